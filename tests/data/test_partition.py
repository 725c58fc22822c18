"""Tests of fedmerge.data.partition: determinism, coverage and label skew."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from fedmerge.data import PartitionConfig, partition_indices

NUM_CLASSES = 10


def _labels(n: int = 2000, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, NUM_CLASSES, n)


def _groups(n: int, num_groups: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, num_groups, n)


# scheme -> (config, num_partitions)
SCHEMES = {
    "iid": (PartitionConfig(scheme="iid"), 10),
    "dirichlet": (PartitionConfig(scheme="dirichlet", alpha=0.5), 10),
    "shards": (PartitionConfig(scheme="shards", shards_per_client=2), 10),
    "quantity-skew": (PartitionConfig(scheme="quantity-skew", alpha=0.5), 10),
    "pathological": (PartitionConfig(scheme="pathological", classes_per_client=2), 12),
}
RANDOM_SCHEMES = sorted(SCHEMES)


def _split(scheme: str, seed: int, labels: np.ndarray | None = None) -> list[np.ndarray]:
    config, k = SCHEMES[scheme]
    return partition_indices(_labels() if labels is None else labels, k, config, seed=seed)


def _entropy(counts: np.ndarray) -> float:
    """Shannon entropy (nats) of a histogram, written out by hand."""
    total = counts.sum()
    h = 0.0
    for c in counts:
        if c > 0:
            p = c / total
            h -= p * np.log(p)
    return h


def _assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts)
    assert len(joined) == n, "some sample is missing or held twice"
    assert np.array_equal(np.sort(joined), np.arange(n))


@pytest.mark.parametrize("scheme", RANDOM_SCHEMES)
def test_same_seed_gives_identical_partitions(scheme: str) -> None:
    a, b = _split(scheme, seed=3), _split(scheme, seed=3)
    assert len(a) == len(b) == SCHEMES[scheme][1]
    for pa, pb in zip(a, b, strict=True):
        np.testing.assert_array_equal(pa, pb)


@pytest.mark.parametrize("scheme", RANDOM_SCHEMES)
def test_different_seed_gives_different_partitions(scheme: str) -> None:
    a, b = _split(scheme, seed=3), _split(scheme, seed=4)
    assert any(
        len(pa) != len(pb) or not np.array_equal(pa, pb) for pa, pb in zip(a, b, strict=True)
    )


@pytest.mark.parametrize("scheme", RANDOM_SCHEMES)
def test_every_sample_in_exactly_one_client(scheme: str) -> None:
    parts = _split(scheme, seed=0)
    assert len(parts) == SCHEMES[scheme][1]
    for p in parts:
        assert p.dtype == np.int64
        assert np.all(np.diff(p) > 0), "indices are sorted and unique within a client"
    _assert_exact_cover(parts, 2000)


def test_natural_partition_is_one_client_per_group() -> None:
    n, k = 1500, 6
    labels, groups = _labels(n), _groups(n, k)
    parts = partition_indices(labels, k, PartitionConfig(scheme="natural"), seed=0, groups=groups)
    _assert_exact_cover(parts, n)
    owners = []
    for p in parts:
        held = np.unique(groups[p])
        assert len(held) == 1, f"a client holds several owners: {held}"
        owners.append(int(held[0]))
        # the client holds *all* the samples of its owner
        np.testing.assert_array_equal(p, np.flatnonzero(groups == held[0]))
    assert sorted(owners) == list(range(k))


def test_natural_partition_does_not_depend_on_seed() -> None:
    n, k = 800, 4
    labels, groups = _labels(n), _groups(n, k)
    cfg = PartitionConfig(scheme="natural")
    a = partition_indices(labels, k, cfg, seed=0, groups=groups)
    b = partition_indices(labels, k, cfg, seed=7, groups=groups)
    for pa, pb in zip(a, b, strict=True):
        np.testing.assert_array_equal(pa, pb)


def test_natural_partition_on_synthetic_users() -> None:
    from fedmerge.data import make_synthetic

    _, y, users = make_synthetic(alpha=0.5, beta=0.5, num_users=5, rng=np.random.default_rng(0))
    parts = partition_indices(y, 5, PartitionConfig(scheme="natural"), seed=0, groups=users)
    _assert_exact_cover(parts, len(y))
    assert sorted(int(np.unique(users[p]).item()) for p in parts) == list(range(5))


@pytest.mark.parametrize("classes_per_client", [1, 2, 3])
def test_pathological_clients_hold_exactly_k_classes(classes_per_client: int) -> None:
    labels = _labels(3000)
    k = 15
    parts = partition_indices(
        labels,
        k,
        PartitionConfig(scheme="pathological", classes_per_client=classes_per_client),
        seed=1,
    )
    for i, p in enumerate(parts):
        held = set(np.unique(labels[p]).tolist())
        assert len(held) == classes_per_client, f"client {i} holds classes {sorted(held)}"
        # documented: the first class of client i is i mod num_classes
        assert i % NUM_CLASSES in held
    _assert_exact_cover(parts, 3000)


@pytest.mark.filterwarnings("ignore:Classes.*will NOT be used:UserWarning")
def test_pathological_with_fewer_clients_than_classes_warns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    labels = _labels(1000)
    with caplog.at_level(logging.WARNING, logger="fedmerge.data.partition"):
        parts = partition_indices(
            labels, 3, PartitionConfig(scheme="pathological", classes_per_client=2), seed=0
        )
    covered = sum(len(p) for p in parts)
    held = set(np.unique(labels[np.concatenate(parts)]).tolist())
    assert len(held) <= 6
    assert covered == int(np.isin(labels, sorted(held)).sum()) < 1000
    assert any("unassigned" in r.getMessage() for r in caplog.records)


def test_quantity_skew_sizes_sum_to_n_and_vary() -> None:
    n = 5000
    labels = _labels(n)
    parts = partition_indices(
        labels,
        8,
        PartitionConfig(scheme="quantity-skew", alpha=0.5, min_partition_size=10),
        seed=2,
    )
    sizes = np.array([len(p) for p in parts])
    assert sizes.sum() == n
    assert sizes.min() >= 10
    assert sizes.max() > 2 * sizes.min(), f"sizes are not skewed: {sizes}"
    _assert_exact_cover(parts, n)


def test_quantity_skew_keeps_labels_iid() -> None:
    n = 6000
    labels = _labels(n)
    global_p = np.bincount(labels, minlength=NUM_CLASSES) / n
    parts = partition_indices(
        labels,
        5,
        PartitionConfig(scheme="quantity-skew", alpha=1.0, min_partition_size=300),
        seed=0,
    )
    for p in parts:
        local_p = np.bincount(labels[p], minlength=NUM_CLASSES) / len(p)
        tv = 0.5 * np.abs(local_p - global_p).sum()
        # an IID sample of >= 300 from 10 classes has TV distance well under 0.15
        assert tv < 0.15, f"client of size {len(p)} is label-skewed (TV {tv:.3f})"


def _mean_label_entropy(alpha: float) -> float:
    labels = _labels(4000)
    parts = partition_indices(
        labels,
        10,
        PartitionConfig(scheme="dirichlet", alpha=alpha, min_partition_size=0),
        seed=0,
    )
    _assert_exact_cover(parts, 4000)
    return float(
        np.mean([_entropy(np.bincount(labels[p], minlength=NUM_CLASSES)) for p in parts if len(p)])
    )


def test_dirichlet_small_alpha_is_more_skewed_than_large_alpha() -> None:
    skewed, balanced = _mean_label_entropy(0.05), _mean_label_entropy(100.0)
    # uniform over 10 classes: log(10) = 2.30 nats
    assert balanced > 2.2
    assert skewed < 1.5
    assert skewed < balanced - 0.7


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan"), float("inf"), True])
def test_alpha_must_be_positive_and_finite(alpha: float) -> None:
    with pytest.raises(ValueError) as info:
        PartitionConfig(scheme="dirichlet", alpha=alpha)
    assert str(info.value) == f"alpha: got {alpha!r}; allowed: a finite number > 0"


@pytest.mark.parametrize("num_partitions", [0, 101])
def test_num_partitions_outside_1_to_n(num_partitions: int) -> None:
    with pytest.raises(ValueError, match=r"num_clients") as info:
        partition_indices(_labels(100), num_partitions, PartitionConfig(), seed=0)
    assert str(num_partitions) in str(info.value)


def test_unknown_scheme() -> None:
    with pytest.raises(ValueError) as info:
        PartitionConfig(scheme="round-robin")
    assert str(info.value) == (
        "scheme: got 'round-robin'; allowed: "
        "iid, dirichlet, pathological, shards, quantity-skew, natural"
    )


def test_natural_without_groups() -> None:
    with pytest.raises(ValueError, match=r"^scheme: got 'natural', which needs"):
        partition_indices(_labels(100), 5, PartitionConfig(scheme="natural"), seed=0)


def test_natural_with_wrong_number_of_clients() -> None:
    groups = _groups(100, 4)
    with pytest.raises(ValueError, match=r"num_clients") as info:
        partition_indices(_labels(100), 5, PartitionConfig(scheme="natural"), seed=0, groups=groups)
    assert "4" in str(info.value)


@pytest.mark.parametrize("key", ["classes_per_client", "shards_per_client"])
def test_per_client_counts_must_be_positive(key: str) -> None:
    with pytest.raises(ValueError) as info:
        PartitionConfig(**{key: 0})
    assert str(info.value) == f"{key}: got 0; allowed: an integer >= 1"


@pytest.mark.parametrize("size", [-1, 2.5])
def test_min_partition_size_must_be_a_non_negative_integer(size: float) -> None:
    with pytest.raises(ValueError) as info:
        PartitionConfig(min_partition_size=size)  # type: ignore[arg-type]
    assert str(info.value) == f"min_partition_size: got {size!r}; allowed: an integer >= 0"


@pytest.mark.parametrize(("n", "clients"), [(100, 7), (60, 60), (1000, 3), (13, 5)])
def test_iid_cut_is_flwr_datasets_iid_partitioner(n: int, clients: int) -> None:
    """The fast IID path gives exactly what flwr-datasets' IidPartitioner gives."""
    import datasets
    from flwr_datasets.partitioner import IidPartitioner

    labels = np.arange(n) % 10
    ours = partition_indices(labels, clients, PartitionConfig(scheme="iid"), seed=3)
    order = np.random.default_rng(3).permutation(n)
    partitioner = IidPartitioner(clients)
    partitioner.dataset = datasets.Dataset.from_dict({"label": labels[order], "index": order})
    for i in range(clients):
        theirs = np.sort(np.asarray(partitioner.load_partition(i)["index"], dtype=np.int64))
        np.testing.assert_array_equal(ours[i], theirs)


def test_pathological_with_more_classes_a_client_than_the_data_has_is_one_line() -> None:
    with pytest.raises(ValueError) as err:
        partition_indices(
            _labels(600), 4, PartitionConfig(scheme="pathological", classes_per_client=11), seed=0
        )
    assert str(err.value) == (
        f"partition.classes_per_client: got 11; allowed: 1 to {NUM_CLASSES} (the classes of "
        "the training set)"
    )


@pytest.mark.parametrize("scheme", ["dirichlet", "quantity-skew"])
def test_more_clients_than_min_partition_size_allows_is_one_line(scheme: str) -> None:
    # 600 samples, at least 10 a client: 60 clients at most, whatever the draw
    with pytest.raises(ValueError) as err:
        partition_indices(
            _labels(600), 61, PartitionConfig(scheme=scheme, min_partition_size=10), seed=0
        )
    assert str(err.value) == (
        "num_clients: got 61 with partition.min_partition_size 10; allowed: 1 to 60 "
        "(600 training samples, at least 10 a client)"
    )


def test_a_dirichlet_split_that_never_meets_min_partition_size_is_one_line_without_warnings(
    recwarn: pytest.WarningsRecorder,
) -> None:
    """flwr-datasets draws ten times, warning at each, then gives up: one line instead."""
    config = PartitionConfig(scheme="dirichlet", alpha=0.05, min_partition_size=10)
    with pytest.raises(ValueError) as err:
        partition_indices(_labels(600), 50, config, seed=0)
    assert str(err.value) == (
        "partition.alpha: got 0.05, which left a client with fewer than 10 samples in ten "
        "draws for 50 clients of 600 samples; allowed: a larger alpha, fewer clients, or a "
        "lower partition.min_partition_size"
    )
    assert [str(w.message) for w in recwarn] == []


@pytest.mark.parametrize("scheme", ["dirichlet", "quantity-skew"])
@pytest.mark.parametrize(
    ("clients", "least", "most"), [(10, 601, 60), (1, 601, 600), (7, 10**6, 85)]
)
def test_min_partition_size_above_the_training_set_names_it_not_num_clients(
    scheme: str, clients: int, least: int, most: int
) -> None:
    # 600 samples: not even one client can hold `least`; `most` = 600 // clients, by hand
    with pytest.raises(ValueError) as err:
        partition_indices(
            _labels(600), clients, PartitionConfig(scheme=scheme, min_partition_size=least), seed=0
        )
    assert str(err.value) == (
        f"partition.min_partition_size: got {least}, more than the 600 training samples; "
        f"allowed: 0 to {most} (600 samples among num_clients {clients})"
    )


@pytest.mark.parametrize("scheme", ["dirichlet", "quantity-skew"])
def test_min_partition_size_equal_to_the_training_set_fits_one_client(scheme: str) -> None:
    config = PartitionConfig(scheme=scheme, min_partition_size=600)
    parts = partition_indices(_labels(600), 1, config, seed=0)
    _assert_exact_cover(parts, 600)


# Labels built by hand: (class sizes, classes_per_client, clients, class the line names,
# clients that drew it, its samples, rarest class). With classes_per_client equal to the
# number of classes every client holds every class; with 1, client i holds class i mod C
# (flwr-datasets' "first-deterministic"): no random draw decides either case.
PATHOLOGICAL_SHORT = [
    ([8, 5, 5, 5, 5, 5, 5, 5, 5, 5], 10, 9, 0, 9, 8, 5),
    ([9, 9, 6], 3, 7, 2, 7, 6, 6),
    ([3, 10], 1, 8, 0, 4, 3, 3),
]


@pytest.mark.parametrize(
    ("sizes", "per_client", "clients", "label", "holders", "samples", "rarest"),
    PATHOLOGICAL_SHORT,
    ids=["every-class-each-client", "a-later-class-short", "one-class-each-client"],
)
def test_pathological_class_drawn_by_more_clients_than_its_samples_is_one_line_in_our_keys(
    sizes: list[int],
    per_client: int,
    clients: int,
    label: int,
    holders: int,
    samples: int,
    rarest: int,
) -> None:
    labels = np.repeat(np.arange(len(sizes)), sizes)
    config = PartitionConfig(scheme="pathological", classes_per_client=per_client)
    with pytest.raises(ValueError) as err:
        partition_indices(labels, clients, config, seed=0)
    lower = "a lower partition.classes_per_client, " if per_client > 1 else ""
    assert str(err.value) == (
        f"num_clients: got {clients} with partition.scheme 'pathological' and "
        f"partition.classes_per_client {per_client}, which gives class {label} to {holders} "
        f"clients but it has {samples} training samples; allowed: fewer clients (up to "
        f"{rarest}, the rarest class's samples, always fits), {lower}or another partition.scheme"
    )
    assert err.value.__cause__ is None and err.value.__suppress_context__
    # the bound the line gives does fit, for any seed
    for seed in range(3):
        parts = partition_indices(labels, rarest, config, seed=seed)
        assert len(parts) == rarest and all(len(p) > 0 for p in parts)
