"""Deployment with fedmerge's own pieces: a server without data, TLS, one ClientApp process.

A SuperLink and real SuperNode processes on loopback, as in ``test_deployment.py``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fedmerge.data import load_dataset
from sims.processes import flower_environment, free_port, stat_fields
from sims.runtime import APP_DIR, stage_app, stop_process
from strategies.config import run_config_from_dict
from strategies.federation import federation
from tests.e2e.deployment_support import (
    OWN_DATA,
    Warm,
    deployment_of,
    flwr_run,
    node_dirs,
    rows_of,
    supernode,
)


def test_a_server_without_data_reports_its_clients_evaluation(
    app: Path, tmp_path: Path, deployment_warm: Warm
) -> None:
    """``evaluation.server = 'clients'``: nobody holds Fashion-MNIST but the nodes' own arrays.

    The SuperLink (and so the ServerApp) runs with the Fashion-MNIST path
    pointing at nothing: the run completes only if the server never loads the
    data set. Every row's accuracy must be the sample-weighted accuracy of the
    round's global model on the nodes' own test arrays, recomputed here.
    """
    data = load_dataset("fashion-mnist")
    x, y = data.train_x.numpy(), data.train_y.numpy()
    tests = []
    dirs = []
    for p, n_test in enumerate((40, 70, 100)):  # unequal sizes: weighting matters
        d = tmp_path / f"node{p}"
        d.mkdir()
        own = slice(p * 400, p * 400 + 300)
        held = slice(p * 400 + 300, p * 400 + 300 + n_test)
        np.savez(d / "data.npz", train_x=x[own], train_y=y[own], test_x=x[held], test_y=y[held])
        tests.append((torch.from_numpy(x[held]), torch.from_numpy(y[held])))
        dirs.append(d)
    nowhere = {"FEDMERGE_FASHION_MNIST": str(tmp_path / "no-fashion-mnist")}
    run_dir = tmp_path / "run"
    with deployment_of(tmp_path, deployment_warm, nowhere) as (env, procs):
        for p, d in enumerate(dirs):
            supernode(env, procs, f"partition-id={p} data-dir='{d}'")
        out = flwr_run(
            env,
            app,
            "num_clients=3 clients_per_round=3 strategy.name='fedavg' "
            "dataset.name='fashion-mnist' model.name='mlp' simulation.assign_partitions=false "
            "simulation.timeout=60 evaluation.server='clients' strategy.fraction_evaluate=1.0 "
            f"rounds=2 output.run-dir='{run_dir}'",
        )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["evaluation"] == "clients"
    assert summary["partition_hash"] is None
    rows = rows_of(run_dir)
    assert [r["client_eval_accuracy"]["n"] for r in rows] == [3, 3, 3]
    # the final model, scored on each node's own test arrays by hand
    config = run_config_from_dict(
        {"dataset": {"name": "fashion-mnist"}, "model": {"name": "mlp"}, "num_clients": 3,
         "clients_per_round": 3}
    )  # fmt: skip
    model = federation(config).build_model(0)
    model.load_state_dict(load_file(str(run_dir / "model.safetensors")))
    model.eval()
    hits = total = 0
    loss_sum = 0.0
    with torch.no_grad():
        for tx, ty in tests:
            logits = model(tx)
            hits += int((logits.argmax(1) == ty).sum())
            loss_sum += float(torch.nn.functional.cross_entropy(logits, ty, reduction="sum"))
            total += len(ty)
    assert rows[-1]["accuracy"] == pytest.approx(hits / total, abs=1e-9)
    assert rows[-1]["loss"] == pytest.approx(loss_sum / total, rel=1e-5)
    assert rows[-1]["accuracy"] > rows[0]["accuracy"] + 0.2


def test_tls_and_node_authentication(app: Path, tmp_path: Path) -> None:
    """fedmerge certs/superlink/supernode: TLS, registered keys only; others stay out.

    The unregistered node claims partition 1 as well: had it joined, discovery would
    fail on a duplicate partition id, or, joining later, it would take partition 1 over.
    """
    repo = Path(__file__).resolve().parents[2]
    fedmerge = [sys.executable, "-m", "sims.cli"]
    certs, home, port = tmp_path / "certs", tmp_path / "home", free_port()
    subprocess.run([*fedmerge, "certs", str(certs), "--host", "127.0.0.1", "--nodes", "3"],
                   cwd=repo, check=True, capture_output=True, timeout=120)  # fmt: skip
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "tls"\n[superlink.tls]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{certs / "ca.crt"}"\n'
    )
    env = {**flower_environment(), "FLWR_HOME": str(home)}
    procs: list[subprocess.Popen] = []

    def start(*args: str) -> None:
        procs.append(
            subprocess.Popen([*fedmerge, *args], cwd=repo, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
        )  # fmt: skip

    try:
        start("superlink", "--certs", str(certs), "--host", "127.0.0.1", "--port", str(port))
        for i in range(2):  # register nodes 0 and 1 (retried until the SuperLink is up)
            deadline = time.monotonic() + 90
            while True:
                reg = subprocess.run(
                    ["flwr", "supernode", "register", str(certs / f"node-{i}.pub"), "tls"],
                    env=env, capture_output=True, text=True, timeout=60,
                )  # fmt: skip
                if reg.returncode == 0 or time.monotonic() > deadline:
                    break
                time.sleep(1)
            assert reg.returncode == 0, reg.stdout + reg.stderr
        dirs = node_dirs(tmp_path, 2)
        for key, pid in ((0, 0), (1, 1), (2, 1)):
            start(
                "supernode", "--superlink", f"127.0.0.1:{port}", "--certs", str(certs),
                "--key", str(certs / f"node-{key}"), "--port", str(free_port()),
                "--node-config", f"partition-id={pid} data-dir='{dirs[pid]}'",
            )  # fmt: skip
        run_dir = tmp_path / "run"
        own = OWN_DATA.replace(
            "num_clients=3 clients_per_round=3", "num_clients=2 clients_per_round=2"
        )
        out = flwr_run(env, app, f"{own} simulation.timeout=60 rounds=1 output.run-dir='{run_dir}'")
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "completed", out.stdout[-3000:]
        assert rows_of(run_dir)[1]["sampled"] == [0, 1]
        assert "round 1: accuracy" in out.stdout + out.stderr
        assert "rejoined" not in out.stdout + out.stderr
    finally:
        for proc in reversed(procs):
            stop_process(proc)


def test_supernode_serves_every_message_from_one_clientapp_process(
    deployment, app: Path, tmp_path: Path
) -> None:
    """fedmerge supernode (process isolation): one ClientApp process per node, all messages.

    Every message a node gets (the discovery query, then one training message per round)
    is served, and logged, by the same worker process; the run learns as usual.
    """
    env, procs = deployment
    logs = [tmp_path / f"node{p}.log" for p in range(2)]
    for p, log in enumerate(logs):
        with log.open("w") as sink:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "sims.cli", "supernode", "--insecure",
                     "--superlink", f"127.0.0.1:{env['SUPERLINK_PORT']}",
                     "--port", str(free_port()),
                     "--node-config", f"partition-id={p} num-partitions=2"],
                    cwd=APP_DIR, env=env, stdout=sink, stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )  # fmt: skip
    run_dir = tmp_path / "run"
    out = flwr_run(
        env,
        app,
        "rounds=3 num_clients=2 clients_per_round=2 strategy.name='fedavg' "
        "dataset.name='digits' model.name='mlp' simulation.assign_partitions=false "
        f"output.run-dir='{run_dir}'",
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed", out.stdout[-3000:]
    rows = rows_of(run_dir)
    assert [r["clients"] for r in rows[1:]] == [2, 2, 2]
    assert rows[-1]["accuracy"] > rows[0]["accuracy"] + 0.3
    for log in logs:
        served = re.findall(r"pid (\d+) served task (\d+) in [\d.]+ s \((\w+)\)", log.read_text())
        assert len(served) == 4, log.read_text()[-3000:]  # query + 3 training messages
        assert len({pid for pid, _, _ in served}) == 1
        assert [int(n) for _, n, _ in served] == [1, 2, 3, 4]
        assert {status for _, _, status in served} == {"completed"}


def test_a_changed_app_gets_fresh_modules_in_the_same_clientapp_process(
    deployment, tmp_path: Path
) -> None:
    """Two runs of two app versions (FAB hashes) on one node: the second one restarts the
    node's ClientApp process in place (exec, same PID) and runs the changed code."""
    env, procs = deployment
    log = tmp_path / "node.log"
    with log.open("w") as sink:
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "sims.cli", "supernode", "--insecure",
                 "--superlink", f"127.0.0.1:{env['SUPERLINK_PORT']}",
                 "--port", str(free_port()), "--node-config", "partition-id=0 num-partitions=1"],
                cwd=APP_DIR, env=env, stdout=sink, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )  # fmt: skip
    apps = [stage_app(tmp_path / "app-a"), stage_app(tmp_path / "app-b")]
    client = apps[1] / "strategies" / "client_app.py"
    client.write_text(  # version b says so in the node's log when it is imported
        client.read_text() + "\nimport logging as _logging\n"
        "_logging.getLogger('fedmerge').warning('client app version b')\n"
    )
    for name, app in zip("ab", apps, strict=True):
        run_dir = tmp_path / f"run-{name}"
        out = subprocess.run(
            ["flwr", "run", str(app), "--stream", "--run-config",
             "rounds=1 num_clients=1 clients_per_round=1 strategy.name='fedavg' "
             "dataset.name='digits' model.name='mlp' simulation.assign_partitions=false "
             f"output.run-dir='{run_dir}'"],
            env=env, capture_output=True, text=True, timeout=400,
        )  # fmt: skip
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "completed", out.stdout[-3000:]
    text = log.read_text()
    served = re.findall(r"pid (\d+) served task (\d+)", text)
    assert len(served) == 4 and len({pid for pid, _ in served}) == 1, text[-3000:]
    # run a: tasks 1-2 in the first interpreter; run b: the exec'd one counts afresh
    assert [int(n) for _, n in served] == [1, 2, 1, 2]
    assert text.count("restarts afresh") == 1
    assert text.index("restarts afresh") < text.index("client app version b")
    # the process was forked from the deployment's warm process, and is still there
    # after its exec (its shim kept waiting: the node did not stop)
    pid = served[0][0]
    fields = stat_fields(int(pid))
    assert fields is not None, f"ClientApp process {pid} has ended"
    ppid = fields[1]
    assert b"sims.warm\0serve" in Path(f"/proc/{ppid}/cmdline").read_bytes()
    assert procs[-1].poll() is None
