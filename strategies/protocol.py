"""The message protocol between fedmerge's ServerApp and ClientApp, in one place.

Every record key, config key, metric name and message type that crosses the
wire is named here; nothing else in ``strategies/`` spells them out.

Training (``MessageType.TRAIN``) and evaluation (``MessageType.EVALUATE``)
follow Flower's conventions: the model travels in the ArrayRecord
:data:`ARRAYS`, the round configuration in the ConfigRecord :data:`CONFIG`,
and replies carry a MetricRecord :data:`METRICS` with :data:`NUM_EXAMPLES`.

A decentralized step (:data:`PEER_MESSAGE_TYPE`) carries the peer's own state
(:data:`SELF`), one ArrayRecord per neighbour (:data:`NEIGHBOUR_PREFIX` + id),
and in its ConfigRecord the mixing weights (:data:`MIXING`, JSON id ->
weight), the peer's own weight (:data:`SELF_WEIGHT`) and whether the round
merges (:data:`MERGE`). The reply adds the merged state before training
(:data:`MERGED`) when it merged; records whose key starts with
:data:`MEASUREMENT_PREFIX` are measurement payload, not protocol traffic, and
are left out of the byte counts.
"""

from __future__ import annotations

from typing import Final

# -- records ----------------------------------------------------------------
ARRAYS: Final = "arrays"
METRICS: Final = "metrics"
CONFIG: Final = "config"
FISHER: Final = "fisher"  # a client's diagonal Fisher (strategy "fisher")

# -- config keys --------------------------------------------------------------
SERVER_ROUND: Final = "server-round"
PROXIMAL_MU: Final = "proximal-mu"  # Flower's FedProx key
PARTITION_ID: Final = "partition-id"  # node config and discovery reply
NUM_PARTITIONS: Final = "num-partitions"  # node config
DATASET_ROOT: Final = "dataset-root"  # node config
DATA_DIR: Final = "data-dir"  # node config: the node's own data (strategies.node_data)

# -- metric names -------------------------------------------------------------
NUM_EXAMPLES: Final = "num-examples"
TRAIN_LOSS: Final = "train_loss"
EVAL_LOSS: Final = "eval_loss"
EVAL_ACCURACY: Final = "eval_accuracy"
UNITS_MOVED: Final = "units-moved"

# -- decentralized step ---------------------------------------------------------
PEER_MESSAGE_TYPE: Final = "train.peer"
PEER_HANDLER: Final = "peer"  # ``@app.train(PEER_HANDLER)`` receives PEER_MESSAGE_TYPE
SELF: Final = "self"
NEIGHBOUR_PREFIX: Final = "nbr-"
MIXING: Final = "mixing"
SELF_WEIGHT: Final = "self-weight"
MERGE: Final = "merge"
MEASUREMENT_PREFIX: Final = "eval-"
MERGED: Final = f"{MEASUREMENT_PREFIX}merged"


def neighbour_key(peer: int) -> str:
    """Record key of neighbour ``peer``'s state in a decentralized step."""
    return f"{NEIGHBOUR_PREFIX}{peer}"
