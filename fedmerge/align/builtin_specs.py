"""Hand-written permutation specs of the built-in models.

The specs follow Git Re-Basin's conventions [1]_: one permutation per hidden
layer, named after the layer that produces it (``P_<module>``), and one
permutation per residual stream of a ResNet, shared by the stem (or the
shortcut convolution that opens the stage) and by the last convolution of
every block in that stage (``P_stream<k>``).

References
----------
.. [1] S. Ainsworth, J. Hayase, S. Srinivasa, "Git Re-Basin: Merging Models
   modulo Permutation Symmetries", ICLR 2023. https://arxiv.org/abs/2209.04836
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fedmerge.align.spec import PermAxis, PermutationSpec
from fedmerge.align.trace import infer_permutation_spec
from fedmerge.models import MLP, VGG11, ResNet20, SimpleCNN

__all__ = [
    "mlp_spec",
    "permutation_spec_for",
    "resnet20_spec",
    "simple_cnn_spec",
    "vgg11_spec",
]

Axes = dict[str, tuple[PermAxis | str | None, ...]]  # normalised by PermutationSpec


def _dense(axes: Axes, name: str, out: str | None, inp: PermAxis | str | None) -> None:
    axes[f"{name}.weight"] = (out, inp)
    axes[f"{name}.bias"] = (out,)


def _conv(axes: Axes, name: str, out: str | None, inp: str | None, *, bias: bool) -> None:
    axes[f"{name}.weight"] = (out, inp, None, None)
    if bias:
        axes[f"{name}.bias"] = (out,)


def _bn(axes: Axes, name: str, perm: str) -> None:
    for leaf in ("weight", "bias", "running_mean", "running_var"):
        axes[f"{name}.{leaf}"] = (perm,)
    axes[f"{name}.num_batches_tracked"] = ()


def mlp_spec(model: MLP) -> PermutationSpec:
    """Spec of :class:`~fedmerge.models.MLP`: one permutation per hidden layer."""
    axes: Axes = {}
    prev: str | None = None
    for i in range(len(model.layers)):
        name = f"P_layers.{i}"
        _dense(axes, f"layers.{i}", name, prev)
        prev = name
    _dense(axes, "head", None, prev)
    return PermutationSpec(axes)


def simple_cnn_spec(model: SimpleCNN) -> PermutationSpec:
    """Spec of :class:`~fedmerge.models.SimpleCNN`.

    ``fc1`` reads the flattened ``conv2`` output, so its input axis has one
    block of ``H * W`` entries per ``conv2`` channel.
    """
    axes: Axes = {}
    _conv(axes, "conv1", "P_conv1", None, bias=True)
    _conv(axes, "conv2", "P_conv2", "P_conv1", bias=True)
    block = model.fc1.in_features // model.conv2.out_channels
    _dense(axes, "fc1", "P_fc1", PermAxis("P_conv2", block))
    _dense(axes, "fc2", "P_fc2", "P_fc1")
    _dense(axes, "fc3", None, "P_fc2")
    return PermutationSpec(axes)


def vgg11_spec(model: VGG11) -> PermutationSpec:
    """Spec of :class:`~fedmerge.models.VGG11`: one permutation per convolution."""
    axes: Axes = {}
    prev: str | None = None
    modules = list(model.features)
    for i, module in enumerate(modules):
        if isinstance(module, nn.Conv2d):
            name = f"P_features.{i}"
            _conv(axes, f"features.{i}", name, prev, bias=module.bias is not None)
            prev = name
        elif isinstance(module, nn.BatchNorm2d):
            if prev is None:
                raise ValueError(f"model: VGG11 features.{i} is a BatchNorm before any conv")
            _bn(axes, f"features.{i}", prev)
    _dense(axes, "classifier", None, prev)
    return PermutationSpec(axes)


def resnet20_spec(model: ResNet20) -> PermutationSpec:
    """Spec of :class:`~fedmerge.models.ResNet20`.

    Stage ``k`` carries one residual stream ``P_stream<k>``: the stem (for the
    first stage) or the 1x1 shortcut convolution (for the strided stages)
    writes it, every block's ``conv2``/``bn2`` adds to it and every block's
    ``conv1`` reads it. Inside a block, ``conv1``/``bn1`` produce their own
    permutation ``P_layer<k>.<j>``.
    """
    axes: Axes = {}
    stream = "P_stream1"
    _conv(axes, "conv1", stream, None, bias=False)
    _bn(axes, "bn1", stream)
    for k, stage in enumerate((model.layer1, model.layer2, model.layer3), start=1):
        for j, block in enumerate(stage):
            prefix = f"layer{k}.{j}"
            inner = f"P_{prefix}"
            new_stream = stream
            if not isinstance(block.shortcut, nn.Identity):
                new_stream = f"P_stream{k}"
            _conv(axes, f"{prefix}.conv1", inner, stream, bias=False)
            _bn(axes, f"{prefix}.bn1", inner)
            _conv(axes, f"{prefix}.conv2", new_stream, inner, bias=False)
            _bn(axes, f"{prefix}.bn2", new_stream)
            if new_stream != stream:
                _conv(axes, f"{prefix}.shortcut.0", new_stream, stream, bias=False)
                _bn(axes, f"{prefix}.shortcut.1", new_stream)
            stream = new_stream
    _dense(axes, "linear", None, stream)
    return PermutationSpec(axes)


#: Exact model class -> its hand-written spec (a subclass may change the
#: forward pass, so it is traced instead).
_HAND_WRITTEN: dict[type[nn.Module], Callable[[Any], PermutationSpec]] = {
    MLP: mlp_spec,
    ResNet20: resnet20_spec,
    SimpleCNN: simple_cnn_spec,
    VGG11: vgg11_spec,
}


def permutation_spec_for(
    model: nn.Module, example_input: torch.Tensor | None = None
) -> PermutationSpec:
    """Return the permutation spec of a model.

    Built-in models (:class:`~fedmerge.models.MLP`, ``SimpleCNN``, ``VGG11``,
    ``ResNet20``) get their hand-written spec; any other module is traced with
    torch.fx by :func:`infer_permutation_spec`.

    Parameters
    ----------
    model : nn.Module
        The model (its weights are only read).
    example_input : Tensor, optional
        A batch of inputs, shape ``(batch, *input_shape)``, for instance
        :func:`fedmerge.models.example_input`. Required for models that are
        not built in: the tracer propagates shapes with it and checks the
        inferred spec on it. Callers that may see a user's model should always
        pass one; it is ignored for the built-in models.

    Returns
    -------
    PermutationSpec
        The spec, listing every key of ``model.state_dict()``.

    Raises
    ------
    UntraceableModelError
        If the model is not built in and cannot be traced or permuted safely.
    ValueError
        If ``example_input`` is missing for a model that is not built in.
    """
    hand_written = _HAND_WRITTEN.get(type(model))
    if hand_written is not None:
        return hand_written(model)
    if example_input is None:
        raise ValueError(
            f"example_input: got None for model {type(model).__name__}, which is not built in; "
            "allowed: a batch of inputs (fedmerge.models.example_input), used to trace the "
            "model and check the spec"
        )
    return infer_permutation_spec(model, example_input)
