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


def _write_pngs(root: Path, images: np.ndarray, labels: np.ndarray) -> None:
    from PIL import Image

    for i, (pixels, label) in enumerate(zip(images, labels, strict=True)):
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / str(label) / f"img{i:03d}.png")


def test_image_folders_load_as_standardised_arrays(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    train = rng.integers(0, 256, size=(6, 8, 8), dtype=np.uint8)
    train_y = np.array([0, 3, 3, 9, 0, 3])
    test = rng.integers(0, 256, size=(2, 8, 8), dtype=np.uint8)
    _write_pngs(tmp_path / "train", train, train_y)
    _write_pngs(tmp_path / "test", test, np.array([9, 1]))
    data = load_node_data(tmp_path, DIGITS)
    # independent reading: folders in name order, files in name order within each
    order = sorted(range(6), key=lambda i: (str(train_y[i]), f"img{i:03d}"))
    pixels = train[order].astype(np.float64) / 255.0
    mean, std = pixels.mean(), pixels.std(ddof=1)
    expected = ((pixels - mean) / std)[:, None].astype(np.float32)
    torch.testing.assert_close(data.train_x, torch.from_numpy(expected))
    assert data.train_y.tolist() == train_y[order].tolist()
    test_expected = ((test[[1, 0]].astype(np.float64) / 255.0 - mean) / std)[:, None]
    torch.testing.assert_close(data.test_x, torch.from_numpy(test_expected.astype(np.float32)))
    assert data.test_y.tolist() == [1, 9]


def test_rgb_images_keep_their_channels(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    _write_pngs(tmp_path / "train", images, np.array([0, 1, 2]))
    data = load_node_data(tmp_path, data_spec("cifar10"))
    assert data.train_x.shape == (3, 3, 32, 32)
    pixels = images.astype(np.float64) / 255.0  # standardised: undo with the node's statistics
    back = data.train_x[0].numpy() * pixels.std(ddof=1) + pixels.mean()
    np.testing.assert_allclose(back, pixels[0].transpose(2, 0, 1), atol=1e-5)


@pytest.mark.parametrize(
    ("folder", "size", "kind", "message"),
    [
        ("12", 8, "digits", r"has a folder '12'; allowed: labels 0 to 9 as folder names"),
        ("cat", 8, "digits", r"has a folder 'cat'; allowed: labels 0 to 9"),
        ("1", 7, "digits", r"is 7x7 pixels; allowed: 8x8 \(dataset.name 'digits'\)"),
        ("1", 8, "mnist1d", r"holds images; allowed: arrays for dataset.name 'mnist1d'"),
    ],
)
def test_bad_image_folders_are_refused_in_one_line(
    tmp_path: Path, folder: str, size: int, kind: str, message: str
) -> None:
    from PIL import Image

    (tmp_path / "train" / folder).mkdir(parents=True)
    for i in range(2):
        Image.fromarray(np.zeros((size, size), np.uint8)).save(
            tmp_path / "train" / folder / f"{i}.png"
        )
    with pytest.raises(ValueError, match=r"^data-dir: .*" + message):
        load_node_data(tmp_path, data_spec(kind))


def test_saved_datasets_dict_with_array_column(tmp_path: Path) -> None:
    import datasets

    x, y = _arrays(5, seed=3)
    tx, ty = _arrays(2, seed=4)
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"x": x.tolist(), "label": y.tolist()}),
            "test": datasets.Dataset.from_dict({"x": tx.tolist(), "label": ty.tolist()}),
        }
    ).save_to_disk(str(tmp_path / "d"))
    data = load_node_data(tmp_path / "d", DIGITS)
    torch.testing.assert_close(data.train_x, torch.tensor(x))
    torch.testing.assert_close(data.test_x, torch.tensor(tx))
    assert data.train_y.tolist() == y.tolist() and data.test_y.tolist() == ty.tolist()


def test_saved_dataset_of_images_is_the_train_split(tmp_path: Path) -> None:
    import datasets
    from PIL import Image

    rng = np.random.default_rng(5)
    pixels = rng.integers(0, 256, size=(4, 8, 8), dtype=np.uint8)
    ds = datasets.Dataset.from_dict(
        {"image": [Image.fromarray(p) for p in pixels], "label": [1, 2, 3, 4]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}),
    )
    ds.save_to_disk(str(tmp_path / "d"))
    data = load_node_data(tmp_path / "d", DIGITS)
    scaled = pixels.astype(np.float64) / 255.0
    expected = ((scaled - scaled.mean()) / scaled.std(ddof=1))[:, None].astype(np.float32)
    torch.testing.assert_close(data.train_x, torch.from_numpy(expected))
    assert data.train_y.tolist() == [1, 2, 3, 4] and len(data.test_y) == 0


def test_saved_dataset_without_a_known_column_is_refused(tmp_path: Path) -> None:
    import datasets

    datasets.Dataset.from_dict({"pixels": [[0.0] * 64], "label": [0]}).save_to_disk(
        str(tmp_path / "d")
    )
    with pytest.raises(ValueError, match=r"split train has columns \['pixels', 'label'\]; "):
        load_node_data(tmp_path / "d", DIGITS)
