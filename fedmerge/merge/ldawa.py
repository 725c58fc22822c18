"""Layer-wise divergence-aware weight aggregation (L-DAWA)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

LDAWA_NORMALIZE: tuple[str, ...] = ("clients", "weights")
LDAWA_NEGATIVE: tuple[str, ...] = ("keep", "clip", "abs")
LDAWA_BN: tuple[str, ...] = ("weighted", "average")
LDAWA_LAYER: tuple[str, ...] = ("tensor", "module")

_BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


@dataclass(frozen=True)
class LDAWAConfig:
    """Options of :func:`ldawa_aggregate`; the defaults are the paper's.

    Attributes
    ----------
    normalize : {"clients", "weights"} (default: "clients")
        Divide the weighted sum by the number of clients (reference code) or by
        the sum of the layer's weights (a convex combination).
    negative : {"keep", "clip", "abs"} (default: "keep")
        What to do with a negative cosine: keep it (reference: the cosine is
        clipped at 1 but not at 0), clip it to 0, or take its magnitude.
    bn : {"weighted", "average"} (default: "weighted")
        BatchNorm running statistics weighted like any other layer (reference)
        or averaged with the sample-count weights of FedAvg.
    layer : {"tensor", "module"} (default: "tensor")
        Granularity of a "layer": every tensor of the state dict on its own, or
        all tensors of one module (``conv1.weight`` and ``conv1.bias``) sharing
        one cosine, computed on their concatenation.
    sample_weighted : bool (default: False)
        Multiply every client's layer weight by ``n_k / mean(n)`` (the paper
        uses no sample counts).
    """

    normalize: str = "clients"
    negative: str = "keep"
    bn: str = "weighted"
    layer: str = "tensor"
    sample_weighted: bool = False

    def __post_init__(self) -> None:
        for key, allowed in (
            ("normalize", LDAWA_NORMALIZE),
            ("negative", LDAWA_NEGATIVE),
            ("bn", LDAWA_BN),
            ("layer", LDAWA_LAYER),
        ):
            if getattr(self, key) not in allowed:
                raise ValueError(
                    f"strategy.ldawa_{key}: got {getattr(self, key)!r}; "
                    f"allowed: {', '.join(allowed)}"
                )


def _group_of(name: str, layer: str) -> str:
    return name.rsplit(".", 1)[0] if layer == "module" and "." in name else name


def _is_bn_stat(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in _BN_STATS


def ldawa_weights(
    global_state: Mapping[str, torch.Tensor],
    client_states: Sequence[Mapping[str, torch.Tensor]],
    config: LDAWAConfig,
) -> dict[str, torch.Tensor]:
    r"""Per-layer, per-client weights: the cosine between client and global layer.

    .. math::

        w_k^l = \min\left(1, \frac{\langle \theta_k^l, \theta_g^l \rangle}
        {\lVert \theta_k^l \rVert \, \lVert \theta_g^l \rVert}\right)

    Parameters
    ----------
    global_state : mapping of str to Tensor
        Global model of the previous round, :math:`\theta_g`.
    client_states : sequence of mappings of str to Tensor
        The K client models, :math:`\theta_k`, with the same keys and shapes.
    config : LDAWAConfig
        Layer granularity and the treatment of negative cosines.

    Returns
    -------
    dict of str to Tensor, each shape (K,)
        One weight vector per layer group (tensor name, or module prefix).
        A zero-norm layer gets cosine 1 (identical directions by convention).
    """
    groups: dict[str, list[str]] = {}
    for name, tensor in global_state.items():
        if tensor.is_floating_point():
            groups.setdefault(_group_of(name, config.layer), []).append(name)
    out: dict[str, torch.Tensor] = {}
    for group, names in groups.items():
        g = torch.cat([global_state[n].reshape(-1).double() for n in names])
        cos = []
        for state in client_states:
            c = torch.cat([state[n].reshape(-1).double() for n in names])
            denom = c.norm() * g.norm()
            cos.append(torch.dot(c, g) / denom if denom > 0 else g.new_ones(()))
        w = torch.stack(cos).clamp(max=1.0)
        if config.negative == "clip":
            w = w.clamp(min=0.0)
        elif config.negative == "abs":
            w = w.abs()
        out[group] = w
    return out


def ldawa_aggregate(
    global_state: Mapping[str, torch.Tensor],
    client_states: Sequence[Mapping[str, torch.Tensor]],
    num_examples: Sequence[int],
    config: LDAWAConfig | None = None,
) -> dict[str, torch.Tensor]:
    r"""Aggregate client models layer by layer with L-DAWA weights.

    .. math::

        \theta_g^{l, \mathrm{new}} = \frac{1}{Z^l} \sum_{k=1}^K w_k^l \, \theta_k^l,
        \qquad Z^l = K \ \text{(paper)} \ \text{or}\ \sum_k w_k^l

    Parameters
    ----------
    global_state : mapping of str to Tensor
        Global model of the previous round.
    client_states : sequence of mappings of str to Tensor
        Client models after local training (same keys and shapes).
    num_examples : sequence of int
        Local sample counts (used by ``sample_weighted`` and ``bn="average"``).
    config : LDAWAConfig, optional
        Options; the defaults reproduce the paper's reference code.

    Returns
    -------
    dict of str to Tensor
        The new global state, each tensor with the global tensor's dtype and
        device. Integer buffers (``num_batches_tracked``) take the maximum.

    Notes
    -----
    Departures from the paper are options, each off by default: renormalising
    by the sum of weights, clipping or flipping negative cosines, FedAvg for
    BatchNorm statistics, module-level layers, and sample-count weighting.
    With ``normalize="clients"`` the result is not a convex combination: the
    update shrinks towards zero when clients diverge from the global model,
    which is what the reference code does.

    References
    ----------
    .. [1] A. Rehman, et al., "L-DAWA: Layer-wise Divergence Aware Weight
       Aggregation in Federated Self-Supervised Visual Representation
       Learning", ICCV 2023. https://arxiv.org/abs/2307.07393
    """
    config = config or LDAWAConfig()
    if not client_states:
        raise ValueError("client_states: got no client models; allowed: at least one")
    if len(num_examples) != len(client_states):
        raise ValueError(
            f"num_examples: got {len(num_examples)} counts for {len(client_states)} clients"
        )
    weights = ldawa_weights(global_state, client_states, config)
    k = len(client_states)
    n = torch.tensor([float(x) for x in num_examples], dtype=torch.float64)
    share = n / n.sum() if n.sum() > 0 else torch.full((k,), 1.0 / k, dtype=torch.float64)
    out: dict[str, torch.Tensor] = {}
    for name, ref in global_state.items():
        stacked = torch.stack([s[name].double() for s in client_states])
        if not ref.is_floating_point():
            out[name] = stacked.max(0).values.to(ref.dtype)
            continue
        if _is_bn_stat(name) and config.bn == "average":
            w, z = share, torch.tensor(1.0, dtype=torch.float64)
        else:  # the reference weights BatchNorm statistics like any other layer
            w = weights[_group_of(name, config.layer)]
            if config.sample_weighted:
                w = w * n / n.mean()
            z = torch.tensor(float(k), dtype=torch.float64)
            if config.normalize == "weights":
                z = w.sum()
        if z == 0:
            z = torch.tensor(1.0, dtype=torch.float64)
        shape = (-1,) + (1,) * (stacked.dim() - 1)
        out[name] = ((w.reshape(shape) * stacked).sum(0) / z).to(ref.dtype).to(ref.device)
    return out
