"""Infer the permutation spec of a user's ``nn.Module`` by tracing it with torch.fx.

The traced graph is walked in forward order. Every linear layer or
convolution creates a permutation of its output units; the permutation then
travels with the tensor through the operations that act on every unit alike
(norms, elementwise activations, pooling, flatten and reshape) and is merged
with the other operand's permutation at a residual addition. A permutation
that reaches the model's output is pinned (not permuted). Any operation on
permuted features that the walker does not know is refused with an
:class:`~fedmerge.errors.UntraceableModelError` naming the module and the
operation; the inferred spec is then checked numerically on the example input.
"""

from __future__ import annotations

import builtins
import logging
import operator
from collections.abc import Callable, Sequence
from math import prod
from typing import Any, NamedTuple

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from fedmerge.align.permute import apply_permutation, random_permutation
from fedmerge.align.spec import PermAxis, PermutationSpec
from fedmerge.errors import UntraceableModelError

__all__ = ["infer_permutation_spec"]

logger = logging.getLogger(__name__)

_FIXED = "<fixed>"

_ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.LogSigmoid, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.Dropout3d, nn.AlphaDropout,
)  # fmt: skip
_POOL_MODULES: dict[type[nn.Module], int] = {
    nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3, nn.AvgPool1d: 1, nn.AvgPool2d: 2,
    nn.AvgPool3d: 3, nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3,
    nn.AdaptiveMaxPool1d: 1, nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3, nn.LPPool1d: 1,
    nn.LPPool2d: 2,
}  # fmt: skip
_ELEMENTWISE_FUNCTIONS: set[Callable[..., Any]] = {
    torch.relu, torch.relu_, F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu,
    F.silu, F.mish, F.hardswish, F.hardsigmoid, F.hardtanh, F.softplus, F.softsign,
    torch.sigmoid, torch.tanh, F.sigmoid, F.tanh, F.dropout, F.dropout1d, F.dropout2d,
    torch.abs, torch.neg, operator.neg, torch.exp, torch.square, torch.clamp,
}  # fmt: skip
_ELEMENTWISE_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clamp_min",
    "contiguous", "clone", "detach", "float", "double", "half", "abs", "neg", "exp", "square",
}  # fmt: skip
_BINARY = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub,
    operator.imul, torch.add, torch.sub, torch.mul, torch.div,
}  # fmt: skip
_BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
_RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze}
_RESHAPE_METHODS = {"flatten", "view", "reshape", "squeeze", "unsqueeze", "unflatten"}
_REDUCE_FUNCTIONS = {torch.mean, torch.sum, torch.amax, torch.amin}
_REDUCE_METHODS = {"mean", "sum", "amax", "amin"}
_SHAPE_QUERIES = {"size", "dim"}


class _Tag(NamedTuple):
    """A tensor whose axis ``dim`` holds the units of ``perm``, ``block`` entries each."""

    perm: str
    dim: int
    block: int


class _Walker:
    """Forward walk over a traced graph that assigns permutations to tensor axes."""

    def __init__(self, gm: torch.fx.GraphModule, root_name: str) -> None:
        self.gm = gm
        self.root_name = root_name
        self.modules = dict(gm.named_modules())
        self.parent: dict[str, str] = {_FIXED: _FIXED}
        self.created: dict[str, int] = {}
        self.axes: dict[str, list[str | None]] = {}
        self.blocks: dict[tuple[str, int], int] = {}
        self.tags: dict[torch.fx.Node, _Tag | None] = {}

    # union-find over permutation names
    def find(self, name: str) -> str:
        while self.parent[name] != name:
            self.parent[name] = self.parent[self.parent[name]]
            name = self.parent[name]
        return name

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            if rb == _FIXED or (ra != _FIXED and self.created[rb] < self.created[ra]):
                ra, rb = rb, ra
            self.parent[rb] = ra  # _FIXED, or else the older name, stays the root

    def new_perm(self, name: str) -> str:
        while name in self.parent:
            name += "'"
        self.parent[name] = name
        self.created[name] = len(self.created)
        return name

    def refuse(self, node: torch.fx.Node, what: str) -> UntraceableModelError:
        stack = node.meta.get("nn_module_stack") or {}
        if node.op == "call_module":
            path = str(node.target)
        elif stack:
            path = list(stack)[-1]
        else:
            path = ""
        module = self.modules.get(path, self.gm)
        where = f"module {path!r} ({type(module).__name__})" if path else f"{self.root_name}"
        return UntraceableModelError(
            f"cannot infer a permutation spec: {where}, operation {_op_name(node)!r} "
            f"(graph node {node.name!r}): {what}"
        )

    def assign(self, node: torch.fx.Node, key: str, entries: Sequence[_Tag | str | None]) -> None:
        row: list[str | None] = []
        for axis, entry in enumerate(entries):
            if isinstance(entry, _Tag):
                self.blocks[(key, axis)] = entry.block
                row.append(entry.perm)
            else:
                row.append(entry)
        if key not in self.axes:
            self.axes[key] = row
            return
        for old, new in zip(self.axes[key], row, strict=True):
            if (old is None) != (new is None):
                raise self.refuse(node, f"parameter {key!r} is used with and without permutation")
            if old is not None and new is not None:
                self.union(old, new)

    # --- the walk ---------------------------------------------------------------------------
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            if node.op in ("placeholder", "get_attr"):
                self.tags[node] = None
            elif node.op == "output":
                for arg in node.all_input_nodes:
                    tag = self.tags.get(arg)
                    if tag is not None:
                        self.union(_FIXED, tag.perm)
            else:
                inputs = [self.tags.get(n) for n in node.all_input_nodes]
                if node.op == "call_module":
                    self.tags[node] = self.call_module(node, inputs)
                else:
                    self.tags[node] = self.call_function(node, inputs)

    def call_module(self, node: torch.fx.Node, inputs: list[_Tag | None]) -> _Tag | None:
        name = str(node.target)
        module = self.modules[name]
        tag = inputs[0] if inputs else None
        shape = _shape(node.args[0]) if node.args else None
        if isinstance(module, nn.Linear):
            if tag is not None and (shape is None or tag.dim != len(shape) - 1):
                raise self.refuse(node, "linear layer over an axis that is not the permuted one")
            out = self.new_perm(f"P_{name}")
            self.assign(node, f"{name}.weight", [out, tag])
            if module.bias is not None:
                self.assign(node, f"{name}.bias", [out])
            return _Tag(out, len(shape) - 1 if shape else 1, 1)
        if isinstance(module, nn.modules.conv._ConvNd) and not isinstance(
            module, nn.modules.conv._ConvTransposeNd
        ):
            spatial = len(module.kernel_size)
            channel = (len(shape) if shape else spatial + 2) - spatial - 1
            if tag is not None and (tag.dim != channel or tag.block != 1):
                raise self.refuse(node, "convolution over an axis that is not the permuted one")
            if module.groups != 1 and tag is not None:
                raise self.refuse(node, f"grouped convolution (groups={module.groups})")
            out = self.new_perm(f"P_{name}")
            if module.groups != 1:
                self.union(_FIXED, out)
            self.assign(node, f"{name}.weight", [out, tag] + [None] * spatial)
            if module.bias is not None:
                self.assign(node, f"{name}.bias", [out])
            return _Tag(out, channel, 1)
        if tag is None:
            return None  # any module on unpermuted inputs leaves them unpermuted
        if isinstance(module, nn.modules.batchnorm._NormBase):  # BatchNorm*, InstanceNorm*
            if tag.dim != 1:
                raise self.refuse(node, "normalisation over an axis that is not the permuted one")
            for leaf in ("weight", "bias", "running_mean", "running_var"):
                if getattr(module, leaf, None) is not None:
                    self.assign(node, f"{name}.{leaf}", [tag])
            if getattr(module, "num_batches_tracked", None) is not None:
                self.assign(node, f"{name}.num_batches_tracked", [])
            return tag
        if isinstance(module, nn.LayerNorm):
            first = len(shape) - len(module.normalized_shape) if shape else 0
            if module.weight is not None or module.bias is not None:
                entries: list[_Tag | None] = [None] * len(module.normalized_shape)
                if tag.dim >= first:
                    entries[tag.dim - first] = tag
                for leaf in ("weight", "bias"):
                    if getattr(module, leaf) is not None:
                        self.assign(node, f"{name}.{leaf}", entries)
            return tag
        if isinstance(module, nn.GroupNorm):
            if tag.dim != 1 or module.num_groups not in (1, module.num_channels):
                raise self.refuse(
                    node,
                    f"GroupNorm with {module.num_groups} groups of {module.num_channels} "
                    "channels mixes units within groups; only 1 group or one group per "
                    "channel can be permuted",
                )
            if module.affine:
                self.assign(node, f"{name}.weight", [tag])
                self.assign(node, f"{name}.bias", [tag])
            return tag
        if isinstance(module, nn.PReLU):
            if module.num_parameters != 1:
                if tag.dim != 1:
                    raise self.refuse(node, "PReLU over an axis that is not the permuted one")
                self.assign(node, f"{name}.weight", [tag])
            return tag
        if isinstance(module, _ELEMENTWISE_MODULES):
            return tag
        pooled = [k for cls, k in _POOL_MODULES.items() if isinstance(module, cls)]
        if pooled:
            if getattr(module, "return_indices", False):
                raise self.refuse(node, "pooling that returns indices")
            if shape is None or tag.dim >= len(shape) - pooled[0]:
                raise self.refuse(node, "pooling over the permuted axis")
            return tag
        if isinstance(module, (nn.Flatten, nn.Unflatten)):
            return self.reshape(node, tag)
        if isinstance(module, (nn.Softmax, nn.LogSoftmax)):
            return tag
        raise self.refuse(node, "module type not supported on permuted features")

    def call_function(self, node: torch.fx.Node, inputs: list[_Tag | None]) -> _Tag | None:
        permuted = [t for t in inputs if t is not None]
        target = node.target
        is_method = node.op == "call_method"
        if (is_method and target in _SHAPE_QUERIES) or target is builtins.getattr:
            return None  # x.size(), x.dim(), x.shape: no tensor comes out
        if not permuted:
            return None  # no permuted data flows through this operation
        if (target in _BINARY) or (is_method and target in _BINARY_METHODS):
            return self.binary(node)
        tensors = [n for n in node.all_input_nodes if _shape(n) is not None]
        if len(tensors) != 1:
            raise self.refuse(node, "operation combining permuted features with other tensors")
        tag = permuted[0]
        if not node.args or node.args[0] is not tensors[0]:
            raise self.refuse(node, "permuted features are not the first argument")
        if target in _ELEMENTWISE_FUNCTIONS or (is_method and target in _ELEMENTWISE_METHODS):
            return tag
        if is_method and target == "to":
            return tag
        if target in _RESHAPE_FUNCTIONS or (is_method and target in _RESHAPE_METHODS):
            return self.reshape(node, tag)
        if target in (F.adaptive_avg_pool2d, F.avg_pool2d, F.max_pool2d, F.adaptive_max_pool2d):
            shape = _shape(node.args[0])
            if shape is None or tag.dim >= len(shape) - 2:
                raise self.refuse(node, "pooling over the permuted axis")
            return tag
        if target in _REDUCE_FUNCTIONS or (is_method and target in _REDUCE_METHODS):
            return self.reduce(node, tag)
        if (is_method and target in ("transpose", "permute", "t")) or target in (
            torch.transpose,
            torch.permute,
            torch.t,
        ):
            return self.transpose(node, tag)
        raise self.refuse(node, "operation not supported on permuted features")

    def binary(self, node: torch.fx.Node) -> _Tag | None:
        out_shape = _shape(node)
        tags: list[_Tag] = []
        for arg in node.args[:2]:
            if not isinstance(arg, torch.fx.Node):
                continue  # a Python scalar
            tag = self.tags.get(arg)
            if tag is not None:
                tags.append(tag)
                continue
            shape = _shape(arg)
            if shape is None or out_shape is None:
                raise self.refuse(node, "permuted features combined with an unknown value")
            tags_here = [t for t in (self.tags.get(a) for a in node.all_input_nodes) if t]
            dim = tags_here[0].dim - len(out_shape) + len(shape)
            if 0 <= dim < len(shape) and shape[dim] != 1:
                raise self.refuse(
                    node, "permuted features combined with an unpermuted tensor along the units"
                )
        if not tags:
            return None
        first = tags[0]
        for other in tags[1:]:
            if (other.dim, other.block) != (first.dim, first.block):
                raise self.refuse(node, "operands permuted along different axes")
            self.union(first.perm, other.perm)
        return first

    def reshape(self, node: torch.fx.Node, tag: _Tag) -> _Tag:
        """Follow the units through a reshape, using the propagated shapes."""
        in_shape, out_shape = _shape(node.all_input_nodes[0]), _shape(node)
        if in_shape is None or out_shape is None:
            raise self.refuse(node, "reshape of permuted features with unknown shapes")
        units = in_shape[tag.dim] // tag.block
        outer = prod(in_shape[: tag.dim])
        stride = tag.block * prod(in_shape[tag.dim + 1 :])
        for dim, size in enumerate(out_shape):
            if prod(out_shape[:dim]) != outer or size % units:
                continue
            block = size // units
            if block * prod(out_shape[dim + 1 :]) == stride:
                return _Tag(tag.perm, dim, block)
        raise self.refuse(
            node, f"reshape {tuple(in_shape)} -> {tuple(out_shape)} splits or mixes permuted units"
        )

    def reduce(self, node: torch.fx.Node, tag: _Tag) -> _Tag | None:
        shape = _shape(node.all_input_nodes[0])
        raw: Any = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        keepdim = bool(node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False))
        if shape is None or raw is None:
            return None  # a full reduction is invariant to permutations
        dims = [int(d) % len(shape) for d in ([raw] if isinstance(raw, int) else raw)]
        if tag.dim in dims:
            return None  # summing over units is invariant to their order
        shift = 0 if keepdim else sum(d < tag.dim for d in dims)
        return _Tag(tag.perm, tag.dim - shift, tag.block)

    def transpose(self, node: torch.fx.Node, tag: _Tag) -> _Tag:
        shape = _shape(node.all_input_nodes[0])
        rank = len(shape) if shape is not None else 2
        args: list[Any] = list(node.args[1:])
        if node.target in ("t", torch.t):
            args = [0, 1]
        if node.target in ("permute", torch.permute):
            order = list(args[0]) if len(args) == 1 and isinstance(args[0], Sequence) else args
            order = [int(d) % rank for d in order]
            return _Tag(tag.perm, order.index(tag.dim), tag.block)
        a, b = (int(d) % rank for d in args[:2])
        dim = b if tag.dim == a else a if tag.dim == b else tag.dim
        return _Tag(tag.perm, dim, tag.block)


def _op_name(node: torch.fx.Node) -> str:
    if node.op == "call_module":
        return "call_module"
    target = node.target
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def _shape(node: Any) -> tuple[int, ...] | None:
    if not isinstance(node, torch.fx.Node):
        return None
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if isinstance(meta, TensorMetadata) else None


class _PathTracer(torch.fx.Tracer):
    """A tracer that remembers the module it was in when tracing failed."""

    def __init__(self) -> None:
        super().__init__()
        self.path: list[str] = []

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: Any, kwargs: Any) -> Any:
        self.path.append(self.path_of_module(m))
        out = super().call_module(m, forward, args, kwargs)
        self.path.pop()
        return out


def _trace(model: nn.Module) -> torch.fx.GraphModule:
    tracer = _PathTracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises many kinds (TraceError, TypeError, ...)
        path = tracer.path[-1] if tracer.path else ""
        module = model.get_submodule(path) if path else model
        where = f"module {path!r} ({type(module).__name__})" if path else type(model).__name__
        raise UntraceableModelError(
            f"cannot trace {where} with torch.fx: {type(exc).__name__}: {exc}; write its "
            "permutation spec by hand (fedmerge.align.PermutationSpec)"
        ) from exc
    return torch.fx.GraphModule(tracer.root, graph, type(model).__name__)


def infer_permutation_spec(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    check: bool = True,
    generator: torch.Generator | None = None,
) -> PermutationSpec:
    r"""Infer a permutation spec by tracing ``model`` with torch.fx.

    Supported on permuted features: ``nn.Linear``, ``nn.Conv1d/2d/3d``
    (``groups=1``), ``BatchNorm*``/``InstanceNorm*``, ``LayerNorm``,
    ``GroupNorm`` with one group or one group per channel, ReLU-like and other
    elementwise activations (modules, functions or methods), dropout,
    pooling over spatial axes, flatten/view/reshape that keep each unit's
    entries together, reductions, transposes, and additions or products of
    two permuted tensors (residual connections, which merge their
    permutations into one stream).

    Parameters
    ----------
    model : nn.Module
        The model. It is run (in eval mode, without gradients) on
        ``example_input``; its training flags are restored afterwards.
    example_input : Tensor, shape (batch, \*input_shape)
        Inputs used to propagate shapes and to check the spec.
    check : bool (default: True)
        Apply a random permutation with the inferred spec and refuse the spec
        unless the permuted model's outputs equal the original ones.
    generator : torch.Generator, optional
        Source of the check's random permutation; ``None`` uses a generator
        seeded with 0, so the check is deterministic.

    Returns
    -------
    PermutationSpec
        One entry per key of ``model.state_dict()``, in forward order.

    Raises
    ------
    UntraceableModelError
        If torch.fx cannot trace the model, if an operation on permuted
        features is not supported (the message names the module and the
        operation), or if the numerical check fails.
    """
    training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        gm = _trace(model)
        with torch.no_grad():
            ShapeProp(gm).propagate(example_input)
        walker = _Walker(gm, type(model).__name__)
        walker.run()
        spec = _build_spec(walker, model.state_dict())
        if check:
            _check_function(model, spec, example_input, generator)
    finally:
        for module, flag in training.items():
            module.train(flag)
    logger.debug("inferred %d permutations for %s", len(spec.perms), type(model).__name__)
    return spec


def _build_spec(walker: _Walker, state: dict[str, torch.Tensor]) -> PermutationSpec:
    names: dict[str, str] = {}
    axes: dict[str, tuple[PermAxis | None, ...]] = {}
    for key, row in list(walker.axes.items()) + [(k, None) for k in state]:
        if key in axes or key not in state:
            continue
        if row is None:
            axes[key] = (None,) * state[key].dim()
            continue
        entries: list[PermAxis | None] = []
        for axis, perm in enumerate(row):
            root = walker.find(perm) if perm is not None else _FIXED
            if root == _FIXED:
                entries.append(None)
                continue
            label = names.setdefault(root, root)
            entries.append(PermAxis(label, walker.blocks.get((key, axis), 1)))
        axes[key] = tuple(entries)
    return PermutationSpec(axes)


def _check_function(
    model: nn.Module,
    spec: PermutationSpec,
    example_input: torch.Tensor,
    generator: torch.Generator | None,
) -> None:
    state = model.state_dict()
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    perm = random_permutation(spec, state, generator=generator)
    permuted = apply_permutation(spec, perm, state)
    with torch.no_grad():
        out = torch.func.functional_call(model, state, (example_input,))
        out_p = torch.func.functional_call(model, permuted, (example_input,))
    leaves, _ = torch.utils._pytree.tree_flatten(out)
    leaves_p, _ = torch.utils._pytree.tree_flatten(out_p)
    for a, b in zip(leaves, leaves_p, strict=True):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            scale = float(a.abs().max()) if a.numel() else 0.0
            if not torch.allclose(a, b, rtol=1e-4, atol=1e-5 * max(scale, 1.0)):
                raise UntraceableModelError(
                    f"the permutation spec inferred for {type(model).__name__} does not preserve "
                    f"its outputs (max difference {float((a - b).abs().max()):.3g}); an "
                    "operation permutes units in a way the tracer does not model; write the "
                    "spec by hand"
                )
