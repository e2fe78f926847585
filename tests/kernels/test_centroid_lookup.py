"""Centroid lookup: kernels vs their torch reference, and the selection vs the spec's `lookup`."""

from __future__ import annotations

import pytest
import torch
from _inputs import make_batch, small_config

from mp_kernels.centroid_lookup import Selection, expand_selection, lookup, ranking_key, select_within_budget
from mp_kernels.layout import BatchIndex, LevelTensors
from mp_sglang.method import reference

LENS = [9, 75, 130, 41]  # 9: nothing clustered (all sink + recent); others: 1-4 k-means blocks


@pytest.mark.parametrize("budget,levels", [(0, 1), (0.25, 1), (0.1, 2), (10_000, 1), (10_000, 2), (0.3, 3)])
def test_lookup_matches_reference(budget, levels):
    cfg = small_config(token_budget=budget, levels=levels, level_budget_multiplier=2.0)
    batch = make_batch(LENS, heads=3, group=2, dim=16, cfg=cfg, seed=levels)
    got = lookup(batch.q, batch.index, batch.budget, batch.max_exact, 2.0, backend="triton")
    ref = lookup(batch.q, batch.index, batch.budget, batch.max_exact, 2.0, backend="torch")

    for lvl in range(levels):
        for b in range(len(LENS)):  # past a request's clusters the kernels write nothing
            n = int(batch.index.levels[lvl].num_clusters[b])
            got_logits, ref_logits = got.logits[lvl][b, :, :n], ref.logits[lvl][b, :, :n]
            assert torch.equal(torch.isinf(got_logits), torch.isinf(ref_logits))
            finite = torch.isfinite(ref_logits)
            assert torch.allclose(got_logits[finite], ref_logits[finite], atol=1e-5, rtol=1e-5)
            assert torch.equal(got.selected[lvl][b, :, :n], ref.selected[lvl][b, :, :n])
    assert torch.equal(got.exact.lengths(), ref.exact.lengths())
    for b in range(len(LENS)):
        for h in range(3):
            assert torch.equal(got.exact.positions(b, h), ref.exact.positions(b, h))

    for b, index in enumerate(batch.indices):
        spec = reference.lookup(batch.q[b], index, cfg)
        exact = torch.zeros_like(spec.exact)
        for h in range(3):
            exact[h, got.exact.positions(b, h)] = True
        assert torch.equal(exact, spec.exact)
        assert int(got.exact.lengths()[b].max()) == int(spec.exact.sum(-1).max())  # no token listed twice
        for lvl in range(levels):
            n = int(batch.index.levels[lvl].num_clusters[b])
            logits = got.logits[lvl][b, :, :n].reshape(3, 2, n)
            approx = torch.isfinite(logits[:, 0]) & (got.selected[lvl][b, :, :n] == 0)
            assert torch.equal(approx, spec.approx[lvl])


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_importance_ties_below_bfloat16_precision_go_to_the_lower_cluster_id(backend):
    # Cluster 2 leads; cluster 1 beats cluster 0 by a factor 1 + 1e-4, below the 8 significant
    # bits the selection ranks by, so the two tie and the budget's second slot goes to cluster 0.
    logits = torch.tensor([[[0.0, 1e-4, 0.85, -20.0]]])
    importance = torch.softmax(logits[0, 0], dim=-1)
    assert importance[1] > importance[0]
    assert ranking_key(importance[:2]).unique().numel() == 1
    counts = torch.full((4, 1), 4, dtype=torch.int32)
    zero, four = torch.zeros(1, dtype=torch.int32), torch.full((1,), 4, dtype=torch.int32)
    level = LevelTensors(torch.zeros(4, 1, 8), torch.zeros(4, 1, 8), counts, zero, four, 4)
    budget = torch.tensor([8], dtype=torch.int32)
    assert select_within_budget(logits, level, budget, backend).selected[0, 0].tolist() == [1, 0, 1, 0]
    # A clear preference is still followed.
    logits[0, 0, 1] = 0.1
    assert select_within_budget(logits, level, budget, backend).selected[0, 0].tolist() == [0, 1, 1, 0]


@pytest.mark.parametrize("cap_short", [0, 40])
def test_expansion_of_many_clusters_of_every_size(cap_short):
    """Enough selected clusters that each copying program walks several chunks, sizes from 0
    (an emptied cluster) past one member tile, and a chosen list cut at its capacity."""
    gen = torch.Generator().manual_seed(4)
    batch, heads, clusters = 2, 3, 150
    counts = torch.randint(0, 70, (batch * clusters, heads), generator=gen, dtype=torch.int32)
    counts[::9] = 0
    member_start = (torch.cumsum(counts, 0) - counts).to(torch.int32)
    members = torch.randint(0, 10_000, (int(counts.sum(0).max()), heads), generator=gen, dtype=torch.int32)
    starts = torch.arange(batch, dtype=torch.int32) * clusters
    level = LevelTensors(
        torch.zeros(batch * clusters, heads, 4),
        torch.zeros(batch * clusters, heads, 4),
        counts,
        starts,
        torch.full((batch,), clusters, dtype=torch.int32),
        clusters,
    )
    sink_len = torch.tensor([5, 0], dtype=torch.int32)
    seq_lens = torch.tensor([12_000, 11_000], dtype=torch.int32)
    recent_start = torch.tensor([11_700, 11_000], dtype=torch.int32)  # 300 recent tokens; none
    index = BatchIndex((level,), member_start, members, sink_len, recent_start, seq_lens)
    selected = torch.rand(batch, heads, clusters, generator=gen) < 0.7
    sizes = counts.view(batch, clusters, heads).transpose(1, 2).long()
    sel_ids = torch.zeros(batch, heads, clusters, dtype=torch.int32)
    sel_cum = torch.zeros_like(sel_ids)
    for b in range(batch):
        for h in range(heads):
            ids = torch.nonzero(selected[b, h]).flatten()
            sel_ids[b, h, : len(ids)] = ids.to(torch.int32)
            sel_cum[b, h, : len(ids)] = sizes[b, h, ids].cumsum(0).to(torch.int32)
    chosen_sizes = torch.where(selected, sizes, 0)
    selection = Selection(
        selected.to(torch.int8),
        sel_ids,
        sel_cum,
        selected.sum(-1).to(torch.int32),
        chosen_sizes.sum(-1).to(torch.int32),
    )
    recent = (seq_lens - recent_start).unsqueeze(1)
    uncut = sink_len.unsqueeze(1) + chosen_sizes.sum(-1) + recent
    cap = int(chosen_sizes.sum(-1).max()) - cap_short  # only the chosen part is bounded
    got = expand_selection(selection, index, cap, backend="triton")
    ref = expand_selection(selection, index, cap, backend="torch")
    assert torch.equal(got.lengths(), ref.lengths())
    assert bool((got.lengths() < uncut).any()) == (cap_short > 0)
    for b in range(batch):
        for h in range(heads):
            listed = min(int(selection.sel_tokens[b, h]), cap)
            assert torch.equal(got.chosen[b, h, :listed], ref.chosen[b, h, :listed]), (b, h)
            assert torch.equal(got.positions(b, h), ref.positions(b, h)), (b, h)
            assert len(got.positions(b, h)) == int(got.lengths()[b, h])


@pytest.mark.parametrize(
    "group,sizes",
    [
        (3, [700, 650]),  # the group's rows at once
        (16, [1100, 1050]),  # row by row
        (4, [2100, 300, 0, 256, 257]),  # a launch per lane width: 256, 2048, 4096 (module doc)
    ],
)
def test_selection_of_many_clusters_matches_reference(group, sizes):
    gen = torch.Generator().manual_seed(group)
    batch, heads, clusters = len(sizes), 2, max(sizes)
    logits = torch.randn(batch, heads * group, clusters, generator=gen) * 3
    logits[:, :, ::11] = float("-inf")  # empty clusters
    counts = torch.randint(1, 40, (batch * clusters, heads), generator=gen, dtype=torch.int32)
    level = LevelTensors(
        torch.zeros(batch * clusters, heads, 4),
        torch.zeros(batch * clusters, heads, 4),
        counts,
        torch.arange(batch, dtype=torch.int32) * clusters,
        torch.tensor(sizes, dtype=torch.int32),
        clusters,
    )
    for b, n in enumerate(sizes):
        logits[b, :, n:] = float("-inf")  # as the reference's scores leave them
    for tokens in (0, 300, 10**6):
        budget = torch.full((batch,), tokens, dtype=torch.int32)
        got = select_within_budget(logits, level, budget, "triton")
        ref = select_within_budget(logits, level, budget, "torch")
        for b, n in enumerate(sizes):
            assert torch.equal(got.selected[b, :, :n], ref.selected[b, :, :n]), (tokens, b)
        assert torch.equal(got.num_sel, ref.num_sel) and torch.equal(got.sel_tokens, ref.sel_tokens)
        for b in range(batch):
            for h in range(heads):
                n = int(ref.num_sel[b, h])
                assert torch.equal(got.sel_ids[b, h, :n], ref.sel_ids[b, h, :n])
                assert torch.equal(got.sel_cum[b, h, :n], ref.sel_cum[b, h, :n])
