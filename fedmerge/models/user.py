"""A user's own model: the builder protocol and the ``factory`` importer.

A factory is written ``"package.module:function"`` (imported with
:func:`importlib.import_module`) or ``"path/to/file.py:function"`` (the file
is loaded as a module of its own; a relative path is resolved against the
current directory when the model is built).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Protocol

from torch import nn

__all__ = ["FACTORY_FORMS", "ModelBuilder", "check_factory", "load_factory"]

#: What a ``factory`` value may look like, for error messages.
FACTORY_FORMS = "'' or 'package.module:function' or 'path/to/file.py:function'"

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_DOTTED = re.compile(rf"{_IDENT}(\.{_IDENT})*")


class ModelBuilder(Protocol):
    """What the registry calls to build a model (and what a ``factory`` must be).

    Parameters
    ----------
    input_shape : tuple of int
        Shape of one sample (``(C, H, W)`` for images, ``(D,)`` for vectors).
    num_classes : int
        Number of output logits.
    width : int
        Width multiplier, >= 1.
    hidden : tuple of int
        Hidden widths (used by MLP-like models; others may ignore it).

    Returns
    -------
    nn.Module
        A freshly initialised model; the caller seeds the global RNG first.
    """

    def __call__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        *,
        width: int,
        hidden: tuple[int, ...],
    ) -> nn.Module:
        """Return a freshly initialised model."""
        ...


def _bad(factory: str, why: str) -> ValueError:
    return ValueError(f"factory: got {factory!r} ({why}); allowed: {FACTORY_FORMS}")


def check_factory(factory: str) -> tuple[str, str]:
    """Split a factory into ``(module or file, attribute)``, checking its form only.

    Parameters
    ----------
    factory : str
        ``"package.module:function"`` or ``"path/to/file.py:function"``; the
        attribute may be dotted (``"module:Class.create"``).

    Returns
    -------
    tuple of str
        The module name or file path, and the attribute path.

    Raises
    ------
    ValueError
        If ``factory`` has neither form; nothing is imported.
    """
    if not isinstance(factory, str):
        raise ValueError(f"factory: got {factory!r}; allowed: {FACTORY_FORMS}")
    target, sep, attr = factory.rpartition(":")
    if not sep or not target:
        raise _bad(factory, "no ':' between module and function")
    if not _DOTTED.fullmatch(attr):
        raise _bad(factory, f"{attr!r} is not a Python name")
    if not target.endswith(".py") and not _DOTTED.fullmatch(target):
        raise _bad(factory, f"{target!r} is neither a dotted module name nor a .py file")
    return target, attr


def _load_file(factory: str, target: str) -> ModuleType:
    path = Path(target).expanduser().resolve()
    if not path.is_file():
        raise _bad(factory, f"no such file: {str(path)!r}")
    # One module per file, named after its path, so building twice reuses it.
    name = "fedmerge_factory_" + hashlib.sha256(str(path).encode()).hexdigest()[:16]
    module = sys.modules.get(name)
    if module is not None and getattr(module, "__file__", None) == str(path):
        return module
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise _bad(factory, f"{str(path)!r} cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise _bad(factory, f"loading {str(path)!r} failed: {type(exc).__name__}: {exc}") from exc
    return module


def _load_module(factory: str, target: str) -> ModuleType:
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as exc:
        raise _bad(factory, f"module not found: {exc.name!r}") from exc
    except Exception as exc:
        raise _bad(factory, f"importing {target!r} failed: {type(exc).__name__}: {exc}") from exc


def load_factory(factory: str) -> ModelBuilder:
    """Import a user's model builder.

    Parameters
    ----------
    factory : str
        ``"package.module:function"`` or ``"path/to/file.py:function"``; the
        function is called as ``function(input_shape, num_classes, *, width,
        hidden)`` and must return an ``nn.Module``.

    Returns
    -------
    ModelBuilder
        The function, wrapped so that a result that is not an ``nn.Module``
        raises ``ValueError``.

    Raises
    ------
    ValueError
        Naming ``factory``, its value and why: bad form, module or file not
        found, import failed, no such attribute, not callable, a signature
        that does not take the builder's arguments, or (when called) a result
        that is not an ``nn.Module``.
    """
    target, attr = check_factory(factory)
    loader = _load_file if target.endswith(".py") else _load_module
    obj: object = loader(factory, target)
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise _bad(factory, f"{target!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise _bad(factory, f"{attr!r} is a {type(obj).__name__}, not callable")
    fn = obj
    try:
        inspect.signature(fn).bind((1,), 2, width=1, hidden=(1,))
    except TypeError as exc:
        raise _bad(
            factory, f"{attr!r} does not take (input_shape, num_classes, *, width, hidden): {exc}"
        ) from exc
    except ValueError:  # no signature to inspect (some builtins): trust the call
        pass

    def builder(
        input_shape: tuple[int, ...], num_classes: int, *, width: int, hidden: tuple[int, ...]
    ) -> nn.Module:
        model = fn(input_shape, num_classes, width=width, hidden=hidden)
        if not isinstance(model, nn.Module):
            raise _bad(factory, f"it returned a {type(model).__name__}, not an nn.Module")
        return model

    return builder
