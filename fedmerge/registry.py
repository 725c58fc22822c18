"""Name registries of the kernel (data sets, models): one way to add an entry."""

from __future__ import annotations

from typing import TypeVar

T = TypeVar("T")


def add_entry(table: dict[str, T], name: str, entry: T, *, key: str, returns: str) -> None:
    """Add ``entry`` to ``table`` under ``name`` and keep the table sorted by name.

    Parameters
    ----------
    table : dict of str to entry
        The registry.
    name : str
        A new, non-empty name.
    entry : callable
        What the name stands for.
    key, returns : str
        The argument's name and what ``entry`` must return, for the error message.

    Raises
    ------
    ValueError
        If ``name`` is empty or already registered.
    TypeError
        If ``entry`` is not callable.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name: got {name!r}; allowed: a non-empty string")
    if name in table:
        raise ValueError(
            f"name: got {name!r}; allowed: a name not yet registered "
            f"(registered: {', '.join(table)})"
        )
    if not callable(entry):
        raise TypeError(f"{key}: got {entry!r}; allowed: a callable returning {returns}")
    table[name] = entry
    # keep the registry sorted, so listings and error messages are stable
    for key in sorted(table):
        table[key] = table.pop(key)
