"""Non-IID partitions through flwr-datasets' partitioners."""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass
from math import inf
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from flwr_datasets.partitioner.partitioner import Partitioner

logger = logging.getLogger(__name__)

# flwr-datasets' PathologicalPartitioner when a class is drawn by more clients than it has samples
_PATHOLOGICAL_SHORT = re.compile(
    r"Label: (\S+) is needed to be assigned to more partitions \((\d+)\) than there are "
    r"samples \(corresponding to this label\) in the dataset \((\d+)\)"
)

PARTITION_SCHEMES: tuple[str, ...] = (
    "iid",
    "dirichlet",
    "pathological",
    "shards",
    "quantity-skew",
    "natural",
)


@dataclass(frozen=True)
class PartitionConfig:
    """How to split a training set among clients.

    Attributes
    ----------
    scheme : str (default: "iid")
        One of :data:`PARTITION_SCHEMES`:

        - ``iid``: uniform random split into equal parts.
        - ``dirichlet``: label skew; each class is spread over clients with
          proportions drawn from Dirichlet(``alpha``) (NIID-Bench's
          ``noniid-labeldir``).
        - ``pathological``: each client holds exactly ``classes_per_client``
          classes (NIID-Bench's ``#C = k``); the first class of client ``i`` is
          ``i mod num_classes``, the rest are drawn at random, as in the paper.
        - ``shards``: sort by label, cut into ``shards_per_client x clients``
          shards, deal ``shards_per_client`` to each client (McMahan et al.).
        - ``quantity-skew``: IID labels, client sizes drawn from
          Dirichlet(``alpha``) (NIID-Bench's ``iid-diff-quantity``).
        - ``natural``: one client per natural owner (Synthetic's users).
    alpha : float (default: 0.5)
        Dirichlet concentration for ``dirichlet`` and ``quantity-skew``; > 0.
    classes_per_client : int (default: 2)
        For ``pathological``.
    shards_per_client : int (default: 2)
        For ``shards``.
    min_partition_size : int (default: 10)
        Smallest client allowed by ``dirichlet`` and ``quantity-skew`` (redrawn
        until it holds).
    """

    scheme: str = "iid"
    alpha: float = 0.5
    classes_per_client: int = 2
    shards_per_client: int = 2
    min_partition_size: int = 10

    def __post_init__(self) -> None:
        if self.scheme not in PARTITION_SCHEMES:
            raise ValueError(
                f"scheme: got {self.scheme!r}; allowed: {', '.join(PARTITION_SCHEMES)}"
            )
        alpha = self.alpha
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 < alpha < inf:
            raise ValueError(f"alpha: got {alpha!r}; allowed: a finite number > 0")
        for key in ("classes_per_client", "shards_per_client"):
            value = getattr(self, key)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{key}: got {value!r}; allowed: an integer >= 1")
        if not _is_int(self.min_partition_size) or self.min_partition_size < 0:
            raise ValueError(
                f"min_partition_size: got {self.min_partition_size!r}; allowed: an integer >= 0"
            )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _quantity_sizes(
    n: int, num_partitions: int, alpha: float, min_size: int, rng: np.random.Generator
) -> list[int]:
    """Client sizes with Dirichlet(alpha) proportions that sum to ``n``."""
    for _ in range(1000):
        proportions = rng.dirichlet(np.full(num_partitions, alpha))
        sizes = np.floor(proportions * n).astype(int)
        sizes[np.argmax(sizes)] += n - sizes.sum()
        if sizes.min() >= max(min_size, 1):
            return [int(s) for s in sizes]
    raise ValueError(
        f"alpha: got {alpha!r}, which cannot give {num_partitions} clients at least "
        f"{max(min_size, 1)} samples each out of {n}; raise alpha or lower min_partition_size"
    )


def _build_partitioner(
    config: PartitionConfig, num_partitions: int, n: int, seed: int
) -> Partitioner:
    # Imported here: flwr-datasets pulls in matplotlib and seaborn (about 1 s),
    # which a client that finds its partition in the cache never needs.
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        NaturalIdPartitioner,
        PathologicalPartitioner,
        ShardPartitioner,
        SizePartitioner,
    )

    scheme = config.scheme
    if scheme == "iid":
        return IidPartitioner(num_partitions)
    if scheme == "dirichlet":
        return DirichletPartitioner(
            num_partitions,
            "label",
            config.alpha,
            min_partition_size=config.min_partition_size,
            self_balancing=False,
            shuffle=True,
            seed=seed,
        )
    if scheme == "pathological":
        return PathologicalPartitioner(
            num_partitions,
            "label",
            config.classes_per_client,
            class_assignment_mode="first-deterministic",
            shuffle=True,
            seed=seed,
        )
    if scheme == "shards":
        return ShardPartitioner(
            num_partitions,
            "label",
            num_shards_per_partition=config.shards_per_client,
            keep_incomplete_shard=True,
            shuffle=True,
            seed=seed,
        )
    if scheme == "quantity-skew":
        rng = np.random.default_rng(seed)
        return SizePartitioner(
            _quantity_sizes(n, num_partitions, config.alpha, config.min_partition_size, rng)
        )
    return NaturalIdPartitioner("group")


def partition_indices(
    labels: np.ndarray,
    num_partitions: int,
    config: PartitionConfig,
    *,
    seed: int,
    groups: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Split sample indices among ``num_partitions`` clients.

    Parameters
    ----------
    labels : ndarray, shape (n,)
        Integer labels of the training set.
    num_partitions : int
        Number of clients; at least 1 and at most ``n``.
    config : PartitionConfig
        Scheme and its parameters.
    seed : int
        Seed of every random choice: the same seed gives the same partitions.
    groups : ndarray, shape (n,), optional
        Natural owner of each sample; required by the ``natural`` scheme.

    Returns
    -------
    list of ndarray
        ``num_partitions`` arrays of indices into ``labels``, each sorted.

    Notes
    -----
    ``pathological`` covers every sample only when ``num_partitions`` is at
    least the number of classes; otherwise classes that no client drew are
    left out, and a warning says how many samples that drops. It also needs
    each class to have at least as many samples as the clients that drew it
    (flwr-datasets splits a class among them): up to the rarest class's size,
    any ``num_partitions`` fits.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if num_partitions < 1 or num_partitions > n:
        raise ValueError(
            f"num_clients: got {num_partitions}; allowed: 1 to {n} (the training set's size)"
        )
    if config.scheme == "shards" and num_partitions * config.shards_per_client > n:
        raise ValueError(
            f"partition.shards_per_client: got {config.shards_per_client}; allowed: 1 to "
            f"{n // num_partitions} ({n} training samples in shards for {num_partitions} clients)"
        )
    least = config.min_partition_size
    if config.scheme in ("dirichlet", "quantity-skew") and least > n:  # not even one client
        raise ValueError(
            f"partition.min_partition_size: got {least}, more than the {n} training samples; "
            f"allowed: 0 to {n // num_partitions} ({n} samples among num_clients {num_partitions})"
        )
    if config.scheme in ("dirichlet", "quantity-skew") and num_partitions * least > n:
        raise ValueError(
            f"num_clients: got {num_partitions} with partition.min_partition_size {least}; "
            f"allowed: 1 to {n // max(least, 1)} ({n} training samples, at least {least} a client)"
        )
    classes = len(np.unique(labels))
    if config.scheme == "pathological" and config.classes_per_client > classes:
        raise ValueError(
            f"partition.classes_per_client: got {config.classes_per_client}; allowed: 1 to "
            f"{classes} (the classes of the training set)"
        )
    order = np.random.default_rng(seed).permutation(n)
    columns: dict[str, np.ndarray] = {"label": labels[order], "index": order}
    if config.scheme == "natural":
        if groups is None:
            raise ValueError(
                "scheme: got 'natural', which needs a data set with natural owners; "
                "allowed data sets: synthetic"
            )
        num_groups = len(np.unique(groups))
        if num_groups != num_partitions:
            raise ValueError(
                f"num_clients: got {num_partitions}; allowed for partition 'natural': "
                f"{num_groups} (one client per natural owner)"
            )
        columns["group"] = np.asarray(groups)[order]
    if config.scheme == "iid":
        # flwr-datasets' IidPartitioner gives client i the i-th contiguous shard
        # of the shuffled order (the first n % N shards one sample longer):
        # np.array_split's cut. Done here directly, it takes milliseconds for
        # 100,000 clients instead of a dataset selection per client.
        return [np.sort(part.astype(np.int64)) for part in np.array_split(order, num_partitions)]
    import datasets

    dataset = datasets.Dataset.from_dict(columns)
    partitioner = _build_partitioner(config, num_partitions, n, seed)
    partitioner.dataset = dataset
    with warnings.catch_warnings():
        # flwr-datasets 0.6 sorts with `datasets`, which passes pyarrow >= 25 a
        # deprecated SortOptions argument; harmless, and not ours to fix.
        warnings.filterwarnings("ignore", "Specifying null_placement", FutureWarning)
        # Dirichlet draws again while a client has fewer than min_partition_size samples,
        # with a warning per draw, and gives up after ten: that is said once, below
        warnings.filterwarnings("ignore", "The specified min_partition_size", UserWarning)
        try:
            parts = [
                np.sort(np.asarray(partitioner.load_partition(i)["index"], dtype=np.int64))
                for i in range(num_partitions)
            ]
        except ValueError as exc:
            ours = _partitioner_error(exc, config, num_partitions, labels)
            if ours is None:
                raise
            raise ours from None
    covered = sum(len(p) for p in parts)
    if covered < n:
        logger.warning(
            "partition %s leaves %d of %d samples unassigned", config.scheme, n - covered, n
        )
    return parts


def _partitioner_error(
    exc: ValueError, config: PartitionConfig, num_partitions: int, labels: np.ndarray
) -> ValueError | None:
    """flwr-datasets' refusal ``exc`` said in fedmerge's keys; ``None`` if it is not one we know.

    Its messages name its own arguments (``num_partitions``,
    ``class_assignment_mode``), which a fedmerge user never sets.
    """
    n = len(labels)
    if config.scheme == "dirichlet" and "max number of attempts" in str(exc):
        return ValueError(
            f"partition.alpha: got {config.alpha!r}, which left a client with fewer than "
            f"{config.min_partition_size} samples in ten draws for {num_partitions} clients "
            f"of {n} samples; allowed: a larger alpha, fewer clients, or a lower "
            f"partition.min_partition_size"
        )
    # PathologicalPartitioner splits each class among the clients that drew it, and
    # refuses when a class has fewer samples than clients: with every client
    # drawing classes_per_client classes, up to num_clients clients may draw one.
    short = _PATHOLOGICAL_SHORT.search(str(exc))
    if config.scheme == "pathological" and short is not None:
        label, holders, samples = short.groups()
        rarest = int(np.unique(labels, return_counts=True)[1].min())
        fewer = "a lower partition.classes_per_client, " if config.classes_per_client > 1 else ""
        return ValueError(
            f"num_clients: got {num_partitions} with partition.scheme 'pathological' and "
            f"partition.classes_per_client {config.classes_per_client}, which gives class "
            f"{label} to {holders} clients but it has {samples} training samples; allowed: "
            f"fewer clients (up to {rarest}, the rarest class's samples, always fits), {fewer}"
            f"or another partition.scheme"
        )
    return None
