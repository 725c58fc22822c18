"""A node's own data: arrays in a local directory instead of a partition of a shared data set.

A SuperNode started with ``--node-config "partition-id=3 data-dir=/srv/data"``
trains on the arrays in ``/srv/data`` and never loads the scenario's data set.
The scenario's ``dataset.name`` still names the *kind* of data (its input
shape and number of classes, :data:`DATA_SPECS`), so that the server and
every node build the same model; a node whose arrays do not match refuses to
join with a one-line error that the server writes to ``summary.json``.

Layout of a data directory (one of)::

    DIR/data.npz                 # arrays train_x, train_y [, test_x, test_y]
    DIR/train_x.npy, DIR/train_y.npy [, DIR/test_x.npy, DIR/test_y.npy]
    DIR/train/LABEL/*.png [, DIR/test/LABEL/*.png]    # image folders (also .jpg, .jpeg)
    DIR/dataset_dict.json ...    # datasets' save_to_disk: splits train [, test]

``train_x``: float array of shape ``(n, *input_shape)``, preprocessed the way
the server's test set is (fedmerge's loaders standardise each data set with
its training mean and standard deviation); integer arrays are converted to
float32 as they are. ``train_y``: integer labels of shape ``(n,)`` in
``[0, num_classes)``. ``test_x``/``test_y`` (both or neither) are the node's
own held-out set, used for client-side evaluation; without them the node
evaluates on its training data.

Image folders: the folder names are the labels (``0`` to ``num_classes -
1``); images must have the data set's height and width and are read as
grey (one channel) or RGB (three). Pixels are scaled to [0, 1] and
standardised with the mean and sample standard deviation of the node's own
training images (one scalar each, as fedmerge's loaders do with the whole
data set's training split): close to the server's preprocessing when the
node's images are like the data set's, not equal to it.

A saved ``datasets`` data set (``Dataset.save_to_disk`` or
``DatasetDict.save_to_disk``; a single Dataset is the train split) has a
``label`` column and the samples in the first of the columns ``x``,
``image``, ``img``: arrays of the sample shape, used as given like
``train_x``; or ``Image`` features, read and standardised like image
folders.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedmerge.data import DatasetBundle
from strategies.config import RunConfig
from strategies.federation import Federation

#: ``dataset.name`` -> (input shape, number of classes) of the built-in data sets.
DATA_SPECS: dict[str, tuple[tuple[int, ...], int]] = {
    "cifar10": ((3, 32, 32), 10),
    "cifar100": ((3, 32, 32), 100),
    "digits": ((1, 8, 8), 10),
    "fashion-mnist": ((1, 28, 28), 10),
    "mnist": ((1, 28, 28), 10),
    "mnist1d": ((1, 40), 10),
    "synthetic": ((60,), 10),
}

_ARRAYS = ("train_x", "train_y", "test_x", "test_y")


@dataclass(frozen=True)
class DataSpec:
    """What every participant's data must look like.

    Attributes
    ----------
    kind : str
        The scenario's ``dataset.name``.
    input_shape : tuple of int
        Shape of one sample.
    num_classes : int
        Labels lie in ``[0, num_classes)``.
    """

    kind: str
    input_shape: tuple[int, ...]
    num_classes: int

    def empty_arrays(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero samples of this kind: ``(x, y)`` of shapes ``(0, *input_shape)`` and ``(0,)``."""
        return torch.zeros((0, *self.input_shape)), torch.zeros(0, dtype=torch.int64)

    def __post_init__(self) -> None:
        """Refuse empty shapes and fewer than two classes."""
        if not self.input_shape or min(self.input_shape) < 1:
            raise ValueError(f"input_shape: got {self.input_shape}; allowed: positive sizes")
        if self.num_classes < 2:
            raise ValueError(f"num_classes: got {self.num_classes}; allowed: >= 2")


def data_spec(kind: str) -> DataSpec:
    """The :class:`DataSpec` of the data set named ``kind``.

    Raises
    ------
    ValueError
        If ``kind`` is not one of :data:`DATA_SPECS`.
    """
    if kind not in DATA_SPECS:
        raise ValueError(
            f"dataset.name: got {kind!r}; allowed with nodes that bring their own data: "
            f"{', '.join(sorted(DATA_SPECS))}"
        )
    shape, classes = DATA_SPECS[kind]
    return DataSpec(kind, shape, classes)


#: Suffixes of the image files of the image-folder layout.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _need_image_kind(spec: DataSpec, where: str) -> None:
    if len(spec.input_shape) != 3 or spec.input_shape[0] not in (1, 3):
        raise ValueError(
            f"data-dir: {where} holds images; allowed: arrays for dataset.name {spec.kind!r} "
            f"(samples of shape {spec.input_shape})"
        )


def _pixels(image: Any, spec: DataSpec, where: str) -> np.ndarray:
    """A PIL image as ``(C, H, W)`` float32 in [0, 1], after checking its size."""
    channels, height, width = spec.input_shape
    pixels = np.asarray(image.convert("L" if channels == 1 else "RGB"))
    if pixels.shape[:2] != (height, width):
        raise ValueError(
            f"data-dir: {where} is {pixels.shape[1]}x{pixels.shape[0]} pixels; "
            f"allowed: {width}x{height} (dataset.name {spec.kind!r})"
        )
    chw = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    return chw.astype(np.float32) / np.float32(255.0)


def _standardised(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Pixels standardised with the training images' mean and sample std (one number each)."""
    train = arrays["train_x"]
    mean = np.float32(train.mean(dtype=np.float64))
    std = np.float32(train.std(dtype=np.float64, ddof=1)) or np.float32(1.0)
    out = dict(arrays)
    for key in ("train_x", "test_x"):
        if key in out:
            out[key] = (out[key] - mean) / std
    return out


def _read_image_split(split_dir: Path, spec: DataSpec) -> tuple[np.ndarray, np.ndarray]:
    """Pixels in [0, 1] of shape ``(n, C, H, W)`` and labels of ``split_dir/LABEL/*.png``."""
    from PIL import Image, UnidentifiedImageError  # only nodes with images need Pillow

    where = repr(str(split_dir))
    _need_image_kind(spec, where)
    xs: list[np.ndarray] = []
    ys: list[int] = []
    for label_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        name = label_dir.name
        if not name.isdigit() or int(name) >= spec.num_classes:
            raise ValueError(
                f"data-dir: {where} has a folder {name!r}; allowed: labels 0 to "
                f"{spec.num_classes - 1} as folder names (dataset.name {spec.kind!r})"
            )
        for path in sorted(label_dir.iterdir()):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(path) as image:
                    xs.append(_pixels(image, spec, repr(str(path))))
            except (OSError, UnidentifiedImageError) as exc:
                raise ValueError(f"data-dir: {str(path)!r} is not a readable image: {exc}") from exc
            ys.append(int(name))
    if not xs:
        return np.zeros((0, *spec.input_shape), np.float32), np.zeros(0, np.int64)
    return np.stack(xs), np.asarray(ys, dtype=np.int64)


def _read_images(root: Path, spec: DataSpec) -> dict[str, np.ndarray]:
    """The image-folder layout as standardised arrays (see the module docstring)."""
    train_x, train_y = _read_image_split(root / "train", spec)
    if len(train_y) < 2:
        raise ValueError(
            f"data-dir: {str(root / 'train')!r} holds {len(train_y)} images; allowed: at least "
            f"2, in folders named by label ({', '.join(IMAGE_SUFFIXES)})"
        )
    arrays = {"train_x": train_x, "train_y": train_y}
    if (root / "test").is_dir():
        arrays["test_x"], arrays["test_y"] = _read_image_split(root / "test", spec)
    return _standardised(arrays)


#: Columns of a saved ``datasets`` data set that may hold the samples, in order of preference.
FEATURE_COLUMNS = ("x", "image", "img")


def _read_saved_dataset(root: Path, spec: DataSpec) -> dict[str, np.ndarray]:
    """A ``datasets`` Dataset or DatasetDict written by ``save_to_disk`` (module docstring)."""
    import datasets  # only nodes with such a directory need it

    where = repr(str(root))
    try:
        saved = datasets.load_from_disk(str(root))
    except (OSError, ValueError) as exc:
        raise ValueError(f"data-dir: {where} is not a readable saved data set: {exc}") from exc
    splits = {"train": saved} if isinstance(saved, datasets.Dataset) else dict(saved)
    if "train" not in splits:
        raise ValueError(
            f"data-dir: {where} has splits {sorted(splits)}; allowed: train [and test]"
        )
    arrays: dict[str, np.ndarray] = {}
    images = False
    for split in ("train", "test"):
        if split not in splits:
            continue
        ds = splits[split]
        column = next((c for c in FEATURE_COLUMNS if c in ds.column_names), None)
        if column is None or "label" not in ds.column_names:
            raise ValueError(
                f"data-dir: {where} split {split} has columns {ds.column_names}; allowed: "
                f"'label' and one of {', '.join(repr(c) for c in FEATURE_COLUMNS)}"
            )
        arrays[f"{split}_y"] = np.asarray(ds["label"])
        if isinstance(ds.features[column], datasets.Image):
            _need_image_kind(spec, where)
            images = True
            pixels = [
                _pixels(image, spec, f"{where} {split} row {i}")
                for i, image in enumerate(ds[column])
            ]
            arrays[f"{split}_x"] = (
                np.stack(pixels) if pixels else np.zeros((0, *spec.input_shape), np.float32)
            )
        else:
            arrays[f"{split}_x"] = np.asarray(ds.with_format("numpy")[column])
    if images and len(arrays["train_y"]) < 2:
        raise ValueError(f"data-dir: {where} train holds fewer than 2 images; allowed: >= 2")
    return _standardised(arrays) if images else arrays


def _read_arrays(root: Path, spec: DataSpec) -> dict[str, np.ndarray]:
    """The arrays of a data directory, by name (see the module docstring)."""
    if not root.is_dir():
        raise ValueError(f"data-dir: got {str(root)!r}; allowed: an existing directory")
    npz = root / "data.npz"
    if not npz.is_file() and not (root / "train_x.npy").is_file():
        if (root / "dataset_dict.json").is_file() or (root / "dataset_info.json").is_file():
            return _read_saved_dataset(root, spec)
        if (root / "train").is_dir():
            return _read_images(root, spec)
    try:
        if npz.is_file():
            with np.load(npz, allow_pickle=False) as archive:
                arrays = {k: np.asarray(archive[k]) for k in _ARRAYS if k in archive.files}
            where = str(npz)
        else:
            arrays = {
                k: np.load(root / f"{k}.npy", allow_pickle=False)
                for k in _ARRAYS
                if (root / f"{k}.npy").is_file()
            }
            where = str(root)
    except (OSError, ValueError) as exc:
        raise ValueError(f"data-dir: {str(root)!r} holds an unreadable array: {exc}") from exc
    for key in ("train_x", "train_y"):
        if key not in arrays:
            raise ValueError(
                f"data-dir: {where!r} has no {key}; allowed: data.npz with train_x, train_y "
                f"[test_x, test_y], or train_x.npy, train_y.npy [test_x.npy, test_y.npy], "
                f"or images in train/LABEL/ [test/LABEL/], or a datasets save_to_disk "
                f"directory"
            )
    if ("test_x" in arrays) != ("test_y" in arrays):
        raise ValueError(
            f"data-dir: {where!r} has only one of test_x, test_y; allowed: both or neither"
        )
    return arrays


def _checked(
    x: np.ndarray, y: np.ndarray, split: str, spec: DataSpec, where: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` as float32 and int64 tensors after checking them against ``spec``."""
    if x.dtype.kind not in "fiu":
        raise ValueError(f"data-dir: {where} {split}_x has dtype {x.dtype}; allowed: numbers")
    if y.dtype.kind not in "iu":
        raise ValueError(f"data-dir: {where} {split}_y has dtype {y.dtype}; allowed: integers")
    if tuple(x.shape[1:]) != spec.input_shape:
        raise ValueError(
            f"data-dir: {where} {split}_x has samples of shape {tuple(x.shape[1:])}; allowed: "
            f"{spec.input_shape} (dataset.name {spec.kind!r})"
        )
    if y.ndim != 1 or len(y) != len(x):
        raise ValueError(
            f"data-dir: {where} {split}_y has shape {y.shape}; allowed: ({len(x)},), "
            f"one label per {split}_x sample"
        )
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= spec.num_classes):
        raise ValueError(
            f"data-dir: {where} {split}_y has labels {int(y.min())} to {int(y.max())}; "
            f"allowed: 0 to {spec.num_classes - 1} (dataset.name {spec.kind!r})"
        )
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise ValueError(f"data-dir: {where} {split}_x has NaN or infinite values; allowed: finite")
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return xt, torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))


def load_node_data(data_dir: str | Path, spec: DataSpec) -> DatasetBundle:
    """Load and check a node's data directory.

    Parameters
    ----------
    data_dir : str or Path
        The directory (layout in the module docstring).
    spec : DataSpec
        What the arrays must look like.

    Returns
    -------
    DatasetBundle
        The node's training arrays, and its test arrays (empty, shape
        ``(0, *input_shape)``, when it has none).

    Raises
    ------
    ValueError
        One line naming ``data-dir``, the array and what is allowed.
    """
    root = Path(data_dir)
    arrays = _read_arrays(root, spec)
    where = repr(str(root))
    train_x, train_y = _checked(arrays["train_x"], arrays["train_y"], "train", spec, where)
    if len(train_y) == 0:
        raise ValueError(f"data-dir: {where} train_y is empty; allowed: at least one sample")
    if "test_x" in arrays:
        test_x, test_y = _checked(arrays["test_x"], arrays["test_y"], "test", spec, where)
    else:
        test_x, test_y = spec.empty_arrays()
    return DatasetBundle(spec.kind, train_x, train_y, test_x, test_y, spec.num_classes)


def local_evaluation_set(data: DatasetBundle) -> tuple[torch.Tensor, torch.Tensor]:
    """A node's evaluation arrays: its test set, else its training set."""
    if len(data.test_y):
        return data.test_x, data.test_y
    return data.train_x, data.train_y


@lru_cache(maxsize=4)
def node_federation(config: RunConfig, data_dir: str) -> Federation:
    """The :class:`Federation` of a node that brings its own data (one per process and run)."""
    data = load_node_data(data_dir, data_spec(config.dataset.name))
    return Federation(config, data=data)
