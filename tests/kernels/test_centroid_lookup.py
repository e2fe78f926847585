"""Centroid lookup: kernels vs their torch reference, and the selection vs the spec's `lookup`."""

from __future__ import annotations

import pytest
import torch
from _inputs import make_batch, small_config

from mp_kernels.centroid_lookup import lookup, select_within_budget
from mp_kernels.layout import LevelTensors
from mp_sglang import reference

LENS = [9, 75, 130, 41]  # 9: nothing clustered (all sink + recent); others: 1-4 k-means blocks


@pytest.mark.parametrize("budget,levels", [(0, 1), (0.25, 1), (0.1, 2), (10_000, 1), (10_000, 2), (0.3, 3)])
def test_lookup_matches_reference(budget, levels):
    cfg = small_config(token_budget=budget, levels=levels, level_budget_multiplier=2.0)
    batch = make_batch(LENS, heads=3, group=2, dim=16, cfg=cfg, seed=levels)
    got = lookup(batch.q, batch.index, batch.budget, batch.max_exact, 2.0, backend="triton")
    ref = lookup(batch.q, batch.index, batch.budget, batch.max_exact, 2.0, backend="torch")

    for lvl in range(levels):
        assert torch.equal(torch.isinf(got.logits[lvl]), torch.isinf(ref.logits[lvl]))
        finite = torch.isfinite(ref.logits[lvl])
        assert torch.allclose(got.logits[lvl][finite], ref.logits[lvl][finite], atol=1e-5, rtol=1e-5)
        assert torch.equal(got.selected[lvl], ref.selected[lvl])
    assert torch.equal(got.token_len, ref.token_len)
    for b in range(len(LENS)):
        for h in range(3):
            n = int(ref.token_len[b, h])
            assert torch.equal(got.token_pos[b, h, :n], ref.token_pos[b, h, :n])

    for b, index in enumerate(batch.indices):
        spec = reference.lookup(batch.q[b], index, cfg)
        exact = torch.zeros_like(spec.exact)
        for h in range(3):
            exact[h, got.token_pos[b, h, : int(got.token_len[b, h])].long()] = True
        assert torch.equal(exact, spec.exact)
        assert int(got.token_len[b].max()) == int(spec.exact.sum(-1).max())  # no token listed twice
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
    assert reference.ranking_key(importance[:2]).unique().numel() == 1
    counts = torch.full((4, 1), 4, dtype=torch.int32)
    zero, four = torch.zeros(1, dtype=torch.int32), torch.full((1,), 4, dtype=torch.int32)
    level = LevelTensors(torch.zeros(4, 1, 8), torch.zeros(4, 1, 8), counts, zero, four, 4)
    budget = torch.tensor([8], dtype=torch.int32)
    assert select_within_budget(logits, level, budget, backend).selected[0, 0].tolist() == [1, 0, 1, 0]
    # A clear preference is still followed.
    logits[0, 0, 1] = 0.1
    assert select_within_budget(logits, level, budget, backend).selected[0, 0].tolist() == [0, 1, 1, 0]
