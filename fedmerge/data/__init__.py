"""Data sets that load offline, and non-IID partitions of them."""

from fedmerge.data.datasets import DATASET_NAMES, DatasetBundle, load_dataset
from fedmerge.data.partition import PARTITION_SCHEMES, PartitionConfig, partition_indices
from fedmerge.data.synthetic import make_synthetic

__all__ = [
    "DATASET_NAMES",
    "PARTITION_SCHEMES",
    "DatasetBundle",
    "PartitionConfig",
    "load_dataset",
    "make_synthetic",
    "partition_indices",
]
