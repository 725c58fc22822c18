"""Tests of fedmerge.data.datasets and fedmerge.data.synthetic."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from fedmerge.data import DatasetBundle, DatasetConfig, load_dataset, make_synthetic
from fedmerge.data.config import dataset_loader

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
IDX_STEMS = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


# --------------------------------------------------------------------------- helpers


def write_idx(path: Path, array: np.ndarray, *, compress: bool = False) -> None:
    """Write a uint8 IDX file: magic 0x0000 08 NDIM, big-endian dims, then the bytes."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    blob = header + array.tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(blob))
    else:
        path.write_bytes(blob)


def read_idx_gz(path: Path) -> np.ndarray:
    """Naive reader of the Debian Fashion-MNIST files, independent of the package."""
    data = gzip.decompress(path.read_bytes())
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data[4 + 4 * ndim :], dtype=np.uint8).reshape(dims)


def expected_normalised(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scale to [0, 1], then standardise with the train mean and std (float64)."""
    tr, te = train.astype(np.float64) / 255.0, test.astype(np.float64) / 255.0
    mean, std = tr.mean(), tr.std()
    return (tr - mean) / std, (te - mean) / std


def fake_images(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    rng.shuffle(labels)
    return images, labels


def assert_bundle_basics(
    b: DatasetBundle, input_shape: tuple[int, ...], classes: int, *, all_classes: bool = True
) -> None:
    assert b.input_shape == input_shape
    assert b.train_x.dtype == b.test_x.dtype == torch.float32
    assert b.train_y.dtype == b.test_y.dtype == torch.int64
    assert b.train_x.shape[0] == b.train_y.shape[0] > 0
    assert b.test_x.shape[0] == b.test_y.shape[0] > 0
    assert b.train_y.ndim == b.test_y.ndim == 1
    assert b.num_classes == classes
    for y in (b.train_y, b.test_y):
        assert int(y.min()) >= 0 and int(y.max()) < classes
    if all_classes:
        assert set(b.train_y.tolist()) == set(range(classes))
    assert torch.isfinite(b.train_x).all() and torch.isfinite(b.test_x).all()


def assert_standardised(x: torch.Tensor, tol: float = 1e-3) -> None:
    mean = x.mean(dtype=torch.float64)
    std = ((x * x).mean(dtype=torch.float64) - mean**2).sqrt()
    assert abs(float(mean)) < tol
    assert abs(float(std) - 1.0) < tol


@pytest.fixture(scope="module")
def fashion() -> DatasetBundle:
    return load_dataset("fashion-mnist")


# --------------------------------------------------------------------------- Fashion-MNIST


def test_fashion_mnist_shapes_and_labels(fashion: DatasetBundle) -> None:
    assert_bundle_basics(fashion, (1, 28, 28), 10)
    assert fashion.name == "fashion-mnist"
    assert fashion.train_x.shape == (60000, 1, 28, 28)
    assert fashion.test_x.shape == (10000, 1, 28, 28)
    # Fashion-MNIST is balanced: 6,000 / 1,000 images per class
    assert torch.bincount(fashion.train_y).tolist() == [6000] * 10
    assert torch.bincount(fashion.test_y).tolist() == [1000] * 10
    assert fashion.train_groups is None


def test_fashion_mnist_is_normalised_raw_files(fashion: DatasetBundle) -> None:
    assert_standardised(fashion.train_x)
    raw_train = read_idx_gz(FASHION_DIR / "train-images-idx3-ubyte.gz")
    raw_test = read_idx_gz(FASHION_DIR / "t10k-images-idx3-ubyte.gz")
    # mean and std of the train pixels from their 256-bin histogram (exact, and cheap)
    hist = np.bincount(raw_train.ravel(), minlength=256).astype(np.float64)
    values = np.arange(256) / 255.0
    mean = (hist * values).sum() / hist.sum()
    std = np.sqrt((hist * (values - mean) ** 2).sum() / hist.sum())
    pick = np.arange(0, 60000, 997)
    exp_train = (raw_train[pick] / 255.0 - mean) / std
    exp_test = (raw_test[:500] / 255.0 - mean) / std
    assert_close(
        fashion.train_x[pick, 0], torch.from_numpy(exp_train).float(), atol=1e-4, rtol=1e-4
    )
    assert_close(fashion.test_x[:500, 0], torch.from_numpy(exp_test).float(), atol=1e-4, rtol=1e-4)
    raw_labels = read_idx_gz(FASHION_DIR / "train-labels-idx1-ubyte.gz")
    assert torch.equal(fashion.train_y, torch.from_numpy(raw_labels.astype(np.int64)))


def test_fashion_mnist_from_a_user_directory(
    tmp_path: Path, fashion: DatasetBundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    # decoded here without the cache: an entry for a temporary directory (210 MB, keyed
    # by the files' path) would stay in the user's cache after the directory is gone
    monkeypatch.setenv("FEDMERGE_CACHE_DIR", "off")
    root = tmp_path / "fmnist"
    root.mkdir()
    for stem in IDX_STEMS:
        shutil.copy(FASHION_DIR / f"{stem}.gz", root / f"{stem}.gz")
    copy = load_dataset("fashion-mnist", str(root))
    assert copy is not fashion
    assert torch.equal(copy.train_x, fashion.train_x)
    assert torch.equal(copy.test_y, fashion.test_y)


@pytest.mark.parametrize("compress", [False, True])
def test_fashion_mnist_tiny_fake_directory(
    tmp_path: Path, compress: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDMERGE_CACHE_DIR", "off")  # as above: a temporary directory
    rng = np.random.default_rng(0)
    tr_x, tr_y = fake_images(rng, 30)
    te_x, te_y = fake_images(rng, 12)
    for stem, arr in zip(IDX_STEMS, (tr_x, tr_y, te_x, te_y), strict=True):
        write_idx(tmp_path / stem, arr, compress=compress)
    b = load_dataset("fashion-mnist", str(tmp_path))
    exp_tr, exp_te = expected_normalised(tr_x, te_x)
    assert b.train_x.shape == (30, 1, 28, 28)
    assert_close(b.train_x[:, 0], torch.from_numpy(exp_tr).float(), atol=1e-4, rtol=1e-4)
    assert_close(b.test_x[:, 0], torch.from_numpy(exp_te).float(), atol=1e-4, rtol=1e-4)
    assert b.train_y.tolist() == tr_y.tolist()
    assert b.test_y.tolist() == te_y.tolist()


def test_fashion_mnist_missing_directory_names_dataset_root(tmp_path: Path) -> None:
    missing = tmp_path / "does-not-exist"
    with pytest.raises(FileNotFoundError, match=r"^root: ") as info:
        load_dataset("fashion-mnist", str(missing))
    assert str(missing) in str(info.value)


def test_fashion_mnist_directory_missing_a_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    tr_x, tr_y = fake_images(rng, 10)
    write_idx(tmp_path / IDX_STEMS[0], tr_x)
    write_idx(tmp_path / IDX_STEMS[1], tr_y)
    with pytest.raises(FileNotFoundError, match=r"^root: ") as info:
        load_dataset("fashion-mnist", str(tmp_path))
    assert "t10k-images-idx3-ubyte" in str(info.value)


# --------------------------------------------------------------------------- torchvision MNIST


def _fake_mnist_root(root: Path) -> tuple[np.ndarray, ...]:
    """torchvision 0.29's MNIST reads ``root/MNIST/raw/<stem>`` (uncompressed IDX)."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(5)
    tr_x, tr_y = fake_images(rng, 40)
    te_x, te_y = fake_images(rng, 20)
    for stem, arr in zip(IDX_STEMS, (tr_x, tr_y, te_x, te_y), strict=True):
        write_idx(raw / stem, arr)
    return tr_x, tr_y, te_x, te_y


def test_torchvision_mnist_from_local_directory(tmp_path: Path) -> None:
    tr_x, tr_y, te_x, te_y = _fake_mnist_root(tmp_path)
    b = load_dataset("mnist", str(tmp_path))
    assert b.name == "mnist"
    assert_bundle_basics(b, (1, 28, 28), 10)
    assert b.train_x.shape == (40, 1, 28, 28) and b.test_x.shape == (20, 1, 28, 28)
    exp_tr, exp_te = expected_normalised(tr_x, te_x)
    assert_close(b.train_x[:, 0], torch.from_numpy(exp_tr).float(), atol=1e-4, rtol=1e-4)
    assert_close(b.test_x[:, 0], torch.from_numpy(exp_te).float(), atol=1e-4, rtol=1e-4)
    assert torch.equal(b.train_y, torch.from_numpy(tr_y.astype(np.int64)))
    assert torch.equal(b.test_y, torch.from_numpy(te_y.astype(np.int64)))
    assert_standardised(b.train_x)


@pytest.mark.parametrize("name", ["mnist", "cifar10", "cifar100"])
def test_torchvision_without_files_names_dataset_root(tmp_path: Path, name: str) -> None:
    with pytest.raises(FileNotFoundError, match=r"^root: "):
        load_dataset(name, str(tmp_path))  # exists, but holds nothing
    with pytest.raises(FileNotFoundError, match=r"^root: ") as info:
        load_dataset(name, str(tmp_path / "nope"))
    assert str(tmp_path / "nope") in str(info.value)
    with pytest.raises(FileNotFoundError, match=r"^root: "):
        load_dataset(name)  # no root at all: never downloads


def test_unknown_dataset_name() -> None:
    with pytest.raises(ValueError) as info:
        load_dataset("imagenet")
    assert str(info.value) == (
        "name: got 'imagenet'; allowed: cifar10, cifar100, digits, fashion-mnist, mnist, "
        "mnist1d, synthetic"
    )


# --------------------------------------------------------------------------- digits, mnist1d


def test_digits_shapes_split_and_normalisation() -> None:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    n = len(bunch.target)
    n_test = round(0.2 * n)
    b = load_dataset("digits")
    assert_bundle_basics(b, (1, 8, 8), 10)
    assert b.train_x.shape == (n - n_test, 1, 8, 8)
    assert b.test_x.shape == (n_test, 1, 8, 8)
    assert_standardised(b.train_x)
    # Pixel 0 and pixel 16 occur in both sets; with the train statistics applied to
    # both, they map to the same two values in train and test.
    lo, hi = float(b.train_x.min()), float(b.train_x.max())
    assert_close(float(b.test_x.min()), lo)
    assert_close(float(b.test_x.max()), hi)
    # Undo the affine map: train + test are exactly sklearn's images and labels.
    x = torch.cat([b.train_x, b.test_x]).double().reshape(n, 64)
    pixels = ((x - lo) / (hi - lo) * 16).numpy()
    assert np.abs(pixels - np.round(pixels)).max() < 1e-3
    got = np.concatenate([np.round(pixels), torch.cat([b.train_y, b.test_y]).numpy()[:, None]], 1)
    ref = np.concatenate([bunch.data, bunch.target[:, None]], 1)
    got = got[np.lexsort(got.T[::-1])]
    ref = ref[np.lexsort(ref.T[::-1])]
    np.testing.assert_array_equal(got, ref)


def test_digits_come_from_the_cache_without_scikit_learn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fresh process reads the cached split: the same bytes, and scikit-learn not imported.

    The split is computed here twice, with the cache off and into an empty cache
    directory; only the process that must not import scikit-learn is a fresh one.
    """
    import hashlib
    import subprocess
    import sys

    def digest(b: DatasetBundle) -> str:
        h = hashlib.sha256()
        for t in (b.train_x, b.train_y, b.test_x, b.test_y):
            h.update(t.numpy().tobytes())
        return h.hexdigest()

    digits = dataset_loader("digits")  # the loader itself: load_dataset keeps what it loaded
    monkeypatch.setenv("FEDMERGE_CACHE_DIR", "off")
    uncached = digest(digits(None, DatasetConfig(name="digits")))
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setenv("FEDMERGE_CACHE_DIR", str(tmp_path))
    first = digest(digits(None, DatasetConfig(name="digits")))  # computed, then stored
    assert [p.name.split("-")[:2] for p in tmp_path.iterdir()] == [["digits", "normalised"]]

    script = (
        "import hashlib, sys\n"
        "from fedmerge.data import load_dataset\n"
        "b = load_dataset('digits')\n"
        "h = hashlib.sha256()\n"
        "for t in (b.train_x, b.train_y, b.test_x, b.test_y):\n"
        "    h.update(t.numpy().tobytes())\n"
        "print(h.hexdigest(), 'sklearn' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, check=True)  # fmt: skip
    second, imported = out.stdout.split()
    assert imported == "False"  # read from the cache
    assert uncached == first == second


def test_mnist1d_shapes_and_scale() -> None:
    b = load_dataset("mnist1d")
    assert_bundle_basics(b, (1, 40), 10)
    assert b.train_x.shape == (4000, 1, 40) and b.test_x.shape == (1000, 1, 40)
    assert_standardised(b.train_x, tol=0.05)


def test_mnist1d_size_and_global_numpy_rng_left_alone() -> None:
    # the legacy global RNG is the subject of this test
    np.random.seed(123)  # noqa: NPY002
    before = np.random.get_state()[1].copy()  # noqa: NPY002
    b = load_dataset("mnist1d", mnist1d_samples=500)
    after = np.random.get_state()[1]  # noqa: NPY002
    np.testing.assert_array_equal(before, after)
    assert len(b.train_y) + len(b.test_y) == 500
    assert len(b.train_y) == 400


# --------------------------------------------------------------------------- Synthetic


def naive_synthetic(alpha: float, beta: float, num_users: int, seed: int):
    """FedProx's generate_synthetic.py, written out per sample (dim 60, 10 classes)."""
    rng = np.random.default_rng(seed)
    dim, classes = 60, 10
    sizes = np.minimum(rng.lognormal(4, 2, num_users).astype(int) + 50, 2000)
    sigma = np.array([(j + 1) ** -1.2 for j in range(dim)])
    xs, ys, us = [], [], []
    for k in range(num_users):
        u_k = rng.normal(0, alpha)  # mean of W_k and b_k
        big_b = rng.normal(0, beta)  # mean of v_k
        w = rng.normal(u_k, 1, (dim, classes))
        b = rng.normal(u_k, 1, classes)
        v = rng.normal(big_b, 1, dim)
        x = rng.multivariate_normal(v, np.diag(sigma), int(sizes[k]))
        for row in x:
            logits = np.array([np.dot(row, w[:, c]) + b[c] for c in range(classes)])
            probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
            ys.append(int(np.argmax(probs)))
            us.append(k)
        xs.append(x)
    return np.concatenate(xs), np.array(ys), np.array(us)


def test_make_synthetic_matches_naive_recipe() -> None:
    x, y, users = make_synthetic(alpha=0.5, beta=0.5, num_users=3, rng=np.random.default_rng(11))
    ex, ey, eu = naive_synthetic(0.5, 0.5, 3, seed=11)
    assert x.dtype == np.float32 and y.dtype == np.int64 and users.dtype == np.int64
    assert_close(torch.from_numpy(x), torch.from_numpy(ex).float())
    np.testing.assert_array_equal(y, ey)
    np.testing.assert_array_equal(users, eu)


def test_make_synthetic_shapes_and_user_sizes() -> None:
    x, y, users = make_synthetic(alpha=1.0, beta=1.0, num_users=12, rng=np.random.default_rng(0))
    assert x.shape == (len(y), 60)
    assert y.min() >= 0 and y.max() < 10
    counts = np.bincount(users, minlength=12)
    assert len(counts) == 12
    assert counts.min() >= 50 and counts.max() <= 2000
    # users are contiguous blocks 0, 0, ..., 1, 1, ...
    assert np.all(np.diff(users) >= 0)


def test_make_synthetic_is_reproducible_given_the_rng() -> None:
    a = make_synthetic(alpha=1.0, beta=1.0, num_users=2, rng=np.random.default_rng(3))
    b = make_synthetic(alpha=1.0, beta=1.0, num_users=2, rng=np.random.default_rng(3))
    c = make_synthetic(alpha=1.0, beta=1.0, num_users=2, rng=np.random.default_rng(4))
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u, v)
    assert a[0].shape != c[0].shape or not np.array_equal(a[0], c[0])


@pytest.mark.parametrize(("alpha", "beta"), [(-0.1, 1.0), (1.0, -0.1)])
def test_make_synthetic_rejects_negative_parameters(alpha: float, beta: float) -> None:
    key, value = ("alpha", alpha) if alpha < 0 else ("beta", beta)
    with pytest.raises(ValueError) as info:
        make_synthetic(alpha=alpha, beta=beta, rng=np.random.default_rng(0))
    assert str(info.value) == f"{key}: got {value!r}; allowed: a number >= 0"


def test_synthetic_bundle_is_a_split_of_make_synthetic() -> None:
    b = load_dataset("synthetic", synthetic_alpha=0.5, synthetic_beta=0.5, synthetic_users=6)
    x, y, users = make_synthetic(alpha=0.5, beta=0.5, num_users=6, rng=np.random.default_rng(0))
    assert_bundle_basics(b, (60,), 10, all_classes=False)
    assert len(b.train_y) + len(b.test_y) == len(y)
    assert len(b.test_y) == round(0.2 * len(y))
    assert b.train_groups is not None and b.train_groups.shape == (len(b.train_y),)
    assert set(b.train_groups.tolist()) == set(range(6))
    # every training row is one of the generated rows, with its label and user
    key = {tuple(row): (int(lab), int(u)) for row, lab, u in zip(x, y, users, strict=True)}
    for row, lab, u in zip(b.train_x.numpy(), b.train_y.numpy(), b.train_groups, strict=True):
        assert key[tuple(row)] == (int(lab), int(u))
