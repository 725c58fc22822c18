"""What every participant of a run derives from its scenario: data, model, seeds."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch import nn

from fedmerge.cache import cache_key, cached_arrays
from fedmerge.data import DatasetBundle, PartitionConfig, load_dataset, partition_indices
from fedmerge.models import build_model
from fedmerge.scenario import Scenario


def dataset_for(scenario: Scenario, root: str | None = None) -> DatasetBundle:
    """Load the scenario's data set (cached per process)."""
    ds = scenario.dataset
    return load_dataset(
        ds.name,
        root or ds.root or None,
        synthetic_alpha=ds.synthetic_alpha,
        synthetic_beta=ds.synthetic_beta,
        synthetic_users=ds.synthetic_users,
        mnist1d_samples=ds.mnist1d_samples,
    )


def partition_config(scenario: Scenario) -> PartitionConfig:
    """The scenario's ``[partition]`` table as a :class:`PartitionConfig`."""
    p = scenario.partition
    return PartitionConfig(
        scheme=p.scheme,
        alpha=p.alpha,
        classes_per_client=p.classes_per_client,
        shards_per_client=p.shards_per_client,
        min_partition_size=p.min_partition_size,
    )


@lru_cache(maxsize=8)
def _partitions(scenario: Scenario, root: str | None) -> tuple[np.ndarray, ...]:
    data = dataset_for(scenario, root)
    labels = data.train_y.numpy()
    config = partition_config(scenario)

    def compute() -> dict[str, np.ndarray]:
        parts = partition_indices(
            labels, scenario.num_clients, config, seed=scenario.seed, groups=data.train_groups
        )
        return {str(i): p for i, p in enumerate(parts)}

    groups = data.train_groups if data.train_groups is not None else np.zeros(0)
    key = cache_key(data.name, labels, groups, str(config), scenario.num_clients, scenario.seed)
    arrays = cached_arrays("partition", key, compute)
    return tuple(arrays[str(i)] for i in range(scenario.num_clients))


def client_indices(scenario: Scenario, root: str | None = None) -> tuple[np.ndarray, ...]:
    """Indices of every client's training samples (cached per process)."""
    return _partitions(scenario, root)


def client_data(
    scenario: Scenario, partition_id: int, root: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training tensors ``(x, y)`` of one client."""
    if not 0 <= partition_id < scenario.num_clients:
        raise ValueError(
            f"partition-id: got {partition_id}; allowed: 0 to {scenario.num_clients - 1}"
        )
    data = dataset_for(scenario, root)
    idx = torch.from_numpy(client_indices(scenario, root)[partition_id])
    return data.train_x[idx], data.train_y[idx]


def initial_model(scenario: Scenario) -> nn.Module:
    """The model every run starts from: same scenario and seed, same weights."""
    return _build(scenario, scenario.seed)


def _build(scenario: Scenario, seed: int, width: int | None = None) -> nn.Module:
    data = dataset_for(scenario)
    m = scenario.model
    return build_model(
        m.name,
        input_shape=data.input_shape,
        num_classes=data.num_classes,
        width=m.width if width is None else width,
        hidden=m.hidden,
        seed=seed,
    )


def client_width(scenario: Scenario, partition_id: int) -> int:
    """Width of one client's model: ``model.client_widths`` cycled, else ``model.width``."""
    widths = scenario.model.client_widths
    return widths[partition_id % len(widths)] if widths else scenario.model.width


def client_model(scenario: Scenario, width: int) -> nn.Module:
    """A model of the scenario's architecture at ``width`` (seeded by the run seed)."""
    return _build(scenario, scenario.seed, width)


def client_seed(scenario: Scenario, server_round: int, partition_id: int) -> int:
    """Seed of one client's training in one round, derived from the run seed."""
    seq = np.random.SeedSequence([scenario.seed, server_round, partition_id])
    return int(seq.generate_state(1, dtype=np.uint64)[0] >> 1)


def peer_initial_model(scenario: Scenario, peer: int) -> nn.Module:
    """Initial model of one peer in decentralized training.

    ``strategy.peer_init = "independent"`` (DIMAT's setting) gives every peer
    its own initialisation, seeded by the run seed and the peer id;
    ``"shared"`` gives all peers :func:`initial_model`.
    """
    if scenario.strategy.peer_init == "shared":
        return initial_model(scenario)
    seq = np.random.SeedSequence([scenario.seed, 2, peer])
    return _build(scenario, int(seq.generate_state(1, dtype=np.uint64)[0] >> 1))


def proxy_batches(scenario: Scenario, batch_size: int = 128) -> list[torch.Tensor]:
    """The server's proxy data: ``strategy.proxy_samples`` training inputs, seeded.

    Drawn uniformly from the whole training set with a generator seeded by
    the run seed, so they overlap the clients' data: this models a server
    that holds a small sample of the same distribution (as OTFusion's and
    FedMA's experiments assume). Empty when ``proxy_samples`` is 0.
    """
    k = scenario.strategy.proxy_samples
    if k == 0:
        return []
    data = dataset_for(scenario)
    rng = np.random.default_rng([scenario.seed, 3])
    idx = torch.from_numpy(
        rng.choice(len(data.train_y), size=min(k, len(data.train_y)), replace=False)
    )
    return list(torch.split(data.train_x[idx], batch_size))
