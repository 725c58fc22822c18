"""``[evaluation]``: a server with a test set of its own, or none (the clients evaluate)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import MetricRecord, RecordDict

from strategies.config import ConfigError, EvaluationConfig, run_config_from_dict
from strategies.federation import Federation
from strategies.recorder import RoundRecorder, clients_evaluation
from strategies.run_log import RunLog
from strategies.sampling import _eval_accuracy_stats
from strategies.server_app import server_federation, server_test_set

_CLIENTS = {"evaluation": {"server": "clients"}, "strategy": {"fraction_evaluate": 0.5}}


def test_the_default_keeps_every_digest() -> None:
    assert (
        run_config_from_dict({}).digest()
        == run_config_from_dict({"evaluation": {"server": "test-set", "test_dir": ""}}).digest()
    )
    assert (
        run_config_from_dict(_CLIENTS).digest()
        != run_config_from_dict({"strategy": {"fraction_evaluate": 0.5}}).digest()
    )


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"evaluation": {"server": "nobody"}},
         "evaluation.server: got 'nobody'; allowed: 'test-set', 'clients'"),
        ({"evaluation": {"server": "clients"}},
         "evaluation.server: got 'clients' with strategy.fraction_evaluate 0; allowed: "
         "with fraction_evaluate > 0 (the clients that evaluate each round)"),
        ({"evaluation": {"server": "clients", "test_dir": "/srv/test"},
          "strategy": {"fraction_evaluate": 0.5}},
         "evaluation.test_dir: got '/srv/test' with server 'clients'; allowed: '' "
         "(the clients evaluate on their own data)"),
        ({"evaluation": {"server": "clients"}, "strategy": {"name": "dimat"}},
         "evaluation.server: got 'clients' with peer strategies (the server evaluates every "
         "peer); allowed: 'test-set'"),
        ({"evaluation": {"test_dir": "/srv/test"}, "strategy": {"name": "oneshot"}},
         "evaluation.test_dir: got '/srv/test' with one-shot fusion (its measures score the "
         "fused model); allowed: '' (the scenario's data set)"),
        ({**_CLIENTS, "strategy": {"name": "ot", "fraction_evaluate": 0.5,
                                   "proxy_samples": 64}},
         "evaluation.server: got 'clients' with strategy.proxy_samples > 0 (proxy data held "
         "by the server); allowed: 'test-set'"),
        ({**_CLIENTS, "strategy": {"name": "zipit", "fraction_evaluate": 0.5}},
         "evaluation.server: got 'clients' with strategy.zip_samples > 0 (proxy data held "
         "by the server); allowed: 'test-set'"),
        ({"evaluation": {"test_dir": "/srv/test"}, "task": {"name": "simclr"}},
         "evaluation.test_dir: got '/srv/test' with task 'simclr' (the server scores the "
         "encoder with labels); allowed: '' (the scenario's data set)"),
        ({"evaluation": {"test_samples": -1}},
         "evaluation.test_samples: got -1; allowed: an integer >= 0 (0: all)"),
        ({**_CLIENTS, "evaluation": {"server": "clients", "test_samples": 100}},
         "evaluation.test_samples: got 100 with server 'clients'; allowed: 0 (the clients "
         "evaluate on their own data)"),
        ({"evaluation": {"test_samples": 100}, "task": {"name": "byol"}},
         "evaluation.test_samples: got 100 with task 'byol'; allowed: 0 (set "
         "task.test_samples)"),
        ({"evaluation": {"where": 1}},
         "evaluation.where: unknown key; allowed: server, test_dir, test_samples"),
    ],
)  # fmt: skip
def test_what_a_server_without_the_data_set_cannot_do_is_refused_in_one_line(
    table: dict, message: str
) -> None:
    with pytest.raises(ConfigError) as err:
        run_config_from_dict(table)
    assert str(err.value) == message


def _reply(n: int, accuracy: float, loss: float) -> RecordDict:
    metrics = {"num-examples": n, "eval_accuracy": accuracy, "eval_loss": loss}
    return RecordDict({"metrics": MetricRecord(metrics)})  # type: ignore[arg-type]


def test_the_clients_accuracy_is_weighted_by_their_samples() -> None:
    counts, accs, losses = [30, 10, 60], [0.5, 1.0, 0.25], [1.2, 0.1, 2.0]
    stats = _eval_accuracy_stats(
        [_reply(n, a, x) for n, a, x in zip(counts, accs, losses, strict=True)], "num-examples"
    )
    row = clients_evaluation(stats)
    # by hand: (30*0.5 + 10*1.0 + 60*0.25) / 100 and (30*1.2 + 10*0.1 + 60*2.0) / 100
    assert row["accuracy"] == pytest.approx(0.40)
    assert row["loss"] == pytest.approx(1.57)
    assert stats["eval_accuracy.mean"] == pytest.approx(np.mean(accs))  # the unweighted stats stay


def test_a_round_nobody_evaluated_has_no_accuracy() -> None:
    assert clients_evaluation(None) == {"accuracy": None, "loss": None}
    assert clients_evaluation(_eval_accuracy_stats([], "num-examples")) == {
        "accuracy": None,
        "loss": None,
    }


def test_a_deployed_server_evaluated_by_its_clients_builds_the_model_without_data() -> None:
    config = run_config_from_dict(
        {
            **_CLIENTS,
            "dataset": {"name": "fashion-mnist", "root": ""},
            "simulation": {"assign_partitions": False},
        }
    )
    fed = server_federation(config)
    assert len(fed.data.train_y) == 0 and len(fed.data.test_y) == 0
    model = fed.initial_model()
    assert model(fed.example_input).shape[1:] == (10,)
    # the same weights as a server that loads Fashion-MNIST builds
    with_data = Federation(config.model_copy(update={"evaluation": EvaluationConfig()}))
    reference = with_data.initial_model().state_dict()
    assert len(with_data.data.train_y) == 60_000
    state = model.state_dict()
    assert list(state) == list(reference)
    assert all(torch.equal(state[k], reference[k]) for k in state)


def test_a_test_dir_is_the_servers_test_set(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, size=50)
    held = tmp_path / "held"
    held.mkdir()
    np.savez(held / "data.npz", train_x=x[:30], train_y=y[:30], test_x=x[30:], test_y=y[30:])
    only_train = tmp_path / "only-train"
    only_train.mkdir()
    np.savez(only_train / "data.npz", train_x=x, train_y=y)
    digits = {"dataset": {"name": "digits"}, "model": {"name": "mlp"}}

    assert server_test_set(run_config_from_dict(digits)) is None
    tx, ty = server_test_set(
        run_config_from_dict({**digits, "evaluation": {"test_dir": str(held)}})
    )
    assert np.array_equal(tx.numpy(), x[30:]) and np.array_equal(ty.numpy(), y[30:])
    tx, ty = server_test_set(
        run_config_from_dict({**digits, "evaluation": {"test_dir": str(only_train)}})
    )
    assert np.array_equal(tx.numpy(), x) and np.array_equal(ty.numpy(), y)

    # the recorder scores a model on exactly those arrays
    config = run_config_from_dict({**digits, "evaluation": {"test_dir": str(held)}})
    model = Federation(config).initial_model()
    recorder = RoundRecorder(
        config,
        RunLog(tmp_path / "run"),
        model,
        None,
        server_test_set(config),  # type: ignore[arg-type]
    )
    state = {k: v.clone() for k, v in model.state_dict().items()}
    loss, acc = recorder.evaluate(state)
    with torch.no_grad():
        logits = model(torch.from_numpy(x[30:]))
    expected_acc = float((logits.argmax(1).numpy() == y[30:]).mean())
    expected_loss = float(torch.nn.functional.cross_entropy(logits, torch.from_numpy(y[30:])))
    assert acc == pytest.approx(expected_acc, abs=1e-9)
    assert loss == pytest.approx(expected_loss, rel=1e-5)


def _scored_by_hand(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    with torch.no_grad():
        logits = model(torch.from_numpy(x))
    acc = float((logits.argmax(1).numpy() == y).mean())
    return float(torch.nn.functional.cross_entropy(logits, torch.from_numpy(y))), acc


def test_test_samples_scores_a_seeded_subset_of_the_test_set(tmp_path: Path) -> None:
    """``evaluation.test_samples = k``: k distinct test samples, drawn by the seed alone."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, size=200)
    held = tmp_path / "held"
    held.mkdir()
    np.savez(held / "data.npz", train_x=x[:10], train_y=y[:10], test_x=x, test_y=y)

    def scored(seed: int, k: int) -> tuple[float, float, torch.nn.Module]:
        table = {"dataset": {"name": "digits"}, "model": {"name": "mlp"}, "seed": seed,
                 "evaluation": {"test_dir": str(held), "test_samples": k}}  # fmt: skip
        config = run_config_from_dict(table)
        model = Federation(config).initial_model()
        recorder = RoundRecorder(
            config, RunLog(tmp_path / f"run{seed}-{k}"), model, None,  # type: ignore[arg-type]
            server_test_set(config),
        )  # fmt: skip
        state = {n: v.clone() for n, v in model.state_dict().items()}
        loss, acc = recorder.evaluate(state)
        return loss, acc, model

    # the subset the documentation names: k of the 200, drawn by SeedSequence([seed, 5, 1])
    for seed in (0, 3):
        draw = np.sort(np.random.default_rng([seed, 5, 1]).choice(200, size=37, replace=False))
        loss, acc, model = scored(seed, 37)
        exp_loss, exp_acc = _scored_by_hand(model, x[draw], y[draw])
        assert acc == pytest.approx(exp_acc, abs=1e-9)
        assert loss == pytest.approx(exp_loss, rel=1e-5)
        assert abs(acc * 37 - round(acc * 37)) < 1e-9  # a share of 37 samples
        # not the whole set, and not the first 37 samples
        whole = _scored_by_hand(model, x, y)
        first = _scored_by_hand(model, x[:37], y[:37])
        assert (loss, acc) != pytest.approx(whole) and (loss, acc) != pytest.approx(first)
    # k at least the test set's size: the whole set
    loss, acc, model = scored(0, 500)
    assert (loss, acc) == pytest.approx(_scored_by_hand(model, x, y), rel=1e-5)
