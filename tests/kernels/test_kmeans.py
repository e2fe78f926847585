"""Batched k-means kernels vs `mp_sglang.clustering` on ragged segments."""

from __future__ import annotations

import torch

from mp_kernels import kmeans
from mp_sglang import clustering

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
        assert (got == clustering.assign(pts, cen)).float().mean() > 0.99
        ref_sums, ref_totals = clustering.cluster_sums(pts, got, c, weights[p0 : p0 + n].t())
        assert torch.allclose(sums[c0 : c0 + c].transpose(0, 1), ref_sums, atol=1e-5, rtol=1e-5)
        assert torch.allclose(totals[c0 : c0 + c].t(), ref_totals, atol=1e-5, rtol=1e-5)


def test_lloyd_matches_clustering_lloyd():
    gen = torch.Generator().manual_seed(2)
    points, centroids, ps, npts, cs, ncl = _segments([(90, 24)], gen)
    centroids[3] = 50.0  # a centroid far from everything: empty, so it is re-seeded
    got_c, got_l = kmeans.lloyd(
        points, centroids, ps, npts, cs, ncl, 90, 4, torch.Generator().manual_seed(5), backend="triton"
    )
    ref_c, ref_l = clustering.lloyd(
        points[:90].transpose(0, 1), centroids.transpose(0, 1), 4, torch.Generator().manual_seed(5)
    )
    assert torch.equal(got_l[:90].t().long(), ref_l)
    assert torch.allclose(got_c.transpose(0, 1), ref_c, atol=1e-5, rtol=1e-5)


def test_reference_assign_through_the_kernel_matches_torch(generator):
    """clustering.assign takes the Triton kernel on CUDA; here it runs in the interpreter on
    strided views, as the reference's blocks and windows are."""
    from mp_sglang import clustering

    window = torch.randn(3, 150, 16, generator=generator)
    points = window[:, 7:140]  # a slice of a window: strided along the points
    centroids = torch.randn(3, 40, 16, generator=generator)
    got = clustering.assign_by_kernel(points, centroids, backend="triton")
    assert got.dtype == torch.long and torch.equal(got, clustering.assign(points, centroids))
    assert clustering.assign_by_kernel(points[:, :0], centroids, backend="triton").shape == (3, 0)
