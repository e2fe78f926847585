"""End to end: the composed kernels vs `mp_sglang.method.reference.decode_attention`, request by request."""

from __future__ import annotations

import pytest
import torch
from _inputs import make_batch, small_config

from mp_kernels._softmax import SPLIT_ALIGN
from mp_kernels.centroid_lookup import lookup
from mp_kernels.centroid_replace import centroid_replace, merge_partials
from mp_kernels.decode import MAX_EXACT_SPLITS, default_splits, multipole_decode, replacement_splits
from mp_sglang.method import reference

LENS = [9, 75, 130, 41]


@pytest.mark.parametrize(
    "budget,levels,page_size,group",
    [(0, 1, 1, 2), (0.25, 1, 4, 3), (0.2, 2, 1, 1), (10_000, 1, 2, 2), (10_000, 2, 1, 2)],
)
def test_decode_matches_reference(budget, levels, page_size, group):
    cfg = small_config(token_budget=budget, levels=levels)
    batch = make_batch(LENS, heads=3, group=group, dim=16, cfg=cfg, page_size=page_size, seed=7 + levels)
    out = multipole_decode(
        batch.q,
        batch.q,
        batch.kv,
        batch.index,
        batch.budget,
        batch.max_exact,
        exact_splits=2,
        approx_splits=2,
        level_budget_multiplier=cfg.level_budget_multiplier,
        backend="triton",
    )
    assert not out.isnan().any()
    for b, index in enumerate(batch.indices):
        ref = reference.decode_attention(batch.q[b], batch.keys[b], batch.values[b], index, cfg)
        assert (out[b] - ref).norm() <= 1e-5 * ref.norm(), b
    if budget >= 10_000:  # everything exact: plain dense attention
        for b in range(len(LENS)):
            dense = reference.dense_attention(batch.q[b], batch.keys[b], batch.values[b])
            assert (out[b] - dense).norm() <= 1e-5 * dense.norm()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_pools_match_the_fp32_reference(dtype):
    """fp16 and bf16 KV pools and queries (fp32 accumulation): within 1e-2 of the fp32 reference
    on the same rounded inputs."""
    cfg = small_config(token_budget=0.25)
    batch = make_batch(LENS, heads=3, group=2, dim=16, cfg=cfg, dtype=dtype, page_size=2, seed=9)
    q = batch.q.to(dtype)
    out = multipole_decode(q, q, batch.kv, batch.index, batch.budget, batch.max_exact, backend="triton")
    assert out.dtype == dtype and not out.isnan().any()
    for b, index in enumerate(batch.indices):
        ref = reference.decode_attention(q[b].float(), batch.keys[b], batch.values[b], index, cfg)
        assert (out[b].float() - ref).norm() <= 1e-2 * ref.norm(), b


def test_scale_and_output_buffer_are_honoured():
    """An explicit sm_scale equals pre-scaled queries, and `out` receives the result in its dtype."""
    cfg = small_config(token_budget=0.25)
    batch = make_batch(LENS, heads=3, group=2, dim=16, cfg=cfg, seed=5)
    args = (batch.kv, batch.index, batch.budget, batch.max_exact)
    scaled = multipole_decode(2 * batch.q, 2 * batch.q, *args, exact_splits=2, backend="triton")
    out = torch.full((len(LENS), 6, 16), float("nan"), dtype=torch.bfloat16)
    got = multipole_decode(batch.q, batch.q, *args, exact_splits=2, sm_scale=0.5, out=out, backend="triton")
    assert got is out
    assert (out.float() - scaled).norm() <= 1e-2 * scaled.norm()
    with pytest.raises(ValueError, match="unit last stride"):
        multipole_decode(batch.q, batch.q, *args, out=out.transpose(1, 2).contiguous().transpose(1, 2))


def test_replace_and_merge_match_reference():
    cfg = small_config(token_budget=0.2, levels=2)
    batch = make_batch(LENS, heads=3, group=2, dim=16, cfg=cfg, seed=3)
    found = lookup(
        batch.q, batch.index, batch.budget, batch.max_exact, cfg.level_budget_multiplier, backend="torch"
    )
    for lvl, level in enumerate(batch.index.levels):
        got = centroid_replace(found.logits[lvl], found.selected[lvl], level, 3, backend="triton")
        ref = centroid_replace(found.logits[lvl], found.selected[lvl], level, 3, backend="torch")
        assert torch.equal(torch.isinf(got[1]), torch.isinf(ref[1]))
        finite = torch.isfinite(ref[1])
        assert torch.allclose(got[1][finite], ref[1][finite], atol=1e-5, rtol=1e-5)
        assert (got[0] - ref[0]).norm() <= 1e-5 * ref[0].norm()
        assert not got[0].isnan().any()

    gen = torch.Generator().manual_seed(0)
    parts = torch.randn(2, 5, 3, 16, generator=gen)
    lses = torch.randn(2, 5, 3, generator=gen)
    lses[0, 0] = float("-inf")  # a row with nothing in it
    lses[1, 2, 1] = float("-inf")
    for out_dtype in (torch.float32, torch.bfloat16):
        out, lse = merge_partials(parts, lses, out_dtype, backend="triton")
        ref_out, ref_lse = merge_partials(parts, lses, out_dtype, backend="torch")
        tol = 1e-5 if out_dtype == torch.float32 else 1e-2
        assert (out.float() - ref_out.float()).norm() <= tol * ref_out.float().norm()
        assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
        spec_out, spec_lse = parts[:, :, 0], lses[:, :, 0]
        for p in range(1, 3):
            spec_out, spec_lse = reference.merge_partials(spec_out, spec_lse, parts[:, :, p], lses[:, :, p])
        assert (ref_out.float() - spec_out.to(out_dtype).float()).norm() <= tol * spec_out.norm()
        assert torch.allclose(lse[torch.isfinite(lse)], spec_lse[torch.isfinite(spec_lse)], atol=1e-5)


@pytest.mark.parametrize(
    "batch,clusters,want",
    [(1, 8200, 33), (8, 4400, 4), (32, 4400, 1), (64, 4400, 1), (1, 100, 2)],
)
def test_replacement_splits_fill_one_wave(batch, clusters, want):
    """Two resident programs per SM: as many splits as make one wave of 2 x 132 programs, at
    least one, and never more than the clusters allow (one aligned chunk each)."""
    splits = replacement_splits(batch, 8, clusters)
    assert splits == want
    assert batch * 8 * splits <= 2 * 132 or splits == 1


@pytest.mark.parametrize(
    "batch,tokens,want",
    [(1, 2760, 44), (1, 100_000, 64), (8, 1448, 17), (8, 700, 11), (32, 1448, 5), (64, 1448, 3)],
)
def test_exact_splits_give_about_eight_programs_per_sm(batch, tokens, want):
    """At least eight programs per SM when the token list is long enough, each split holding at
    least one aligned chunk of `SPLIT_ALIGN` tokens, and no more splits than the merge takes."""
    splits = default_splits(batch, 8, tokens)
    assert splits == want
    assert batch * 8 * splits >= 8 * 132 or splits in (-(-tokens // SPLIT_ALIGN), MAX_EXACT_SPLITS)
