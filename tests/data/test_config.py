"""Tests of DatasetConfig, the data-set registry and load_dataset_config."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import FrozenInstanceError, fields
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmerge.data import (
    DATASET_NAMES,
    DatasetBundle,
    DatasetConfig,
    dataset_names,
    load_dataset,
    load_dataset_config,
    register_dataset,
)
from fedmerge.data import config as config_module

SPREAD = "a number from 0 to 100 (FedProx's Synthetic uses 0 to 1)"
SAMPLES = "an integer from 10 to 1,000,000"
BUILT_IN = ("cifar10", "cifar100", "digits", "fashion-mnist", "mnist", "mnist1d", "synthetic")


def test_defaults_are_todays_dataset_table() -> None:
    config = DatasetConfig()
    assert {f.name: getattr(config, f.name) for f in fields(config)} == {
        "name": "fashion-mnist",
        "root": "",
        "synthetic_alpha": 1.0,
        "synthetic_beta": 1.0,
        "synthetic_users": 30,
        "mnist1d_samples": 5000,
    }
    with pytest.raises(FrozenInstanceError):
        config.name = "digits"  # type: ignore[misc]


def test_names_are_the_sorted_built_ins() -> None:
    assert dataset_names() == DATASET_NAMES == BUILT_IN


@pytest.mark.parametrize("name", BUILT_IN)
def test_every_built_in_name_is_accepted(name: str) -> None:
    assert DatasetConfig(name=name).name == name


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "imagenet"}, "name: got 'imagenet'; allowed: " + ", ".join(BUILT_IN)),
        ({"root": "/no/such"}, "root: got '/no/such'; allowed: '' or an existing directory"),
        ({"synthetic_alpha": -0.5}, "synthetic_alpha: got -0.5; allowed: " + SPREAD),
        ({"synthetic_alpha": float("nan")}, "synthetic_alpha: got nan; allowed: " + SPREAD),
        ({"synthetic_beta": float("inf")}, "synthetic_beta: got inf; allowed: " + SPREAD),
        ({"synthetic_beta": "1"}, "synthetic_beta: got '1'; allowed: " + SPREAD),
        # 1e308 overflowed the generator: every sample got label 0
        ({"synthetic_alpha": 1e308}, "synthetic_alpha: got 1e+308; allowed: " + SPREAD),
        ({"synthetic_beta": 100.5}, "synthetic_beta: got 100.5; allowed: " + SPREAD),
        ({"synthetic_users": 0}, "synthetic_users: got 0; allowed: an integer >= 1"),
        ({"synthetic_users": 2.0}, "synthetic_users: got 2.0; allowed: an integer >= 1"),
        ({"mnist1d_samples": 9}, "mnist1d_samples: got 9; allowed: " + SAMPLES),
        # 10**12 was generated until the memory was gone
        ({"mnist1d_samples": 10**12}, "mnist1d_samples: got 1000000000000; allowed: " + SAMPLES),
    ],
)  # fmt: skip
def test_bad_values_name_the_field_only(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError) as info:
        DatasetConfig(**kwargs)  # type: ignore[arg-type]
    assert str(info.value) == message


def test_edge_values_are_accepted(tmp_path: Path) -> None:
    config = DatasetConfig(
        root=str(tmp_path), synthetic_alpha=0, synthetic_beta=0.0, synthetic_users=1,
        mnist1d_samples=10,
    )  # fmt: skip
    assert config.root == str(tmp_path) and config.synthetic_users == 1
    high = DatasetConfig(synthetic_alpha=100, synthetic_beta=100.0, mnist1d_samples=10**6)
    assert high.mnist1d_samples == 1_000_000


def test_load_dataset_config_is_load_dataset_from_the_same_cache() -> None:
    config = DatasetConfig(name="synthetic", synthetic_alpha=0.5, synthetic_users=4)
    a = load_dataset_config(config)
    b = load_dataset(
        "synthetic",
        None,
        synthetic_alpha=0.5,
        synthetic_beta=1.0,
        synthetic_users=4,
        mnist1d_samples=5000,
    )
    assert a is b  # one per-process cache for both entry points (all options spelt out)
    other = load_dataset_config(
        DatasetConfig(name="synthetic", synthetic_alpha=0.5, synthetic_beta=2.0, synthetic_users=4)
    )
    # beta moves the users' input means, so the inputs change with it
    assert not torch.equal(a.train_x[:5], other.train_x[:5])


def test_load_dataset_config_digits_equals_load_dataset() -> None:
    a = load_dataset_config(DatasetConfig(name="digits"))
    b = load_dataset("digits")
    for x, y in ((a.train_x, b.train_x), (a.test_y, b.test_y)):
        assert torch.equal(x, y)
    assert a.num_classes == 10 and a.train_x.shape[1:] == (1, 8, 8)


def test_root_argument_replaces_config_root(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    config = DatasetConfig(name="mnist", root=str(tmp_path / "a"))
    with pytest.raises(FileNotFoundError, match=r"^root: ") as info:
        load_dataset_config(config, root=str(tmp_path / "b"))
    assert str(tmp_path / "b") in str(info.value)
    with pytest.raises(FileNotFoundError, match=r"^root: ") as info:
        load_dataset_config(config)
    assert str(tmp_path / "a") in str(info.value)


def test_load_dataset_validates_its_options() -> None:
    with pytest.raises(ValueError) as info:
        load_dataset("synthetic", synthetic_users=0)
    assert str(info.value) == "synthetic_users: got 0; allowed: an integer >= 1"


# --------------------------------------------------------------------------- registry


@pytest.fixture
def clean_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A private copy of the data-set registry, dropped after the test."""
    monkeypatch.setattr(config_module, "_LOADERS", dict(config_module._LOADERS))
    yield


def _tiny(root: str | None, config: DatasetConfig) -> DatasetBundle:
    x = torch.arange(12.0).reshape(6, 2)
    y = torch.tensor([0, 1, 0, 1, 0, 1])
    return DatasetBundle("tiny", x[:4], y[:4], x[4:], y[4:], num_classes=2,
                         train_groups=np.zeros(4, dtype=np.int64))  # fmt: skip


@pytest.mark.usefixtures("clean_registry")
def test_registered_loader_is_loaded_by_name_and_config() -> None:
    with pytest.raises(ValueError, match=r"^name: got 'tiny'"):
        DatasetConfig(name="tiny")
    register_dataset("tiny", _tiny)
    assert dataset_names() == ("cifar10", "cifar100", "digits", "fashion-mnist", "mnist",
                               "mnist1d", "synthetic", "tiny")  # fmt: skip
    bundle = load_dataset_config(DatasetConfig(name="tiny"))
    assert bundle.name == "tiny" and bundle.input_shape == (2,)
    assert bundle.train_y.tolist() == [0, 1, 0, 1]
    assert bundle.test_x.tolist() == [[8.0, 9.0], [10.0, 11.0]]


@pytest.mark.usefixtures("clean_registry")
def test_register_refuses_duplicates_and_non_callables() -> None:
    with pytest.raises(ValueError, match=r"^name: got 'digits'; allowed: a name not yet"):
        register_dataset("digits", _tiny)
    with pytest.raises(TypeError, match=r"^loader: got 'x'"):
        register_dataset("x", "x")  # type: ignore[arg-type]
    assert "x" not in dataset_names()
