"""Permutation alignment: specs, weight and activation matching, optimal transport.

Pure functions on state dicts and tensors; no Flower, no Ray.
"""

from fedmerge.align.activation_matching import (
    ACTIVATION_METHODS,
    ActivationMatchingInfo,
    activation_matching,
)
from fedmerge.align.activations import ActivationStats, collect_activation_stats
from fedmerge.align.builtin_specs import (
    mlp_spec,
    permutation_spec_for,
    resnet20_spec,
    simple_cnn_spec,
    vgg11_spec,
)
from fedmerge.align.optimal_transport import (
    OT_COSTS,
    OT_INPUT_RULES,
    OT_MARGINALS,
    OT_SOLVERS,
    OTAlignInfo,
    apply_transport,
    ot_align,
    ot_fuse,
    transport_to_permutation,
)
from fedmerge.align.permute import (
    apply_permutation,
    count_moved_units,
    identity_permutation,
    invert_permutation,
    random_permutation,
)
from fedmerge.align.spec import AxisRef, PermAxis, PermutationSpec
from fedmerge.align.trace import infer_permutation_spec
from fedmerge.align.weight_matching import WeightMatchingInfo, weight_matching

__all__ = [
    "ACTIVATION_METHODS",
    "OT_COSTS",
    "OT_INPUT_RULES",
    "OT_MARGINALS",
    "OT_SOLVERS",
    "ActivationMatchingInfo",
    "ActivationStats",
    "AxisRef",
    "OTAlignInfo",
    "PermAxis",
    "PermutationSpec",
    "WeightMatchingInfo",
    "activation_matching",
    "apply_permutation",
    "apply_transport",
    "collect_activation_stats",
    "count_moved_units",
    "identity_permutation",
    "infer_permutation_spec",
    "invert_permutation",
    "mlp_spec",
    "ot_align",
    "ot_fuse",
    "permutation_spec_for",
    "random_permutation",
    "resnet20_spec",
    "simple_cnn_spec",
    "transport_to_permutation",
    "vgg11_spec",
    "weight_matching",
]
