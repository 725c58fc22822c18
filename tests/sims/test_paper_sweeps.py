"""The paper reproduction sweeps under sims/sweeps/papers/ load, expand and set their regimes."""

from __future__ import annotations

from pathlib import Path

from sims import compare

PAPERS = Path(__file__).resolve().parents[2] / "sims" / "sweeps" / "papers"


def _runs(name: str) -> list:
    return [sc for _, sc in compare.expand(compare.load_sweep(PAPERS / f"{name}.toml"))]


def test_every_paper_sweep_names_its_paper_scale_command() -> None:
    files = sorted(PAPERS.glob("*.toml"))
    assert [f.stem for f in files] == [
        "dimat_regime", "fedma_regime", "merge_ops_halves", "merge_ops_peers",
        "otfusion_dirichlet", "otfusion_halves", "otfusion_widths", "rebasin_barrier",
        "rebasin_width",
    ]  # fmt: skip
    for f in files:
        assert "Paper scale" in f.read_text(), f.name


def test_one_shot_sweeps_fuse_independent_pretrained_clients_once() -> None:
    for name, methods in [
        ("otfusion_halves", {"average", "weight", "activation", "ot-weight", "ot-activation"}),
        ("otfusion_dirichlet", {"average", "weight", "activation", "ot-weight", "ot-activation"}),
        ("rebasin_barrier", {"average", "weight", "activation"}),
    ]:
        runs = _runs(name)
        assert {sc.strategy.options.method for sc in runs} == methods
        for sc in runs:
            assert sc.strategy.name == "oneshot"
            assert sc.train.independent_init and sc.train.pretrain_epochs > 0
            assert sc.clients_per_round == sc.num_clients
    halves = _runs("otfusion_halves")[0]
    assert (halves.partition.scheme, halves.partition.shards_per_client) == ("shards", 1)


def test_dimat_regime_compares_local_and_proxy_alignment_with_gossip() -> None:
    runs = _runs("dimat_regime")
    assert len(runs) == 54  # 3 partitions x 2 graphs x 3 variants x 3 seeds
    assert {sc.partition.scheme for sc in runs} == {"iid", "dirichlet", "shards"}
    seen = {(sc.strategy.name, getattr(sc.strategy.options, "align_data", None)) for sc in runs}
    assert seen == {("dimat", "local"), ("dimat", "proxy"), ("gossip", "local")}
    for sc in runs:
        assert sc.train.optimizer == "adam" and sc.train.lr == 0.001
        assert sc.train.pretrain_epochs > 0 and sc.num_clients == 5


def test_fedma_regime_trains_many_local_epochs() -> None:
    runs = _runs("fedma_regime")
    assert {"fedavg", "aligned", "ot"} <= {sc.strategy.name for sc in runs}
    assert {sc.train.epochs for sc in runs} == {10}
    assert {sc.partition.alpha for sc in runs} == {0.1}


def test_merge_operator_sweeps_pair_with_the_regimes_they_extend() -> None:
    """Same seeds and setting as the sweeps whose rows are their baselines."""
    halves, ops = _runs("otfusion_halves")[0], _runs("merge_ops_halves")
    assert {sc.strategy.name for sc in ops} == {
        "fedavg",
        "ldawa",
        "task-arithmetic",
        "ties",
        "fisher",
        "zipit",
    }
    for sc in ops:
        for key in ("num_clients", "seed", "partition", "model", "train"):
            if key != "seed":
                assert getattr(sc, key) == getattr(halves, key), key
    assert {sc.seed for sc in ops} == {sc.seed for sc in _runs("otfusion_halves")}
    dimat, peers = _runs("dimat_regime"), _runs("merge_ops_peers")
    assert {sc.strategy.name for sc in peers} == {"peer-ties", "peer-task-arithmetic"}
    for sc in peers:
        assert sc.topology.name == "full"
        twin = next(d for d in dimat if d.seed == sc.seed and d.partition == sc.partition)
        assert (sc.model, sc.train, sc.rounds) == (twin.model, twin.train, twin.rounds)
    fedma = {sc.strategy.name for sc in _runs("fedma_regime")}
    assert {
        "fedavg",
        "aligned",
        "ot",
        "ldawa",
        "ties",
        "task-arithmetic",
        "fisher",
        "zipit",
    } == fedma


def test_width_sweep_fuses_a_wider_client_by_ot() -> None:
    runs = _runs("otfusion_widths")
    assert {sc.strategy.options.client_widths for sc in runs} == {(), (1, 2)}
    assert {sc.strategy.options.method for sc in runs} == {"ot-weight"}


def test_ldawa_ssl_sweep_loads_and_covers_its_regime() -> None:
    sweep = PAPERS.parent / "ldawa_ssl.toml"
    assert "Paper scale" in sweep.read_text()
    runs = [sc for _, sc in compare.expand(compare.load_sweep(sweep))]
    assert len(runs) == 2 * 2 * 2 * 4 * 3
    assert {sc.task.name for sc in runs} == {"simclr", "byol"}
    assert {sc.train.epochs for sc in runs} == {1, 5}
    assert {sc.partition.scheme for sc in runs} == {"dirichlet", "iid"}
    assert {sc.seed for sc in runs} == {0, 1, 2}
    kinds = {(sc.strategy.name, getattr(sc.strategy.options, "normalize", None)) for sc in runs}
    assert kinds == {("fedavg", None), ("fedprox", None), ("ldawa", "clients"),
                     ("ldawa", "weights")}  # fmt: skip
    for sc in runs:
        assert sc.num_clients == sc.clients_per_round == 10
        assert sc.dataset.name == "fashion-mnist" and sc.task.client_samples == 500
        if sc.partition.scheme == "dirichlet":
            assert sc.partition.alpha == 0.1
        if sc.strategy.name == "ldawa" and sc.strategy.options.normalize == "clients":
            assert sc.strategy.options == type(sc.strategy.options)()  # the paper's defaults


def test_rebasin_width_sweep_fuses_resnets_of_three_widths_by_weight_matching() -> None:
    runs = _runs("rebasin_width")
    assert sorted({sc.model.width for sc in runs}) == [1, 2, 4]
    assert {sc.model.name for sc in runs} == {"resnet20"}
    assert {sc.seed for sc in runs} == {0, 1, 2}
    for sc in runs:
        assert sc.strategy.name == "oneshot" and sc.strategy.options.method == "weight"
        assert sc.strategy.options.proxy_samples > 0  # BatchNorm re-estimated at the midpoint
        assert sc.train.independent_init and sc.num_clients == 2
