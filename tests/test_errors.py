"""One-line error messages (:func:`fedmerge.errors.one_line`)."""

from __future__ import annotations

from fedmerge.errors import one_line


def test_blanks_are_joined_into_one_line() -> None:
    assert one_line(ValueError("a\n  b\tc ")) == "a b c"


def test_a_long_message_is_cut_and_says_so() -> None:
    text = "x" * 50
    assert one_line(text, 50) == text  # at the limit: whole
    cut = one_line(text + "y", 50)
    assert cut == "x" * 47 + "..." and len(cut) == 50
