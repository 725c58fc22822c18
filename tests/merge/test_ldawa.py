"""L-DAWA against a naive per-layer implementation in NumPy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmerge.merge.ldawa import LDAWAConfig, ldawa_aggregate, ldawa_weights


def _model_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(4, 2, 3, 3, generator=g),
        "conv.bias": torch.randn(4, generator=g),
        "bn.weight": torch.rand(4, generator=g) + 0.5,
        "bn.bias": torch.randn(4, generator=g),
        "bn.running_mean": torch.randn(4, generator=g),
        "bn.running_var": torch.rand(4, generator=g) + 0.1,
        "bn.num_batches_tracked": torch.tensor(seed + 3),
        "fc.weight": torch.randn(3, 4, generator=g),
        "fc.bias": torch.randn(3, generator=g),
    }


def _naive(global_state, clients, counts, *, normalize="clients", negative="keep",
           bn="weighted", layer="tensor", sample_weighted=False):  # fmt: skip
    """Independent: plain loops, float64 NumPy, module groups by hand."""
    k = len(clients)
    n = np.asarray(counts, dtype=np.float64)

    def group(name):
        return name.rsplit(".", 1)[0] if layer == "module" else name

    def cosine(names, c):
        a = np.concatenate([c[x].double().numpy().ravel() for x in names])
        b = np.concatenate([global_state[x].double().numpy().ravel() for x in names])
        denom = np.linalg.norm(a) * np.linalg.norm(b)
        value = 1.0 if denom == 0 else float(a @ b / denom)
        value = min(value, 1.0)
        if negative == "clip":
            value = max(value, 0.0)
        if negative == "abs":
            value = abs(value)
        return value

    out = {}
    for name, ref in global_state.items():
        stack = [c[name].double().numpy() for c in clients]
        if not ref.is_floating_point():
            out[name] = max(int(s) for s in stack)
            continue
        if bn == "average" and name.split(".")[-1] in ("running_mean", "running_var"):
            out[name] = sum(s * (n[i] / n.sum()) for i, s in enumerate(stack))
            continue
        names = [
            x
            for x in global_state
            if global_state[x].is_floating_point() and group(x) == group(name)
        ]
        w = np.array([cosine(names, c) for c in clients])
        if sample_weighted:
            w = w * n / n.mean()
        z = k if normalize == "clients" else w.sum()
        out[name] = sum(w[i] * s for i, s in enumerate(stack)) / z
    return out


def _close(got, want):
    for key, value in want.items():
        torch.testing.assert_close(got[key].double(), torch.as_tensor(value, dtype=torch.float64),
                                   rtol=1e-5, atol=1e-6, msg=key)  # fmt: skip


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"normalize": "weights"},
        {"negative": "clip"},
        {"negative": "abs"},
        {"bn": "average"},
        {"layer": "module"},
        {"sample_weighted": True, "normalize": "weights"},
    ],
)
def test_matches_naive_implementation(options):
    global_state = _model_state(0)
    clients = [_model_state(s) for s in (1, 2, 3)]
    # make one client lean towards the global model, so cosines differ a lot
    clients[0] = {k: v + 2 * global_state[k] if v.is_floating_point() else v
                  for k, v in clients[0].items()}  # fmt: skip
    counts = [10, 30, 60]
    got = ldawa_aggregate(global_state, clients, counts, LDAWAConfig(**options))
    _close(got, _naive(global_state, clients, counts, **options))


def test_one_client_equal_to_global_returns_it_divided_by_one():
    g = _model_state(0)
    got = ldawa_aggregate(g, [g], [5])
    _close(got, {k: v for k, v in g.items()})


def test_identical_clients_equal_to_global_are_a_fixed_point():
    g = _model_state(0)
    got = ldawa_aggregate(g, [g, g, g], [1, 2, 3])
    _close(got, {k: v for k, v in g.items()})


def test_paper_default_shrinks_when_client_diverges_but_renormalised_does_not():
    """Cosine < 1 with normalize='clients' scales the layer down (reference code)."""
    g = _model_state(0)
    c = _model_state(7)
    w = ldawa_weights(g, [c], LDAWAConfig())["fc.weight"].item()
    a = np.concatenate([c["fc.weight"].numpy().ravel()])
    b = np.concatenate([g["fc.weight"].numpy().ravel()])
    assert w == pytest.approx(float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)), rel=1e-6)
    paper = ldawa_aggregate(g, [c], [1])
    renorm = ldawa_aggregate(g, [c], [1], LDAWAConfig(normalize="weights"))
    torch.testing.assert_close(paper["fc.weight"], c["fc.weight"] * w)
    torch.testing.assert_close(renorm["fc.weight"], c["fc.weight"])


def test_negative_cosine_kept_clipped_or_flipped():
    g = _model_state(0)
    opposite = {k: -v if v.is_floating_point() else v for k, v in g.items()}
    same = dict(g)
    keep = ldawa_aggregate(g, [same, opposite], [1, 1])
    clip = ldawa_aggregate(g, [same, opposite], [1, 1], LDAWAConfig(negative="clip"))
    flip = ldawa_aggregate(g, [same, opposite], [1, 1], LDAWAConfig(negative="abs"))
    # keep: (1*g + (-1)*(-g)) / 2 = g; clip: (g + 0) / 2; abs: (g - g) / 2 = 0
    torch.testing.assert_close(keep["fc.weight"], g["fc.weight"])
    torch.testing.assert_close(clip["fc.weight"], g["fc.weight"] / 2)
    torch.testing.assert_close(flip["fc.weight"], torch.zeros_like(g["fc.weight"]))


def test_bad_option_names_the_key():
    with pytest.raises(ValueError, match="^negative: got 'drop'; allowed: keep, clip, abs$"):
        LDAWAConfig(negative="drop")
    for key in ("normalize", "bn", "layer"):
        with pytest.raises(ValueError, match=f"^{key}: got 'x'; allowed: "):
            LDAWAConfig(**{key: "x"})
