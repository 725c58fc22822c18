"""The data set's configuration, and the registry of data-set loaders."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

from fedmerge.registry import add_entry

if TYPE_CHECKING:
    from fedmerge.data.datasets import DatasetBundle

__all__ = ["DatasetConfig", "DatasetLoader", "dataset_loader", "dataset_names", "register_dataset"]

#: ``loader(root, config) -> DatasetBundle``: ``root`` is the directory to read
#: (``None`` when none was given), ``config`` the validated options.
DatasetLoader: TypeAlias = "Callable[[str | None, DatasetConfig], DatasetBundle]"

#: Name -> loader, kept sorted by name; filled by :func:`register_dataset`.
_LOADERS: dict[str, DatasetLoader] = {}


def register_dataset(name: str, loader: DatasetLoader) -> None:
    """Make ``loader`` loadable by ``name`` (in ``load_dataset`` and :class:`DatasetConfig`).

    Parameters
    ----------
    name : str
        A new, non-empty data-set name.
    loader : DatasetLoader
        ``loader(root, config) -> DatasetBundle``. It must never download,
        and must give the same tensors for the same arguments: results are
        cached per process.

    Raises
    ------
    ValueError
        If ``name`` is empty or already registered.
    TypeError
        If ``loader`` is not callable.
    """
    add_entry(_LOADERS, name, loader, key="loader", returns="a DatasetBundle")


def dataset_names() -> tuple[str, ...]:
    """Names of every registered data set, sorted."""
    return tuple(_LOADERS)


def dataset_loader(name: str) -> DatasetLoader:
    """Return the loader registered as ``name``.

    Raises
    ------
    ValueError
        If ``name`` is not registered (the message lists the names).
    """
    loader = _LOADERS.get(name)
    if loader is None:
        raise ValueError(f"name: got {name!r}; allowed: {', '.join(_LOADERS)}")
    return loader


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


#: Largest ``synthetic_alpha`` and ``synthetic_beta``: FedProx's Synthetic(alpha, beta)
#: uses 0 to 1, and 1e308 overflowed the generator (every sample got label 0).
MAX_SYNTHETIC_SPREAD = 100.0
#: Largest generated MNIST-1D: 160 bytes a sample, 160 MB at this size (the original has 5,000).
MAX_MNIST1D_SAMPLES = 1_000_000


@dataclass(frozen=True)
class DatasetConfig:
    """Which data set to load, and where its files are; validated once.

    Load it with :func:`~fedmerge.data.load_dataset_config`. Nothing is ever
    downloaded.

    Attributes
    ----------
    name : str (default: "fashion-mnist")
        A registered data set (:func:`dataset_names`): ``cifar10``,
        ``cifar100``, ``digits`` (scikit-learn's 8x8 digits), ``fashion-mnist``,
        ``mnist``, ``mnist1d`` (generated) or ``synthetic`` (Synthetic(alpha,
        beta) of FedProx, generated), and any added with
        :func:`register_dataset`.
    root : str (default: "")
        Directory of the files, or ``""`` for the default: Fashion-MNIST's IDX
        files (default: Debian's ``/usr/share/datasets/fashion-mnist`` or
        ``$FEDMERGE_FASHION_MNIST``) or torchvision's root for MNIST/CIFAR
        (required for those). Ignored by the generated data sets. When set, an
        existing directory.
    synthetic_alpha : float (default: 1.0)
        Synthetic's alpha: how much the users' models differ; 0 to 100.
    synthetic_beta : float (default: 1.0)
        Synthetic's beta: how much the users' inputs differ; 0 to 100.
    synthetic_users : int (default: 30)
        Number of Synthetic users (its natural owners); >= 1.
    mnist1d_samples : int (default: 5000)
        Size of the generated MNIST-1D (80% train, 20% test); 10 to 1,000,000.

    Raises
    ------
    ValueError
        From ``__post_init__``, naming the field, the value and what is allowed.
    """

    name: str = "fashion-mnist"
    root: str = ""
    synthetic_alpha: float = 1.0
    synthetic_beta: float = 1.0
    synthetic_users: int = 30
    mnist1d_samples: int = 5000

    def __post_init__(self) -> None:
        if self.name not in _LOADERS:
            raise ValueError(f"name: got {self.name!r}; allowed: {', '.join(_LOADERS)}")
        if not isinstance(self.root, str) or (self.root and not Path(self.root).is_dir()):
            raise ValueError(f"root: got {self.root!r}; allowed: '' or an existing directory")
        for key in ("synthetic_alpha", "synthetic_beta"):
            value = getattr(self, key)
            # 1e308 overflowed the generator's products: every sample got label 0
            if not _is_number(value) or not 0 <= value <= MAX_SYNTHETIC_SPREAD:
                raise ValueError(
                    f"{key}: got {value!r}; allowed: a number from 0 to {MAX_SYNTHETIC_SPREAD:g} "
                    f"(FedProx's Synthetic uses 0 to 1)"
                )
        if not _is_int(self.synthetic_users) or self.synthetic_users < 1:
            raise ValueError(
                f"synthetic_users: got {self.synthetic_users!r}; allowed: an integer >= 1"
            )
        samples = self.mnist1d_samples  # 10**12 was generated until the memory was gone
        if not _is_int(samples) or not 10 <= samples <= MAX_MNIST1D_SAMPLES:
            raise ValueError(
                f"mnist1d_samples: got {samples!r}; allowed: an integer from 10 to "
                f"{MAX_MNIST1D_SAMPLES:,}"
            )
