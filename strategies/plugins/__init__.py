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
import sys
from collections.abc import Iterable
from pathlib import Path

from fedmerge.errors import ConfigError
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

    Raises
    ------
    ConfigError
        ``plugins: got '...'; ...`` when a module cannot be found or imported.
    """
    for spec in specs:
        try:
            if spec.endswith(".py"):
                path = Path(spec).resolve()
                tag = hashlib.sha1(str(path).encode()).hexdigest()[:8]
                name = f"fedmerge_plugin_{path.stem}_{tag}"
                if name in sys.modules:
                    continue
                loader = importlib.util.spec_from_file_location(name, path)
                if loader is None or loader.loader is None or not path.is_file():
                    raise FileNotFoundError(path)
                module = importlib.util.module_from_spec(loader)
                sys.modules[name] = module
                try:
                    loader.loader.exec_module(module)
                except BaseException:  # not loaded: the next load tries again
                    del sys.modules[name]
                    raise
            else:
                importlib.import_module(spec)
        except (ImportError, FileNotFoundError) as exc:
            raise ConfigError(
                f"plugins: got {spec!r}; allowed: an importable module or an existing "
                f".py file ({exc})"
            ) from None
        except ValueError as exc:  # the plugin refused something as it registered: say which
            raise ConfigError(f"plugins: {spec!r} refused to load: {exc}") from None
