"""Topologies and mixing matrices."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest

from fedmerge.topology import TopologyConfig, build_graph, mixing_matrix


def _degrees(g):
    return sorted(d for _, d in g.degree())


@pytest.mark.parametrize(
    ("name", "n", "degrees"),
    [
        ("ring", 6, [2] * 6),
        ("full", 5, [4] * 5),
        ("star", 5, [1, 1, 1, 1, 4]),
        ("torus", 9, [4] * 9),  # 3 x 3 periodic grid
        ("bipartite", 6, [3] * 6),  # K_{3,3}
    ],
)
def test_fixed_graph_degrees(name, n, degrees):
    g = build_graph(TopologyConfig(name=name), n, seed=0)
    assert g.number_of_nodes() == n
    assert _degrees(g) == degrees
    assert nx.is_connected(g)


def test_star_centre_is_peer_zero():
    g = build_graph(TopologyConfig(name="star"), 5, seed=0)
    assert sorted(g.neighbors(0)) == [1, 2, 3, 4]


def test_bipartite_has_no_edge_inside_a_half():
    g = build_graph(TopologyConfig(name="bipartite"), 6, seed=0)
    assert all((i < 3) != (j < 3) for i, j in g.edges())


@pytest.mark.parametrize("name", ["erdos-renyi", "regular"])
def test_random_graphs_are_seeded_and_connected(name):
    cfg = TopologyConfig(name=name, p=0.3, degree=3)
    a = build_graph(cfg, 10, seed=1)
    b = build_graph(cfg, 10, seed=1)
    assert sorted(a.edges()) == sorted(b.edges())
    assert nx.is_connected(a)
    others = [sorted(build_graph(cfg, 10, seed=s).edges()) for s in range(2, 6)]
    assert any(o != sorted(a.edges()) for o in others)
    if name == "regular":
        assert _degrees(a) == [3] * 10


def test_matching_changes_every_round_and_is_a_matching():
    cfg = TopologyConfig(name="matching")
    graphs = [build_graph(cfg, 8, seed=0, round=r) for r in range(4)]
    for g in graphs:
        assert _degrees(g) == [1] * 8
    assert len({tuple(sorted(g.edges())) for g in graphs}) > 1
    again = build_graph(cfg, 8, seed=0, round=2)
    assert sorted(again.edges()) == sorted(graphs[2].edges())


def test_exponential_graph_hops_by_powers_of_two():
    cfg = TopologyConfig(name="exponential")
    for r, hop in enumerate([1, 2, 4, 1]):
        g = build_graph(cfg, 8, seed=0, round=r)
        assert all(g.has_edge(i, (i + hop) % 8) for i in range(8))


def test_disconnected_graph_refused_unless_allowed(tmp_path):
    edges = tmp_path / "edges.txt"
    edges.write_text("0 1\n2 3  # two components\n")
    with pytest.raises(ValueError, match="not connected"):
        build_graph(TopologyConfig(name="edge-list", edge_file=str(edges)), 4, seed=0)
    g = build_graph(
        TopologyConfig(name="edge-list", edge_file=str(edges), allow_disconnected=True), 4, seed=0
    )
    assert sorted(g.edges()) == [(0, 1), (2, 3)]


def test_edge_list_with_given_weights(tmp_path):
    edges = tmp_path / "edges.txt"
    edges.write_text("# i j w\n0 1 0.25\n1 2 0.5\n")
    cfg = TopologyConfig(name="edge-list", edge_file=str(edges), mixing="given")
    w = mixing_matrix(build_graph(cfg, 3, seed=0), "given")
    want = np.array([[0.75, 0.25, 0.0], [0.25, 0.25, 0.5], [0.0, 0.5, 0.5]])
    np.testing.assert_allclose(w, want)


def test_bad_edge_list_line_names_the_line(tmp_path):
    edges = tmp_path / "edges.txt"
    edges.write_text("0 1\n0 x\n")
    with pytest.raises(ValueError, match="line 2"):
        build_graph(TopologyConfig(name="edge-list", edge_file=str(edges)), 3, seed=0)


def test_uniform_mixing_is_dimats_and_row_stochastic():
    g = build_graph(TopologyConfig(name="star"), 4, seed=0)
    w = mixing_matrix(g, "uniform")
    np.testing.assert_allclose(w.sum(1), 1.0)
    np.testing.assert_allclose(w[0], [0.25] * 4)  # centre: degree 3
    np.testing.assert_allclose(w[1], [0.5, 0.5, 0, 0])  # leaf: itself and the centre
    ring = mixing_matrix(build_graph(TopologyConfig(name="ring"), 5, seed=0), "uniform")
    np.testing.assert_allclose(ring.sum(0), 1.0)  # regular graph: doubly stochastic


@pytest.mark.parametrize("name", ["star", "erdos-renyi", "ring", "bipartite"])
def test_metropolis_is_symmetric_and_doubly_stochastic(name):
    g = build_graph(TopologyConfig(name=name, p=0.4), 7, seed=3)
    w = mixing_matrix(g, "metropolis")
    np.testing.assert_allclose(w, w.T)
    np.testing.assert_allclose(w.sum(0), 1.0)
    np.testing.assert_allclose(w.sum(1), 1.0)
    assert (w >= 0).all()
    for i, j in g.edges():  # hand formula on every edge
        assert w[i, j] == pytest.approx(1 / (1 + max(g.degree(i), g.degree(j))))


def test_bad_options_name_the_key():
    with pytest.raises(ValueError, match="^name: got 'mesh'; allowed: ring, full"):
        TopologyConfig(name="mesh")
    with pytest.raises(ValueError, match=r"^p: got 0; allowed: a number in \(0, 1\]"):
        TopologyConfig(name="erdos-renyi", p=0)
    with pytest.raises(ValueError, match="^degree: got 3; allowed: below 5"):
        build_graph(TopologyConfig(name="regular", degree=3), 5, seed=0)
    with pytest.raises(
        ValueError, match="^mixing: got 'given'; allowed only with name 'edge-list'"
    ):
        TopologyConfig(mixing="given")
    with pytest.raises(ValueError, match="^rows: got -1; allowed: an integer >= 0"):
        TopologyConfig(name="torus", rows=-1)
    with pytest.raises(ValueError, match="^rows: got 4; allowed: a divisor of the 6 peers"):
        build_graph(TopologyConfig(name="torus", rows=4), 6, seed=0)
    with pytest.raises(ValueError, match="^n: got 0; allowed: an integer >= 1"):
        build_graph(TopologyConfig(), 0, seed=0)
    with pytest.raises(ValueError, match="^scheme: got 'mean'; allowed: uniform"):
        mixing_matrix(build_graph(TopologyConfig(), 3, seed=0), "mean")


@pytest.mark.parametrize("p", [float("inf"), float("nan"), float("-inf")])
def test_non_finite_p_is_refused(p):
    with pytest.raises(ValueError, match=rf"^p: got {p!r}; allowed: a number in"):
        TopologyConfig(name="erdos-renyi", p=p)


def test_messages_name_no_scenario_section(tmp_path):
    bad = tmp_path / "edges.txt"
    bad.write_text("0 1\n0 x\n")
    messages = []
    for call in (
        lambda: TopologyConfig(name="mesh"),
        lambda: TopologyConfig(name="edge-list", edge_file=str(tmp_path / "missing")),
        lambda: build_graph(TopologyConfig(name="edge-list", edge_file=str(bad)), 3, seed=0),
        lambda: mixing_matrix(build_graph(TopologyConfig(), 3, seed=0), "given"),
    ):
        with pytest.raises(ValueError) as info:
            call()
        messages.append(str(info.value))
    assert messages[1].startswith("edge_file: got ")
    assert messages[2].startswith("edge_file: line 2 is '0 x'")
    assert messages[3].startswith("graph: edge (0, 1) has no 'weight'")
    assert not any("topology." in m for m in messages)
