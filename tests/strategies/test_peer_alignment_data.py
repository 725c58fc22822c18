"""Tests of where peers take their alignment data (``align_data``)."""

from __future__ import annotations

import pytest
import torch

from strategies.plugins.peer import DIMATOptions, GossipOptions, LocalOptions, alignment_batches


def test_default_is_local_data() -> None:
    assert GossipOptions().align_data == "local"
    assert DIMATOptions(align_data="proxy").align_data == "proxy"


def test_bad_align_data_is_one_line() -> None:
    with pytest.raises(ValueError, match=r"^align_data: got 'global'; allowed: local, proxy$"):
        DIMATOptions(align_data="global")


def test_proxy_alignment_reads_none_of_the_local_data() -> None:
    """Local inputs full of NaN: a proxy-aligned peer's batches hold none of them."""
    local = torch.full((300, 4), float("nan"))
    proxy = torch.arange(40 * 4, dtype=torch.float32).reshape(40, 4)
    asked: list[int] = []

    def proxy_batches(k: int) -> list[torch.Tensor]:
        asked.append(k)
        return list(torch.split(proxy[:k], 16))

    batches = alignment_batches(DIMATOptions(align_data="proxy"), 40, local, 7, proxy_batches)
    assert asked == [40]
    got = torch.cat(batches)
    assert not torch.isnan(got).any()
    assert torch.equal(got, proxy)


def test_local_alignment_draws_seeded_rows_of_the_local_data() -> None:
    x = torch.arange(300, dtype=torch.float32).unsqueeze(1).repeat(1, 3)

    def no_proxy(k: int) -> list[torch.Tensor]:
        raise AssertionError("a local-data peer must not ask for proxy data")

    batches = alignment_batches(DIMATOptions(), 200, x, 5, no_proxy)
    assert [len(b) for b in batches] == [128, 72]
    rows = torch.cat(batches)[:, 0].long()
    assert len(set(rows.tolist())) == 200  # distinct local rows
    want = torch.randperm(300, generator=torch.Generator().manual_seed(5))[:200]
    assert torch.equal(rows, want)
    other = torch.cat(alignment_batches(DIMATOptions(), 200, x, 6, no_proxy))[:, 0].long()
    assert not torch.equal(rows, other)
    # options without align_data (the local peers') align on local data too
    assert torch.equal(torch.cat(alignment_batches(LocalOptions(), 200, x, 5, no_proxy)), x[want])
