"""OTFusion: soft alignment of hidden units by optimal transport, and fusion."""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from types import ModuleType

import numpy as np
import torch

from fedmerge.align.activations import ActivationStats
from fedmerge.align.spec import PermutationSpec, StateDict, check_finite
from fedmerge.errors import AlignmentError, ShapeMismatchError

__all__ = [
    "OT_COSTS",
    "OT_INPUT_RULES",
    "OT_MARGINALS",
    "OT_SOLVERS",
    "OTAlignInfo",
    "apply_transport",
    "ot_align",
    "ot_fuse",
    "transport_to_permutation",
]

logger = logging.getLogger(__name__)

#: Solvers of the transport problem.
OT_SOLVERS: tuple[str, ...] = ("emd", "sinkhorn")
#: Ground costs between units.
OT_COSTS: tuple[str, ...] = ("weight", "activation")
#: Masses of the units.
OT_MARGINALS: tuple[str, ...] = ("uniform", "activation")


#: How :func:`apply_transport` maps the axes that read the units (inputs).
OT_INPUT_RULES: tuple[str, ...] = ("sum", "mean")


@dataclass(frozen=True)
class OTAlignInfo:
    r"""What :func:`ot_align` computed.

    Attributes
    ----------
    costs : dict of str to float
        Transport cost :math:`\langle T_p, C_p \rangle` per group.
    order : tuple of str
        Order in which the groups were aligned.
    """

    costs: dict[str, float]
    order: tuple[str, ...]


def _check_pair(spec: PermutationSpec, state_a: StateDict, state_b: StateDict) -> None:
    """Same keys; equal lengths on every axis that no permutation touches."""
    spec.check_covers(state_a)
    spec.check_covers(state_b)
    for key, entries in spec.axes.items():
        sa, sb = state_a[key].shape, state_b[key].shape
        if any(e is None and sa[i] != sb[i] for i, e in enumerate(entries)):
            raise ShapeMismatchError(
                f"parameter {key!r} has shape {tuple(sa)} in the first state dict and "
                f"{tuple(sb)} in the second, and differs on an axis that is not permuted"
            )


def _contract(x: torch.Tensor, axis: int, block: int, mapping: torch.Tensor) -> torch.Tensor:
    """``y[.., j, ..] = sum_i mapping[i, j] x[.., i, ..]`` with ``block`` entries per unit."""
    n_b, n_a = mapping.shape
    moved = torch.movedim(x, axis, 0)
    rest = moved.shape[1:]
    flat = moved.reshape(n_b, -1)
    out = (mapping.to(flat.dtype).T @ flat).reshape(n_a * block, *rest)
    return torch.movedim(out, 0, axis)


def _maps(plan: torch.Tensor, inputs: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Map of a unit's own parameters (axis 0) and map of the axes that read it."""
    tiny = torch.finfo(plan.dtype).tiny
    own = plan / plan.sum(0, keepdim=True).clamp_min(tiny)
    if inputs == "mean":
        return own, own
    return own, plan / plan.sum(1, keepdim=True).clamp_min(tiny)


def apply_transport(
    spec: PermutationSpec,
    plans: Mapping[str, torch.Tensor],
    state: StateDict,
    *,
    inputs: str = "sum",
) -> dict[str, torch.Tensor]:
    r"""Move a state dict onto another model's units with transport plans.

    With plan :math:`T_p` (shape ``(n_b, n_a)``, B's units by A's), axis 0 of
    a tensor (a unit's own parameters: weight rows, bias, norm parameters and
    statistics) becomes the :math:`T`-weighted mean of the units sent to each
    target unit, and an axis that reads the units (the inputs of the next
    layer) splits each unit's column by the fractions it sends:

    .. math::

        W'_{j \dots} = \sum_i \frac{T[i, j]}{\sum_{i'} T[i', j]} W_{i \dots},
        \qquad
        W'_{\dots j} = \sum_i \frac{T[i, j]}{\sum_{j'} T[i, j']} W_{\dots i}.

    With a permutation plan both are :func:`apply_permutation`; when a unit
    of B is duplicated in A (or two of B's copies are merged into one) the
    result computes the same function.

    Parameters
    ----------
    spec : PermutationSpec
        Couplings of the architecture.
    plans : mapping of str to Tensor
        Transport plans :math:`T_p`, shape ``(n_b, n_a)``, per group (as
        returned by :func:`ot_align`; any positive scale).
    state : mapping of str to Tensor
        The state dict of B (``n_b`` units per group).
    inputs : str (default: "sum")
        ``"sum"`` (the second formula) or ``"mean"``: inputs use the first
        formula too, as OTFusion's reference code does (see Notes).

    Returns
    -------
    dict of str to Tensor
        A state dict with ``n_a`` units per group. Integer tensors and
        tensors without permuted axes are shared, not copied.

    Notes
    -----
    OTFusion [1]_ multiplies the next layer's weights by the same
    column-normalised plan, which averages the columns of units merged into
    one and so shrinks their contribution when a wider model is fused into a
    narrower one. Both rules agree for equal widths with uniform marginals.

    References
    ----------
    .. [1] S. P. Singh, M. Jaggi, "Model Fusion via Optimal Transport",
       NeurIPS 2020. https://arxiv.org/abs/1910.05653
    """
    if inputs not in OT_INPUT_RULES:
        raise ValueError(f"inputs: got {inputs!r}; allowed: {', '.join(OT_INPUT_RULES)}")
    sizes = spec.perm_sizes(state)
    for name, n in sizes.items():
        if name not in plans or plans[name].dim() != 2 or plans[name].shape[0] != n:
            got = tuple(plans[name].shape) if name in plans else None
            raise ValueError(
                f"plans[{name!r}]: got shape {got}; allowed: a matrix with {n} rows (units of B)"
            )
    maps = {name: _maps(plans[name], inputs) for name in sizes}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for axis, entry in enumerate(spec.axes[key]):
            if entry is not None and value.is_floating_point():
                mapping = maps[entry.perm][0 if axis == 0 else 1].to(value.device)
                value = _contract(value, axis, entry.block, mapping)
        out[key] = value
    return out


def transport_to_permutation(plan: torch.Tensor, *, atol: float = 1e-6) -> torch.Tensor:
    """Convert a transport plan that is a scaled permutation matrix into indices.

    Parameters
    ----------
    plan : Tensor, shape (n, n)
        A plan :math:`T` with one non-zero entry per column and per row.
    atol : float (default: 1e-6)
        Tolerance on the 0/1 entries of the column-normalised plan.

    Returns
    -------
    LongTensor, shape (n,)
        ``perm`` such that unit ``j`` of the aligned model is unit ``perm[j]``
        of B (``T[perm[j], j] > 0``): the input of :func:`apply_permutation`.

    Raises
    ------
    ValueError
        If the plan is not square or not a (scaled) permutation matrix.
    """
    if plan.dim() != 2 or plan.shape[0] != plan.shape[1]:
        raise ValueError(f"plan: shape {tuple(plan.shape)}; allowed: a square matrix")
    mapping = plan / plan.sum(0, keepdim=True).clamp_min(torch.finfo(plan.dtype).tiny)
    perm = mapping.argmax(dim=0)
    onehot = torch.zeros_like(mapping)
    onehot[perm, torch.arange(mapping.shape[1], device=plan.device)] = 1
    close = torch.allclose(mapping, onehot, atol=atol, rtol=0)
    if not close or torch.unique(perm).numel() != perm.numel():
        raise ValueError("plan: not a permutation matrix (apply a soft plan with apply_transport)")
    return perm


def import_pot() -> ModuleType:
    """POT (``ot``), imported without scikit-learn: only where a plan is solved.

    POT imports scikit-learn, and with it pandas, for k-means initialisations
    and clusterings that fedmerge never asks for (low-rank Sinkhorn, quantised
    Gromov-Wasserstein); where scikit-learn is missing it leaves them out by
    design. It is hidden from POT's import (unless it was imported already)
    and visible again afterwards: about 1 s of CPU less in every process that
    solves a plan, e.g. an OT run's ServerApp.
    """
    if "ot" in sys.modules:
        return sys.modules["ot"]
    hide = "sklearn" not in sys.modules
    if hide:
        sys.modules["sklearn"] = None  # type: ignore[assignment]  # import sklearn: ImportError
    try:
        import ot  # noqa: F401  # registers itself in sys.modules
    finally:
        if hide and sys.modules.get("sklearn", False) is None:
            del sys.modules["sklearn"]
    return sys.modules["ot"]


def _solve(
    cost: np.ndarray, mu: np.ndarray, nu: np.ndarray, solver: str, reg: float, max_iter: int | None
) -> np.ndarray:
    ot = import_pot()
    if solver == "emd":
        return np.asarray(ot.emd(mu, nu, cost, numItermax=max_iter or 1_000_000))
    scale = float(cost.max()) or 1.0  # reg is relative to the largest cost
    return np.asarray(ot.sinkhorn(mu, nu, cost / scale, reg, numItermax=max_iter or 1000))


def _marginal(mass: torch.Tensor | None, n: int) -> np.ndarray:
    if mass is None:
        return np.full(n, 1.0 / n)
    m = mass.detach().double().cpu().numpy() + 1e-8
    return np.asarray(m / m.sum())


def _weight_features(
    spec: PermutationSpec,
    name: str,
    state_a: StateDict,
    state_b: StateDict,
    maps: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    rows_only: bool,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Rows of every tensor coupled to ``name`` whose other axes are already aligned."""
    feats_a, feats_b = [], []
    for ref in spec.perm_to_axes[name]:
        entries = spec.axes[ref.key]
        if rows_only and ref.axis != 0:
            continue
        others = [(i, e) for i, e in enumerate(entries) if e is not None and i != ref.axis]
        if any(e.perm not in maps for _, e in others):
            continue
        wa, wb = state_a[ref.key], state_b[ref.key]
        if not wa.is_floating_point():
            continue
        wa, wb = wa.double(), wb.double()
        for i, e in others:
            wb = _contract(wb, i, e.block, maps[e.perm][0 if i == 0 else 1].to(wb.device))
        n_a, n_b = wa.shape[ref.axis] // ref.block, wb.shape[ref.axis] // ref.block
        feats_a.append(torch.movedim(wa, ref.axis, 0).reshape(n_a, -1))
        feats_b.append(torch.movedim(wb, ref.axis, 0).reshape(n_b, -1))
    if not feats_a or (rows_only and all(f.shape[1] == 1 for f in feats_a)):
        return None  # nothing, or only vectors (bias, norm): too little to tell units apart
    return torch.cat(feats_a, 1), torch.cat(feats_b, 1)


def ot_align(
    spec: PermutationSpec,
    state_a: StateDict,
    state_b: StateDict,
    *,
    solver: str = "emd",
    reg: float = 0.1,
    cost: str = "weight",
    marginals: str = "uniform",
    activations: Mapping[str, ActivationStats] | None = None,
    inputs: str = "sum",
    max_iter: int | None = None,
) -> tuple[dict[str, torch.Tensor], OTAlignInfo]:
    r"""Soft-align B's hidden units to A's by optimal transport (OTFusion).

    For every group :math:`p`, with marginals :math:`\mu` over B's
    :math:`n_b` units and :math:`\nu` over A's :math:`n_a` units and ground
    cost :math:`C_p[i, j]` between unit :math:`i` of B and :math:`j` of A,

    .. math::

        T_p = \operatorname*{arg\,min}_{T \ge 0,\ T 1 = \mu,\ T^\top 1 = \nu}
              \langle T, C_p \rangle - \lambda H(T)

    with :math:`\lambda = 0` (exact EMD, ``ot.emd``) or :math:`\lambda` =
    ``reg`` (Sinkhorn, ``ot.sinkhorn``). :func:`apply_transport` moves B onto
    A's units with the plans.

    Weight cost (OTFusion's default): groups are aligned in forward order;
    :math:`C_p` is the Euclidean distance between the rows (incoming weights,
    bias, norm parameters) of the tensors that produce :math:`p`, after their
    input axes were moved onto A's units with the plans found so far.
    Activation cost: :math:`C_p[i, j] = \sqrt{\mathbb{E}[(b_i - a_j)^2]}`
    over the activations of :func:`collect_activation_stats`.

    Parameters
    ----------
    spec : PermutationSpec
        Couplings of the architecture (the same for both widths).
    state_a : mapping of str to Tensor
        The target model (its widths are the fused model's).
    state_b : mapping of str to Tensor
        The model to align; same architecture, widths may differ.
    solver : str (default: "emd")
        ``"emd"`` (exact) or ``"sinkhorn"`` (entropic, soft plans).
    reg : float (default: 0.1)
        Entropic regularisation of Sinkhorn, relative to the largest cost.
    cost : str (default: "weight")
        ``"weight"`` or ``"activation"`` ground cost.
    marginals : str (default: "uniform")
        ``"uniform"`` or ``"activation"`` (mass proportional to a unit's mean
        absolute activation, plus 1e-8).
    activations : mapping of str to ActivationStats, optional
        From :func:`collect_activation_stats` (model A first); needed by the
        activation cost or marginals.
    inputs : str (default: "sum")
        How input axes are moved while computing weight costs, as in
        :func:`apply_transport`.
    max_iter : int, optional
        Iteration limit of the solver (POT warns when it is reached); by
        default 1,000,000 network-simplex iterations for EMD and 1,000
        Sinkhorn iterations.

    Returns
    -------
    plans : dict of str to Tensor
        :math:`T_p`, shape ``(n_b, n_a)``, entries summing to 1, float64 on
        A's device. With ``"emd"``, uniform marginals and equal widths each is
        a permutation matrix divided by ``n`` (:func:`transport_to_permutation`).
    info : OTAlignInfo
        Transport costs and the order of alignment.

    Raises
    ------
    ValueError
        If an option is unknown, or activation statistics are missing.
    ShapeMismatchError, SpecCoverageError, NonFiniteWeightsError
        If the state dicts do not fit the spec or each other, or hold NaN/inf.

    Notes
    -----
    OTFusion [1]_ aligns layer by layer. For a residual stream, shared by
    several producers, the weight cost uses the producers whose inputs are
    already aligned when the stream is reached in forward order (the stem or
    shortcut convolution and the first block); a group with no such producer
    falls back to its consumers' columns. Sinkhorn's cost is divided by its
    maximum so that ``reg`` does not depend on the weights' scale.

    References
    ----------
    .. [1] S. P. Singh, M. Jaggi, "Model Fusion via Optimal Transport",
       NeurIPS 2020. https://arxiv.org/abs/1910.05653
    """
    if solver not in OT_SOLVERS:
        raise ValueError(f"solver: got {solver!r}; allowed: {', '.join(OT_SOLVERS)}")
    if cost not in OT_COSTS:
        raise ValueError(f"cost: got {cost!r}; allowed: {', '.join(OT_COSTS)}")
    if marginals not in OT_MARGINALS:
        raise ValueError(f"marginals: got {marginals!r}; allowed: {', '.join(OT_MARGINALS)}")
    if inputs not in OT_INPUT_RULES:
        raise ValueError(f"inputs: got {inputs!r}; allowed: {', '.join(OT_INPUT_RULES)}")
    if solver == "sinkhorn" and not reg > 0:
        raise ValueError(f"reg: got {reg!r}; allowed: a float > 0 for solver 'sinkhorn'")
    if (cost == "activation" or marginals == "activation") and activations is None:
        raise ValueError(
            f"activations: got None with cost={cost!r}, marginals={marginals!r}; allowed: the "
            "result of collect_activation_stats(spec, model_a, model_b, batches)"
        )
    _check_pair(spec, state_a, state_b)
    sizes_a, sizes_b = spec.perm_sizes(state_a), spec.perm_sizes(state_b)
    check_finite(state_a, name="state_a")
    check_finite(state_b, name="state_b")
    device = next(iter(state_a.values())).device
    maps: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    plans: dict[str, torch.Tensor] = {}
    costs: dict[str, float] = {}
    pending = list(spec.perms)
    while pending:
        name, ground = _next_group(spec, pending, state_a, state_b, maps, cost, activations)
        pending.remove(name)
        n_a, n_b = sizes_a[name], sizes_b[name]
        if ground.shape != (n_b, n_a):
            raise ShapeMismatchError(
                f"permutation {name!r}: cost matrix {tuple(ground.shape)}, expected ({n_b}, {n_a})"
            )
        mass_a = mass_b = None
        if marginals == "activation" and activations is not None:
            mass_a, mass_b = activations[name].mean_abs()
        c = ground.detach().to("cpu", torch.float64).numpy()
        plan = _solve(c, _marginal(mass_b, n_b), _marginal(mass_a, n_a), solver, reg, max_iter)
        costs[name] = float((plan * c).sum())
        plans[name] = torch.as_tensor(plan, dtype=torch.float64).to(device)
        maps[name] = _maps(plans[name], inputs)
    logger.debug("OT alignment costs: %s", costs)
    return plans, OTAlignInfo(costs, tuple(plans))


def _next_group(
    spec: PermutationSpec,
    pending: list[str],
    state_a: StateDict,
    state_b: StateDict,
    maps: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    cost: str,
    activations: Mapping[str, ActivationStats] | None,
) -> tuple[str, torch.Tensor]:
    """The next group to align and its ground cost, shape ``(n_b, n_a)``."""
    if cost == "activation" and activations is not None:
        name = pending[0]
        if name not in activations:
            raise ValueError(f"activations: no statistics for permutation {name!r}")
        return name, activations[name].sq_distance().T.sqrt()
    for rows_only in (True, False):
        for name in pending:
            feats = _weight_features(spec, name, state_a, state_b, maps, rows_only)
            if feats is not None:
                fa, fb = feats
                return name, torch.cdist(fb, fa)
    raise AlignmentError(
        f"permutations {pending} cannot be aligned by weights: every tensor they act on also "
        "acts on another unaligned permutation; use cost='activation'"
    )


def ot_fuse(
    spec: PermutationSpec,
    state_a: StateDict,
    state_b: StateDict,
    *,
    weight_a: float = 0.5,
    solver: str = "emd",
    reg: float = 0.1,
    cost: str = "weight",
    marginals: str = "uniform",
    activations: Mapping[str, ActivationStats] | None = None,
    inputs: str = "sum",
) -> dict[str, torch.Tensor]:
    r"""Fuse B into A's architecture: align with :func:`ot_align`, then average.

    .. math::

        W^F = w_A \, W^A + (1 - w_A) \, T(W^B)

    where :math:`T(W^B)` is B moved onto A's units by :func:`apply_transport`.
    The fused model has A's widths, so a wide and a narrow model can be fused
    into either width: pass the model of the target width as A.

    Parameters
    ----------
    spec : PermutationSpec
        Couplings of the architecture.
    state_a : mapping of str to Tensor
        The target model.
    state_b : mapping of str to Tensor
        The other model; same architecture, widths may differ.
    weight_a : float (default: 0.5)
        Weight of A in ``[0, 1]``; B gets ``1 - weight_a``.
    solver, reg, cost, marginals, activations, inputs
        As in :func:`ot_align` and :func:`apply_transport`.

    Returns
    -------
    dict of str to Tensor
        The fused state dict, shaped like ``state_a``. Integer buffers
        (``num_batches_tracked``) are A's. Norm statistics are averaged like
        weights; re-estimate them (:func:`fedmerge.merge.reset_bn_stats`).
    """
    if not 0.0 <= weight_a <= 1.0:
        raise ValueError(f"weight_a: got {weight_a!r}; allowed: a float in [0, 1]")
    plans, _ = ot_align(
        spec,
        state_a,
        state_b,
        solver=solver,
        reg=reg,
        cost=cost,
        marginals=marginals,
        activations=activations,
        inputs=inputs,
    )
    aligned = apply_transport(spec, plans, state_b, inputs=inputs)
    # imported here: fedmerge.merge imports fedmerge.align (a module-level import is a cycle)
    from fedmerge.merge.average import weighted_average

    return weighted_average(
        [state_a, aligned],
        [weight_a, 1.0 - weight_a],
        integers="first",
        accumulate="native",  # in the tensors' dtype, as recorded runs were computed
        normalise=False,
        check=False,
    )
