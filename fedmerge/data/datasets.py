"""Load the offline data sets into memory as tensors."""

from __future__ import annotations

import gzip
import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from fedmerge.cache import cache_key, cached_arrays
from fedmerge.data.config import DatasetConfig, dataset_loader, dataset_names, register_dataset
from fedmerge.data.synthetic import make_synthetic

logger = logging.getLogger(__name__)

#: Where Debian's ``dataset-fashion-mnist`` package puts the IDX files.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class DatasetBundle:
    """A data set held in memory, split into train and test.

    Attributes
    ----------
    name : str
        Data set name.
    train_x : Tensor, shape (n_train, *input_shape), float32
        Normalised training inputs.
    train_y : Tensor, shape (n_train,), int64
        Training labels in ``[0, num_classes)``.
    test_x : Tensor, shape (n_test, *input_shape), float32
    test_y : Tensor, shape (n_test,), int64
    num_classes : int
    train_groups : ndarray, shape (n_train,), optional
        Natural owner of each training sample (Synthetic's users).
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    train_groups: np.ndarray | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input sample."""
        return tuple(self.train_x.shape[1:])


def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) into a uint8 array.

    Raises
    ------
    ValueError
        If the file is not a gzip file (for ``.gz``), is empty, or is not an
        IDX file of unsigned bytes whose size matches its header.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (gzip.BadGzipFile, EOFError) as exc:
        raise ValueError(
            f"root: {str(path)!r}: got a damaged gzip file ({exc}); "
            f"allowed: a gzip-compressed IDX file"
        ) from None
    ndim = data[3] if len(data) >= 4 else 0
    size = 4 + 4 * ndim
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    if len(data) < 4 or data[:3] != b"\x00\x00\x08" or len(data) != size + int(np.prod(dims)):
        raise ValueError(
            f"root: {str(path)!r}: got {len(data)} bytes that are not an IDX file of unsigned "
            f"bytes; allowed: an IDX file (magic 0x00000801 or 0x00000803, size as its header)"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=size).reshape(dims)


def _find_idx(root: Path, stem: str) -> Path:
    for suffix in (".gz", ""):
        path = root / f"{stem}{suffix}"
        if path.exists():
            return path
    raise FileNotFoundError(
        f"root: {str(root)!r} has no {stem}[.gz]; allowed: a directory holding "
        f"the four Fashion-MNIST IDX files (Debian: apt-get install dataset-fashion-mnist)"
    )


def _normalise(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scale to [0, 1], then standardise with the training mean and (sample) std.

    The statistics are reduced in float64 by numpy, on one thread, so every
    process on every machine gets the same bits (torch's float32 reductions
    depend on the thread count).
    """
    tr = train.astype(np.float32) / np.float32(255.0)
    te = test.astype(np.float32) / np.float32(255.0)
    mean = np.float32(tr.mean(dtype=np.float64))
    std = np.float32(tr.std(dtype=np.float64, ddof=1))
    return (tr - mean) / std, (te - mean) / std


def _fashion_mnist(root: Path) -> DatasetBundle:
    if not root.is_dir():
        raise FileNotFoundError(
            f"root: {str(root)!r} is not a directory; allowed: a directory holding "
            f"the Fashion-MNIST IDX files (Debian: apt-get install dataset-fashion-mnist)"
        )
    stems = (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    )
    paths = [_find_idx(root, stem) for stem in stems]
    stat = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in paths]

    def decode() -> dict[str, np.ndarray]:
        raw = dict(zip(stems, (_read_idx(path) for path in paths), strict=True))
        for images, labels in (("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                               ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")):  # fmt: skip
            y, where = raw[labels], str(paths[stems.index(labels)])
            if raw[images].ndim != 3 or y.ndim != 1 or len(y) != len(raw[images]):
                raise ValueError(
                    f"root: {where!r}: got {y.shape} labels for images of shape "
                    f"{raw[images].shape}; allowed: one label per 2-D image"
                )
            if len(y) and int(y.max()) >= 10:
                raise ValueError(
                    f"root: {where!r}: got label {int(y.max())}; allowed: labels 0 to 9"
                )
        train_x, test_x = _normalise(
            raw["train-images-idx3-ubyte"][:, None], raw["t10k-images-idx3-ubyte"][:, None]
        )
        return {
            "train_x": train_x,
            "train_y": raw["train-labels-idx1-ubyte"].astype(np.int64),
            "test_x": test_x,
            "test_y": raw["t10k-labels-idx1-ubyte"].astype(np.int64),
        }

    # The decoded, normalised arrays are what every process holds: cache those,
    # memory-mapped, so that the processes of a machine share one copy.
    arrays = cached_arrays("fashion-mnist-normalised", cache_key(stat), decode)
    return DatasetBundle(
        name="fashion-mnist",
        train_x=torch.from_numpy(arrays["train_x"]),
        train_y=torch.from_numpy(arrays["train_y"]),
        test_x=torch.from_numpy(arrays["test_x"]),
        test_y=torch.from_numpy(arrays["test_y"]),
        num_classes=10,
    )


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, ...]:
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = round(len(y) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test], train


def _digits() -> DatasetBundle:
    def split() -> dict[str, np.ndarray]:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        x = (bunch.images.astype(np.float32) / 16.0)[:, None]
        tr_x, tr_y, te_x, te_y, _ = _split(x, bunch.target.astype(np.int64), 0.2, seed=0)
        mean, std = tr_x.mean(), tr_x.std()
        return {
            "train_x": (tr_x - mean) / std,
            "train_y": tr_y,
            "test_x": (te_x - mean) / std,
            "test_y": te_y,
        }

    # Importing scikit-learn costs about 1 s of CPU, in every process that
    # loads the set (each Ray actor of each run): cache the split, keyed by
    # scikit-learn's version, which ships the data.
    from importlib.metadata import version

    arrays = cached_arrays("digits-normalised", cache_key(version("scikit-learn")), split)
    return DatasetBundle(
        name="digits",
        train_x=torch.from_numpy(arrays["train_x"]),
        train_y=torch.from_numpy(arrays["train_y"]),
        test_x=torch.from_numpy(arrays["test_x"]),
        test_y=torch.from_numpy(arrays["test_y"]),
        num_classes=10,
    )


def _mnist1d(num_samples: int) -> DatasetBundle:
    def generate() -> dict[str, np.ndarray]:
        from mnist1d.data import get_dataset_args, make_dataset

        args = get_dataset_args()
        args.num_samples = num_samples
        # make_dataset seeds NumPy's legacy global RNG; restore the caller's state after.
        state = np.random.get_state()  # noqa: NPY002
        try:
            data = make_dataset(args)
        finally:
            np.random.set_state(state)  # noqa: NPY002
        return {
            "train_x": data["x"].astype(np.float32)[:, None],
            "train_y": data["y"].astype(np.int64),
            "test_x": data["x_test"].astype(np.float32)[:, None],
            "test_y": data["y_test"].astype(np.int64),
        }

    # Generating MNIST-1D costs about 0.25 ms a sample (a minute for 250,000):
    # cache it like a decoded data set, keyed by the generator's version too.
    from importlib.metadata import version

    arrays = cached_arrays("mnist1d", cache_key(num_samples, version("mnist1d")), generate)
    return DatasetBundle(
        name="mnist1d",
        train_x=torch.from_numpy(arrays["train_x"]),
        train_y=torch.from_numpy(arrays["train_y"]),
        test_x=torch.from_numpy(arrays["test_x"]),
        test_y=torch.from_numpy(arrays["test_y"]),
        num_classes=10,
    )


def _synthetic(alpha: float, beta: float, num_users: int) -> DatasetBundle:
    x, y, users = make_synthetic(
        alpha=alpha, beta=beta, num_users=num_users, rng=np.random.default_rng(0)
    )
    tr_x, tr_y, te_x, te_y, train_idx = _split(x, y, 0.2, seed=1)
    return DatasetBundle(
        name="synthetic",
        train_x=torch.from_numpy(tr_x),
        train_y=torch.from_numpy(tr_y),
        test_x=torch.from_numpy(te_x),
        test_y=torch.from_numpy(te_y),
        num_classes=10,
        train_groups=users[train_idx],
    )


def _torchvision(name: str, root: Path) -> DatasetBundle:
    from torchvision import datasets

    cls = {"mnist": datasets.MNIST, "cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}
    if not root.is_dir():
        raise FileNotFoundError(
            f"root: {str(root)!r} is not a directory; allowed: a directory where "
            f"torchvision's {cls[name].__name__} finds its files (nothing is downloaded)"
        )
    try:
        train = cls[name](str(root), train=True, download=False)
        test = cls[name](str(root), train=False, download=False)
    except RuntimeError as exc:  # torchvision's "Dataset not found" (it would download)
        raise FileNotFoundError(
            f"root: {str(root)!r}: got no files that torchvision's {cls[name].__name__} can "
            f"read; allowed: a directory where it finds its files (nothing is downloaded)"
        ) from exc

    def arrays(ds: object) -> tuple[np.ndarray, np.ndarray]:
        data = np.asarray(ds.data)  # type: ignore[attr-defined]
        targets = np.asarray(ds.targets, dtype=np.int64)  # type: ignore[attr-defined]
        images = data[:, None] if data.ndim == 3 else data.transpose(0, 3, 1, 2)
        return images, targets

    (tr_x, tr_y), (te_x, te_y) = arrays(train), arrays(test)
    train_t, test_t = _normalise(tr_x, te_x)
    return DatasetBundle(
        name=name,
        train_x=torch.from_numpy(train_t),
        train_y=torch.from_numpy(tr_y),
        test_x=torch.from_numpy(test_t),
        test_y=torch.from_numpy(te_y),
        num_classes=100 if name == "cifar100" else 10,
    )


def _load_fashion_mnist(root: str | None, config: DatasetConfig) -> DatasetBundle:
    default = os.environ.get("FEDMERGE_FASHION_MNIST", str(FASHION_MNIST_DIR))
    return _fashion_mnist(Path(root or default))


def _load_digits(root: str | None, config: DatasetConfig) -> DatasetBundle:
    return _digits()


def _load_mnist1d(root: str | None, config: DatasetConfig) -> DatasetBundle:
    return _mnist1d(config.mnist1d_samples)


def _load_synthetic(root: str | None, config: DatasetConfig) -> DatasetBundle:
    return _synthetic(config.synthetic_alpha, config.synthetic_beta, config.synthetic_users)


def _load_torchvision(root: str | None, config: DatasetConfig) -> DatasetBundle:
    if root is None:
        raise FileNotFoundError(
            f"root: not set for {config.name!r}; allowed: a local directory with "
            f"torchvision's files for {config.name} (fedmerge never downloads)"
        )
    return _torchvision(config.name, Path(root))


register_dataset("cifar10", _load_torchvision)
register_dataset("cifar100", _load_torchvision)
register_dataset("digits", _load_digits)
register_dataset("fashion-mnist", _load_fashion_mnist)
register_dataset("mnist", _load_torchvision)
register_dataset("mnist1d", _load_mnist1d)
register_dataset("synthetic", _load_synthetic)

#: Names of the built-in data sets, sorted (:func:`dataset_names` adds registered ones).
DATASET_NAMES: tuple[str, ...] = dataset_names()


@lru_cache(maxsize=4)
def load_dataset(
    name: str,
    root: str | None = None,
    *,
    synthetic_alpha: float = 1.0,
    synthetic_beta: float = 1.0,
    synthetic_users: int = 30,
    mnist1d_samples: int = 5000,
) -> DatasetBundle:
    """Load a data set into memory; nothing is ever downloaded.

    Parameters
    ----------
    name : str
        One of :func:`dataset_names` (built in: :data:`DATASET_NAMES`).
    root : str, optional
        Directory of the files: Fashion-MNIST's IDX files (default: Debian's
        ``/usr/share/datasets/fashion-mnist`` or ``$FEDMERGE_FASHION_MNIST``),
        or torchvision's root for MNIST/CIFAR (required). Ignored by the
        generated data sets (digits, mnist1d, synthetic).
    synthetic_alpha, synthetic_beta : float (default: 1.0)
        Synthetic(alpha, beta) parameters.
    synthetic_users : int (default: 30)
        Number of Synthetic users.
    mnist1d_samples : int (default: 5000)
        Size of the generated MNIST-1D (80% train, 20% test).

    Returns
    -------
    DatasetBundle
        Tensors in memory; the result is cached per process.

    Raises
    ------
    ValueError
        If an option is not allowed (as in :class:`DatasetConfig`).
    FileNotFoundError
        If the files are not found under ``root``.
    """
    # root is checked by the loader, which says what it expected to find there
    config = DatasetConfig(
        name=name,
        synthetic_alpha=synthetic_alpha,
        synthetic_beta=synthetic_beta,
        synthetic_users=synthetic_users,
        mnist1d_samples=mnist1d_samples,
    )
    return dataset_loader(name)(root, config)


def load_dataset_config(config: DatasetConfig, root: str | None = None) -> DatasetBundle:
    """Load the data set that ``config`` describes (cached per process).

    Parameters
    ----------
    config : DatasetConfig
        The data set and its options.
    root : str, optional
        Directory that replaces ``config.root`` (a node's local copy of the
        files); ``None`` keeps ``config.root``.

    Returns
    -------
    DatasetBundle
        The same tensors as :func:`load_dataset` with the same arguments, from
        the same per-process cache.
    """
    return load_dataset(
        config.name,
        root or config.root or None,
        synthetic_alpha=config.synthetic_alpha,
        synthetic_beta=config.synthetic_beta,
        synthetic_users=config.synthetic_users,
        mnist1d_samples=config.mnist1d_samples,
    )
