"""The reference against dense attention and hand-checked cases: the spec must be right first."""

from __future__ import annotations

import math
from dataclasses import fields, replace

import pytest
import torch
from clustered_data import clustered_kv

from mp_sglang.method.clustering import max_clusters
from mp_sglang.method.config import MultipoleConfig
from mp_sglang.method.reference import (
    ClusterIndex,
    build_index,
    compact_levels,
    decode_attention,
    decode_view,
    dense_attention,
    heads_of,
    lookup,
    masked_attention,
    stack_heads,
    update_index,
    with_window,
    without_window,
)
from mp_sglang.method.rope import Rope


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).norm() / ref.norm()).item()


def roped_kv(heads, seq, dim, generator, rope, centres=48):
    keys, values = clustered_kv(heads, seq, dim, centres, generator)
    return rope.rotate(keys, torch.arange(seq)), values


SMALL = dict(kmeans_block=256, sink_tokens=4, recent_window=16, update_block=8, tokens_per_cluster=8)


@pytest.mark.parametrize("levels", [1, 2])
@pytest.mark.parametrize("windowed", [True, False])
def test_full_budget_equals_dense(generator, levels, windowed):
    heads, q_heads, seq, dim = 2, 6, 700, 32
    rope = Rope.standard(dim)
    keys, values = roped_kv(heads, seq, dim, generator, rope)
    cfg = MultipoleConfig(token_budget=seq, levels=levels, windowed_rope=windowed, **SMALL)
    index = build_index(keys, values, cfg, rope=rope)
    assert index.num_clustered == seq - cfg.sink_tokens - cfg.recent_window
    q = torch.randn(q_heads, dim, generator=generator)
    assert rel_err(decode_attention(q, keys, values, index, cfg), dense_attention(q, keys, values)) <= 1e-5


def test_one_token_per_cluster_at_zero_budget_equals_dense(generator):
    heads, q_heads, seq, dim = 3, 3, 300, 16
    keys = torch.randn(heads, seq, dim, generator=generator)
    values = torch.randn(heads, seq, dim, generator=generator)
    cfg = MultipoleConfig(
        token_budget=0,
        tokens_per_cluster=1,
        windowed_rope=False,
        sink_tokens=0,
        recent_window=0,
        kmeans_block=128,
    )
    index = build_index(keys, values, cfg)
    assert index.num_clustered == seq and not lookup(torch.randn(q_heads, dim), index, cfg).exact.any()
    q = torch.randn(q_heads, dim, generator=generator)
    assert rel_err(decode_attention(q, keys, values, index, cfg), dense_attention(q, keys, values)) <= 1e-5


def test_gqa_group_shares_one_selection_ranked_by_mean_importance():
    # One KV head, two query heads, one key per cluster, budget of one token.
    keys = torch.tensor([[[3.0, 0.0], [0.0, 3.0]]])
    values = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    cfg = MultipoleConfig(
        token_budget=1,
        tokens_per_cluster=1,
        windowed_rope=False,
        sink_tokens=0,
        recent_window=0,
        kmeans_block=16,
    )
    index = build_index(keys, values, cfg)
    # Head 0 is sure of key 0 (importance ~1.0); head 1 mildly prefers key 1 (~0.67): mean picks key 0.
    q = torch.tensor([[10.0, 0.0], [0.0, 1.0 / 3.0 * math.sqrt(2.0)]])
    assert lookup(q, index, cfg).exact.tolist() == [[True, False]]
    # Head 1 alone would pick key 1.
    assert lookup(q[1:].repeat(2, 1), index, cfg).exact.tolist() == [[False, True]]
    # With one key per cluster the centroid part is exact, so the output is dense attention.
    assert rel_err(decode_attention(q, keys, values, index, cfg), dense_attention(q, keys, values)) <= 1e-6


def test_gqa_output_is_per_head_attention_over_the_shared_selection(generator):
    heads, q_heads, seq, dim = 2, 8, 500, 16
    keys, values = clustered_kv(heads, seq, dim, 20, generator)
    cfg = MultipoleConfig(token_budget=0.1, windowed_rope=False, **SMALL)
    index = build_index(keys, values, cfg)
    q = torch.randn(q_heads, dim, generator=generator)
    out = decode_attention(q, keys, values, index, cfg)
    # The same computation with each query head given its own copy of the KV head must agree,
    # as long as every copy receives the group's selection.
    selection = lookup(q, index, cfg)
    exact, _ = masked_attention(q, keys, values, selection.exact)
    exact_mha, _ = masked_attention(
        q,
        keys.repeat_interleave(4, 0),
        values.repeat_interleave(4, 0),
        selection.exact.repeat_interleave(4, 0),
    )
    assert rel_err(exact, exact_mha) <= 1e-6
    assert out.shape == (q_heads, dim) and torch.isfinite(out).all()


def test_error_falls_as_budget_grows_on_clustered_keys(generator):
    heads, q_heads, seq, dim = 2, 4, 2000, 32
    keys, values = clustered_kv(heads, seq, dim, 64, generator)
    q = 2.0 * torch.randn(q_heads, dim, generator=generator)
    ref = dense_attention(q, keys, values)
    errors = []
    for budget in (0.0, 0.02, 0.1, 0.3, 0.6, 1.0):
        cfg = MultipoleConfig(token_budget=budget, windowed_rope=False, **SMALL)
        errors.append(rel_err(decode_attention(q, keys, values, build_index(keys, values, cfg), cfg), ref))
    assert all(later <= earlier + 1e-6 for earlier, later in zip(errors, errors[1:], strict=False)), errors
    assert errors[0] > 10 * max(errors[-1], 1e-7) and errors[-1] <= 1e-5, errors


def test_centroid_part_beats_dropping_the_unselected_tokens(generator):
    heads, q_heads, seq, dim = 2, 4, 2000, 32
    keys, values = clustered_kv(heads, seq, dim, 64, generator)
    q = torch.randn(q_heads, dim, generator=generator)
    cfg = MultipoleConfig(token_budget=0.05, windowed_rope=False, **SMALL)
    index = build_index(keys, values, cfg)
    ref = dense_attention(q, keys, values)
    dropped, _ = masked_attention(q, keys, values, lookup(q, index, cfg).exact)
    assert rel_err(decode_attention(q, keys, values, index, cfg), ref) < 0.5 * rel_err(dropped, ref)


def test_budget_is_respected_and_sink_and_recent_are_exact(generator):
    heads, q_heads, seq, dim = 2, 2, 1000, 16
    keys, values = clustered_kv(heads, seq, dim, 40, generator)
    cfg = MultipoleConfig(token_budget=0.05, windowed_rope=False, **SMALL)
    index = build_index(keys, values, cfg)
    exact = lookup(torch.randn(q_heads, dim, generator=generator), index, cfg).exact
    assert exact[:, : cfg.sink_tokens].all() and exact[:, index.recent_start :].all()
    clustered = exact[:, index.start : index.recent_start].sum(dim=1)
    assert (clustered <= cfg.budget_tokens(seq)).all() and (clustered > 0).all()


@pytest.mark.parametrize("windowed", [True, False])
def test_online_update_keeps_counts_and_means_exact(generator, windowed):
    heads, dim, prompt, generated = 2, 16, 300, 260
    rope = Rope.standard(dim)
    cfg = MultipoleConfig(
        kmeans_block=64,
        sink_tokens=4,
        recent_window=16,
        update_block=8,
        tokens_per_cluster=4,
        levels=2,
        level_ratio=3,
        windowed_rope=windowed,
    )
    keys, values = roped_kv(heads, prompt + generated, dim, generator, rope)
    index = build_index(keys[:, :prompt], values[:, :prompt], cfg, rope=rope)
    frozen_before = index.levels[0].centroids[:, : index.block_clusters[0][-2]].clone()
    for step in range(prompt, prompt + generated, 5):  # tokens arrive in uneven chunks
        stop = min(step + 5, prompt + generated)
        index = update_index(index, keys[:, step:stop], values[:, step:stop], cfg)
    total = prompt + generated
    assert index.num_tokens == total
    assert cfg.recent_window <= total - index.recent_start < cfg.recent_window + cfg.update_block
    final_block = index.block_tokens[-1] - index.block_tokens[-2]
    assert cfg.kmeans_block // 2 <= final_block < cfg.kmeans_block * 3 // 2
    # Blocks that were final before never change.
    assert torch.equal(index.levels[0].centroids[:, : frozen_before.shape[1]], frozen_before)

    span = slice(index.start, index.recent_start)
    lookup_keys = rope.rotate(keys, -torch.arange(total))[:, span] if windowed else keys[:, span]
    members = lookup_keys, values[:, span]
    level = index.levels[0]
    num_clusters = level.centroids.shape[1]
    one_hot = torch.nn.functional.one_hot(level.labels, num_clusters).float()  # [H, N, C]
    counts = one_hot.sum(1)
    assert torch.equal(level.counts, counts.long())
    filled = counts > 0
    for got, data in zip((level.centroids, level.value_centroids), members, strict=True):
        means = torch.einsum("hnc,hnd->hcd", one_hot, data) / counts.clamp_min(1).unsqueeze(-1)
        assert torch.allclose(got[filled], means[filled], atol=1e-5)
    coarse = index.levels[1]
    assert torch.equal(
        coarse.counts, torch.zeros_like(coarse.counts).scatter_add_(1, coarse.labels, level.counts)
    )


def test_updated_index_at_full_budget_still_equals_dense(generator):
    heads, q_heads, dim = 2, 4, 16
    rope = Rope.standard(dim)
    keys, values = roped_kv(heads, 400, dim, generator, rope)
    cfg = MultipoleConfig(token_budget=10_000, **SMALL)
    index = build_index(keys[:, :250], values[:, :250], cfg, rope=rope)
    index = update_index(index, keys[:, 250:], values[:, 250:], cfg)
    q = torch.randn(q_heads, dim, generator=generator)
    assert rel_err(decode_attention(q, keys, values, index, cfg), dense_attention(q, keys, values)) <= 1e-5


def test_hierarchy_matches_flat_lookup_when_the_coarse_budget_covers_everything(generator):
    heads, q_heads, seq, dim = 2, 4, 1500, 16
    keys, values = clustered_kv(heads, seq, dim, 30, generator)
    flat = MultipoleConfig(token_budget=0.05, windowed_rope=False, **SMALL)
    tiered = MultipoleConfig(
        token_budget=0.05, windowed_rope=False, levels=2, level_budget_multiplier=100.0, **SMALL
    )
    q = torch.randn(q_heads, dim, generator=generator)
    flat_index, tiered_index = build_index(keys, values, flat), build_index(keys, values, tiered)
    assert torch.equal(lookup(q, flat_index, flat).exact, lookup(q, tiered_index, tiered).exact)
    out_flat = decode_attention(q, keys, values, flat_index, flat)
    assert rel_err(decode_attention(q, keys, values, tiered_index, tiered), out_flat) <= 1e-6


def test_hierarchy_error_shrinks_to_flat_as_the_coarse_budget_widens(generator):
    heads, q_heads, seq, dim = 2, 4, 3000, 16
    keys, values = clustered_kv(heads, seq, dim, 30, generator)
    q = torch.randn(q_heads, dim, generator=generator)
    ref = dense_attention(q, keys, values)
    flat = MultipoleConfig(token_budget=0.05, windowed_rope=False, **SMALL)
    flat_err = rel_err(decode_attention(q, keys, values, build_index(keys, values, flat), flat), ref)
    errors = []
    for multiplier in (2.0, 8.0, 100.0):
        cfg = MultipoleConfig(
            token_budget=0.05, windowed_rope=False, levels=2, level_budget_multiplier=multiplier, **SMALL
        )
        index = build_index(keys, values, cfg)
        if multiplier == 2.0:
            assert lookup(q, index, cfg).approx[1].any(), (
                "a tight coarse budget must approximate coarse clusters"
            )
        errors.append(rel_err(decode_attention(q, keys, values, index, cfg), ref))
    assert errors[0] > errors[1] > errors[2] and abs(errors[2] - flat_err) <= 1e-6, (errors, flat_err)


def test_index_must_cover_the_cache(generator):
    keys = torch.randn(1, 100, 8, generator=generator)
    cfg = MultipoleConfig(**SMALL)
    index = build_index(keys, keys, cfg)
    with pytest.raises(ValueError, match="update_index"):
        decode_attention(
            torch.randn(2, 8),
            torch.cat([keys, keys[:, :1]], 1),
            torch.cat([keys, keys[:, :1]], 1),
            index,
            cfg,
        )


def test_build_is_reproducible_for_a_seed(generator):
    keys, values = clustered_kv(2, 600, 16, 20, generator)
    cfg = MultipoleConfig(**SMALL)
    first, second = build_index(keys, values, cfg), build_index(keys, values, cfg)
    assert torch.equal(first.levels[0].labels, second.levels[0].labels)


def test_rope_rotations_compose_and_invert(generator):
    rope = Rope.standard(16, theta=500.0)
    x = torch.randn(3, 10, 16, generator=generator)
    pos = torch.arange(10)
    assert torch.allclose(rope.rotate(rope.rotate(x, pos), -pos), x, atol=1e-6)
    assert torch.allclose(rope.rotate(rope.rotate(x, pos), 7), rope.rotate(x, pos + 7), atol=1e-5)
    q, k = torch.randn(16, generator=generator), torch.randn(16, generator=generator)
    # The score depends only on the distance between positions.
    assert torch.allclose(
        rope.rotate(q, 40) @ rope.rotate(k, 10), rope.rotate(q, 2030) @ rope.rotate(k, 2000), atol=1e-4
    )


def _index_on(index: ClusterIndex, device: str) -> ClusterIndex:
    """The same index with every tensor on `device`."""
    levels = tuple(
        replace(lvl, **{f.name: getattr(lvl, f.name).to(device) for f in fields(lvl)}) for lvl in index.levels
    )
    return replace(
        index,
        levels=levels,
        window_keys=index.window_keys.to(device),
        window_values=index.window_values.to(device),
    )


@pytest.mark.gpu
def test_reference_runs_on_cuda_and_matches_cpu(generator):
    # Decoding from the same index agrees to float rounding. The clusterings themselves may part
    # at a near-tie (a point equidistant from two centroids up to rounding), so they are compared
    # by how many tokens share a cluster, not bit for bit.
    heads, q_heads, dim = 4, 16, 64
    rope = Rope.standard(dim)
    keys, values = roped_kv(heads, 3000, dim, generator, rope)
    q = torch.randn(q_heads, dim, generator=generator)
    cfg = MultipoleConfig(token_budget=0.05, levels=2, **SMALL)
    indexes = []
    for device in ("cpu", "cuda"):
        k, v = keys.to(device), values.to(device)
        index = build_index(k[:, :2900], v[:, :2900], cfg, rope=rope)
        indexes.append(update_index(index, k[:, 2900:], v[:, 2900:], cfg))
    on_cpu, on_cuda = indexes
    for cpu_level, cuda_level in zip(on_cpu.levels, on_cuda.levels, strict=True):
        same = (cpu_level.labels == cuda_level.labels.cpu()).float().mean().item()
        assert same >= 0.999
    expected = decode_attention(q, keys, values, on_cpu, cfg)
    got = decode_attention(q.cuda(), keys.cuda(), values.cuda(), _index_on(on_cpu, "cuda"), cfg).cpu()
    assert rel_err(got, expected) <= 1e-5
    decoded_with_own_index = decode_attention(q.cuda(), keys.cuda(), values.cuda(), on_cuda, cfg).cpu()
    assert torch.isfinite(decoded_with_own_index).all()


def test_positions_carry_from_build_to_updates(generator):
    # A sequence whose RoPE positions start at 1000 (e.g. a continued conversation) must be
    # un-rotated with those positions during updates too: the result equals building from scratch.
    heads, q_heads, dim, seq = 2, 4, 16, 400
    rope = Rope.standard(dim)
    raw, values = clustered_kv(heads, seq, dim, 20, generator)
    positions = torch.arange(1000, 1000 + seq)
    keys = rope.rotate(raw, positions)
    cfg = MultipoleConfig(token_budget=0.1, **SMALL)
    grown = update_index(
        build_index(keys[:, :300], values[:, :300], cfg, positions[:300], rope),
        keys[:, 300:],
        values[:, 300:],
        cfg,
    )
    assert grown.next_position == 1000 + seq
    # Every lookup-frame key the update kept equals the un-rotated raw key.
    assert torch.allclose(grown.window_keys, raw[:, grown.window_start :], atol=1e-4)
    q = torch.randn(q_heads, dim, generator=generator)
    out = decode_attention(q, keys, values, grown, cfg)
    assert out.shape == (q_heads, dim) and torch.isfinite(out).all()


def test_a_window_read_back_from_the_cache_is_the_one_dropped(generator):
    """`with_window` rebuilds exactly what `without_window` dropped, from the cache as stored
    (after RoPE, positions starting at 1000): a holder can keep indexes without their windows."""
    heads, dim, seq = 2, 16, 420
    rope = Rope.standard(dim)
    raw, values = clustered_kv(heads, seq, dim, 20, generator)
    positions = torch.arange(1000, 1000 + seq)
    keys = rope.rotate(raw, positions)
    cfg = MultipoleConfig(**SMALL)
    index = build_index(keys[:, :300], values[:, :300], cfg, positions[:300], rope)
    index = update_index(index, keys[:, 300:], values[:, 300:], cfg)
    assert index.window_start > cfg.sink_tokens  # folds moved the window on
    bare = without_window(index)
    assert bare.window_keys.shape == (heads, 0, dim) and bare.window_values.numel() == 0
    window = slice(index.window_start, index.num_tokens)
    back = with_window(bare, keys[:, window], values[:, window])
    assert torch.equal(back.window_keys, index.window_keys)
    assert torch.equal(back.window_values, index.window_values)
    with pytest.raises(ValueError, match="window holds tokens"):
        with_window(bare, keys[:, :5], values[:, :5])


def test_decode_view_of_a_lagging_index_equals_the_updated_index(generator):
    """Tokens past an index that has not folded them yet are in its exact recent window, so
    decoding through `decode_view` equals decoding through the index updated token by token (as
    long as no fold falls in between); an index longer than the cache is refused."""
    cfg = MultipoleConfig(
        token_budget=0.1,
        tokens_per_cluster=4,
        kmeans_block=64,
        recent_window=16,
        update_block=8,
        sink_tokens=4,
    )
    keys, values = clustered_kv(2, 300, 16, 6, generator)
    q = torch.randn(4, 16, generator=generator)
    lagging = build_index(keys[:, :295], values[:, :295], cfg)
    assert 300 - lagging.recent_start < cfg.recent_window + cfg.update_block  # no fold due at 300
    updated = update_index(lagging, keys[:, 295:], values[:, 295:], cfg)
    assert updated.recent_start == lagging.recent_start
    via_view = decode_attention(q, keys, values, decode_view(lagging, 300), cfg)
    assert torch.allclose(via_view, decode_attention(q, keys, values, updated, cfg), atol=1e-6)
    with pytest.raises(ValueError, match="more than"):
        decode_view(updated, 299)


@pytest.mark.parametrize("levels", [1, 2])
def test_stacked_heads_give_back_each_part_and_fold_as_one(generator, levels):
    """Indexes of the same tokens (two layers) stacked along heads: each part comes back intact,
    decoding through a part equals decoding through its own index, and the stacked index folds
    and decodes like any index (full budget: dense)."""
    cfg = MultipoleConfig(token_budget=0.1, levels=levels, **SMALL)
    rope = Rope.standard(16)
    layers = [clustered_kv(2, 600, 16, 6, generator) for _ in range(2)]
    parts = [build_index(k[:, :500], v[:, :500], cfg, rope=rope) for k, v in layers]
    stacked = stack_heads(parts)
    q = torch.randn(4, 16, generator=generator)
    for i, ((keys, values), part) in enumerate(zip(layers, parts, strict=True)):
        view = heads_of(stacked, slice(2 * i, 2 * i + 2))
        for got, want in zip(view.levels, part.levels, strict=True):
            assert torch.equal(got.centroids, want.centroids) and torch.equal(got.labels, want.labels)
        assert torch.equal(view.window_keys, part.window_keys)
        got = decode_attention(q, keys[:, :500], values[:, :500], view, cfg)
        assert torch.equal(got, decode_attention(q, keys[:, :500], values[:, :500], part, cfg))
    all_keys = torch.cat([k for k, _ in layers])
    all_values = torch.cat([v for _, v in layers])
    folded = update_index(stacked, all_keys[:, 500:], all_values[:, 500:], cfg)
    assert folded.num_clustered > stacked.num_clustered and folded.window_keys.shape[0] == 4
    full = MultipoleConfig(token_budget=10_000, levels=levels, **SMALL)
    for i, (keys, values) in enumerate(layers):
        out = decode_attention(q, keys, values, heads_of(folded, slice(2 * i, 2 * i + 2)), full)
        assert torch.allclose(out, dense_attention(q, keys, values), atol=1e-5)


def test_stacking_refuses_indexes_of_different_tokens(generator):
    cfg = MultipoleConfig(**SMALL)
    keys, values = clustered_kv(2, 600, 16, 6, generator)
    with pytest.raises(ValueError, match="same tokens"):
        stack_heads([build_index(keys[:, :500], values[:, :500], cfg), build_index(keys, values, cfg)])


@pytest.mark.parametrize(
    "cfg_overrides",
    [
        {},  # SMALL: blocks of 256, 8 tokens per cluster, folds of 8
        {"kmeans_block": 16, "tokens_per_cluster": 12, "update_block": 4},  # blocks can round up
    ],
)
def test_clusters_never_exceed_the_static_bound(generator, cfg_overrides):
    """`clustering.max_clusters` bounds a request's clusters whatever its length and folds: the
    kernel path sizes its buffers and the selection's lanes by it."""
    cfg = MultipoleConfig(**{**SMALL, **cfg_overrides})
    heads, dim = 2, 8
    keys, values = clustered_kv(heads, 900, dim, 10, generator)
    for built_at in (5, 30, 290, 600):
        index = build_index(keys[:, :built_at], values[:, :built_at], cfg)
        for end in range(built_at, 900, 37):
            index = update_index(
                index, keys[:, index.num_tokens : end], values[:, index.num_tokens : end], cfg
            )
            clustered = index.num_tokens - min(cfg.sink_tokens, index.num_tokens) - cfg.recent_window
            bound = max_clusters(clustered, cfg.tokens_per_cluster, cfg.kmeans_block)
            assert index.levels[0].centroids.shape[1] <= bound


def test_a_compact_index_folds_like_the_full_one(generator):
    """`compact_levels` holds centroids in bf16 and labels in int32; folds keep those dtypes and
    cluster as the full index does, up to the warm start's rounding."""
    heads, dim, seq = 2, 16, 700
    rope = Rope.standard(dim)
    keys, values = roped_kv(heads, seq, dim, generator, rope)
    cfg = MultipoleConfig(**SMALL)
    full = build_index(keys[:, :500], values[:, :500], cfg, rope=rope)
    compact = compact_levels(full, torch.bfloat16)
    assert (
        compact.levels[0].centroids.dtype == torch.bfloat16 and compact.levels[0].labels.dtype == torch.int32
    )
    folded = [update_index(index, keys[:, 500:], values[:, 500:], cfg) for index in (full, compact)]
    level_full, level_compact = folded[0].levels[0], folded[1].levels[0]
    assert level_compact.centroids.dtype == level_compact.value_centroids.dtype == torch.bfloat16
    assert level_compact.labels.dtype == torch.int32
    assert folded[1].num_clustered == folded[0].num_clustered > full.num_clustered
    assert (level_compact.labels.long() == level_full.labels).float().mean() >= 0.99
    assert torch.equal(level_compact.counts.sum(-1), level_full.counts.sum(-1))
    assert rel_err(level_compact.centroids.float(), level_full.centroids) <= 2e-2
