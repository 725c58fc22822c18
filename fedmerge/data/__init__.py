"""Data sets that load offline, and non-IID partitions of them."""

from fedmerge.data.config import DatasetConfig, DatasetLoader, dataset_names, register_dataset
from fedmerge.data.datasets import DATASET_NAMES, DatasetBundle, load_dataset, load_dataset_config
from fedmerge.data.partition import PARTITION_SCHEMES, PartitionConfig, partition_indices
from fedmerge.data.synthetic import make_synthetic

__all__ = [
    "DATASET_NAMES",
    "PARTITION_SCHEMES",
    "DatasetBundle",
    "DatasetConfig",
    "DatasetLoader",
    "PartitionConfig",
    "dataset_names",
    "load_dataset",
    "load_dataset_config",
    "make_synthetic",
    "partition_indices",
    "register_dataset",
]
