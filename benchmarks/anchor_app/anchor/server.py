"""ServerApp: Flower's FedAvg with a central evaluation that timestamps every round."""

from __future__ import annotations

import time
from pathlib import Path

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from anchor.task import federation
from fedmerge.training import evaluate

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    fed = federation(context)
    c = context.run_config
    clients, per_round = int(c["num-clients"]), int(c["per-round"])
    model = fed.initial_model()
    data = fed.data
    times = Path(str(c["times"]))

    def central(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, acc = evaluate(model, data.test_x, data.test_y)
        with times.open("a") as f:
            f.write(f"{server_round} {time.time():.3f} {acc:.4f}\n")
        return MetricRecord({"accuracy": acc, "loss": loss})

    strategy = FedAvg(
        fraction_train=per_round / clients,
        fraction_evaluate=0.0,
        min_train_nodes=per_round,
        min_available_nodes=clients,
    )
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=int(c["rounds"]),
        evaluate_fn=central,
    )
