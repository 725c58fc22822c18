"""Domain exceptions of fedmerge.

Every class derives from :class:`ValueError`, so callers that only know the
standard library (the CLI turns any ``ValueError`` into one line on stderr and
exit code 2) still catch them; callers that care can catch the precise kind.
"""

from __future__ import annotations

__all__ = [
    "AlignmentError",
    "ConfigError",
    "NonFiniteWeightsError",
    "ShapeMismatchError",
    "SpecCoverageError",
    "UntraceableModelError",
    "one_line",
]


def one_line(message: object, limit: int | None = None) -> str:
    """``message`` (an exception's, say) as one line for an error: blanks joined, cut to ``limit``.

    A message cut short ends with ``...``.
    """
    text = " ".join(str(message).split())
    if limit is None or len(text) <= limit:
        return text
    return text[: max(0, limit - 3)] + "..."


class ConfigError(ValueError):
    """A configuration value that is not allowed.

    The message is one line: the dotted key, the value and what is allowed
    (``partition.alpha: got 0.0; allowed: a number > 0``).
    """


class AlignmentError(ValueError):
    """Two models, or a model and a permutation spec, cannot be aligned."""


class ShapeMismatchError(AlignmentError):
    """Two state dicts differ in their keys or in the shape of a parameter.

    The message names the parameter and both shapes.
    """


class SpecCoverageError(AlignmentError):
    """A permutation spec does not describe a parameter of the state dict.

    The message names the parameter (or the permutation) that is not covered.
    """


class UntraceableModelError(AlignmentError):
    """A permutation spec cannot be inferred for a model.

    Raised when torch.fx cannot trace the model or when the traced graph holds
    an operation that cannot be permuted safely; the message names the module
    and the operation.
    """


class NonFiniteWeightsError(AlignmentError):
    """A state dict holds NaN or infinite values; the message names the key."""
