"""The task-arithmetic, TIES, Fisher and ZipIt! plugins: options, one round on Flower messages."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedmerge.align import apply_permutation, permutation_spec_for, random_permutation
from fedmerge.models import build_model
from strategies.merging import MergingStrategy
from strategies.plugins import get_plugin
from strategies.plugins.aligned import ServerModel
from strategies.plugins.base import ClientContext
from strategies.plugins.fisher import FisherMerge, FisherOptions
from strategies.plugins.task_arithmetic import TaskArithmeticMerge, TaskArithmeticOptions
from strategies.plugins.ties import PeerTIESOptions, TIESMerge, TIESOptions
from strategies.plugins.zipit import ZipItMerge, ZipItOptions


def _reply(node: int, state: dict[str, torch.Tensor], n: int, **extra: ArrayRecord) -> Message:
    instruction = Message(
        RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type=MessageType.TRAIN
    )
    content = RecordDict(
        {"arrays": ArrayRecord(state), "metrics": MetricRecord({"num-examples": n}), **extra}
    )
    return Message(content, reply_to=instruction)


def _bind(strategy: MergingStrategy, k: int) -> MergingStrategy:
    strategy.bind_nodes({p: 10 + p for p in range(k)}, clients_per_round=k,
                        rng=np.random.default_rng(0))  # fmt: skip
    return strategy


def _states() -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(3, 4, generator=g), "b": torch.randn(4, generator=g)}
    clients = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
               for _ in range(3)]  # fmt: skip
    return base, clients


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (lambda: TaskArithmeticOptions(scale=float("inf")), "scale: got inf"),
        (lambda: TaskArithmeticOptions(bn_stats="reset"), "bn_stats: got 'reset'"),
        (lambda: TIESOptions(density=0.0), r"density: got 0.0; allowed: a number in \(0, 1\]"),
        (lambda: TIESOptions(trim_scope="layer"), "trim_scope: got 'layer'"),
        (lambda: PeerTIESOptions(density=2.0), "density: got 2.0"),
        (lambda: FisherOptions(fisher_samples=0), "fisher_samples: got 0"),
        (lambda: FisherOptions(fisher_labels="true"), "fisher_labels: got 'true'"),
        (lambda: FisherOptions(fisher_floor=0.0), "fisher_floor: got 0.0"),
        (lambda: FisherOptions(floor_models="last"), "floor_models: got 'last'"),
        (lambda: ZipItOptions(alpha=1.5), r"alpha: got 1.5; allowed: a number in \[0, 1\]"),
        (lambda: ZipItOptions(beta=-0.1), "beta: got -0.1"),
        (lambda: ZipItOptions(zip_samples=0), "zip_samples: got 0"),
    ],
)
def test_options_reject_bad_values(options, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        options()


def test_task_arithmetic_round_on_messages() -> None:
    base, clients = _states()
    strategy = _bind(MergingStrategy(
        merge=TaskArithmeticMerge(TaskArithmeticOptions(scale=2.0, sample_weighted=True)),
        min_available_nodes=1), 3)  # fmt: skip
    counts = [10, 30, 60]
    outcome = strategy.aggregate_round(
        1,
        base,
        [_reply(10 + i, s, n) for i, (s, n) in enumerate(zip(clients, counts, strict=True))],
    )
    for key in base:
        delta = sum(n / 100 * (s[key] - base[key]) for s, n in zip(clients, counts, strict=True))
        torch.testing.assert_close(outcome.state[key], base[key] + 2.0 * delta)
    norm = sum(float((outcome.state[k] - base[k]).square().sum()) for k in base) ** 0.5
    assert outcome.extras["update_norm"] == pytest.approx(norm)


def test_ties_round_reports_the_share_it_changed() -> None:
    base, clients = _states()
    strategy = _bind(MergingStrategy(merge=TIESMerge(TIESOptions(density=0.1)),
                                     min_available_nodes=1), 3)  # fmt: skip
    outcome = strategy.aggregate_round(
        1, base, [_reply(10 + i, s, 5) for i, s in enumerate(clients)]
    )
    # 16 entries per task vector, ceil(1.6) = 2 kept each: at most 6 of 16 change, at least 2
    changed = sum(int((outcome.state[k] != base[k]).sum()) for k in base)
    assert 2 <= changed <= 6
    assert outcome.extras["ties_changed"] == changed / 16


def test_fisher_client_hook_and_server_merge() -> None:
    model = build_model("mlp", input_shape=(1, 8, 8), num_classes=10, hidden=(16,), seed=0)
    plugin = get_plugin("fisher")
    options = FisherOptions(fisher_samples=20, fisher_labels="empirical", normalise_fishers=False)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, 1, 8, 8, generator=g), torch.randint(0, 10, (50,), generator=g)
    ctx = ClientContext(config=None, partition_id=0, model=model,
                        model_at_width=lambda w: model, example_input=x[:2])  # fmt: skip
    states, fishers, replies = [], [], []
    for i in range(2):
        local = build_model("mlp", input_shape=(1, 8, 8), num_classes=10, hidden=(16,), seed=i)
        extra = plugin.reply_arrays(options, ctx, local, x, y, seed=7 + i)
        assert set(extra) == {"fisher"}
        assert set(extra["fisher"]) == {n for n, _ in local.named_parameters()}
        states.append(local.state_dict())
        fishers.append(extra["fisher"])
        replies.append(_reply(10 + i, local.state_dict(), 5, fisher=ArrayRecord(extra["fisher"])))
    first = plugin.reply_arrays(options, ctx, model, x, y, seed=7)["fisher"]
    again = plugin.reply_arrays(options, ctx, model, x, y, seed=7)["fisher"]
    assert all(torch.equal(first[k], again[k]) for k in first)  # seeded: reproducible
    strategy = _bind(MergingStrategy(merge=FisherMerge(options), min_available_nodes=1), 2)
    outcome = strategy.aggregate_round(1, states[0], replies)
    for key, value in outcome.state.items():
        f = [fisher[key].clamp_min(1e-6) for fisher in fishers]
        expected = (f[0] * states[0][key] + f[1] * states[1][key]) / (f[0] + f[1])
        torch.testing.assert_close(value, expected)
    assert outcome.extras["fisher_mean"] > 0


def test_fisher_merge_needs_the_fisher_in_every_reply() -> None:
    base, clients = _states()
    strategy = _bind(MergingStrategy(merge=FisherMerge(FisherOptions()), min_available_nodes=1), 2)
    with pytest.raises(ValueError, match="partition 0 has no Fisher"):
        strategy.aggregate_round(1, base, [_reply(10, clients[0], 5), _reply(11, clients[1], 5)])


def test_peer_ties_with_full_density_and_scale_one_of_one_neighbour() -> None:
    model = torch.nn.Linear(2, 2)
    own = {"weight": torch.zeros(2, 2), "bias": torch.zeros(2)}
    nbr = {"weight": torch.tensor([[1.0, -2.0], [3.0, 0.5]]), "bias": torch.tensor([1.0, -1.0])}
    ctx = ClientContext(config=None, partition_id=0, model=model,
                        model_at_width=lambda w: model,
                        example_input=torch.zeros(1, 2))  # fmt: skip
    plugin = get_plugin("peer-ties")
    merged, info = plugin.merge(
        PeerTIESOptions(density=1.0), ctx, own, {3: nbr}, {3: 0.5}, 0.5,
        batches=[], rng=np.random.default_rng(0),
    )  # fmt: skip
    # the own zero task vector never agrees: the disjoint mean is the neighbour's delta
    for key in own:
        torch.testing.assert_close(merged[key], nbr[key])
    assert info.weights == {3: 0.5}
    ta = get_plugin("peer-task-arithmetic")
    merged, _ = ta.merge(
        ta.Options(), ctx, own, {3: nbr}, {3: 1.0}, 3.0, batches=[], rng=np.random.default_rng(0)
    )
    for key in own:  # gossip: own + 1/4 (nbr - own)
        torch.testing.assert_close(merged[key], 0.25 * nbr[key])


def test_zipit_round_undoes_a_planted_permutation() -> None:
    model = build_model("mlp", input_shape=(1, 8, 8), num_classes=10, hidden=(16, 8), seed=0)
    spec = permutation_spec_for(model)
    state = model.state_dict()
    perm = random_permutation(spec, state, generator=torch.Generator().manual_seed(1))
    proxy = list(torch.split(torch.randn(256, 1, 8, 8, generator=torch.Generator()), 128))
    server = ServerModel(model, spec, proxy, reset_bn=True)
    strategy = _bind(MergingStrategy(merge=ZipItMerge(server, ZipItOptions()),
                                     min_available_nodes=1), 2)  # fmt: skip
    outcome = strategy.aggregate_round(
        1, state, [_reply(10, state, 5), _reply(11, apply_permutation(spec, perm, state), 50)]
    )
    for key in state:
        torch.testing.assert_close(outcome.state[key], state[key], rtol=1e-5, atol=1e-6)
    assert outcome.extras["zipit_within"] == 0


@pytest.mark.parametrize("name", ["task-arithmetic", "ties", "fisher", "zipit"])
@pytest.mark.parametrize(
    "override", ["robust='median'", "clip_norm=1.0", "clip_to_median=true", "krum_f=2"]
)
def test_robust_options_they_would_ignore_are_refused(name: str, override: str) -> None:
    from sims.scenario_files import load_scenario

    key = override.split("=")[0]
    with pytest.raises(ValueError, match=rf"^strategy\.{key}: got .*; allowed for {name}: "):
        load_scenario(None, [f"strategy.name='{name}'", f"strategy.{override}"])
    load_scenario(None, [f"strategy.name='{name}'"])  # the defaults are accepted
