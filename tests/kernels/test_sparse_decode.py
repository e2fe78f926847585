"""Sparse flash decoding vs its torch reference, on a shuffled paged pool."""

from __future__ import annotations

import pytest
import torch
from _inputs import make_batch, small_config

from mp_kernels.layout import ExactTokens
from mp_kernels.sparse_decode import sparse_decode


def _random_exact(lens, heads, cap, gen) -> ExactTokens:
    """Per row: sinks, a random choice of the tokens between them and the recent window (per head),
    the window. Row 1 attends nothing, row 2's list is longer than `cap` (only the chosen part is
    bounded), row 3 is all recent (a row without clusters, as a server attends short contexts)."""
    sink_len = torch.tensor([4, 0, 10, 10], dtype=torch.int32)
    recent_start = torch.tensor([30, lens[1], 20, 10], dtype=torch.int32)
    chosen = torch.zeros(len(lens), heads, cap, dtype=torch.int32)
    num_chosen = torch.zeros(len(lens), heads, dtype=torch.int32)
    for b in (0, 2):
        middle = torch.arange(int(sink_len[b]), int(recent_start[b]), dtype=torch.int32)
        for h in range(heads):
            k = int(torch.randint(0, len(middle) + 1, (1,), generator=gen))
            num_chosen[b, h] = k
            chosen[b, h, :k] = middle[torch.randperm(len(middle), generator=gen)[:k]]
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    return ExactTokens(sink_len, chosen, num_chosen, recent_start, seq_lens)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("page_size", [1, 3])
@pytest.mark.parametrize("splits", [1, 3])
def test_sparse_decode_matches_reference(dtype, page_size, splits):
    lens = [37, 5, 150, 60]
    batch = make_batch(
        lens,
        heads=3,
        group=3,
        dim=16,
        cfg=small_config(),
        dtype=dtype,
        page_size=page_size,
        seed=splits * 10 + page_size,
    )
    exact = _random_exact(lens, 3, 140, torch.Generator().manual_seed(page_size))
    assert exact.lengths()[3].max() == 60 and exact.lengths()[1].max() == 0
    assert exact.lengths()[2].min() >= 140 and exact.lengths()[2].max() > 140
    out, lse = sparse_decode(batch.q, batch.kv, exact, splits, backend="triton")
    ref_out, ref_lse = sparse_decode(batch.q, batch.kv, exact, splits, backend="torch")
    assert not out.isnan().any() and not lse.isnan().any()
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert torch.allclose(lse[finite], ref_lse[finite], atol=1e-5, rtol=1e-5)
    assert (out - ref_out).norm() <= tol * ref_out.norm()
