"""What every participant of a run derives from its configuration: data, models, seeds.

The ServerApp and every ClientApp build the same :class:`Federation` from the
same :class:`~strategies.config.RunConfig`, so they agree on partitions,
initial weights and seeds without exchanging them.
"""

from __future__ import annotations

from functools import cached_property, lru_cache

import numpy as np
import torch
from torch import nn

from fedmerge.cache import cache_key, cached_arrays
from fedmerge.data import DatasetBundle, load_dataset_config, partition_indices
from fedmerge.models import build_model_from_config, example_input
from fedmerge.tasks import fixed_subset, get_task
from strategies.config import RunConfig

#: Independent random streams derived from the run seed (``SeedSequence([seed, stream, ...])``).
SAMPLING_STREAM = 1  # the server's client sampler
PEER_INIT_STREAM = 2  # per-peer initial weights (decentralized strategies)
PROXY_STREAM = 3  # the server's proxy data
TASK_STREAM = 4  # what a task adds to the model (projection head), clients' fixed subsets

#: Offset of a peer's training seed from its merge seed in the same round.
PEER_TRAIN_SEED_OFFSET = 1


class Federation:
    """Data, models and seeds of one run, computed lazily and cached.

    Parameters
    ----------
    config : RunConfig
        The run.
    root : str, optional
        Where this participant finds the data set (a node's ``dataset-root``),
        overriding ``dataset.root``.
    data : DatasetBundle, optional
        This participant's own data (a node that brings its own data, see
        :mod:`strategies.node_data`) instead of the scenario's data set.
    """

    def __init__(
        self, config: RunConfig, root: str | None = None, data: DatasetBundle | None = None
    ) -> None:
        self.config = config
        self.root = root
        if data is not None:
            self.__dict__["data"] = data  # fills the cached property below

    @cached_property
    def data(self) -> DatasetBundle:
        """The data set (cached per process by the loader as well)."""
        return load_dataset_config(self.config.dataset, self.root)

    @cached_property
    def _partition_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Every client's sample indices, concatenated, and each client's offsets in them."""
        c, data = self.config, self.data
        labels = data.train_y.numpy()

        def compute() -> dict[str, np.ndarray]:
            parts = partition_indices(
                labels, c.num_clients, c.partition, seed=c.seed, groups=data.train_groups
            )
            # One index array and the offsets of each client's slice: one file
            # and one memory map however many clients there are.
            offsets = np.zeros(len(parts) + 1, dtype=np.int64)
            np.cumsum([len(p) for p in parts], out=offsets[1:])
            indices = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
            return {"indices": indices.astype(np.int64, copy=False), "offsets": offsets}

        groups = data.train_groups if data.train_groups is not None else np.zeros(0)
        key = cache_key(data.name, labels, groups, str(c.partition), c.num_clients, c.seed)
        arrays = cached_arrays("partitions", key, compute)
        return arrays["indices"], arrays["offsets"]

    @cached_property
    def partitions(self) -> tuple[np.ndarray, ...]:
        """Indices of every client's training samples (memory-mapped from the disk cache)."""
        indices, offsets = self._partition_arrays
        return tuple(indices[offsets[i] : offsets[i + 1]] for i in range(self.config.num_clients))

    @cached_property
    def partition_digest(self) -> str:
        """A hash of every client's sample indices (equal digests: equal partitions)."""
        return cache_key(*self._partition_arrays)

    def client_data(self, partition_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Training tensors ``(x, y)`` of one client."""
        if not 0 <= partition_id < self.config.num_clients:
            raise ValueError(
                f"partition-id: got {partition_id}; allowed: 0 to {self.config.num_clients - 1}"
            )
        idx = torch.from_numpy(self.partitions[partition_id])
        keep = self.config.task.client_samples
        if keep:  # self-supervised runs scaled down: a fixed seeded subset of the partition
            idx = idx[
                fixed_subset(
                    len(idx), keep, derived_seed(self.config.seed, TASK_STREAM, partition_id)
                )
            ]
        return self.data.train_x[idx], self.data.train_y[idx]

    @cached_property
    def example_input(self) -> torch.Tensor:
        """A batch of zeros of the data set's input shape (for tracing a model)."""
        return example_input(self.data.input_shape)

    def build_model(self, seed: int, width: int | None = None) -> nn.Module:
        """The network of the run's task and architecture (at ``width``), initialised with ``seed``.

        The task decides what is trained and sent: the model itself
        (``supervised``) or its encoder plus a projection head (self-supervised
        tasks, whose head is seeded from ``seed`` as well).
        """
        model = build_model_from_config(
            self.config.model,
            input_shape=self.data.input_shape,
            num_classes=self.data.num_classes,
            seed=seed,
            width=width,
        )
        task = self.config.task
        shape = self.data.input_shape
        if task.self_supervised and len(shape) != 3:  # the augmentations act on images
            raise ValueError(
                f"task.name: got {task.name!r} for inputs of shape {shape} "
                f"(dataset {self.config.dataset.name!r}); allowed: image data sets "
                f"(channels, height, width) with a self-supervised task"
            )
        return get_task(task.name).network(model, task, seed=derived_seed(seed, TASK_STREAM))

    def initial_model(self) -> nn.Module:
        """The model every run starts from: same configuration and seed, same weights."""
        return self.build_model(self.config.seed)

    def model_at_width(self, width: int) -> nn.Module:
        """A fresh model of another width, seeded by the run seed."""
        return self.build_model(self.config.seed, width).to(self.config.device)

    def peer_initial_model(self, peer: int) -> nn.Module:
        """Initial model of one peer in decentralized training.

        Every peer gets its own initialisation, seeded by the run seed and the
        peer id (DIMAT's setting), unless the strategy says all peers share
        :meth:`initial_model` (``peer_init = "shared"``).
        """
        strategy = self.config.strategy
        if not strategy.plugin.independent_init(strategy.options):  # type: ignore[attr-defined]
            return self.initial_model()
        return self.build_model(derived_seed(self.config.seed, PEER_INIT_STREAM, peer))

    def client_initial_model(self, partition_id: int, width: int | None = None) -> nn.Module:
        """A client's own seeded initialisation (``train.independent_init``; peers' seeds).

        ``width``: of another width than ``model.width`` (one-shot fusion of
        several widths); the seed is the same.
        """
        seed = derived_seed(self.config.seed, PEER_INIT_STREAM, partition_id)
        return self.build_model(seed, width)

    def client_seed(self, server_round: int, partition_id: int) -> int:
        """Seed of one client's training in one round, derived from the run seed."""
        return derived_seed(self.config.seed, server_round, partition_id)

    def proxy_batches(self, samples: int, batch_size: int = 128) -> list[torch.Tensor]:
        """The server's proxy data: ``samples`` training inputs, seeded, in batches.

        Drawn uniformly from the whole training set with a generator seeded by
        the run seed, so they overlap the clients' data: this models a server
        that holds a small sample of the same distribution (as OTFusion's and
        FedMA's experiments assume). Empty when ``samples`` is 0.
        """
        if samples == 0:
            return []
        data = self.data
        rng = np.random.default_rng([self.config.seed, PROXY_STREAM])
        n = len(data.train_y)
        idx = torch.from_numpy(rng.choice(n, size=min(samples, n), replace=False))
        return list(torch.split(data.train_x[idx], batch_size))


def derived_seed(*entropy: int) -> int:
    """A 63-bit seed derived from ``entropy`` (``numpy.random.SeedSequence``)."""
    seq = np.random.SeedSequence(list(entropy))
    return int(seq.generate_state(1, dtype=np.uint64)[0] >> 1)


@lru_cache(maxsize=4)
def federation(config: RunConfig, root: str | None = None) -> Federation:
    """The :class:`Federation` of ``config`` (one per process and configuration)."""
    return Federation(config, root)
