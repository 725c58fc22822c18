"""Merging state dicts: weighted means, L-DAWA, task vectors, Fisher, ZipIt!, peer merges, BN.

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
from fedmerge.merge.fisher import FISHER_FLOORS, FISHER_LABELS, diagonal_fisher, fisher_merge
from fedmerge.merge.ldawa import LDAWAConfig, ldawa_aggregate, ldawa_weights
from fedmerge.merge.merge_many import MERGE_REFERENCES, MergeManyInfo, merge_many
from fedmerge.merge.peer import (
    PEER_ALIGN,
    PeerMergeInfo,
    consensus_distance,
    mean_state,
    peer_merge,
)
from fedmerge.merge.task_vectors import (
    BN_STAT_RULES,
    TIES_TRIM_SCOPES,
    is_bn_stat,
    task_arithmetic,
    ties_merge,
    trim_mask,
)
from fedmerge.merge.zipit import ZipItResult, zipit_match, zipit_merge

__all__ = [
    "ACCUMULATE_MODES",
    "BN_STAT_RULES",
    "FISHER_FLOORS",
    "FISHER_LABELS",
    "INTEGER_RULES",
    "MERGE_REFERENCES",
    "PEER_ALIGN",
    "TIES_TRIM_SCOPES",
    "LDAWAConfig",
    "MergeManyInfo",
    "PeerMergeInfo",
    "ZipItResult",
    "consensus_distance",
    "diagonal_fisher",
    "fisher_merge",
    "has_batchnorm",
    "is_bn_stat",
    "ldawa_aggregate",
    "ldawa_weights",
    "mean_state",
    "merge_many",
    "normalise_weights",
    "peer_merge",
    "reset_bn_state",
    "reset_bn_stats",
    "task_arithmetic",
    "ties_merge",
    "trim_mask",
    "weighted_average",
    "zipit_match",
    "zipit_merge",
]
