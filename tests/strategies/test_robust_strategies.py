"""The robust options compose with every server-side strategy (independent numpy expectations)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedmerge.align import apply_permutation, permutation_spec_for, random_permutation
from fedmerge.models import build_model
from strategies.config import RunConfig, StrategyConfig
from strategies.merging import MergingStrategy
from strategies.plugins import get_plugin
from strategies.plugins.aligned import AlignedMerge, ServerModel
from strategies.plugins.base import ServerContext
from strategies.plugins.fedavg import FedProxOptions, ServerOptions
from strategies.plugins.ldawa import LDAWAMerge, LDAWAOptions
from strategies.plugins.ot import OTMerge, OTOptions
from strategies.sampling import SeededFedAvg


def _reply(node: int, state: dict[str, torch.Tensor], n: int) -> Message:
    instruction = Message(
        RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type=MessageType.TRAIN
    )
    content = RecordDict(
        {"arrays": ArrayRecord(state), "metrics": MetricRecord({"num-examples": n})}
    )
    return Message(content, reply_to=instruction)


def _bind(strategy, k: int):
    strategy.bind_nodes({p: 10 + p for p in range(k)}, clients_per_round=k,
                        rng=np.random.default_rng(0))  # fmt: skip
    return strategy


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"fc.weight": torch.randn(3, 4, generator=g), "fc.bias": torch.randn(3, generator=g)}


def _np(state, key):
    return state[key].double().numpy()


G = _state(100)
CLIENTS = [_state(s) for s in (1, 2, 3, 4)]
BAD = {k: v * 1e30 for k, v in _state(5).items()}  # an update scaled by 1e30
COUNTS = [10, 20, 30, 40, 50]


def _replies(states):
    return [_reply(10 + i, s, COUNTS[i]) for i, s in enumerate(states)]


@pytest.mark.parametrize("options", [ServerOptions, FedProxOptions], ids=["fedavg", "fedprox"])
def test_fedavg_and_fedprox_take_the_coordinate_median(options) -> None:
    name = "fedavg" if options is ServerOptions else "fedprox"
    opts = options(robust="median")
    config = RunConfig(strategy=StrategyConfig(name, opts))
    model = build_model("mlp", input_shape=(1, 2, 2), num_classes=3, hidden=(2,), seed=0)
    ctx = ServerContext(config, model, torch.zeros(1, 1, 2, 2), lambda k: [],
                        {"min_available_nodes": 1})  # fmt: skip
    strategy = _bind(get_plugin(name).strategy(opts, ctx), 5)
    outcome = strategy.aggregate_round(1, G, _replies([*CLIENTS, BAD]))
    for key in G:
        want = np.median(np.stack([_np(s, key) for s in [*CLIENTS, BAD]]), axis=0)
        np.testing.assert_allclose(outcome.state[key].double().numpy(), want, rtol=1e-6)
    assert all(bool(torch.isfinite(v).all()) for v in outcome.state.values())


def test_fedavg_trimmed_mean_and_clipping() -> None:
    strategy = _bind(SeededFedAvg(min_available_nodes=1, robust=ServerOptions(
        robust="trimmed-mean", trim_fraction=0.2, clip_norm=1.0)), 5)  # fmt: skip
    outcome = strategy.aggregate_round(1, G, _replies([*CLIENTS, BAD]))
    clipped = []
    for s in [*CLIENTS, BAD]:  # clip every update to norm 1 by hand
        d = np.concatenate([_np(s, k).ravel() - _np(G, k).ravel() for k in G])
        scale = min(1.0, 1.0 / np.sqrt((d**2).sum()))
        clipped.append({k: _np(G, k) + scale * (_np(s, k) - _np(G, k)) for k in G})
    for key in G:
        arr = np.sort(np.stack([c[key] for c in clipped]), axis=0)
        want = arr[1:4].mean(axis=0)  # floor(0.2 * 5) = 1 dropped at each end
        np.testing.assert_allclose(outcome.state[key].double().numpy(), want, rtol=1e-5)
    assert outcome.extras["clipped"] == [0, 1, 2, 3, 4]  # all updates here are longer than 1


def test_fedavg_multi_krum_keeps_the_central_clients() -> None:
    strategy = _bind(
        SeededFedAvg(min_available_nodes=1, robust=ServerOptions(robust="multi-krum", krum_f=1)), 5
    )
    outcome = strategy.aggregate_round(1, G, _replies([*CLIENTS, BAD]))
    assert outcome.extras["krum_kept"] == [0, 1, 2, 3]  # K - f = 4 kept, the outlier is not
    for key in G:  # kept clients averaged with their sample counts
        want = sum(COUNTS[i] * _np(CLIENTS[i], key) for i in range(4)) / sum(COUNTS[:4])
        np.testing.assert_allclose(outcome.state[key].double().numpy(), want, rtol=1e-6)


def _cos(t: np.ndarray, ref: np.ndarray) -> float:
    return min(1.0, float(t.ravel() @ ref.ravel() / np.linalg.norm(t) / np.linalg.norm(ref)))


def test_ldawa_median_is_the_median_of_the_cosine_weighted_layers() -> None:
    merge = LDAWAMerge(LDAWAOptions(robust="median"))
    strategy = _bind(MergingStrategy(merge=merge, min_available_nodes=1), 5)
    # x 1e3, not 1e30: L-DAWA's float32 cosine would overflow (and weight the client 0)
    states = [*CLIENTS, {k: v * 1e3 for k, v in _state(5).items()}]
    got = strategy.aggregate_round(1, G, _replies(states)).state
    for key in G:
        ref = _np(G, key)
        terms = [_cos(_np(s, key), ref) * _np(s, key) for s in states]  # paper: Z = K, so K/Z = 1
        want = np.median(np.stack(terms), axis=0)
        np.testing.assert_allclose(got[key].double().numpy(), want, rtol=1e-5, atol=1e-6)


def test_ldawa_krum_runs_ldawa_on_the_kept_clients() -> None:
    merge = LDAWAMerge(LDAWAOptions(robust="multi-krum", krum_f=1, krum_m=3))
    strategy = _bind(MergingStrategy(merge=merge, min_available_nodes=1), 5)
    states = [*CLIENTS, BAD]
    outcome = strategy.aggregate_round(1, G, _replies(states))
    kept = outcome.extras["krum_kept"]
    assert len(kept) == 3 and 4 not in kept
    vecs = [np.concatenate([_np(s, k).ravel() for k in G]) for s in states]
    scores = [sum(sorted(((vecs[i] - vecs[j]) ** 2).sum() for j in range(5) if j != i)[:2])
              for i in range(5)]  # fmt: skip
    assert kept == sorted(np.argsort(scores, kind="stable")[:3].tolist())
    for key in G:
        ref = _np(G, key)
        want = sum(_cos(_np(states[i], key), ref) * _np(states[i], key) for i in kept) / 3
        np.testing.assert_allclose(outcome.state[key].double().numpy(), want, rtol=1e-5, atol=1e-6)


def _mlp():
    return build_model("mlp", input_shape=(1, 8, 8), num_classes=10, hidden=(16,), seed=0)


def _planted(model, k: int):
    """Client i = a random permutation of (global + noise_i); the last one is an outlier."""
    g = {key: v.clone() for key, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    noisy = [{key: v + 0.01 * torch.randn(v.shape, generator=gen) for key, v in g.items()}
             for _ in range(k)]  # fmt: skip
    noisy[-1] = {key: v + 5.0 for key, v in noisy[-1].items()}
    spec = permutation_spec_for(model)
    permuted = []
    for i, state in enumerate(noisy):
        perm = random_permutation(spec, g, generator=torch.Generator().manual_seed(10 + i))
        permuted.append(apply_permutation(spec, perm, state))
    return g, noisy, permuted


@pytest.mark.parametrize("kind", ["aligned", "ot"])
def test_aligned_and_ot_take_the_median_after_alignment(kind: str) -> None:
    model = _mlp()
    g, noisy, permuted = _planted(model, 5)
    server = ServerModel(model, permutation_spec_for(model), proxy=[], reset_bn=True)
    if kind == "aligned":
        merge = AlignedMerge(server, "weight", 0, ServerOptions(robust="median"))
    else:
        merge = OTMerge(server, OTOptions(solver="emd", robust="median"))
    strategy = _bind(MergingStrategy(merge=merge, min_available_nodes=1), 5)
    got = strategy.aggregate_round(1, g, _replies(permuted)).state
    for key in g:  # the median of the unpermuted clients: alignment first, then the median
        want = np.median(np.stack([_np(s, key) for s in noisy]), axis=0)
        np.testing.assert_allclose(got[key].double().numpy(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"robust": "mean"}, "robust: got 'mean'; allowed"),
        ({"screen_norm_ratio": 0.5}, "screen_norm_ratio: got 0.5; allowed: 0 (off) or"),
        ({"trim_fraction": 0.6}, "trim_fraction: got 0.6; allowed"),
    ],
)
def test_every_server_plugin_validates_the_robust_section(kwargs, message) -> None:
    for options in (ServerOptions, FedProxOptions, LDAWAOptions, OTOptions):
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            options(**kwargs)
