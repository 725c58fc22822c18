"""The strategy registry: the one place where a strategy's name becomes behaviour.

Built-in strategies are registered below, one line each, sorted by name.
Modules named in the run's ``plugins`` list (``package.module`` or
``path/to/file.py``) are imported before a name is looked up; they call
:func:`register` for their own plugins. An unknown name is an error
everywhere, never a default.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import shlex
import sys
import traceback
from collections.abc import Iterable
from pathlib import Path

from fedmerge.errors import ConfigError, one_line
from strategies.plugins.aligned import AlignedPlugin
from strategies.plugins.base import (
    ClientContext,
    ClientStart,
    PeerPlugin,
    Plugin,
    ServerContext,
    ServerPlugin,
)
from strategies.plugins.fedavg import FedAvgPlugin, FedProxPlugin
from strategies.plugins.fisher import FisherPlugin
from strategies.plugins.ldawa import LDAWAPlugin
from strategies.plugins.oneshot import OneShotPlugin
from strategies.plugins.ot import OTPlugin
from strategies.plugins.peer import DIMATPlugin, DIMATWMPlugin, GossipPlugin, LocalPlugin
from strategies.plugins.task_arithmetic import PeerTaskArithmeticPlugin, TaskArithmeticPlugin
from strategies.plugins.ties import PeerTIESPlugin, TIESPlugin
from strategies.plugins.zipit import ZipItPlugin

__all__ = [
    "ClientContext",
    "ClientStart",
    "PeerPlugin",
    "Plugin",
    "ServerContext",
    "ServerPlugin",
    "builtin_plugin_names",
    "get_plugin",
    "load_plugins",
    "plugin_names",
    "register",
]

_BUILTIN: dict[str, Plugin] = {
    "aligned": AlignedPlugin(),
    "dimat": DIMATPlugin(),
    "dimat-wm": DIMATWMPlugin(),
    "fedavg": FedAvgPlugin(),
    "fedprox": FedProxPlugin(),
    "fisher": FisherPlugin(),
    "gossip": GossipPlugin(),
    "ldawa": LDAWAPlugin(),
    "local": LocalPlugin(),
    "oneshot": OneShotPlugin(),
    "ot": OTPlugin(),
    "peer-task-arithmetic": PeerTaskArithmeticPlugin(),
    "peer-ties": PeerTIESPlugin(),
    "task-arithmetic": TaskArithmeticPlugin(),
    "ties": TIESPlugin(),
    "zipit": ZipItPlugin(),
}
_REGISTRY: dict[str, Plugin] = dict(_BUILTIN)


def register(plugin: Plugin) -> Plugin:
    """Register ``plugin`` under ``plugin.name``; returns it (usable as a decorator on instances).

    Registering the same plugin class again under its name is a no-op (a
    module may be imported twice); another plugin under a taken name is an
    error.
    """
    name = plugin.name
    current = _REGISTRY.get(name)
    if current is not None and type(current) is not type(plugin):
        if type(current).__qualname__ != type(plugin).__qualname__:
            raise ValueError(f"strategy.name: {name!r} is already registered")
    _REGISTRY[name] = plugin
    return plugin


def get_plugin(name: str) -> Plugin:
    """The plugin registered as ``name``.

    Raises
    ------
    ConfigError
        If no plugin has that name (the message lists the names).
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"strategy.name: got {name!r}; allowed: {', '.join(plugin_names())}"
        ) from None


def plugin_names() -> list[str]:
    """Registered strategy names, sorted."""
    return sorted(_REGISTRY)


def builtin_plugin_names() -> list[str]:
    """The strategies fedmerge ships, sorted."""
    return sorted(_BUILTIN)


def load_plugins(specs: Iterable[str]) -> None:
    """Import plugin modules (``package.module`` or ``path/to/file.py``); each registers its own.

    A ``.py`` file whose import failed is not kept as loaded: once mended, the
    next call imports it again.

    Raises
    ------
    ConfigError
        One line naming ``plugins`` and the module or file:
        ``plugins: got '...'; allowed: an importable module ...`` when it is
        not there; ``plugins: '...' refused to load: ...`` when its import
        raised ``ValueError`` (it refused something as it registered); and
        ``plugins: got '...', whose import raised TYPE: MESSAGE (FILE:LINE)``
        for anything else its import raised, ``SyntaxError`` and
        ``SystemExit`` included, with the command that shows the traceback.
        ``KeyboardInterrupt`` is not caught.
    """
    for spec in specs:
        if spec.endswith(".py"):
            _load_file(spec)
        else:
            _load_module(spec)


def _load_file(spec: str) -> None:
    path = Path(spec).resolve()
    tag = hashlib.sha1(str(path).encode()).hexdigest()[:8]
    name = f"fedmerge_plugin_{path.stem}_{tag}"
    if name in sys.modules:
        return
    found = importlib.util.spec_from_file_location(name, path)
    if found is None or found.loader is None or not path.is_file():
        raise ConfigError(_not_found(spec, str(path)))
    module = importlib.util.module_from_spec(found)
    sys.modules[name] = module
    loaded = False
    try:
        found.loader.exec_module(module)
        loaded = True
    except (Exception, SystemExit) as exc:
        command = f"{shlex.quote(sys.executable)} {shlex.quote(str(path))}"
        raise _import_failed(spec, exc, command) from None
    finally:
        if not loaded:  # the next load tries again
            sys.modules.pop(name, None)


def _load_module(spec: str) -> None:
    try:
        importlib.import_module(spec)
    except (Exception, SystemExit) as exc:
        missing = exc.name if isinstance(exc, ModuleNotFoundError) else None
        if missing is not None and (spec == missing or spec.startswith(f"{missing}.")):
            raise ConfigError(_not_found(spec, str(exc))) from None
        # Anything else, a ModuleNotFoundError for another module included, is the plugin's own
        command = f"{shlex.quote(sys.executable)} -c {shlex.quote(f'import {spec}')}"
        raise _import_failed(spec, exc, command) from None


def _not_found(spec: str, reason: str) -> str:
    return (
        f"plugins: got {spec!r}; allowed: an importable module or an existing .py file ({reason})"
    )


def _import_failed(spec: str, exc: BaseException, command: str) -> ConfigError:
    """One line for what the plugin's own import raised: its type, message and place."""
    if isinstance(exc, ValueError):  # the plugin refused something as it registered: say which
        return ConfigError(f"plugins: {spec!r} refused to load: {exc}")
    if isinstance(exc, SyntaxError):
        text, where = exc.msg, f"{exc.filename}:{exc.lineno}"
    else:
        # The innermost frame of the plugin's import, skipping importlib's own
        # (the place of a failed `import` inside the plugin).
        frames = [
            frame
            for frame in traceback.extract_tb(exc.__traceback__)
            if not frame.filename.startswith("<frozen ")
        ]
        text = one_line(exc)  # whatever the plugin's message
        where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else spec
    raised = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return ConfigError(
        f"plugins: got {spec!r}, whose import raised {raised} ({where}); allowed: a plugin "
        f"that imports without error (`{command}` shows the traceback)"
    )
