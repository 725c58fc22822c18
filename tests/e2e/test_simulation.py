"""End-to-end: real Flower simulation runtime, real Ray, real Fashion-MNIST."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fedmerge.run_end import END_OF_RUN
from sims import launch
from sims.launch import simulate
from sims.processes import flower_environment, free_port
from sims.runtime import APP_DIR, Runtime, wait_healthy
from sims.scenario_files import load_scenario
from strategies.config import RunConfig
from strategies.federation import Federation
from tests.e2e.short_runs import SHORT

SMALL = [
    "rounds=2",
    *SHORT,
    "num_clients=4",
    "clients_per_round=2",
    "partition.scheme='dirichlet'",
    "partition.alpha=0.5",
]


def _scenario(ray_address: str, *extra: str):
    return load_scenario(None, [*SMALL, f"simulation.ray_address='{ray_address}'", *extra])


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def fedavg_run(ray_address: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("fedavg")
    seen: list[int] = []
    simulate(_scenario(ray_address), run_dir, on_round=lambda row: seen.append(row["round"]))
    assert seen == [0, 1, 2]  # the progress callback saw every round in order
    return run_dir


def test_fedavg_improves_on_initial_model(fedavg_run: Path) -> None:
    rows = _rows(fedavg_run)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[-1]["accuracy"] > rows[0]["accuracy"] + 0.2
    assert rows[-1]["loss"] < rows[0]["loss"]
    summary = json.loads((fedavg_run / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["final_accuracy"] == rows[-1]["accuracy"]
    for name in ("config.json", "model.safetensors", "flower.log"):
        assert (fedavg_run / name).exists(), name


def test_flower_log_holds_the_whole_run(fedavg_run: Path) -> None:
    """``flwr run --stream`` is stopped only once it has shown the ServerApp's last line.

    Flower streams that log some tenths of a second late: stopped as soon as
    ``summary.json`` appeared, it lost the last round's lines.
    """
    lines = (fedavg_run / "flower.log").read_text().splitlines()
    for row in _rows(fedavg_run):
        assert any(f"round {row['round']}: accuracy {row['accuracy']:.4f}" in x for x in lines), row
    last = [x for x in lines if END_OF_RUN in x]
    assert len(last) == 1 and last[0].endswith(str(fedavg_run / "summary.json")), last


def test_initial_round_is_the_seeded_initial_model(fedavg_run: Path) -> None:
    """Round 0 is the model built from the scenario's seed, evaluated independently.

    On the 2,000 test samples ``evaluation.test_samples`` names: drawn without
    replacement by ``SeedSequence([seed, 5, 1])``, in their order.
    """
    scenario = load_scenario(None, SMALL)
    fed = Federation(scenario)
    model = fed.initial_model()
    data = fed.data
    n, k = len(data.test_y), scenario.evaluation.test_samples
    idx = np.sort(np.random.default_rng([scenario.seed, 5, 1]).choice(n, size=k, replace=False))
    x, y = data.test_x[torch.from_numpy(idx)], data.test_y[torch.from_numpy(idx)]
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    assert k == 2000
    assert abs(_rows(fedavg_run)[0]["accuracy"] - acc) < 1e-6


def test_bytes_counted_match_model_size(fedavg_run: Path) -> None:
    """Each round sends the model to 2 clients and gets 2 models back.

    Flower serialises every array in NumPy's ``.npy`` format; the expected
    size is computed here with ``numpy.save``.
    """
    state = load_file(str(fedavg_run / "model.safetensors"))
    model_bytes = 0
    for tensor in state.values():
        buffer = io.BytesIO()
        np.save(buffer, tensor.numpy(), allow_pickle=False)
        model_bytes += buffer.getbuffer().nbytes
    for row in _rows(fedavg_run)[1:]:
        assert row["clients"] == 2
        assert row["bytes_down"] == 2 * model_bytes
        assert row["bytes_up"] == 2 * model_bytes
        assert row["train_loss"]["n"] == 2


def _shared_runtime(scenario: RunConfig) -> Runtime | None:
    """The runtime of the session's ``shared_runtimes`` block that ``scenario``'s runs go on."""
    shared = launch._shared
    assert shared is not None, "the session's shared_runtimes block is not open"
    return shared.runtimes.get(launch.runtime_key(scenario))


def test_same_seed_same_numbers(fedavg_run: Path, ray_address: str, tmp_path: Path) -> None:
    scenario = _scenario(ray_address)
    before = _shared_runtime(scenario)
    assert before is not None and before.superlink is not None  # fedavg_run's
    simulate(scenario, tmp_path)
    # the second run of the block went on the first one's runtime, still up
    assert _shared_runtime(scenario) is before
    assert before.superlink.poll() is None
    a, b = _rows(fedavg_run), _rows(tmp_path)
    for ra, rb in zip(a, b, strict=True):
        assert ra["accuracy"] == rb["accuracy"]
        assert ra["loss"] == rb["loss"]
        assert ra["train_loss"] == rb["train_loss"]
    wa = load_file(str(fedavg_run / "model.safetensors"))
    wb = load_file(str(tmp_path / "model.safetensors"))
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=0)


def test_fedprox_runs_and_differs(fedavg_run: Path, ray_address: str, tmp_path: Path) -> None:
    simulate(
        _scenario(
            ray_address, "strategy.name='fedprox'", "strategy.prox_mu=0.1",
            "strategy.fraction_evaluate=0.5",
        ),
        tmp_path,
    )  # fmt: skip
    rows = _rows(tmp_path)
    for row in rows[1:]:  # 2 of the 4 clients evaluate the global model on their data
        assert row["client_eval_accuracy"]["n"] == 2
        assert 0.0 <= row["client_eval_accuracy"]["min"] <= row["client_eval_accuracy"]["max"] <= 1
    assert rows[0]["client_eval_accuracy"] is None
    assert rows[-1]["accuracy"] > rows[0]["accuracy"] + 0.2
    # The final model differs from the FedAvg run's (an accuracy on 2,000 samples could tie
    # after 40 steps with mu = 0.1; the weights cannot).
    prox, avg = (load_file(str(d / "model.safetensors")) for d in (tmp_path, fedavg_run))
    assert any(not torch.equal(prox[k], avg[k]) for k in avg)


def test_flwr_run_dot_uses_the_embedded_default(ray_address: str, tmp_path: Path) -> None:
    """`flwr run .` through Flower's own CLI runs pyproject's default scenario."""
    env = {**flower_environment(), "FLWR_HOME": str(tmp_path / "home"), "RAY_ADDRESS": ray_address}
    (tmp_path / "home").mkdir()
    port = free_port()
    (tmp_path / "home" / "config.toml").write_text(
        f'[superlink]\ndefault = "local"\n[superlink.local]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    superlink = subprocess.Popen(
        ["flower-superlink", "--insecure", "--simulation", "--host", "127.0.0.1",
         "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    run_dir = tmp_path / "run"
    try:
        wait_healthy(port, superlink, timeout=60)
        out = subprocess.run(
            ["flwr", "run", ".", "--stream",
             # one round of the first 40 mini-batches per epoch; every other key as embedded
             "--run-config", f"rounds=1 train.max_steps=40 output.run-dir='{run_dir}'",
             # one CPU per actor: Flower's default of two needs a Ray head of two CPUs,
             # and under `make test` each pytest worker's head has one
             "--federation-config", "num-supernodes=10 client-resources-num-cpus=1"],
            cwd=APP_DIR, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    finally:
        os.killpg(superlink.pid, signal.SIGTERM)
        superlink.wait(timeout=30)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    config = json.loads((run_dir / "config.json").read_text())
    default = load_scenario(None).to_dict()
    assert config == {**default, "rounds": 1, "train": {**default["train"], "max_steps": 40}}
    rows = _rows(run_dir)
    assert len(rows) == 2 and rows[1]["accuracy"] > rows[0]["accuracy"]
