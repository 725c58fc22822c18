"""Merging state dicts: weighted means, L-DAWA, aligned merges, BatchNorm re-estimation.

Pure functions on state dicts (``reset_bn_stats`` updates a model's buffers);
no Flower, no Ray.
"""

from fedmerge.merge.average import INTEGER_RULES, normalise_weights, weighted_average
from fedmerge.merge.batchnorm import has_batchnorm, reset_bn_stats
from fedmerge.merge.ldawa import LDAWAConfig, ldawa_aggregate, ldawa_weights
from fedmerge.merge.merge_many import MERGE_REFERENCES, MergeManyInfo, merge_many

__all__ = [
    "INTEGER_RULES",
    "MERGE_REFERENCES",
    "LDAWAConfig",
    "MergeManyInfo",
    "has_batchnorm",
    "ldawa_aggregate",
    "ldawa_weights",
    "merge_many",
    "normalise_weights",
    "reset_bn_stats",
    "weighted_average",
]
