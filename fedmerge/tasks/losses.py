"""Self-supervised objectives: SimCLR's NT-Xent and BYOL's normalised regression."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    r"""SimCLR's normalised temperature-scaled cross-entropy over a batch of view pairs.

    With :math:`u` the :math:`2N` L2-normalised projections (first views, then
    second views), :math:`s_{ij} = u_i^\top u_j` and :math:`p(i)` the other
    view of sample :math:`i`:

    .. math::

        \mathcal{L} = \frac{1}{2N} \sum_{i=1}^{2N}
            -\log \frac{\exp(s_{i,p(i)} / \tau)}{\sum_{k \ne i} \exp(s_{ik} / \tau)}

    Parameters
    ----------
    z1, z2 : Tensor, shape (n, d)
        Projections of the first and the second view of the same ``n`` samples.
    temperature : float
        :math:`\tau > 0`.

    Returns
    -------
    Tensor, shape ()
        The mean loss.

    References
    ----------
    .. [1] T. Chen, S. Kornblith, M. Norouzi, G. Hinton, "A Simple Framework for
       Contrastive Learning of Visual Representations", ICML 2020.
       https://arxiv.org/abs/2002.05709
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(
            f"z1, z2: got shapes {tuple(z1.shape)} and {tuple(z2.shape)}; allowed: equal (n, d)"
        )
    n = z1.shape[0]
    u = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = (u @ u.T) / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=u.device), float("-inf"))
    idx = torch.arange(n, device=u.device)
    targets = torch.cat([idx + n, idx])
    return F.cross_entropy(sim, targets)


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    r"""BYOL's regression loss :math:`2 - 2 \cos(p, z)`, averaged over the batch.

    ``z`` (the target's projection) is detached: no gradient reaches the target.

    Parameters
    ----------
    p : Tensor, shape (n, d)
        The online network's predictions.
    z : Tensor, shape (n, d)
        The target network's projections of the other view.

    References
    ----------
    .. [1] J.-B. Grill et al., "Bootstrap Your Own Latent: A New Approach to
       Self-Supervised Learning", NeurIPS 2020. https://arxiv.org/abs/2006.07733
    """
    cos = F.cosine_similarity(p, z.detach(), dim=1)
    return (2 - 2 * cos).mean()
