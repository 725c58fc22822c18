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
                    f"{key}: got {getattr(self, key)!r}; allowed: {', '.join(allowed)}"
                )


def _group_of(name: str, layer: str) -> str:
    return name.rsplit(".", 1)[0] if layer == "module" and "." in name else name


def _is_bn_stat(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in _BN_STATS


class _Flat:
    """Floating tensors of K clients and the global model as flat matrices."""

    def __init__(
        self,
        global_state: Mapping[str, torch.Tensor],
        client_states: Sequence[Mapping[str, torch.Tensor]],
        layer: str,
    ) -> None:
        self.names = [n for n, t in global_state.items() if t.is_floating_point()]
        self.sizes = [global_state[n].numel() for n in self.names]
        groups: dict[str, int] = {}
        self.tensor_group = [
            groups.setdefault(_group_of(n, layer), len(groups)) for n in self.names
        ]
        self.groups = list(groups)
        ref = global_state[self.names[0]]
        self.g = torch.cat([global_state[n].reshape(-1).float() for n in self.names])
        self.c = torch.stack(
            [torch.cat([s[n].reshape(-1).float() for n in self.names]) for s in client_states]
        )
        self.element_group = torch.repeat_interleave(
            torch.tensor(self.tensor_group, device=ref.device),
            torch.tensor(self.sizes, device=ref.device),
        )

    def group_sums(self, values: torch.Tensor) -> torch.Tensor:
        """Sum the last axis of ``values`` (..., P) within each group -> (..., G)."""
        out = values.new_zeros((*values.shape[:-1], len(self.groups)))
        return out.index_add_(values.dim() - 1, self.element_group, values)


def _cosines(flat: _Flat, config: LDAWAConfig) -> torch.Tensor:
    """Clipped cosines, shape (K, G)."""
    dots = flat.group_sums(flat.c * flat.g)
    c_norm = flat.group_sums(flat.c * flat.c).sqrt()
    g_norm = flat.group_sums(flat.g * flat.g).sqrt()
    denom = c_norm * g_norm
    cos = torch.where(denom > 0, dots / denom.clamp_min(1e-30), torch.ones_like(dots))
    w = cos.clamp(max=1.0)
    if config.negative == "clip":
        w = w.clamp(min=0.0)
    elif config.negative == "abs":
        w = w.abs()
    return w


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
    flat = _Flat(global_state, client_states, config.layer)
    w = _cosines(flat, config)
    return {group: w[:, i] for i, group in enumerate(flat.groups)}


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
    flat, coef = _coefficients(global_state, client_states, num_examples, config)
    element_coef = torch.repeat_interleave(
        coef, torch.tensor(flat.sizes, device=coef.device), dim=1
    )
    merged = (element_coef * flat.c).sum(0)
    out: dict[str, torch.Tensor] = {}
    for name, chunk in zip(flat.names, torch.split(merged, flat.sizes), strict=True):
        ref = global_state[name]
        out[name] = chunk.reshape(ref.shape).to(ref.dtype)
    for name, ref in global_state.items():
        if not ref.is_floating_point():
            out[name] = torch.stack([s[name] for s in client_states]).max(0).values.to(ref.dtype)
    return {name: out[name] for name in global_state}


def ldawa_terms(
    global_state: Mapping[str, torch.Tensor],
    client_states: Sequence[Mapping[str, torch.Tensor]],
    num_examples: Sequence[int],
    config: LDAWAConfig | None = None,
) -> list[dict[str, torch.Tensor]]:
    r"""The per-client terms whose plain mean is :func:`ldawa_aggregate`'s result.

    .. math::

        T_k^l = K \frac{w_k^l}{Z^l} \theta_k^l, \qquad
        \theta_g^{l, \mathrm{new}} = \frac{1}{K} \sum_{k=1}^K T_k^l

    A robust aggregator (coordinate-wise median, trimmed mean) applied to
    these terms instead of their mean is a robust L-DAWA. Integer buffers
    (``num_batches_tracked``) are each client's own value.

    Parameters
    ----------
    global_state, client_states, num_examples, config
        As in :func:`ldawa_aggregate`.

    Returns
    -------
    list of dict of str to Tensor
        One state dict per client, in the global tensors' dtypes.
    """
    flat, coef = _coefficients(global_state, client_states, num_examples, config)
    k = len(client_states)
    sizes = torch.tensor(flat.sizes, device=coef.device)
    terms = []
    for i, state in enumerate(client_states):
        row = torch.repeat_interleave(coef[i], sizes) * k * flat.c[i]
        term = {
            name: chunk.reshape(global_state[name].shape).to(global_state[name].dtype)
            for name, chunk in zip(flat.names, torch.split(row, flat.sizes), strict=True)
        }
        for name, ref in global_state.items():
            if not ref.is_floating_point():
                term[name] = state[name].to(ref.dtype)
        terms.append({name: term[name] for name in global_state})
    return terms


def _coefficients(
    global_state: Mapping[str, torch.Tensor],
    client_states: Sequence[Mapping[str, torch.Tensor]],
    num_examples: Sequence[int],
    config: LDAWAConfig | None,
) -> tuple[_Flat, torch.Tensor]:
    """The flattened models and every client's coefficient per tensor, shape (K, T)."""
    config = config or LDAWAConfig()
    if not client_states:
        raise ValueError("client_states: got no client models; allowed: at least one")
    if len(num_examples) != len(client_states):
        raise ValueError(
            f"num_examples: got {len(num_examples)} counts for {len(client_states)} clients"
        )
    flat = _Flat(global_state, client_states, config.layer)
    k = len(client_states)
    w = _cosines(flat, config)  # (K, G)
    n = torch.tensor([float(x) for x in num_examples], device=flat.g.device)
    share = n / n.sum() if n.sum() > 0 else torch.full_like(n, 1.0 / k)
    tensor_w = w[:, flat.tensor_group]  # (K, T)
    if config.sample_weighted:
        tensor_w = tensor_w * (n / n.mean())[:, None]
    z = tensor_w.sum(0) if config.normalize == "weights" else torch.full_like(tensor_w[0], k)
    z = torch.where(z == 0, torch.ones_like(z), z)
    coef = tensor_w / z
    if config.bn == "average":  # FedAvg for BatchNorm statistics
        for t, name in enumerate(flat.names):
            if _is_bn_stat(name):
                coef[:, t] = share
    return flat, coef
