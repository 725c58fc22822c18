"""The model's configuration: which architecture, and how wide."""

from __future__ import annotations

from dataclasses import dataclass

from fedmerge.models.factory import check_width, model_names
from fedmerge.models.user import check_factory

__all__ = ["ModelConfig"]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class ModelConfig:
    """Which model every client trains, validated once.

    Build it with :func:`~fedmerge.models.build_model_from_config`.

    Attributes
    ----------
    name : str (default: "simple-cnn")
        A registered model (:func:`~fedmerge.models.model_names`: ``mlp``,
        ``resnet20``, ``simple-cnn``, ``vgg11`` and any added with
        :func:`~fedmerge.models.register_model`). Not checked when
        ``factory`` is set, which then takes its place.
    width : int (default: 1)
        Width multiplier, >= 1: channels of the CNNs, hidden widths of the MLP.
    hidden : tuple of int (default: (200, 200))
        Hidden widths of the MLP (each multiplied by ``width``); passed to a
        factory as well. Non-empty, every entry >= 1.
    factory : str (default: "")
        A user's model builder, ``"package.module:function"`` or
        ``"path/to/file.py:function"``, called as ``function(input_shape,
        num_classes, *, width, hidden)`` and returning an ``nn.Module``. Only
        its form is checked here; it is imported when the model is built.

    Raises
    ------
    ValueError
        From ``__post_init__``, naming the field, the value and what is allowed.
    """

    name: str = "simple-cnn"
    width: int = 1
    hidden: tuple[int, ...] = (200, 200)
    factory: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.factory, str):
            raise ValueError(f"factory: got {self.factory!r}; allowed: a string")
        if self.factory:
            check_factory(self.factory)
        elif self.name not in model_names():
            raise ValueError(
                f"name: got {self.name!r}; allowed: {', '.join(model_names())}, "
                "or set factory to a model builder of your own"
            )
        check_width(self.width)
        hidden = self.hidden
        if (
            not isinstance(hidden, tuple)
            or not hidden
            or not all(_is_int(h) and h >= 1 for h in hidden)
        ):
            raise ValueError(f"hidden: got {hidden!r}; allowed: a non-empty tuple of integers >= 1")
