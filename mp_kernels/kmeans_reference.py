"""K-means batched over KV heads in plain torch: the twin of the k-means kernels (`kmeans.py`),
and the k-means problem as a value.

Every function takes `[heads, n, d]` tensors and treats the heads independently. The method's
reference (`mp_sglang.method.reference`) builds and updates indexes with these; the segmented
Triton kernels compute the same assignment and mean steps for many problems at once.
`KMeansTask`/`KMeansResult` are what both solvers speak: `solve_each` here, task by task, and
`kmeans.solve_batched`, a whole round of tasks in one set of launches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from mp_kernels.dispatch import to_device


def assign(points: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Nearest centroid (squared Euclidean) of every point: `[H, N, d] x [H, K, d] -> [H, N]`.

    On CUDA the Triton assignment kernel computes it without writing the `[H, N, K]` distance
    matrix (hundreds of MB for a final block of 12K keys), which dominated index upkeep in serving.
    """
    if points.is_cuda:
        return assign_by_kernel(points, centroids)
    dist = (
        points.pow(2).sum(-1, keepdim=True)
        - 2 * points @ centroids.transpose(-1, -2)
        + centroids.pow(2).sum(-1).unsqueeze(-2)
    )
    return dist.argmin(dim=-1)


def assign_by_kernel(
    points: torch.Tensor, centroids: torch.Tensor, backend: str | None = None
) -> torch.Tensor:
    """`assign` through `kmeans.assign` (one segment): the CUDA path, and on the CPU
    under Triton's interpreter (backend="triton") for tests."""
    from mp_kernels.kmeans import assign as segment_assign  # kmeans.py imports this module

    heads, n, _ = points.shape
    if n == 0:
        return torch.empty(heads, 0, dtype=torch.long, device=points.device)
    like = {"dtype": torch.int32, "device": points.device}
    start = torch.zeros(1, **like)
    labels = segment_assign(
        points.transpose(0, 1),
        centroids.transpose(0, 1),
        start,
        torch.full((1,), n, **like),
        start,
        torch.full((1,), centroids.shape[1], **like),
        n,
        backend=backend,
    )
    return labels.t().long()


def cluster_sums(
    points: torch.Tensor,
    labels: torch.Tensor,
    num_clusters: int,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cluster (weighted) sums of `points` and total weights (counts when unweighted)."""
    heads, _, dim = points.shape
    like = {"dtype": points.dtype, "device": points.device}
    w = torch.ones(labels.shape, **like) if weights is None else weights.to(**like)
    sums = torch.zeros(heads, num_clusters, dim, **like)
    sums.scatter_add_(1, labels.unsqueeze(-1).expand(-1, -1, dim), points * w.unsqueeze(-1))
    totals = torch.zeros(heads, num_clusters, **like)
    totals.scatter_add_(1, labels, w)
    return sums, totals


def cluster_means(
    points: torch.Tensor,
    labels: torch.Tensor,
    num_clusters: int,
    fallback: torch.Tensor,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Means of the members of each cluster; an empty cluster keeps its `fallback` row."""
    sums, totals = cluster_sums(points, labels, num_clusters, weights)
    means = torch.where(totals.unsqueeze(-1) > 0, sums / totals.clamp_min(1e-30).unsqueeze(-1), fallback)
    return means, totals


def lloyd(
    points: torch.Tensor,
    centroids: torch.Tensor,
    iters: int,
    generator: torch.Generator,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd iterations from `centroids`; returns the final labels and their exact member means.

    A cluster left empty by an iteration (other than the last) is re-seeded at a random point, as
    the paper's k-means does, so that centroids are not wasted. The points are drawn whether or
    not a cluster is empty (deciding on the host would wait for the GPU once per iteration), all
    iterations' at once (`reseed_offsets`). The returned centroids are the means of the returned
    labels, so counts and means always describe the assignment exactly.
    """
    heads, n, _ = points.shape
    num_clusters = centroids.shape[1]
    offsets = to_device(reseed_offsets(generator, iters, heads, n), points.device)
    draws = reseed_points(
        offsets.unsqueeze(-1), torch.arange(num_clusters, device=points.device), num_clusters, n
    )
    for it in range(iters):
        labels = assign(points, centroids)
        centroids, totals = cluster_means(points, labels, num_clusters, centroids, weights)
        if it < iters - 1:
            reseeded = torch.gather(points, 1, draws[it].unsqueeze(-1).expand(-1, -1, points.shape[-1]))
            centroids = torch.where((totals == 0).unsqueeze(-1), reseeded, centroids)
    labels = assign(points, centroids)
    centroids, _ = cluster_means(points, labels, num_clusters, centroids, weights)
    return centroids, labels


def reseed_offsets(generator: torch.Generator, iters: int, heads: int, num_points: int) -> torch.Tensor:
    """Random offsets `[iters - 1, heads]` that place empty clusters after each Lloyd iteration but
    the last (`reseed_points`), drawn up front: both solvers draw them alike, and a task draws
    (iters - 1) x heads numbers rather than that many times its clusters (a 64K-token build:
    4.7M draws, ~25 ms of host time, down to 9K)."""
    return torch.randint(0, num_points, (max(0, iters - 1), heads), generator=generator)


def reseed_points(
    offsets: torch.Tensor,
    cluster: torch.Tensor,
    num_clusters: int | torch.Tensor,
    num_points: int | torch.Tensor,
) -> torch.Tensor:
    """The point that cluster `cluster` of `num_clusters` moves to if it is left empty:
    (offset + cluster * num_points // num_clusters) mod num_points. Over the random offset it is a
    uniformly random point, and different clusters get different points (when there are no more
    clusters than points). Broadcasts, so one call serves all heads, iterations and (with
    per-cluster sizes) segments."""
    return (offsets + cluster * num_points // num_clusters) % num_points


@dataclass(frozen=True)
class KMeansTask:
    """Lloyd iterations over `points [H, n, d]` from `init [H, K, d]`, plus the member means of `values`.

    Empty clusters are re-seeded from `generator` between iterations (as `lloyd`);
    `weights [H, n]` weigh the points (the counts of child clusters at a coarser level).
    """

    points: torch.Tensor
    values: torch.Tensor
    init: torch.Tensor
    iters: int
    generator: torch.Generator
    weights: torch.Tensor | None = None


@dataclass(frozen=True)
class KMeansResult:
    """Key centroids `[H, K, d]`, value means `[H, K, d]` (0 for an empty cluster), total weight per
    cluster `[H, K]` and each point's cluster `[H, n]` int64, all on the points' device."""

    centroids: torch.Tensor
    value_means: torch.Tensor
    totals: torch.Tensor
    labels: torch.Tensor


Solver = Callable[[Sequence[KMeansTask]], list[KMeansResult]]


def solve_each(tasks: Sequence[KMeansTask]) -> list[KMeansResult]:
    """The reference solver: one task after another with `lloyd`."""
    results = []
    for task in tasks:
        centroids, labels = lloyd(task.points, task.init, task.iters, task.generator, task.weights)
        fallback = torch.zeros_like(task.values[:, :1]).expand(-1, centroids.shape[1], -1)
        value_means, totals = cluster_means(task.values, labels, centroids.shape[1], fallback, task.weights)
        results.append(KMeansResult(centroids, value_means, totals, labels))
    return results
