"""Batched k-means kernels vs `mp_sglang.method.clustering` on ragged segments."""

from __future__ import annotations

import pytest
import torch

from mp_kernels import kmeans, kmeans_reference

HEADS, DIM = 3, 16


def _segments(sizes, gen):
    points = torch.randn(sum(n for n, _ in sizes) + 2, HEADS, DIM, generator=gen)  # 2 rows outside
    centroids = torch.randn(sum(c for _, c in sizes), HEADS, DIM, generator=gen)
    ps = torch.tensor([sum(n for n, _ in sizes[:i]) for i in range(len(sizes))], dtype=torch.int32)
    cs = torch.tensor([sum(c for _, c in sizes[:i]) for i in range(len(sizes))], dtype=torch.int32)
    npts = torch.tensor([n for n, _ in sizes], dtype=torch.int32)
    ncl = torch.tensor([c for _, c in sizes], dtype=torch.int32)
    return points, centroids, ps, npts, cs, ncl


def test_assign_and_sums_match_clustering():
    gen = torch.Generator().manual_seed(1)
    sizes = [(150, 70), (7, 7), (0, 0), (33, 1)]
    points, centroids, ps, npts, cs, ncl = _segments(sizes, gen)
    labels = kmeans.assign(points, centroids, ps, npts, cs, ncl, 150, backend="triton")
    weights = torch.rand(points.shape[:2], generator=gen)
    sums, totals = kmeans.cluster_sums(
        points, labels, ps, npts, cs, centroids.shape[0], 150, weights, "triton"
    )
    for (n, c), p0, c0 in zip(sizes, ps.tolist(), cs.tolist(), strict=True):
        if n == 0:
            continue
        pts = points[p0 : p0 + n].transpose(0, 1)
        cen = centroids[c0 : c0 + c].transpose(0, 1)
        got = labels[p0 : p0 + n].t().long()
        assert got.min() >= 0 and got.max() < c
        dist = torch.cdist(pts.double(), cen.double()) ** 2
        chosen = dist.gather(-1, got.unsqueeze(-1)).squeeze(-1)
        assert torch.all(chosen <= dist.min(-1).values + 1e-4)  # nearest, ties aside
        assert (got == kmeans_reference.assign(pts, cen)).float().mean() > 0.99
        ref_sums, ref_totals = kmeans_reference.cluster_sums(pts, got, c, weights[p0 : p0 + n].t())
        assert torch.allclose(sums[c0 : c0 + c].transpose(0, 1), ref_sums, atol=1e-5, rtol=1e-5)
        assert torch.allclose(totals[c0 : c0 + c].t(), ref_totals, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("weighted", [False, True])
def test_assign_and_sum_in_one_launch_equals_the_two_steps(weighted):
    gen = torch.Generator().manual_seed(3)
    sizes = [(150, 70), (7, 7), (0, 0), (33, 1)]
    points, centroids, ps, npts, cs, ncl = _segments(sizes, gen)
    weights = torch.rand(points.shape[:2], generator=gen) if weighted else None
    labels, sums, totals = kmeans.assign_and_sum(points, centroids, ps, npts, cs, ncl, 150, weights, "triton")
    want_labels = kmeans.assign(points, centroids, ps, npts, cs, ncl, 150, backend="triton")
    inside = torch.cat([torch.arange(p, p + n) for p, n in zip(ps.tolist(), npts.tolist(), strict=True)])
    assert torch.equal(labels[inside], want_labels[inside])
    want_sums, want_totals = kmeans.cluster_sums(
        points, want_labels, ps, npts, cs, centroids.shape[0], 150, weights, "triton"
    )
    assert torch.allclose(sums, want_sums, atol=1e-5, rtol=1e-5)
    assert torch.allclose(totals, want_totals, atol=1e-5, rtol=1e-5)


def test_lloyd_matches_clustering_lloyd():
    gen = torch.Generator().manual_seed(2)
    points, centroids, ps, npts, cs, ncl = _segments([(90, 24)], gen)
    centroids[3] = 50.0  # a centroid far from everything: empty, so it is re-seeded
    got_c, got_l = kmeans.lloyd(
        points, centroids, ps, npts, cs, ncl, 90, 4, [torch.Generator().manual_seed(5)], backend="triton"
    )
    ref_c, ref_l = kmeans_reference.lloyd(
        points[:90].transpose(0, 1), centroids.transpose(0, 1), 4, torch.Generator().manual_seed(5)
    )
    assert torch.equal(got_l[:90].t().long(), ref_l)
    assert torch.allclose(got_c.transpose(0, 1), ref_c, atol=1e-5, rtol=1e-5)


def test_lloyd_reseeds_every_segment_as_clustering_does():
    """Two segments, each with an empty cluster, each with its own generator: the batched
    re-seeding places each segment's clusters as `kmeans_reference.lloyd` does on that segment alone."""
    gen = torch.Generator().manual_seed(8)
    sizes = [(60, 12), (45, 9)]
    points, centroids, ps, npts, cs, ncl = _segments(sizes, gen)
    centroids[2] = centroids[12 + 5] = 50.0  # far from everything: empty after the first pass
    got_c, got_l = kmeans.lloyd(
        points, centroids, ps, npts, cs, ncl, 60, 4, [torch.Generator().manual_seed(s) for s in (1, 2)],
        backend="triton",
    )  # fmt: skip
    for seed, (n, c), p0, c0 in zip((1, 2), sizes, ps.tolist(), cs.tolist(), strict=True):
        ref_c, ref_l = kmeans_reference.lloyd(
            points[p0 : p0 + n].transpose(0, 1),
            centroids[c0 : c0 + c].transpose(0, 1),
            4,
            torch.Generator().manual_seed(seed),
        )
        assert torch.equal(got_l[p0 : p0 + n].t().long(), ref_l)
        assert torch.allclose(got_c[c0 : c0 + c].transpose(0, 1), ref_c, atol=1e-5, rtol=1e-5)


def test_reseed_points_are_distinct_and_in_range():
    offsets = kmeans_reference.reseed_offsets(torch.Generator().manual_seed(0), 5, 3, 100)
    points = kmeans_reference.reseed_points(offsets.unsqueeze(-1), torch.arange(7), 7, 100)
    assert points.shape == (4, 3, 7) and points.min() >= 0 and points.max() < 100
    assert all(len(set(row.tolist())) == 7 for row in points.flatten(0, 1))


def test_reference_assign_through_the_kernel_matches_torch(generator):
    """kmeans_reference.assign takes the Triton kernel on CUDA; here it runs in the interpreter on
    strided views, as the reference's blocks and windows are."""
    window = torch.randn(3, 150, 16, generator=generator)
    points = window[:, 7:140]  # a slice of a window: strided along the points
    centroids = torch.randn(3, 40, 16, generator=generator)
    got = kmeans_reference.assign_by_kernel(points, centroids, backend="triton")
    assert got.dtype == torch.long and torch.equal(got, kmeans_reference.assign(points, centroids))
    assert kmeans_reference.assign_by_kernel(points[:, :0], centroids, backend="triton").shape == (3, 0)


def _small_cfg(levels: int):
    from mp_sglang.method.config import MultipoleConfig

    return MultipoleConfig(
        kmeans_block=96,
        tokens_per_cluster=8,
        recent_window=8,
        update_block=8,
        sink_tokens=3,
        levels=levels,
        level_ratio=4,
        dense_below=0,
    )


def _assert_same_index(got, want):
    assert got.block_tokens == want.block_tokens and got.block_clusters == want.block_clusters
    assert torch.equal(got.window_keys, want.window_keys)
    for got_level, want_level in zip(got.levels, want.levels, strict=True):
        assert torch.equal(got_level.labels, want_level.labels)
        assert torch.equal(got_level.counts, want_level.counts)
        assert torch.allclose(got_level.centroids, want_level.centroids, atol=1e-5, rtol=1e-5)
        assert torch.allclose(got_level.value_centroids, want_level.value_centroids, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("levels", [1, 2])
@pytest.mark.parametrize("max_bytes", [1 << 30, 1])
def test_batched_builds_and_folds_match_the_reference(levels, max_bytes):
    """Builds of ragged requests and their folds, driven in lockstep through the batched solver
    (one segment per block; max_bytes=1 puts every task in a launch of its own), give the
    reference's indexes: same blocks, labels and counts, means to rounding."""
    from functools import partial

    from clustered_data import clustered_kv

    from mp_sglang.method.kmeans_tasks import drive
    from mp_sglang.method.reference import build_index, build_index_steps, update_index, update_index_steps
    from mp_sglang.method.rope import Rope

    cfg, rope = _small_cfg(levels), Rope.standard(DIM)
    gen = torch.Generator().manual_seed(3)
    kvs = [clustered_kv(HEADS, n, DIM, 12, gen) for n in (400, 150, 20)]
    solve = partial(kmeans.solve_batched, backend="triton", max_bytes=max_bytes)
    built = drive([build_index_steps(k[:, :-40], v[:, :-40], cfg, rope=rope) for k, v in kvs], solve)
    for (k, v), got in zip(kvs, built, strict=True):
        _assert_same_index(got, build_index(k[:, :-40], v[:, :-40], cfg, rope=rope))
    pairs = list(zip(built, kvs, strict=True))
    folded = drive([update_index_steps(index, k[:, -40:], v[:, -40:], cfg) for index, (k, v) in pairs], solve)
    for (index, (k, v)), got in zip(pairs, folded, strict=True):
        _assert_same_index(got, update_index(index, k[:, -40:], v[:, -40:], cfg))


def test_batched_solver_clusters_points_in_the_given_dtype():
    """points_dtype=bf16 (the serving setting) clusters the keys rounded to bf16: the same labels
    as clustering the rounded keys in fp32, and centroids that are their fp32 means. Both start
    from the same (bf16-exact) centroids: the solver rounds the points, not the starting point."""
    from dataclasses import replace

    from mp_sglang.method.kmeans_tasks import random_init_task

    gen = torch.Generator().manual_seed(4)
    points = torch.randn(HEADS, 64, DIM, generator=gen)
    rounded = points.to(torch.bfloat16).float()
    values = torch.randn(HEADS, 64, 8, generator=gen)

    def task():
        return random_init_task(rounded, values, 6, 3, torch.Generator().manual_seed(0))

    (got,) = kmeans.solve_batched(
        [replace(task(), points=points)], points_dtype=torch.bfloat16, backend="triton"
    )
    (want,) = kmeans.solve_batched([task()], backend="triton")
    assert torch.equal(got.labels, want.labels) and torch.equal(got.totals, want.totals)
    means, _ = kmeans_reference.cluster_means(rounded, got.labels, 6, got.centroids)
    assert torch.allclose(got.centroids, means, atol=1e-5)
    assert got.value_means.shape == (HEADS, 6, 8)


def test_a_fold_may_hold_its_window_in_the_cache_dtype():
    """A windowless fold through the bf16 batched solver, its window held in bf16 (what the GPU
    decoder does) or in fp32: the solver rounds the keys to bf16 either way, so the two folds
    cluster the same points and part only through seeds of rounded vs. unrounded new keys."""
    from functools import partial

    from clustered_data import clustered_kv

    from mp_sglang.method.kmeans_tasks import run
    from mp_sglang.method.reference import build_index, update_windowless_index_steps, without_window
    from mp_sglang.method.rope import Rope

    cfg, rope = _small_cfg(1), Rope.standard(DIM)
    keys, values = clustered_kv(HEADS, 300, DIM, 12, torch.Generator().manual_seed(6))
    keys, values = rope.rotate(keys, torch.arange(300)).to(torch.bfloat16), values.to(torch.bfloat16)
    bare = without_window(build_index(keys[:, :280].float(), values[:, :280].float(), cfg, rope=rope))
    solve = partial(kmeans.solve_batched, points_dtype=torch.bfloat16, backend="triton")
    window = (keys[:, bare.window_start :], values[:, bare.window_start :])
    folds = [
        run(update_windowless_index_steps(bare, *window, cfg, window_dtype=dtype), solve)
        for dtype in (torch.float32, torch.bfloat16)
    ]
    assert folds[1].window_keys.dtype == torch.bfloat16
    assert folds[1].num_clustered == folds[0].num_clustered > bare.num_clustered
    labels = [fold.levels[0].labels for fold in folds]
    assert (labels[0] == labels[1]).float().mean() >= 0.95
    assert torch.equal(folds[0].levels[0].counts.sum(-1), folds[1].levels[0].counts.sum(-1))
    for fold in folds:
        assert fold.levels[0].centroids.dtype == fold.levels[0].value_centroids.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reseeded", [False, True])
def test_centroid_update_kernel_matches_its_torch_steps(dtype, reseeded):
    """Means of non-empty clusters, and for empty ones the named point (or the old centroid),
    with the assignment's inputs (cast centroids, norms) from the same values."""
    gen = torch.Generator().manual_seed(6)
    rows, points_n = 21, 40
    points = torch.randn(points_n, HEADS, DIM, generator=gen).to(dtype)
    sums = torch.randn(rows, HEADS, DIM, generator=gen)
    totals = torch.randint(0, 4, (rows, HEADS), generator=gen).float()  # about a quarter empty
    centroids = torch.randn(rows, HEADS, DIM, generator=gen)
    reseed = torch.randint(0, points_n, (rows, HEADS), generator=gen) if reseeded else None
    got = kmeans.update_centroids(sums, totals, centroids, points, reseed, backend="triton")
    want = kmeans.update_centroids(sums, totals, centroids, points, reseed, backend="torch")
    assert (totals == 0).any() and (totals > 0).any()
    assert torch.equal(got[0], want[0]) and got[1].dtype == want[1].dtype
    assert torch.equal(got[1], want[1])
    assert torch.allclose(got[2], want[2], rtol=1e-6)
