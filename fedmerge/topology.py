"""Communication graphs and mixing matrices for decentralized training."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # networkx is imported where a graph is built, not by every client
    import networkx as nx

TOPOLOGY_NAMES: tuple[str, ...] = (
    "ring",
    "full",
    "star",
    "torus",
    "erdos-renyi",
    "regular",
    "bipartite",
    "matching",
    "exponential",
    "edge-list",
    "none",
)
TIME_VARYING: tuple[str, ...] = ("matching", "exponential")
MIXING_SCHEMES: tuple[str, ...] = ("uniform", "metropolis", "given")


@dataclass(frozen=True)
class TopologyConfig:
    """Which graph connects the peers, and how they weigh each other.

    Attributes
    ----------
    name : str (default: "ring")
        One of :data:`TOPOLOGY_NAMES`: ``ring``; ``full`` (fully connected);
        ``star`` (peer 0 in the centre); ``torus`` (2-D, ``rows`` x n/rows);
        ``erdos-renyi`` (G(n, p), redrawn until connected); ``regular``
        (random ``degree``-regular); ``bipartite`` (complete bipartite between
        the first and second half); time-varying ``matching`` (a new random
        perfect matching every round) and ``exponential`` (one-peer exponential
        graph: in round t peer i talks to i +/- 2^(t mod log2 n)); ``edge-list``
        (read ``edge_file``); ``none`` (no edges: the local-only baseline).
    p : float (default: 0.5)
        Edge probability of ``erdos-renyi``.
    degree : int (default: 2)
        Degree of ``regular``.
    rows : int (default: 0)
        Rows of ``torus`` (0: the divisor of n closest to sqrt(n)).
    edge_file : str (default: "")
        ``edge-list``: one edge per line, ``i j`` or ``i j w`` (``#`` comments).
    mixing : str (default: "uniform")
        ``uniform``: 1/(deg_i+1) over self and neighbours (DIMAT's);
        ``metropolis``: Metropolis-Hastings weights (doubly stochastic);
        ``given``: the ``w`` column of ``edge_file`` (self weight: the rest).
    allow_disconnected : bool (default: False)
        Accept a graph that is not connected (refused otherwise).
    """

    name: str = "ring"
    p: float = 0.5
    degree: int = 2
    rows: int = 0
    edge_file: str = ""
    mixing: str = "uniform"
    allow_disconnected: bool = False

    def __post_init__(self) -> None:
        if self.name not in TOPOLOGY_NAMES:
            raise ValueError(f"name: got {self.name!r}; allowed: {', '.join(TOPOLOGY_NAMES)}")
        if self.mixing not in MIXING_SCHEMES:
            raise ValueError(f"mixing: got {self.mixing!r}; allowed: {', '.join(MIXING_SCHEMES)}")
        if not (math.isfinite(self.p) and 0 < self.p <= 1):
            raise ValueError(f"p: got {self.p!r}; allowed: a number in (0, 1]")
        if self.degree < 1:
            raise ValueError(f"degree: got {self.degree!r}; allowed: an integer >= 1")
        if self.rows < 0:
            raise ValueError(f"rows: got {self.rows!r}; allowed: an integer >= 0 (0: automatic)")
        if self.mixing == "given" and self.name != "edge-list":
            raise ValueError(
                f"mixing: got 'given'; allowed only with name 'edge-list' (name is {self.name!r})"
            )
        if self.name == "edge-list" and not Path(self.edge_file).is_file():
            raise ValueError(
                f"edge_file: got {self.edge_file!r}; allowed: an existing file "
                f"with one edge 'i j [w]' per line"
            )


def _read_edges(path: str, n: int) -> list[tuple[int, int, float | None]]:
    edges = []
    for lineno, raw in enumerate(Path(path).read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        try:
            i, j = int(parts[0]), int(parts[1])
            w = float(parts[2]) if len(parts) > 2 else None
        except (ValueError, IndexError):
            raise ValueError(
                f"edge_file: line {lineno} is {raw!r}; allowed: 'i j' or 'i j w'"
            ) from None
        if w is not None and not (math.isfinite(w) and 0 <= w <= 1):
            raise ValueError(
                f"edge_file: line {lineno} has weight {parts[2]!r}; allowed: a number in [0, 1]"
            )
        if not (0 <= i < n and 0 <= j < n) or i == j:
            raise ValueError(
                f"edge_file: line {lineno} has edge ({i}, {j}); "
                f"allowed: two different peers in 0..{n - 1}"
            )
        edges.append((i, j, w))
    return edges


def _torus_rows(n: int, rows: int) -> int:
    if rows:
        if n % rows:
            raise ValueError(f"rows: got {rows!r}; allowed: a divisor of the {n} peers")
        return rows
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: abs(d - math.sqrt(n)))


def build_graph(config: TopologyConfig, n: int, *, seed: int, round: int = 0) -> nx.Graph:
    """The graph over peers ``0..n-1`` used in ``round``.

    Parameters
    ----------
    config : TopologyConfig
        Topology and its parameters.
    n : int
        Number of peers.
    seed : int
        Seed of random graphs; with ``round`` it fixes time-varying graphs.
    round : int (default: 0)
        Round number (only time-varying graphs depend on it).

    Returns
    -------
    networkx.Graph
        Undirected, without self-loops; edges of ``edge-list`` carry ``weight``.

    Raises
    ------
    ValueError
        If the graph is not connected and ``allow_disconnected`` is false, or
        a parameter does not fit ``n``.
    """
    import networkx as nx

    if n < 1:
        raise ValueError(f"n: got {n!r}; allowed: an integer >= 1")
    name = config.name
    rng = np.random.default_rng([seed, 7, round if name in TIME_VARYING else 0])
    g: nx.Graph
    if name == "ring":
        g = nx.cycle_graph(n) if n > 2 else nx.path_graph(n)
    elif name == "full":
        g = nx.complete_graph(n)
    elif name == "star":
        g = nx.star_graph(n - 1)
    elif name == "torus":
        rows = _torus_rows(n, config.rows)
        grid = nx.grid_2d_graph(rows, n // rows, periodic=rows > 2 and n // rows > 2)
        g = nx.convert_node_labels_to_integers(grid, ordering="sorted")
    elif name == "erdos-renyi":
        for _ in range(1000):
            g = nx.gnp_random_graph(n, config.p, seed=int(rng.integers(2**31)))
            if nx.is_connected(g) or config.allow_disconnected:
                break
        else:
            raise ValueError(
                f"p: got {config.p!r}, and G({n}, p) was never connected in 1000 draws; "
                "allowed: a larger p, or allow_disconnected"
            )
    elif name == "regular":
        if config.degree >= n or (n * config.degree) % 2:
            raise ValueError(
                f"degree: got {config.degree!r}; allowed: below {n} with {n} x degree even"
            )
        g = nx.random_regular_graph(config.degree, n, seed=int(rng.integers(2**31)))
    elif name == "bipartite":
        g = nx.complete_bipartite_graph(n // 2, n - n // 2)
    elif name == "matching":
        order = rng.permutation(n)
        g = nx.empty_graph(n)
        g.add_edges_from((int(order[i]), int(order[i + 1])) for i in range(0, n - 1, 2))
    elif name == "exponential":
        hops = max(1, math.ceil(math.log2(n))) if n > 1 else 1
        step = 2 ** (round % hops)
        g = nx.empty_graph(n)
        g.add_edges_from((i, (i + step) % n) for i in range(n) if (i + step) % n != i)
    elif name == "edge-list":
        g = nx.empty_graph(n)
        for i, j, w in _read_edges(config.edge_file, n):
            g.add_edge(i, j, **({} if w is None else {"weight": w}))
    else:  # "none"
        g = nx.empty_graph(n)
    time_varying = name in TIME_VARYING
    if (
        n > 1
        and not nx.is_connected(g)
        and not (config.allow_disconnected or time_varying or name == "none")
    ):
        raise ValueError(
            f"name: got {name!r}, which over {n} peers is not connected; allowed: a "
            "connected graph, or allow_disconnected=True"
        )
    return g


def mixing_matrix(graph: nx.Graph, scheme: str = "uniform") -> np.ndarray:
    r"""Mixing weights :math:`W` with :math:`W_{ij} > 0` only on edges and the diagonal.

    - ``uniform``: :math:`W_{ij} = 1/(d_i + 1)` for :math:`j \in N(i) \cup \{i\}`
      (row-stochastic; doubly stochastic on regular graphs). DIMAT's choice.
    - ``metropolis``: :math:`W_{ij} = 1/(1 + \max(d_i, d_j))` on edges,
      :math:`W_{ii} = 1 - \sum_{j \ne i} W_{ij}` (symmetric, doubly stochastic).
    - ``given``: edge attribute ``weight``, :math:`W_{ii} = 1 - \sum_j W_{ij}`.

    Parameters
    ----------
    graph : networkx.Graph
        Undirected graph over nodes ``0..n-1``.
    scheme : str (default: "uniform")
        One of :data:`MIXING_SCHEMES`.

    Returns
    -------
    ndarray, shape (n, n)
        Rows sum to 1.
    """
    n = graph.number_of_nodes()
    w = np.zeros((n, n))
    deg = dict(graph.degree())
    for i in range(n):
        nbrs = list(graph.neighbors(i))
        if scheme == "uniform":
            for j in [i, *nbrs]:
                w[i, j] = 1.0 / (deg[i] + 1)
        elif scheme == "metropolis":
            for j in nbrs:
                w[i, j] = 1.0 / (1 + max(deg[i], deg[j]))
            w[i, i] = 1.0 - w[i].sum()
        elif scheme == "given":
            for j in nbrs:
                if "weight" not in graph.edges[i, j]:
                    raise ValueError(
                        f"graph: edge ({i}, {j}) has no 'weight'; "
                        f"allowed with scheme 'given': a weight on every edge"
                    )
                w[i, j] = float(graph.edges[i, j]["weight"])
            w[i, i] = 1.0 - w[i].sum()
            if w[i, i] < -1e-12:
                raise ValueError(
                    f"graph: the edge weights of peer {i} sum to {w[i].sum() - w[i, i]:.3f}; "
                    f"allowed: at most 1"
                )
        else:
            raise ValueError(f"scheme: got {scheme!r}; allowed: {', '.join(MIXING_SCHEMES)}")
    return w
