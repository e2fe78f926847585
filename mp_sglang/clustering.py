"""K-means batched over KV heads, in plain torch: the clustering half of the reference.

Every function takes `[heads, n, d]` tensors and treats the heads independently. Index building
and the blockwise update (reference.py) are written in terms of these; the Triton k-means kernel
computes the same assignment and mean steps.
"""

from __future__ import annotations

import torch


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
    """`assign` through `mp_kernels.kmeans.assign` (one segment): the CUDA path, and on the CPU
    under Triton's interpreter (backend="triton") for tests."""
    from mp_kernels.kmeans import assign as segment_assign  # here: mp_kernels imports this module

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


def block_sizes(num_tokens: int, block: int) -> list[int]:
    """Split `num_tokens` into k-means blocks of `block` keys; the final block holds [block/2, 3/2 block).

    A short remainder joins the final block rather than forming a poorly clustered block of its own.
    """
    full, rem = divmod(num_tokens, block)
    if 0 < rem < block // 2 and full > 0:
        full, rem = full - 1, rem + block
    return [block] * full + ([rem] if rem else [])


def clusters_for(num_tokens: int, tokens_per_cluster: int) -> int:
    """How many clusters a block of `num_tokens` keys gets (at least one)."""
    return max(1, num_tokens // tokens_per_cluster)


def max_clusters(clustered: int, tokens_per_cluster: int, kmeans_block: int) -> int:
    """The most clusters an index of at most `clustered` tokens holds, however its blocks fell.

    Each block gets `clusters_for` its size, which rounds down except that a block shorter than
    `tokens_per_cluster` still gets one. Blocks are at least `kmeans_block // 2` tokens long
    (`block_sizes`), except a request's first block while the request is short, so with the usual
    settings at most one block rounds up.
    """
    short_blocks = 1
    if kmeans_block // 2 < tokens_per_cluster:
        short_blocks += -(-clustered // max(1, kmeans_block // 2))
    return max(0, clustered) // tokens_per_cluster + short_blocks


def seeded(seed: int, salt: int) -> torch.Generator:
    """A (CPU) generator fixed by the config's seed and a position, so equal inputs cluster equally."""
    return torch.Generator().manual_seed((seed * 1_000_003 + salt) % (1 << 63))


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor (random picks, per-row metadata) onto `device` without waiting for the
    GPU's queue to drain.

    A copy from pageable memory blocks the host until the stream catches up; a copy from pinned
    memory is queued instead (the host allocator keeps the buffer until the copy has run).
    """
    if torch.device(device).type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
