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
from fedmerge.merge.fusion import (
    FUSION_METHODS,
    align_to_anchor,
    ensemble_accuracy,
    fuse_to_anchor,
)
from fedmerge.merge.ldawa import LDAWAConfig, ldawa_aggregate, ldawa_terms, ldawa_weights
from fedmerge.merge.merge_many import MERGE_REFERENCES, MergeManyInfo, merge_many
from fedmerge.merge.peer import (
    PEER_ALIGN,
    PeerMergeInfo,
    consensus_distance,
    mean_state,
    peer_merge,
)
from fedmerge.merge.robust import (
    ROBUST_AGGREGATORS,
    RobustConfig,
    clip_updates,
    coordinate_median,
    krum,
    krum_scores,
    krum_select,
    median_of,
    multi_krum,
    trimmed_mean,
    update_norms,
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
    "FUSION_METHODS",
    "INTEGER_RULES",
    "MERGE_REFERENCES",
    "PEER_ALIGN",
    "ROBUST_AGGREGATORS",
    "TIES_TRIM_SCOPES",
    "LDAWAConfig",
    "MergeManyInfo",
    "PeerMergeInfo",
    "RobustConfig",
    "ZipItResult",
    "align_to_anchor",
    "clip_updates",
    "consensus_distance",
    "coordinate_median",
    "diagonal_fisher",
    "ensemble_accuracy",
    "fisher_merge",
    "fuse_to_anchor",
    "has_batchnorm",
    "is_bn_stat",
    "krum",
    "krum_scores",
    "krum_select",
    "ldawa_aggregate",
    "ldawa_terms",
    "ldawa_weights",
    "mean_state",
    "median_of",
    "merge_many",
    "multi_krum",
    "normalise_weights",
    "peer_merge",
    "reset_bn_state",
    "reset_bn_stats",
    "task_arithmetic",
    "ties_merge",
    "trim_mask",
    "trimmed_mean",
    "update_norms",
    "weighted_average",
    "zipit_match",
    "zipit_merge",
]
