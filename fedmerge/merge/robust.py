r"""Robust aggregation of client models: norm clipping, coordinate-wise median, trimmed mean, Krum.

Pure functions on state dicts. Each aggregator takes the client models
(``K`` state dicts with equal keys and shapes) and returns one state dict;
clipping and Krum's distances also need the reference model the clients
started from (the global model), since they look at updates
:math:`\Delta_k = W_k - W_g`.

Floating tensors are combined in float64 and rounded once to their own
dtype; integer tensors (BatchNorm's ``num_batches_tracked``) by the same rule,
rounded to the nearest integer; boolean tensors are taken from the first
state.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from fedmerge.align.spec import check_same_shapes

__all__ = [
    "ROBUST_AGGREGATORS",
    "RobustConfig",
    "clip_updates",
    "coordinate_median",
    "krum",
    "krum_scores",
    "krum_select",
    "median_of",
    "multi_krum",
    "trimmed_mean",
    "update_norms",
]

StateDict = dict[str, torch.Tensor]

#: Values of :attr:`RobustConfig.robust`.
ROBUST_AGGREGATORS: tuple[str, ...] = ("none", "median", "trimmed-mean", "krum", "multi-krum")


@dataclass(frozen=True)
class RobustConfig:
    r"""How a server combines client models that may come from bad clients.

    Attributes
    ----------
    robust : {"none", "median", "trimmed-mean", "krum", "multi-krum"} (default: "none")
        The aggregator: the strategy's own mean (``"none"``),
        :func:`coordinate_median`, :func:`trimmed_mean`, or the strategy's
        own mean over the clients that :func:`krum_select` keeps (one for
        ``"krum"``, ``krum_m`` for ``"multi-krum"``).
    clip_norm : float (default: 0.0)
        Clip every update :math:`W_k - W_g` to this Euclidean norm before
        aggregating (:func:`clip_updates`); 0 turns clipping off; >= 0.
    clip_to_median : bool (default: False)
        Clip every update to the median update norm of the round instead of
        a fixed ``clip_norm`` (not both).
    trim_fraction : float (default: 0.1)
        :math:`\beta` of the trimmed mean: the fraction of values dropped at
        each end of every coordinate; in [0, 0.5).
    krum_f : int (default: 1)
        :math:`f`, the number of Byzantine clients Krum tolerates; >= 0.
    krum_m : int (default: 0)
        :math:`m`, the clients Multi-Krum keeps; 0 means :math:`K - f`; >= 0.
    """

    robust: str = "none"
    clip_norm: float = 0.0
    clip_to_median: bool = False
    trim_fraction: float = 0.1
    krum_f: int = 1
    krum_m: int = 0

    def __post_init__(self) -> None:
        if self.robust not in ROBUST_AGGREGATORS:
            raise ValueError(
                f"robust: got {self.robust!r}; allowed: {', '.join(ROBUST_AGGREGATORS)}"
            )
        if not (math.isfinite(self.clip_norm) and self.clip_norm >= 0):
            raise ValueError(f"clip_norm: got {self.clip_norm!r}; allowed: a number >= 0 (0: off)")
        if self.clip_to_median and self.clip_norm > 0:
            raise ValueError(
                f"clip_norm: got {self.clip_norm!r} with clip_to_median = true; "
                "allowed: 0 when clipping to the median norm"
            )
        if not 0 <= self.trim_fraction < 0.5:
            raise ValueError(
                f"trim_fraction: got {self.trim_fraction!r}; allowed: a number in [0, 0.5)"
            )
        if self.krum_f < 0:
            raise ValueError(f"krum_f: got {self.krum_f!r}; allowed: an integer >= 0")
        if self.krum_m < 0:
            raise ValueError(f"krum_m: got {self.krum_m!r}; allowed: an integer >= 0 (0: K - f)")

    @property
    def clips(self) -> bool:
        """Whether updates are clipped (to ``clip_norm`` or to the median norm)."""
        return self.clip_norm > 0 or self.clip_to_median

    @property
    def is_plain(self) -> bool:
        """No clipping and no robust aggregator: the strategy's own merge, unchanged."""
        return self.robust == "none" and not self.clips


def _check(states: Sequence[Mapping[str, torch.Tensor]]) -> None:
    if not states:
        raise ValueError("states: got an empty sequence; allowed: at least one state dict")
    for state in states[1:]:
        check_same_shapes(states[0], state)


def _flat_updates(
    states: Sequence[Mapping[str, torch.Tensor]], reference: Mapping[str, torch.Tensor] | None
) -> torch.Tensor:
    """Floating tensors of every state minus the reference, flattened: shape (K, P), float64."""
    names = [n for n, t in states[0].items() if t.is_floating_point()]
    rows = []
    for state in states:
        parts = [
            (state[n].double() - (reference[n].double() if reference is not None else 0.0))
            .reshape(-1)
            .cpu()
            for n in names
        ]
        rows.append(torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64))
    return torch.stack(rows)


def update_norms(
    reference: Mapping[str, torch.Tensor], states: Sequence[Mapping[str, torch.Tensor]]
) -> list[float]:
    r"""Euclidean norm of every client's update over all floating tensors.

    .. math::

        \lVert \Delta_k \rVert_2 = \Bigl(\sum_{t} \sum_i (W_{k,t,i} - W_{g,t,i})^2\Bigr)^{1/2}

    Parameters
    ----------
    reference : mapping of str to Tensor
        The model the clients started from, :math:`W_g`.
    states : sequence of mapping of str to Tensor
        The ``K`` client models (same keys and shapes as ``reference``).

    Returns
    -------
    list of float, length K
        The norms, computed in float64.
    """
    _check([reference, *states])
    return [float(v) for v in _flat_updates(states, reference).norm(dim=1)]


def median_of(values: Sequence[float]) -> float:
    """The median of ``values``: the middle value, or the mean of the two middle values."""
    if not values:
        raise ValueError("values: got an empty sequence; allowed: at least one value")
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def clip_updates(
    reference: Mapping[str, torch.Tensor],
    states: Sequence[Mapping[str, torch.Tensor]],
    max_norm: float,
) -> list[StateDict]:
    r"""Clip every client's update to Euclidean norm ``max_norm``.

    .. math::

        W_k' = W_g + \Delta_k \min\Bigl(1, \frac{C}{\lVert \Delta_k \rVert_2}\Bigr)

    Parameters
    ----------
    reference : mapping of str to Tensor
        :math:`W_g`, the model the clients started from.
    states : sequence of mapping of str to Tensor
        The ``K`` client models.
    max_norm : float
        :math:`C`; >= 0.

    Returns
    -------
    list of dict of str to Tensor
        The clipped models. A model whose update is within the norm is
        returned unchanged (the same tensors); integer and boolean tensors are
        never changed.
    """
    if not (math.isfinite(max_norm) and max_norm >= 0):
        raise ValueError(f"max_norm: got {max_norm!r}; allowed: a number >= 0")
    norms = update_norms(reference, states)
    out: list[StateDict] = []
    for state, norm in zip(states, norms, strict=True):
        if norm <= max_norm:
            out.append(dict(state))
            continue
        scale = max_norm / norm
        clipped: StateDict = {}
        for k, v in state.items():
            if v.is_floating_point():
                g = reference[k].double()
                v = (g + (v.double() - g) * scale).to(v.dtype)
            clipped[k] = v
        out.append(clipped)
    return out


def _coordinatewise(
    states: Sequence[Mapping[str, torch.Tensor]], reduce: Callable[[torch.Tensor], torch.Tensor]
) -> StateDict:
    """Apply ``reduce`` (float64 tensor of shape (K, ...) -> (...)) to every tensor."""
    _check(states)
    out: StateDict = {}
    for key, ref in states[0].items():
        if ref.dtype == torch.bool:
            out[key] = ref.clone()
            continue
        stacked = torch.stack([s[key].to(ref.device) for s in states])
        if ref.is_complex():
            raise TypeError(f"{key}: got a complex tensor; allowed: real tensors")
        value = reduce(stacked.double())
        out[key] = value.to(ref.dtype) if ref.is_floating_point() else value.round().to(ref.dtype)
    return out


def _sorted_median(x: torch.Tensor) -> torch.Tensor:
    s = torch.sort(x, dim=0).values
    n = s.shape[0]
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def coordinate_median(states: Sequence[Mapping[str, torch.Tensor]]) -> StateDict:
    r"""Coordinate-wise median of the client models.

    .. math::

        \bar W_i = \operatorname{median}_{k=1..K} W_{k,i}

    With an even ``K`` the median of a coordinate is the mean of its two
    middle values.

    Parameters
    ----------
    states : sequence of mapping of str to Tensor
        The ``K`` client models, with equal keys and shapes.

    Returns
    -------
    dict of str to Tensor
        The median model, each tensor in the dtype and on the device of the
        first state's tensor.

    References
    ----------
    .. [1] D. Yin, Y. Chen, K. Ramchandran, P. Bartlett, "Byzantine-Robust
       Distributed Learning: Towards Optimal Statistical Rates", ICML 2018.
       https://arxiv.org/abs/1803.01498
    """
    return _coordinatewise(states, _sorted_median)


def trimmed_mean(states: Sequence[Mapping[str, torch.Tensor]], beta: float) -> StateDict:
    r"""Coordinate-wise :math:`\beta`-trimmed mean of the client models.

    For every coordinate the ``b = floor(beta K)`` smallest and ``b`` largest
    values are dropped and the remaining ``K - 2b`` are averaged:

    .. math::

        \bar W_i = \frac{1}{K - 2b} \sum_{j=b+1}^{K-b} W_{(j),i},
        \qquad b = \lfloor \beta K \rfloor

    where :math:`W_{(1),i} \le \dots \le W_{(K),i}` are the sorted values.

    Parameters
    ----------
    states : sequence of mapping of str to Tensor
        The ``K`` client models, with equal keys and shapes.
    beta : float
        Fraction trimmed at each end; in [0, 0.5). ``beta = 0`` is the plain mean.

    Returns
    -------
    dict of str to Tensor
        The trimmed mean, each tensor in the first state's dtype and device.

    References
    ----------
    .. [1] D. Yin, Y. Chen, K. Ramchandran, P. Bartlett, "Byzantine-Robust
       Distributed Learning: Towards Optimal Statistical Rates", ICML 2018.
       https://arxiv.org/abs/1803.01498
    """
    if not 0 <= beta < 0.5:
        raise ValueError(f"trim_fraction: got {beta!r}; allowed: a number in [0, 0.5)")
    b = math.floor(beta * len(states))

    def reduce(x: torch.Tensor) -> torch.Tensor:
        s = torch.sort(x, dim=0).values
        return s[b : s.shape[0] - b].mean(0)

    return _coordinatewise(states, reduce)


def krum_scores(states: Sequence[Mapping[str, torch.Tensor]], f: int) -> list[float]:
    r"""Krum's score of every client model (lower is more central).

    .. math::

        s(k) = \sum_{j \in N_k} \lVert W_k - W_j \rVert_2^2

    where :math:`N_k` holds the :math:`K - f - 2` models closest to
    :math:`W_k` (other than itself), over all floating tensors.

    Parameters
    ----------
    states : sequence of mapping of str to Tensor
        The ``K`` client models.
    f : int
        The number of Byzantine clients tolerated; >= 0.

    Returns
    -------
    list of float, length K
        The scores, computed in float64.

    Notes
    -----
    Krum needs :math:`K > 2f + 2`. With fewer models (clients failed or were
    refused) each score sums the :math:`\max(1, K - f - 2)` nearest
    neighbours, so the most central model still wins; a single model scores 0.

    References
    ----------
    .. [1] P. Blanchard, E. M. El Mhamdi, R. Guerraoui, J. Stainer, "Machine
       Learning with Adversaries: Byzantine Tolerant Gradient Descent",
       NeurIPS 2017. https://arxiv.org/abs/1703.02757
    """
    if f < 0:
        raise ValueError(f"krum_f: got {f!r}; allowed: an integer >= 0")
    _check(states)
    k = len(states)
    if k == 1:
        return [0.0]
    x = _flat_updates(states, None)
    d = torch.cdist(x, x).pow(2)  # (K, K) squared distances
    neighbours = max(1, k - f - 2)
    scores = []
    for i in range(k):
        others = torch.cat([d[i, :i], d[i, i + 1 :]])
        scores.append(float(torch.sort(others).values[:neighbours].sum()))
    return scores


def krum_select(states: Sequence[Mapping[str, torch.Tensor]], f: int, m: int = 1) -> list[int]:
    """Indices of the ``m`` client models with the lowest Krum scores, best first.

    Ties go to the lower index. ``m`` is capped at ``K``; ``m = 1`` is Krum,
    ``m > 1`` Multi-Krum's selection (see :func:`krum_scores` for the score).
    """
    if m < 1:
        raise ValueError(f"krum_m: got {m!r}; allowed: an integer >= 1")
    scores = krum_scores(states, f)
    order = sorted(range(len(scores)), key=lambda i: (scores[i], i))
    return order[: min(m, len(order))]


def krum(states: Sequence[Mapping[str, torch.Tensor]], f: int) -> StateDict:
    """Krum: the client model with the lowest score (a copy); see :func:`krum_scores`."""
    best = krum_select(states, f, 1)[0]
    return {k: v.clone() for k, v in states[best].items()}


def multi_krum(
    states: Sequence[Mapping[str, torch.Tensor]],
    f: int,
    m: int,
    weights: Sequence[float] | None = None,
) -> StateDict:
    r"""Multi-Krum: the mean of the ``m`` client models with the lowest Krum scores.

    .. math::

        \bar W = \frac{\sum_{k \in S} a_k W_k}{\sum_{k \in S} a_k},
        \qquad S = \text{the } m \text{ lowest } s(k)

    with :math:`a_k = 1` (the paper) unless ``weights`` are given.

    Parameters
    ----------
    states : sequence of mapping of str to Tensor
        The ``K`` client models.
    f : int
        Byzantine clients tolerated; >= 0.
    m : int
        Models kept; >= 1 (capped at ``K``).
    weights : sequence of float, optional
        Non-negative weights of the ``K`` models (sample counts); the kept
        models' weights are normalised.

    Returns
    -------
    dict of str to Tensor
        The mean of the kept models (see :func:`trimmed_mean` for dtypes).
    """
    if weights is not None and len(weights) != len(states):
        raise ValueError(f"weights: got {len(weights)} weights for {len(states)} state dicts")
    chosen = sorted(krum_select(states, f, m))
    a = [1.0 if weights is None else float(weights[i]) for i in chosen]
    if not all(math.isfinite(x) and x >= 0 for x in a) or sum(a) <= 0:
        raise ValueError(f"weights: got {a}; allowed: finite numbers >= 0 with a positive sum")
    total = sum(a)
    kept = [states[i] for i in chosen]

    def reduce(x: torch.Tensor) -> torch.Tensor:
        w = torch.tensor(a, dtype=torch.float64, device=x.device) / total
        return (w.reshape(-1, *([1] * (x.dim() - 1))) * x).sum(0)

    return _coordinatewise(kept, reduce)
