"""Evaluation of a finished run's final model on every client's local data.

The only module of ``sims/`` that rebuilds a run's data and model from its
resolved run configuration.
"""

from __future__ import annotations

import hashlib
import json

from safetensors import SafetensorError
from safetensors.torch import load_file

from fedmerge.atomic import atomic_write_text
from fedmerge.errors import one_line
from fedmerge.training import evaluate
from sims.runs import METRICS_FILE, RunRecord, is_number, read_json
from strategies.config import run_config_from_dict
from strategies.encoder_eval import EncoderEvaluation
from strategies.federation import federation

#: Per-run cache of the final model's accuracy on every client's local data.
CLIENT_ACCURACY_FILE = "client_accuracy.json"

#: The final global model of a run.
MODEL_FILE = "model.safetensors"


def _is_accuracy(value: object) -> bool:
    return is_number(value) and 0 <= value <= 1  # type: ignore[operator]


def client_accuracy(run: RunRecord) -> list[float]:
    """Accuracy of the run's final model on every client's local data.

    A last ``metrics.jsonl`` row with a ``peer_accuracy`` list (peer-side
    strategies, one model per peer) is used as is. Otherwise the final global
    model (``model.safetensors``) is evaluated on each client's local training
    data; the result is cached in ``client_accuracy.json``, keyed by the
    model file's hash. A self-supervised run's network has no classifier: its
    encoder is scored by k-NN on each client's data instead (the bank of its
    rows' k-NN, :mod:`strategies.encoder_eval`).

    Raises
    ------
    ValueError
        If the run has neither ``peer_accuracy`` nor ``model.safetensors``.
    """
    peer = run.rows[-1].get("peer_accuracy")
    if isinstance(peer, list):
        if not all(_is_accuracy(a) for a in peer):
            raise ValueError(
                f"{run.run_dir / METRICS_FILE}: peer_accuracy: got {one_line(peer, 80)}; "
                f"allowed: a list of accuracies in [0, 1]"
            )
        return [float(a) for a in peer]
    model_path = run.run_dir / MODEL_FILE
    if not model_path.is_file():
        raise ValueError(
            f"run_dir: {str(run.run_dir)!r} has no {MODEL_FILE}; allowed: finished runs"
        )
    model_hash = hashlib.sha256(model_path.read_bytes()).hexdigest()
    cache_path = run.run_dir / CLIENT_ACCURACY_FILE
    cached = read_json(cache_path)
    kept = cached.get("accuracy")
    if (  # a cache of another shape (damaged, edited) is computed again
        cached.get("model_sha256") == model_hash
        and isinstance(kept, list)
        and len(kept) == run.config.get("num_clients")
        and all(_is_accuracy(a) for a in kept)
    ):
        return [float(a) for a in kept]

    fed = federation(run_config_from_dict(run.config))
    model = fed.initial_model()
    try:
        state = load_file(str(model_path))
        model.load_state_dict(state)
    except (SafetensorError, RuntimeError) as exc:  # damaged, or another model's weights
        raise ValueError(
            f"{model_path}: got {one_line(exc, 163)}; allowed: "
            f"the final {fed.config.model.name} weights that the run wrote"
        ) from None
    accuracy = []
    encoder = (
        EncoderEvaluation(fed.config, fed.data, model) if fed.config.task.self_supervised else None
    )
    for pid in range(fed.config.num_clients):
        x, y = fed.client_data(pid)
        # a self-supervised run's network has no classifier: k-NN of its encoder, as its rows
        accuracy.append(  # the client's own samples are left out of the k-NN bank
            evaluate(model, x, y)[1]
            if encoder is None
            else encoder.knn_on(state, x, y, exclude=fed.partitions[pid])
        )
    data = "local training data" + ("" if encoder is None else " (k-NN of the encoder)")
    record = {"model_sha256": model_hash, "data": data, "accuracy": accuracy}
    atomic_write_text(cache_path, json.dumps(record, indent=2) + "\n")
    return accuracy
