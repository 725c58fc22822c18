"""End-to-end runs of the paper regimes: pre-training, independent clients, one-shot fusion."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from fedmerge.training import evaluate, train_local
from sims.launch import simulate
from sims.scenario_files import load_scenario
from strategies.federation import PEER_TRAIN_SEED_OFFSET, Federation

SMALL = [
    "rounds=1",
    "num_clients=3",
    "clients_per_round=3",
    "dataset.name='mnist1d'",
    "dataset.mnist1d_samples=600",
    "model.name='mlp'",
    "model.hidden=[16]",
    "train.epochs=1",
    "train.pretrain_epochs=2",
    "train.batch_size=32",
]


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _train(fed: Federation, model: torch.nn.Module, pid: int, seed: int, epochs: int) -> None:
    x, y = fed.client_data(pid)
    cfg = fed.config.train
    train_local(model, x, y, cfg, generator=torch.Generator().manual_seed(seed), epochs=epochs)


def test_peers_pretrain_exactly_pretrain_epochs_before_the_first_merge(
    ray_address: str, tmp_path: Path
) -> None:
    """Local peers, Adam: round 0 = 2 epochs alone from their own init, round 1 = 1 more."""
    scenario = load_scenario(
        None,
        [*SMALL, "strategy.name='local'", "train.optimizer='adam'", "train.lr=0.001",
         f"simulation.ray_address='{ray_address}'"],
    )  # fmt: skip
    simulate(scenario, tmp_path)
    rows = _rows(tmp_path)
    assert [r["round"] for r in rows] == [0, 1] and rows[0]["pretrained"] is True
    for row in rows:  # order-invariant measures beside the raw ones
        assert 0 <= row["aligned_consensus_distance"] <= row["consensus_distance"] * 1.5
        assert 0 <= row["aligned_avg_model_accuracy"] <= 1
    fed = Federation(scenario)
    final = load_file(str(tmp_path / "model.safetensors"))
    for p in range(3):
        model = fed.client_initial_model(p)
        _train(fed, model, p, fed.client_seed(0, p) + PEER_TRAIN_SEED_OFFSET, 2)
        _, acc0 = evaluate(model, fed.data.test_x, fed.data.test_y)
        assert rows[0]["peer_accuracy"][p] == pytest.approx(acc0, abs=1e-6)
        _train(fed, model, p, fed.client_seed(1, p) + PEER_TRAIN_SEED_OFFSET, 1)
        got = {k.split(".", 1)[1]: v for k, v in final.items() if k.startswith(f"peer{p}.")}
        for k, v in model.state_dict().items():
            assert_close(got[k], v, rtol=1e-5, atol=1e-6, msg=f"peer {p} {k}")


def test_oneshot_fuses_independent_pretrained_clients_then_fine_tunes(
    ray_address: str, tmp_path: Path
) -> None:
    """Round 1: every client trains 2 epochs from its own init and the server averages them
    once (vanilla), measuring fused, client and ensemble accuracy; round 2 is FedAvg."""
    scenario = load_scenario(
        None,
        [*SMALL, "rounds=2", "strategy.name='oneshot'", "strategy.method='average'",
         "train.independent_init=true", f"simulation.ray_address='{ray_address}'"],
    )  # fmt: skip
    simulate(scenario, tmp_path)
    fed = Federation(scenario)
    x, y = fed.data.test_x, fed.data.test_y
    models, counts = [], []
    for p in range(3):
        model = fed.client_initial_model(p)
        _train(fed, model, p, fed.client_seed(1, p), 2)
        models.append(model)
        counts.append(float(len(fed.client_data(p)[1])))
    total = sum(counts)
    pairs = list(zip(counts, [m.state_dict() for m in models], strict=True))
    fused = {k: sum(c * s[k] for c, s in pairs) / total for k in models[0].state_dict()}
    probs = torch.stack([m.eval()(x).softmax(1) for m in models]).mean(0)
    fused_model = fed.initial_model()
    fused_model.load_state_dict(fused)
    rows = _rows(tmp_path)
    fusion = rows[1]["fusion"]
    assert fusion["method"] == "average" and fusion["client_partitions"] == [0, 1, 2]
    for got, m in zip(fusion["client_accuracy"], models, strict=True):
        assert got == pytest.approx(evaluate(m, x, y)[1], abs=1e-6)
    assert fusion["ensemble_accuracy"] == pytest.approx(
        float((probs.argmax(1) == y).float().mean())
    )
    fused_loss, fused_acc = evaluate(fused_model, x, y)
    assert fusion["fused_accuracy"] == pytest.approx(fused_acc, abs=1e-6)
    client_eval = [evaluate(m, x, y) for m in models]
    mean_loss = sum(loss for loss, _ in client_eval) / 3
    mean_acc = sum(acc for _, acc in client_eval) / 3
    assert fusion["loss_barrier"] == pytest.approx(fused_loss - mean_loss, abs=1e-5)
    assert fusion["accuracy_barrier"] == pytest.approx(mean_acc - fused_acc, abs=1e-6)
    assert rows[1]["accuracy"] == pytest.approx(fusion["fused_accuracy"], abs=1e-6)
    assert "fusion" not in rows[2]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["fusion"] == fusion
    # round 2: FedAvg fine-tuning, every client one epoch from the fused model
    states = []
    for p in range(3):
        model = fed.initial_model()
        model.load_state_dict(fused)
        _train(fed, model, p, fed.client_seed(2, p), 1)
        states.append(model.state_dict())
    pairs = list(zip(counts, states, strict=True))
    want = {k: sum(c * s[k] for c, s in pairs) / total for k in states[0]}
    final = load_file(str(tmp_path / "model.safetensors"))
    for k, v in want.items():
        assert_close(final[k], v, rtol=1e-5, atol=1e-5, msg=k)


def test_oneshot_fuses_clients_of_different_widths_by_ot_then_fine_tunes_the_fused_width(
    ray_address: str, tmp_path: Path
) -> None:
    """OTFusion's heterogeneous setting: clients of widths 1, 2, 1 (hidden 16, 32, 16), each
    from its own initialisation at its width, fused by OT (weight cost) into client 0's width;
    round 2 fine-tunes the fused model (width 1) on every client."""
    from fedmerge.align import permutation_spec_for
    from fedmerge.merge import fuse_to_anchor

    scenario = load_scenario(
        None,
        [*SMALL, "rounds=2", "strategy.name='oneshot'", "strategy.method='ot-weight'",
         "strategy.client_widths=[1, 2]", "train.independent_init=true",
         f"simulation.ray_address='{ray_address}'"],
    )  # fmt: skip
    simulate(scenario, tmp_path)
    fed = Federation(scenario)
    x, y = fed.data.test_x, fed.data.test_y
    widths = [1, 2, 1]
    models, counts = [], []
    for p, w in enumerate(widths):
        model = fed.client_initial_model(p, None if w == 1 else w)
        assert model.state_dict()["layers.0.weight"].shape[0] == 16 * w
        _train(fed, model, p, fed.client_seed(1, p), 2)
        models.append(model)
        counts.append(float(len(fed.client_data(p)[1])))
    rows = _rows(tmp_path)
    fusion = rows[1]["fusion"]
    for got, m in zip(fusion["client_accuracy"], models, strict=True):
        assert got == pytest.approx(evaluate(m, x, y)[1], abs=1e-6)
    spec = permutation_spec_for(fed.initial_model(), fed.example_input)
    states = [m.state_dict() for m in models]
    fused = fuse_to_anchor(spec, fed.initial_model(), states, counts, method="ot-weight")
    fused_model = fed.initial_model()
    fused_model.load_state_dict(fused)
    assert fusion["fused_accuracy"] == pytest.approx(evaluate(fused_model, x, y)[1], abs=1e-6)
    want_states = []
    for p in range(3):  # round 2: every client trains the fused width
        model = fed.initial_model()
        model.load_state_dict(fused)
        _train(fed, model, p, fed.client_seed(2, p), 1)
        want_states.append(model.state_dict())
    total = sum(counts)
    final = load_file(str(tmp_path / "model.safetensors"))
    for k in want_states[0]:
        want = sum(c * s[k] for c, s in zip(counts, want_states, strict=True)) / total
        assert_close(final[k], want, rtol=1e-5, atol=1e-5, msg=k)
