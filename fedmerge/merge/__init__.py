"""Merging state dicts: weighted means, L-DAWA, aligned merges, peer merges, BatchNorm.

Pure functions on state dicts (``reset_bn_stats`` updates a model's buffers);
no Flower, no Ray.
"""

from fedmerge.merge.average import (
    ACCUMULATE_MODES,
    INTEGER_RULES,
    normalise_weights,
    weighted_average,
)
from fedmerge.merge.batchnorm import has_batchnorm, reset_bn_state, reset_bn_stats
from fedmerge.merge.ldawa import LDAWAConfig, ldawa_aggregate, ldawa_weights
from fedmerge.merge.merge_many import MERGE_REFERENCES, MergeManyInfo, merge_many
from fedmerge.merge.peer import (
    PEER_ALIGN,
    PeerMergeInfo,
    consensus_distance,
    mean_state,
    peer_merge,
)

__all__ = [
    "ACCUMULATE_MODES",
    "INTEGER_RULES",
    "MERGE_REFERENCES",
    "PEER_ALIGN",
    "LDAWAConfig",
    "MergeManyInfo",
    "PeerMergeInfo",
    "consensus_distance",
    "has_batchnorm",
    "ldawa_aggregate",
    "ldawa_weights",
    "mean_state",
    "merge_many",
    "normalise_weights",
    "peer_merge",
    "reset_bn_state",
    "reset_bn_stats",
    "weighted_average",
]
