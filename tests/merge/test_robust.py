"""Robust aggregators against independent computations (explicit loops and numpy)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedmerge.merge import (
    RobustConfig,
    clip_updates,
    coordinate_median,
    krum,
    krum_scores,
    krum_select,
    multi_krum,
    trimmed_mean,
    update_norms,
)


def _states(k: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "w": torch.randn(2, 3, generator=g),
            "b": torch.randn(3, generator=g),
            "n": torch.tensor(k + 2 * i, dtype=torch.int64),
        }
        for i in range(k)
    ]


def _vec(state: dict[str, torch.Tensor]) -> np.ndarray:
    return np.concatenate([state["w"].numpy().ravel(), state["b"].numpy().ravel()]).astype(
        np.float64
    )


def test_update_norms_is_the_norm_of_the_flattened_difference() -> None:
    ref, *clients = _states(4, seed=1)
    got = update_norms(ref, clients)
    for norm, c in zip(got, clients, strict=True):
        d = _vec(c) - _vec(ref)
        assert norm == pytest.approx(math.sqrt(sum(x * x for x in d)))


def test_clip_updates_scales_only_the_long_updates() -> None:
    ref, small, big = _states(3, seed=2)
    small = {k: (ref[k] + 0.01 * (v - ref[k]) if v.is_floating_point() else v)
             for k, v in small.items()}  # fmt: skip
    c = 0.5
    out = clip_updates(ref, [small, big], c)
    assert all(torch.equal(out[0][k], small[k]) for k in small)  # within the norm: unchanged
    d = _vec(big) - _vec(ref)
    norm = np.sqrt((d**2).sum())
    want = _vec(ref) + d * c / norm
    np.testing.assert_allclose(_vec(out[1]), want, rtol=1e-6, atol=1e-6)
    assert np.linalg.norm(_vec(out[1]) - _vec(ref)) == pytest.approx(c, rel=1e-5)
    assert torch.equal(out[1]["n"], big["n"])  # integer buffers untouched


@pytest.mark.parametrize("k", [1, 4, 5])
def test_coordinate_median_matches_numpy(k: int) -> None:
    states = _states(k, seed=3)
    got = coordinate_median(states)
    for key in ("w", "b"):
        stacked = np.stack([s[key].numpy() for s in states]).astype(np.float64)
        np.testing.assert_allclose(got[key].numpy(), np.median(stacked, axis=0), rtol=1e-6)
    assert got["n"].dtype == torch.int64
    assert int(got["n"]) == round(float(np.median([int(s["n"]) for s in states])))


def test_median_ignores_one_huge_client() -> None:
    states = _states(5, seed=4)
    states[2] = {k: (v * 1e30 if v.is_floating_point() else v) for k, v in states[2].items()}
    got = coordinate_median(states)
    assert all(bool(torch.isfinite(got[k]).all()) and float(got[k].abs().max()) < 10
               for k in ("w", "b"))  # fmt: skip


@pytest.mark.parametrize(("k", "beta"), [(5, 0.2), (6, 0.25), (4, 0.0), (7, 0.49)])
def test_trimmed_mean_matches_an_explicit_loop(k: int, beta: float) -> None:
    states = _states(k, seed=5)
    got = trimmed_mean(states, beta)
    b = int(np.floor(beta * k))
    for key in ("w", "b"):
        arr = np.stack([s[key].numpy() for s in states]).astype(np.float64)
        want = np.empty(arr.shape[1:])
        for idx in np.ndindex(*arr.shape[1:]):
            column = sorted(arr[(slice(None), *idx)])
            kept = column[b : k - b]
            want[idx] = sum(kept) / len(kept)
        np.testing.assert_allclose(got[key].numpy(), want, rtol=1e-6, atol=1e-7)


def test_trimmed_mean_rejects_half() -> None:
    with pytest.raises(ValueError, match=r"trim_fraction: got 0.5; allowed"):
        trimmed_mean(_states(3), 0.5)


def _naive_krum_scores(vectors: list[np.ndarray], f: int) -> list[float]:
    k = len(vectors)
    scores = []
    for i in range(k):
        dists = sorted(float(((vectors[i] - vectors[j]) ** 2).sum()) for j in range(k) if j != i)
        scores.append(sum(dists[: max(1, k - f - 2)]))
    return scores


@pytest.mark.parametrize(("k", "f"), [(6, 1), (7, 2), (3, 1)])
def test_krum_scores_match_pairwise_distances(k: int, f: int) -> None:
    states = _states(k, seed=6)
    want = _naive_krum_scores([_vec(s) for s in states], f)
    np.testing.assert_allclose(krum_scores(states, f), want, rtol=1e-9)


def test_krum_picks_the_central_client_and_multi_krum_averages_the_best() -> None:
    states = _states(6, seed=7)
    states[0] = {k: (v + 50.0 if v.is_floating_point() else v) for k, v in states[0].items()}
    vecs = [_vec(s) for s in states]
    scores = _naive_krum_scores(vecs, 1)
    best = int(np.argmin(scores))
    assert krum_select(states, 1) == [best]
    got = krum(states, 1)
    torch.testing.assert_close(got["w"], states[best]["w"])
    m = 3
    chosen = sorted(sorted(range(6), key=lambda i: scores[i])[:m])
    assert 0 not in chosen  # the outlier is never among the best
    assert sorted(krum_select(states, 1, m)) == chosen
    want = sum(vecs[i] for i in chosen) / m
    np.testing.assert_allclose(_vec(multi_krum(states, 1, m)), want, rtol=1e-6, atol=1e-7)
    counts = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    weighted = sum(counts[i] * vecs[i] for i in chosen) / sum(counts[i] for i in chosen)
    np.testing.assert_allclose(
        _vec(multi_krum(states, 1, m, counts)), weighted, rtol=1e-6, atol=1e-7
    )


def test_krum_of_one_model_is_that_model() -> None:
    (state,) = _states(1)
    assert krum_scores([state], 3) == [0.0]
    assert torch.equal(krum([state], 3)["w"], state["w"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"robust": "mean"}, "robust: got 'mean'; allowed: none, median"),
        ({"clip_norm": -1.0}, "clip_norm: got -1.0; allowed"),
        ({"clip_norm": float("inf")}, "clip_norm: got inf; allowed"),
        ({"clip_norm": 1.0, "clip_to_median": True}, "clip_norm: got 1.0 with clip_to_median"),
        ({"trim_fraction": 0.5}, "trim_fraction: got 0.5; allowed"),
        ({"krum_f": -1}, "krum_f: got -1; allowed"),
        ({"krum_m": -2}, "krum_m: got -2; allowed"),
    ],
)
def test_robust_config_rejects_bad_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        RobustConfig(**kwargs)


def test_robust_config_defaults_are_plain() -> None:
    assert RobustConfig().is_plain
    assert not RobustConfig(robust="median").is_plain
    assert not RobustConfig(clip_to_median=True).is_plain
    # every aggregator name is accepted
    for name in ("none", "median", "trimmed-mean", "krum", "multi-krum"):
        assert RobustConfig(robust=name).robust == name
