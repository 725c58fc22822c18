"""``fedmerge partition``: a split the data cannot give is one line in fedmerge's keys, exit 2."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sims import cli

EXIT_BAD_INPUT = 2
DIGITS = ["--set", "dataset.name=digits", "--set", "model.name=mlp"]


def _digits_train_labels() -> np.ndarray:
    """The training labels of the scenario's digits data set."""
    from fedmerge.data import load_dataset_config
    from sims.scenario_files import load_scenario

    scenario = load_scenario(None, ["dataset.name=digits"])
    return load_dataset_config(scenario.dataset).train_y.numpy()


def _partition(tmp_path: Path, capsys: pytest.CaptureFixture[str], *sets: str) -> str:
    """Run ``fedmerge partition`` with ``sets``; check exit 2, no PNG and no output; stderr."""
    png = tmp_path / "p.png"
    argv = ["partition", *DIGITS, "--out", str(png)]
    for item in sets:
        argv += ["--set", item]
    assert cli.main(argv) == EXIT_BAD_INPUT
    out, err = capsys.readouterr()
    assert out == "" and not png.exists()
    return err


@pytest.mark.parametrize("scheme", ["dirichlet", "quantity-skew"])
@pytest.mark.parametrize("clients", [1, 10])
def test_min_partition_size_above_the_data_names_it_with_the_data_size(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], scheme: str, clients: int
) -> None:
    n = 1797 - round(0.2 * 1797)  # digits: sklearn's 1,797 images less the 20 % test split
    err = _partition(
        tmp_path, capsys, f"partition.scheme={scheme}", f"num_clients={clients}",
        f"clients_per_round={clients}", "partition.min_partition_size=1000000",
    )  # fmt: skip
    assert err == (
        f"fedmerge: error: partition.min_partition_size: got 1000000, more than the {n} "
        f"training samples; allowed: 0 to {n // clients} ({n} samples among num_clients "
        f"{clients})\n"
    )


def test_more_clients_than_min_partition_size_allows_still_names_num_clients(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    n = 1797 - round(0.2 * 1797)
    err = _partition(
        tmp_path, capsys, "partition.scheme=dirichlet", "num_clients=10",
        "partition.min_partition_size=1000",
    )  # fmt: skip
    assert err == (
        "fedmerge: error: num_clients: got 10 with partition.min_partition_size 1000; "
        f"allowed: 1 to {n // 1000} ({n} training samples, at least 1000 a client)\n"
    )


def test_pathological_with_more_clients_than_a_class_has_samples_is_one_line_in_our_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # every client holds all 10 classes: each class goes to all 1000 clients, and the
    # first class checked (0) has fewer samples than that
    counts = np.bincount(_digits_train_labels())
    err = _partition(
        tmp_path, capsys, "partition.scheme=pathological", "partition.classes_per_client=10",
        "num_clients=1000", "clients_per_round=1",
    )  # fmt: skip
    assert err == (
        "fedmerge: error: num_clients: got 1000 with partition.scheme 'pathological' and "
        f"partition.classes_per_client 10, which gives class 0 to 1000 clients but it has "
        f"{counts[0]} training samples; allowed: fewer clients (up to {counts.min()}, the "
        f"rarest class's samples, always fits), a lower partition.classes_per_client, or "
        f"another partition.scheme\n"
    )
