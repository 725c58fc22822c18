"""Statistics of paired hidden activations of two models, per permutation group."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from fedmerge.align.spec import PermutationSpec
from fedmerge.errors import AlignmentError, ShapeMismatchError

__all__ = ["ActivationStats", "collect_activation_stats", "first_tensor"]

logger = logging.getLogger(__name__)


class _Site(NamedTuple):
    """Where a permutation's units are observed: the input (or output) of a module."""

    module: str
    use_input: bool
    block: int


class _SiteStats:
    """Running sums (float64) over samples of one site; ``a``: units of A, ``b``: of B."""

    def __init__(self, n_a: int, n_b: int, device: torch.device) -> None:
        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.float64, device=device)

        self.count = 0
        self.sum_a, self.sumsq_a, self.abs_a = zeros(n_a), zeros(n_a), zeros(n_a)
        self.sum_b, self.sumsq_b, self.abs_b = zeros(n_b), zeros(n_b), zeros(n_b)
        self.cross = zeros(n_a, n_b)

    def update(self, fa: torch.Tensor, fb: torch.Tensor) -> None:
        """Add the samples ``fa`` (shape ``(rows, n_a)``) and ``fb`` (``(rows, n_b)``)."""
        ones = fa.new_ones(fa.shape[0])  # column sums as products: faster than sum(0)
        self.sum_a += ones @ fa
        self.sum_b += ones @ fb
        self.sumsq_a += ones @ (fa * fa)
        self.sumsq_b += ones @ (fb * fb)
        self.abs_a += ones @ fa.abs()
        self.abs_b += ones @ fb.abs()
        self.cross += fa.T @ fb
        self.count += fa.shape[0]


@dataclass
class ActivationStats:
    r"""Paired activation statistics of one permutation group.

    Each *site* is a place where the group's units are visible in both models
    (the input of a layer that consumes them); ``sites`` holds running sums
    over all samples (batch entries times spatial positions) of each site.
    The matrices below have shape ``(n_a, n_b)`` and average over sites.
    """

    sites: list[_SiteStats] = field(default_factory=list)

    @property
    def num_samples(self) -> int:
        """Samples seen per site (batch entries times spatial positions)."""
        return self.sites[0].count if self.sites else 0

    def _mean(self, fn: Any) -> torch.Tensor:
        return torch.stack([fn(s) for s in self.sites]).mean(0)

    def cross_moment(self) -> torch.Tensor:
        r""":math:`\mathbb{E}[a_i b_j]`, shape ``(n_a, n_b)``."""
        return self._mean(lambda s: s.cross / s.count)

    def correlation(self, eps: float = 1e-8) -> torch.Tensor:
        r"""Pearson correlation, shape ``(n_a, n_b)``.

        :math:`\operatorname{cov}(a_i, b_j) / (\sigma_{a_i} \sigma_{b_j} + \epsilon)`;
        units that never vary (dead ReLUs) get correlation 0.
        """

        def corr(s: _SiteStats) -> torch.Tensor:
            mean_a, mean_b = s.sum_a / s.count, s.sum_b / s.count
            cov = s.cross / s.count - torch.outer(mean_a, mean_b)
            std_a = (s.sumsq_a / s.count - mean_a**2).clamp_min(0).sqrt()
            std_b = (s.sumsq_b / s.count - mean_b**2).clamp_min(0).sqrt()
            return cov / (torch.outer(std_a, std_b) + eps)

        return self._mean(corr)

    def sq_distance(self) -> torch.Tensor:
        r""":math:`\mathbb{E}[(a_i - b_j)^2]`, shape ``(n_a, n_b)``."""

        def dist(s: _SiteStats) -> torch.Tensor:
            sq = s.sumsq_a[:, None] + s.sumsq_b[None, :] - 2 * s.cross
            return (sq / s.count).clamp_min(0)

        return self._mean(dist)

    def mean_abs(self) -> tuple[torch.Tensor, torch.Tensor]:
        r""":math:`\mathbb{E}|a_i|` (shape ``(n_a,)``) and :math:`\mathbb{E}|b_j|` (``(n_b,)``)."""
        return self._mean(lambda s: s.abs_a / s.count), self._mean(lambda s: s.abs_b / s.count)


def first_tensor(batch: Any) -> torch.Tensor:
    """Return the inputs of a batch: the batch itself, or the first item of a tuple/list/dict."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, dict) and batch:
        value = next(iter(batch.values()))
        if isinstance(value, torch.Tensor):
            return value
    raise ValueError(
        f"batches: got an item of type {type(batch).__name__}; allowed: a Tensor of inputs or "
        "a tuple (inputs, targets, ...)"
    )


def _is_observable(module: nn.Module) -> bool:
    conv = nn.modules.conv._ConvNd
    transposed = nn.modules.conv._ConvTransposeNd
    return isinstance(module, nn.Linear) or (
        isinstance(module, conv) and not isinstance(module, transposed)
    )


def _find_sites(spec: PermutationSpec, model: nn.Module) -> dict[str, list[_Site]]:
    """Inputs of the layers that consume each permutation (else outputs of its producers)."""
    modules = dict(model.named_modules())
    sites: dict[str, list[_Site]] = {}
    for name, refs in spec.perm_to_axes.items():
        found: list[_Site] = []
        for use_input, axis in ((True, 1), (False, 0)):
            for ref in refs:
                path, _, leaf = ref.key.rpartition(".")
                module = modules.get(path)
                if leaf == "weight" and ref.axis == axis and module is not None:
                    if _is_observable(module):
                        found.append(_Site(path, use_input, ref.block))
            if found:
                break
        if not found:
            raise AlignmentError(
                f"permutation {name!r}: no linear or convolution layer reads or writes its units, "
                "so its activations cannot be observed"
            )
        sites[name] = found
    return sites


def _features(module: nn.Module, x: torch.Tensor, block: int) -> torch.Tensor:
    """Rows = samples (batch entries x positions), columns = units."""
    if isinstance(module, nn.Linear):
        n = x.shape[-1] // block
        return x.reshape(-1, n, block).transpose(1, 2).reshape(-1, n)
    channel = x.dim() - len(module.kernel_size) - 1  # type: ignore[arg-type]
    return torch.movedim(x, channel, -1).reshape(-1, x.shape[channel])


def collect_activation_stats(
    spec: PermutationSpec,
    model_a: nn.Module,
    model_b: nn.Module,
    batches: Iterable[Any],
) -> dict[str, ActivationStats]:
    """Run both models on the same batches and accumulate paired unit statistics.

    A permutation group is observed at the inputs of the linear and
    convolution layers that consume it (for a hidden layer: its
    post-activation, post-pooling features; for a residual stream: the output
    of every block of the stage). Sites that receive the very same tensor
    (a block's ``conv1`` and its shortcut) count once.

    Parameters
    ----------
    spec : PermutationSpec
        Couplings of the architecture, shared by both models (widths may differ).
    model_a, model_b : nn.Module
        The models; run in eval mode without gradients, on the device of their
        parameters, and left in the training mode they had.
    batches : iterable
        Batches of inputs, each a Tensor of shape ``(batch, *input_shape)`` or a
        tuple whose first item is one (a ``DataLoader`` over ``(x, y)`` works).

    Returns
    -------
    dict of str to ActivationStats
        Per permutation, the paired statistics.

    Raises
    ------
    ValueError
        If ``batches`` is empty or holds something other than tensors.
    AlignmentError
        If a group has no observable layer, or the models differ in a layer.
    """
    sites = _find_sites(spec, model_a)
    mods_a, mods_b = dict(model_a.named_modules()), dict(model_b.named_modules())
    paths = sorted({s.module for group in sites.values() for s in group})
    for path in paths:
        if type(mods_b.get(path)) is not type(mods_a[path]):
            raise ShapeMismatchError(
                f"module {path!r} is a {type(mods_a[path]).__name__} in the first model and "
                f"{type(mods_b.get(path)).__name__} in the second"
            )
    seen_a: dict[str, torch.Tensor] = {}
    seen_b: dict[str, torch.Tensor] = {}

    def hook(store: dict[str, torch.Tensor], path: str, use_input: bool) -> Any:
        def fn(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            store[path] = inputs[0] if use_input else output

        return fn

    uses = {s.module: s.use_input for group in sites.values() for s in group}
    handles = [mods_a[p].register_forward_hook(hook(seen_a, p, uses[p])) for p in paths]
    handles += [mods_b[p].register_forward_hook(hook(seen_b, p, uses[p])) for p in paths]
    stats = {name: ActivationStats() for name in sites}
    site_stats: dict[tuple[str, str], _SiteStats] = {}
    modes = {m: m.training for m in (*model_a.modules(), *model_b.modules())}
    device_a = next(model_a.parameters()).device
    device_b = next(model_b.parameters()).device
    num_batches = 0
    try:
        model_a.eval()
        model_b.eval()
        with torch.no_grad():
            for batch in batches:
                x = first_tensor(batch)
                seen_a.clear()
                seen_b.clear()
                model_a(x.to(device_a))
                model_b(x.to(device_b))
                for name, group in sites.items():
                    used: list[torch.Tensor] = []
                    for site in group:
                        ta, tb = seen_a[site.module], seen_b[site.module]
                        if any(ta is u for u in used):
                            continue
                        used.append(ta)
                        fa = _features(mods_a[site.module], ta, site.block).float()
                        fb = _features(mods_b[site.module], tb, site.block).float().to(fa.device)
                        key = (name, site.module)
                        if key not in site_stats:
                            site_stats[key] = _SiteStats(fa.shape[1], fb.shape[1], fa.device)
                            stats[name].sites.append(site_stats[key])
                        site_stats[key].update(fa, fb)
                num_batches += 1
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in modes.items():
            module.train(flag)
    if num_batches == 0:
        raise ValueError("batches: got no batch; allowed: a non-empty iterable of input tensors")
    logger.debug("collected activations of %d groups over %d batches", len(stats), num_batches)
    return stats
