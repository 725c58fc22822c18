"""Adversarial clients: seeded choice, what each behaviour sends, validation; degraded runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from strategies.adversary import Adversary, adversarial_partitions, adversary_for
from strategies.config import ConfigError, run_config_from_dict
from strategies.metering import Traffic
from strategies.recorder import RoundRecorder
from strategies.run_log import RunLog


def _config(**simulation):
    return run_config_from_dict({"num_clients": 10, "seed": 3, "simulation": simulation})


def test_a_fraction_is_drawn_with_the_run_seed() -> None:
    config = _config(adversary_fraction=0.3)
    got = adversarial_partitions(config)
    rng = np.random.default_rng([3, 4])  # [seed, the adversaries' stream]
    assert got == frozenset(int(p) for p in rng.choice(10, size=3, replace=False))
    assert adversarial_partitions(_config(adversary_fraction=0.3)) == got  # reproducible
    assert len(adversarial_partitions(_config(adversary_fraction=0.01))) == 1  # at least one
    assert adversarial_partitions(_config()) == frozenset()


def test_a_list_names_the_adversaries() -> None:
    config = _config(adversary_partitions=[7, 2], adversary_behaviour="sign-flip")
    assert adversarial_partitions(config) == {2, 7}
    assert adversary_for(config, 2) == Adversary("sign-flip", 10.0)
    assert adversary_for(config, 3) is None


def _pair():
    g = {"w": torch.tensor([1.0, -2.0]), "n": torch.tensor(3)}
    w = {"w": torch.tensor([1.5, -1.0]), "n": torch.tensor(5)}
    return g, w


@pytest.mark.parametrize(
    ("behaviour", "want_w", "want_count"),
    [
        ("scale", [4 * 1.5, 4 * -1.0], 100),  # c W
        ("replace", [1.0 + 4 * 0.5, -2.0 + 4 * 1.0], 100),  # g + c (w - g)
        ("sign-flip", [1.0 - 0.5, -2.0 - 1.0], 100),  # g - (w - g)
        ("label-flip", [1.5, -1.0], 100),  # sends its (badly) trained model as is
        ("inflate-count", [1.5, -1.0], 400),  # c n
    ],
)
def test_each_behaviour_sends_what_it_says(behaviour, want_w, want_count) -> None:
    g, w = _pair()
    sent, count = Adversary(behaviour, 4.0).reply(g, w, 100)
    torch.testing.assert_close(sent["w"], torch.tensor(want_w))
    assert count == want_count
    assert torch.equal(sent["n"], w["n"])  # integer buffers untouched


def test_label_flip_moves_every_label_to_the_next_class() -> None:
    y = torch.tensor([0, 1, 2, 9, 5])
    assert Adversary("label-flip", 1.0).labels(y, 10).tolist() == [1, 2, 3, 0, 6]
    assert Adversary("scale", 1.0).labels(y, 10) is y


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"simulation": {"adversary_fraction": 1.5}}, "simulation.adversary_fraction: got 1.5"),
        ({"simulation": {"adversary_behaviour": "nice"}},
         "simulation.adversary_behaviour: got 'nice'; allowed: scale, replace"),
        ({"simulation": {"adversary_partitions": [-1]}},
         "simulation.adversary_partitions: got [-1]; allowed"),
        ({"num_clients": 4, "clients_per_round": 2, "simulation": {"adversary_partitions": [4]}},
         "simulation.adversary_partitions: got [4]; allowed: partition ids 0 to 3"),
        ({"simulation": {"adversary_partitions": [1], "adversary_fraction": 0.2}},
         "simulation.adversary_partitions: got [1] with adversary_fraction 0.2"),
        ({"strategy": {"name": "gossip"}, "simulation": {"adversary_fraction": 0.2}},
         "simulation.adversary_behaviour: got adversaries with peer strategy 'gossip'"),
    ],
)  # fmt: skip
def test_bad_adversary_settings_are_one_line_errors(data, message) -> None:
    with pytest.raises(ConfigError) as info:
        run_config_from_dict(data)
    assert str(info.value).startswith(message), str(info.value)


def _summary(tmp_path: Path, rows: list[dict], **simulation) -> dict:
    config = run_config_from_dict(
        {"num_clients": 4, "clients_per_round": 2, "simulation": simulation}
    )
    recorder = RoundRecorder(config, RunLog(tmp_path), model=None, data=None)  # type: ignore[arg-type]
    for r, extra in enumerate(rows):
        traffic = Traffic(errors=extra.pop("errors", 0), missing=extra.pop("missing", 0))
        recorder.record(r, {"accuracy": 0.5, "loss": 1.0, **extra}, traffic=traffic)
    recorder.summary(0.0, {})
    return json.loads((tmp_path / "summary.json").read_text())


@pytest.mark.parametrize(
    ("rows", "status", "counts"),
    [
        ([{}, {"refused": 0}], "completed", (0, 0, 0)),
        ([{}, {"refused": 2}], "degraded", (0, 0, 2)),
        ([{}, {"errors": 1}], "degraded", (1, 0, 0)),
        ([{}, {"missing": 1}, {"refused": 1}], "degraded", (0, 1, 1)),
    ],
)
def test_summary_is_degraded_when_clients_were_lost_or_refused(
    tmp_path: Path, rows, status, counts
) -> None:
    summary = _summary(tmp_path, rows)
    assert summary["status"] == status
    assert (summary["failures"], summary["missing"], summary["refused"]) == counts


def test_summary_lists_the_adversaries(tmp_path: Path) -> None:
    summary = _summary(tmp_path, [{}], adversary_partitions=[3, 1])
    assert summary["adversaries"] == [1, 3]
