"""Server-side aggregation time of each strategy on the same client replies.

Builds K client replies (Flower Messages with ArrayRecords, as the ServerApp
receives them) from one global model plus independent perturbations, then
times ``aggregate_round`` of every strategy on them. FedAvg is Flower's own
aggregation behind fedmerge's reply screening; ratios are against it, measured
in the same process. The Fisher strategy gets the same replies plus a diagonal
Fisher each (random, positive); the clients' cost of computing it is not
part of the aggregation. ZipIt! correlates activations on 256 random proxy
inputs.

Run:  .venv/bin/python benchmarks/aggregation_cost.py [--clients 10] [--repeat 5]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedmerge.align import permutation_spec_for
from fedmerge.merge import weighted_average
from fedmerge.models import build_model
from strategies.merging import MergingStrategy
from strategies.plugins.aligned import AlignedMerge, ServerModel
from strategies.plugins.fisher import FisherMerge, FisherOptions
from strategies.plugins.ldawa import LDAWAMerge, LDAWAOptions
from strategies.plugins.ot import OTMerge, OTOptions
from strategies.plugins.task_arithmetic import TaskArithmeticMerge, TaskArithmeticOptions
from strategies.plugins.ties import TIESMerge, TIESOptions
from strategies.plugins.zipit import ZipItMerge, ZipItOptions
from strategies.replies import ClientUpdate
from strategies.sampling import SeededFedAvg

StateDict = dict[str, torch.Tensor]


def fedavg_kernel(
    server_round: int, global_state: StateDict, updates: list[ClientUpdate]
) -> tuple[StateDict, dict[str, float]]:
    """FedAvg as fedmerge's kernel computes it (``weighted_average`` of the sample counts)."""
    return weighted_average([u.state for u in updates], [u.num_examples for u in updates]), {}


def replies(model: torch.nn.Module, k: int, scale: float, *, fisher: bool = False) -> list[Message]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for node in range(k):
        state = {
            name: (v + scale * v.std().nan_to_num(0) * torch.randn(v.shape, generator=gen))
            if v.is_floating_point() else v.clone()
            for name, v in model.state_dict().items()
        }  # fmt: skip
        instruction = Message(
            RecordDict({"config": ConfigRecord({})}), dst_node_id=100 + node,
            message_type=MessageType.TRAIN,
        )  # fmt: skip
        records = {
            "arrays": ArrayRecord(state),
            "metrics": MetricRecord({"num-examples": 100 + node}),
        }
        if fisher:  # Flower's FedAvg accepts exactly one ArrayRecord per reply
            records["fisher"] = ArrayRecord(
                {name: torch.rand(p.shape, generator=gen) for name, p in model.named_parameters()}
            )
        content = RecordDict(records)
        out.append(Message(content, reply_to=instruction))
    return out


def time_strategy(
    strategy: SeededFedAvg, model: torch.nn.Module, msgs: list[Message], repeat: int
) -> float:
    strategy.bind_nodes({i: 100 + i for i in range(len(msgs))}, clients_per_round=len(msgs),
                        rng=np.random.default_rng(0))  # fmt: skip
    best = float("inf")
    for _ in range(repeat):
        global_state = {k: v.clone() for k, v in model.state_dict().items()}
        t0 = time.perf_counter()
        strategy.aggregate_round(1, global_state, msgs)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads (default 1: Flower's NumPy FedAvg is single-threaded)",
    )  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    print(f"torch threads {torch.get_num_threads()}; {args.clients} clients; best of {args.repeat}")
    print(f"{'model':<14}{'strategy':<26}{'ms':>10}{'x FedAvg':>10}")
    models = [("simple-cnn", (1, 28, 28)), ("mlp", (1, 28, 28)), ("resnet20", (3, 32, 32))]
    for name, shape in models:
        model = build_model(name, input_shape=shape, num_classes=10, width=1, seed=0)
        msgs = replies(model, args.clients, scale=0.05)
        with_fisher = replies(model, args.clients, scale=0.05, fisher=True)
        spec = permutation_spec_for(model)
        server = ServerModel(model, spec, proxy=[])  # no proxy data
        proxy = list(
            torch.split(torch.randn(256, *shape, generator=torch.Generator().manual_seed(1)), 128)
        )
        zip_server = ServerModel(model, spec, proxy=proxy)
        strategies = {
            "fedavg (Flower)": SeededFedAvg(min_available_nodes=1),
            "fedavg (weighted_average)": MergingStrategy(
                merge=fedavg_kernel, min_available_nodes=1
            ),
            "ldawa": MergingStrategy(merge=LDAWAMerge(LDAWAOptions()), min_available_nodes=1),
            "ldawa (module layers)": MergingStrategy(
                merge=LDAWAMerge(LDAWAOptions(layer="module")), min_available_nodes=1
            ),
            "aligned (weight)": MergingStrategy(
                merge=AlignedMerge(server, method="weight", seed=0), min_available_nodes=1
            ),
            "ot (emd, weight cost)": MergingStrategy(
                merge=OTMerge(server, OTOptions(solver="emd")), min_available_nodes=1
            ),
            "task-arithmetic": MergingStrategy(
                merge=TaskArithmeticMerge(TaskArithmeticOptions()), min_available_nodes=1
            ),
            "ties": MergingStrategy(merge=TIESMerge(TIESOptions()), min_available_nodes=1),
            "ties (per-tensor trim)": MergingStrategy(
                merge=TIESMerge(TIESOptions(trim_scope="tensor")), min_available_nodes=1
            ),
            "fisher": MergingStrategy(merge=FisherMerge(FisherOptions()), min_available_nodes=1),
            "zipit (256 proxy inputs)": MergingStrategy(
                merge=ZipItMerge(zip_server, ZipItOptions()), min_available_nodes=1
            ),
        }
        base = None
        for label, strategy in strategies.items():
            given = with_fisher if label == "fisher" else msgs
            t = time_strategy(strategy, model, given, args.repeat)
            base = base or t
            print(f"{name:<14}{label:<26}{1000 * t:>10.1f}{t / base:>10.2f}")


if __name__ == "__main__":
    main()
