"""Sparse flash decoding vs its torch reference, on a shuffled paged pool."""

from __future__ import annotations

import pytest
import torch
from _inputs import make_batch, small_config

from mp_kernels.sparse_decode import sparse_decode


def _random_lists(lens, heads, cap, gen):
    pos = torch.zeros(len(lens), heads, cap, dtype=torch.int32)
    length = torch.zeros(len(lens), heads, dtype=torch.int32)
    for b, n in enumerate(lens):
        for h in range(heads):
            k = int(torch.randint(0, min(n, cap) + 1, (1,), generator=gen))
            length[b, h] = k
            pos[b, h, :k] = torch.randperm(n, generator=gen)[:k].to(torch.int32)
    length[0, 0] = 0  # always one empty list
    return pos, length


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("page_size", [1, 3])
@pytest.mark.parametrize("splits", [1, 3])
def test_sparse_decode_matches_reference(dtype, page_size, splits):
    lens = [37, 5, 150]
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
    pos, length = _random_lists(lens, 3, 140, torch.Generator().manual_seed(page_size))
    out, lse = sparse_decode(batch.q, batch.kv, pos, length, splits, backend="triton")
    ref_out, ref_lse = sparse_decode(batch.q, batch.kv, pos, length, splits, backend="torch")
    assert not out.isnan().any() and not lse.isnan().any()
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert torch.allclose(lse[finite], ref_lse[finite], atol=1e-5, rtol=1e-5)
    assert (out - ref_out).norm() <= tol * ref_out.norm()
