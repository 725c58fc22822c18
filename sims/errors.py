"""The errors a ``fedmerge`` command reports in one line (standard library only)."""

from __future__ import annotations


class SimulationError(RuntimeError):
    """The Flower run did not complete; the message says where its log is."""


class FederationError(RuntimeError):
    """A process of the federation failed or did not answer; the message says which."""
