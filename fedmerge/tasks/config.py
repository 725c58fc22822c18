"""``[task]``: what clients learn (supervised or self-supervised) and its options."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

#: Options every self-supervised task has (network, augmentations, evaluation, data).
SSL_OPTIONS: frozenset[str] = frozenset(
    {
        "projection_dim",
        "projection_hidden",
        "knn_k",
        "eval_every",
        "eval_samples",
        "test_samples",
        "probe_steps",
        "client_samples",
        "crop_scale",
        "flip",
        "brightness",
        "contrast",
        "blur",
    }
)


@dataclass(frozen=True)
class TaskConfig:
    """``[task]``: the training task of the clients and its frozen options.

    Attributes
    ----------
    name : {"supervised", "simclr", "byol"} (default: "supervised")
        ``"supervised"``: cross-entropy on the labels (the model as built).
        ``"simclr"``: NT-Xent on two augmented views (Chen et al., ICML 2020).
        ``"byol"``: online and EMA target networks with a predictor (Grill et
        al., NeurIPS 2020). Self-supervised tasks train the built-in model
        without its classifier (the encoder) plus a projection MLP, and never
        read the labels.
    temperature : float (default: 0.5)
        SimCLR's NT-Xent temperature; > 0.
    ema_decay : float (default: 0.99)
        BYOL's target decay ``tau``: ``target <- tau target + (1 - tau) online``
        after every step; in [0, 1).
    projection_dim : int (default: 128)
        Output width of the projection MLP; >= 1.
    projection_hidden : int (default: 512)
        Hidden width of the projection MLP; >= 1.
    predictor_hidden : int (default: 512)
        Hidden width of BYOL's predictor MLP; >= 1.
    knn_k : int (default: 20)
        Neighbours of the server's k-NN monitor (cosine similarity); >= 1.
    eval_every : int (default: 5)
        The linear probe runs every ``eval_every`` rounds and after the last; >= 1.
    eval_samples : int (default: 5000)
        Labelled training samples (seeded draw) that form the k-NN memory bank
        and the linear probe's training set; >= 10.
    test_samples : int (default: 0)
        Test samples the k-NN and the probe are scored on (seeded draw; 0: all).
    probe_steps : int (default: 100)
        L-BFGS iterations of the linear probe; >= 1.
    client_samples : int (default: 0)
        Each client trains on at most this many of its samples (a seeded draw,
        the same every round; 0: all), to scale runs down.
    crop_scale : float (default: 0.5)
        Smallest area fraction of the random resized crop; in (0, 1].
    flip : bool (default: True)
        Random horizontal flips.
    brightness : float (default: 0.4)
        Additive brightness shift drawn from ``[-brightness, brightness]`` (in
        units of the normalised input); >= 0.
    contrast : float (default: 0.4)
        Contrast factor drawn from ``[1 - contrast, 1 + contrast]``; in [0, 1].
    blur : float (default: 0.0)
        Probability of a 3x3 Gaussian blur (sigma in [0.1, 2]) per view; in [0, 1].

    Raises
    ------
    ValueError
        ``key: got X; allowed: Y`` for a value out of range, an unknown task,
        or an option the chosen task does not read set to another value than
        its default.
    """

    name: str = "supervised"
    temperature: float = 0.5
    ema_decay: float = 0.99
    projection_dim: int = 128
    projection_hidden: int = 512
    predictor_hidden: int = 512
    knn_k: int = 20
    eval_every: int = 5
    eval_samples: int = 5000
    test_samples: int = 0
    probe_steps: int = 100
    client_samples: int = 0
    crop_scale: float = 0.5
    flip: bool = True
    brightness: float = 0.4
    contrast: float = 0.4
    blur: float = 0.0

    def __post_init__(self) -> None:
        from fedmerge.tasks.registry import task_names

        if self.name not in task_names():
            raise ValueError(f"name: got {self.name!r}; allowed: {', '.join(task_names())}")
        checks = {
            "temperature": (_finite(self.temperature) and self.temperature > 0, "a number > 0"),
            "ema_decay": (
                _finite(self.ema_decay) and 0 <= self.ema_decay < 1,
                "a number in [0, 1)",
            ),
            "crop_scale": (_finite(self.crop_scale) and 0 < self.crop_scale <= 1, "(0, 1]"),
            "brightness": (_finite(self.brightness) and self.brightness >= 0, "a number >= 0"),
            "contrast": (_finite(self.contrast) and 0 <= self.contrast <= 1, "a number in [0, 1]"),
            "blur": (_finite(self.blur) and 0 <= self.blur <= 1, "a probability in [0, 1]"),
            "eval_samples": (self.eval_samples >= 10, "an integer >= 10"),
            "test_samples": (self.test_samples >= 0, "an integer >= 0 (0: all)"),
            "client_samples": (self.client_samples >= 0, "an integer >= 0 (0: all)"),
        }
        for key in ("projection_dim", "projection_hidden", "predictor_hidden", "knn_k"):
            checks[key] = (getattr(self, key) >= 1, "an integer >= 1")
        for key in ("eval_every", "probe_steps"):
            checks[key] = (getattr(self, key) >= 1, "an integer >= 1")
        for key, (ok, allowed) in checks.items():
            if not ok:
                raise ValueError(f"{key}: got {getattr(self, key)!r}; allowed: {allowed}")
        own = task_options(self.name)
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "name" and f.name not in own and value != f.default:
                users = [n for n in task_names() if f.name in task_options(n)]
                raise ValueError(
                    f"{f.name}: got {value!r}; allowed: only with task "
                    f"{' or '.join(repr(n) for n in users)} (task is {self.name!r})"
                )

    @property
    def self_supervised(self) -> bool:
        """Whether the task trains without labels (anything but ``supervised``)."""
        return self.name != "supervised"


def task_options(name: str) -> frozenset[str]:
    """The options task ``name`` reads (a registered task's ``options``)."""
    from fedmerge.tasks.registry import get_task

    return get_task(name).options


def _finite(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
