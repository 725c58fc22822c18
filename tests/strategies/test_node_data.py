"""A node's own data directory: layouts, checks against the data set's kind, evaluation set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from strategies.config import from_run_config
from strategies.node_data import (
    DATA_SPECS,
    data_spec,
    load_node_data,
    local_evaluation_set,
    node_federation,
)

DIGITS = data_spec("digits")


def _arrays(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 1, 8, 8)).astype(np.float32), rng.integers(0, 10, size=n)


def test_npy_layout_loads_the_arrays_as_given(tmp_path: Path) -> None:
    x, y = _arrays(7)
    np.save(tmp_path / "train_x.npy", x)
    np.save(tmp_path / "train_y.npy", y)
    data = load_node_data(tmp_path, DIGITS)
    torch.testing.assert_close(data.train_x, torch.tensor(x))
    assert data.train_y.dtype == torch.int64 and data.train_y.tolist() == y.tolist()
    assert data.num_classes == 10 and data.input_shape == (1, 8, 8)
    assert len(data.test_y) == 0 and data.test_x.shape == (0, 1, 8, 8)
    # without a test set a node evaluates on its training data
    ex, ey = local_evaluation_set(data)
    assert ey.tolist() == y.tolist() and ex.shape == (7, 1, 8, 8)


def test_npz_layout_with_test_set(tmp_path: Path) -> None:
    x, y = _arrays(5)
    tx, ty = _arrays(3, seed=1)
    np.savez(tmp_path / "data.npz", train_x=x.astype(np.uint8), train_y=y, test_x=tx, test_y=ty)
    data = load_node_data(tmp_path, DIGITS)
    assert data.train_x.dtype == torch.float32
    assert data.train_x.tolist() == x.astype(np.uint8).astype(np.float32).tolist()
    ex, ey = local_evaluation_set(data)
    assert ey.tolist() == ty.tolist()
    torch.testing.assert_close(ex, torch.tensor(tx))


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"train_x": _arrays(4)[0]}, "has no train_y"),
        ({"train_y": _arrays(4)[1]}, "has no train_x"),
        ({"train_x": np.zeros((4, 8, 8), np.float32), "train_y": np.zeros(4, np.int64)},
         "samples of shape (8, 8); allowed: (1, 8, 8) (dataset.name 'digits')"),
        ({"train_x": _arrays(4)[0], "train_y": np.array([0, 1, 2, 10])},
         "labels 0 to 10; allowed: 0 to 9"),
        ({"train_x": _arrays(4)[0], "train_y": np.array([0, 1, 2])},
         "train_y has shape (3,); allowed: (4,)"),
        ({"train_x": _arrays(4)[0], "train_y": np.zeros(4, np.float32)},
         "train_y has dtype float32; allowed: integers"),
        ({"train_x": np.full((2, 1, 8, 8), np.nan, np.float32), "train_y": np.zeros(2, np.int64)},
         "NaN or infinite"),
        ({"train_x": np.zeros((0, 1, 8, 8), np.float32), "train_y": np.zeros(0, np.int64)},
         "train_y is empty"),
        ({**dict(zip(("train_x", "train_y"), _arrays(4), strict=True)), "test_x": _arrays(2)[0]},
         "only one of test_x, test_y"),
        ({**dict(zip(("train_x", "train_y"), _arrays(4), strict=True)),
          "test_x": _arrays(2)[0], "test_y": np.array([0, 99])}, "test_y has labels 0 to 99"),
    ],
)  # fmt: skip
def test_bad_directories_are_refused_in_one_line(
    tmp_path: Path, arrays: dict[str, np.ndarray], message: str
) -> None:
    for name, value in arrays.items():
        np.save(tmp_path / f"{name}.npy", value)
    with pytest.raises(ValueError, match=r"^data-dir: ") as info:
        load_node_data(tmp_path, DIGITS)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_missing_directory_and_unreadable_array(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="allowed: an existing directory"):
        load_node_data(tmp_path / "nope", DIGITS)
    (tmp_path / "train_x.npy").write_bytes(b"not an array")
    np.save(tmp_path / "train_y.npy", np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="unreadable array"):
        load_node_data(tmp_path, DIGITS)


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match=r"^dataset.name: got 'my-data'; allowed with nodes"):
        data_spec("my-data")
    assert data_spec("cifar100").num_classes == 100 and data_spec("mnist1d").input_shape == (1, 40)
    assert set(DATA_SPECS) >= {"fashion-mnist", "digits", "synthetic"}


def test_node_federation_builds_the_scenarios_model_from_node_data(tmp_path: Path) -> None:
    x, y = _arrays(6)
    np.savez(tmp_path / "data.npz", train_x=x, train_y=y)
    config = from_run_config({"dataset.name": "digits", "model.name": "mlp"})
    fed = node_federation(config, str(tmp_path))
    assert fed.data.train_y.tolist() == y.tolist()
    model = fed.initial_model()
    assert model(torch.tensor(x)).shape == (6, 10)
