"""Batched k-means steps (assignment, per-cluster sums) for index building and the blockwise update.

Points come in segments, one independent k-means problem each (a k-means block of a request, or
the final block during an update): segment `b` owns point rows `point_start[b] : point_start[b] +
num_points[b]` of `points [N, H, d]` and centroid rows `cluster_start[b] : cluster_start[b] +
num_clusters[b]` of `centroids [R, H, d]`; labels are local cluster ids. All heads of all segments
run in one launch, which is what makes building a 128K-token index a handful of launches.
`lloyd` composes the steps exactly as `kmeans_reference.lloyd` does, and `solve_batched` solves a
round of `kmeans_reference.KMeansTask` problems (index builds and folds of many requests and layers)
with it.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from mp_kernels import kmeans_reference
from mp_kernels.dispatch import exact_dots, to_device, use_triton
from mp_kernels.kmeans_reference import KMeansResult, KMeansTask

# Assignment tiles: points x centroids per program. bf16/fp16 multiply on tensor cores (tuned on
# the H100, docs/perf.md); fp32 FMA tiles beyond 32 x 32 spill (ptxas resource report, sm_90).
ASSIGN_TILE = {"BLOCK_P": 128, "BLOCK_K": 32, "num_warps": 4, "num_stages": 3}
_ASSIGN_TILE_FP32 = {"BLOCK_P": 32, "BLOCK_K": 32, "num_warps": 4}


@torch.no_grad()
def assign(
    points: torch.Tensor,
    centroids: torch.Tensor,
    point_start: torch.Tensor,
    num_points: torch.Tensor,
    cluster_start: torch.Tensor,
    num_clusters: torch.Tensor,
    max_points: int,
    backend: str | None = None,
) -> torch.Tensor:
    """Nearest centroid (squared Euclidean, lowest id on ties) of every point: labels `[N, H]` int32.

    Rows outside every segment are left unwritten.
    """
    seg = (point_start, num_points, cluster_start, num_clusters)
    if not use_triton(points, backend):
        return _assign_reference(points, centroids, *seg)
    labels = torch.empty(points.shape[:2], dtype=torch.int32, device=points.device)
    _launch_assign(points, centroids, *seg, max_points, labels, None)
    return labels


@torch.no_grad()
def assign_and_sum(
    points: torch.Tensor,
    centroids: torch.Tensor,
    point_start: torch.Tensor,
    num_points: torch.Tensor,
    cluster_start: torch.Tensor,
    num_clusters: torch.Tensor,
    max_points: int,
    weights: torch.Tensor | None = None,
    backend: str | None = None,
    prepared: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`assign`, then `cluster_sums` of the new labels: (labels, sums, totals).

    On the GPU one launch does both: each program adds its points to their clusters' sums while
    it still holds them, so a Lloyd iteration reads the points once, not twice. `prepared` is the
    centroids as the kernel multiplies them and their norms (`update_centroids` makes both).
    """
    seg = (point_start, num_points, cluster_start, num_clusters)
    num_rows = centroids.shape[0]
    if not use_triton(points, backend):
        labels = _assign_reference(points, centroids, *seg)
        sums, totals = cluster_sums(points, labels, *seg[:3], num_rows, max_points, weights, backend)
        return labels, sums, totals
    labels = torch.empty(points.shape[:2], dtype=torch.int32, device=points.device)
    sums, totals = _zero_sums(points, num_rows)
    _launch_assign(points, centroids, *seg, max_points, labels, (sums, totals, weights), prepared)
    return labels, sums, totals


def _assign_reference(
    points, centroids, point_start, num_points, cluster_start, num_clusters
) -> torch.Tensor:
    labels = torch.empty(points.shape[:2], dtype=torch.int32, device=points.device)
    for ps, pe, cs, ce in _segments(point_start, num_points, cluster_start, num_clusters):
        if pe > ps and ce > cs:
            got = kmeans_reference.assign(
                points[ps:pe].transpose(0, 1).float(), centroids[cs:ce].transpose(0, 1).float()
            )
            labels[ps:pe] = got.t().to(torch.int32)
    return labels


def _launch_assign(
    points,
    centroids,
    point_start,
    num_points,
    cluster_start,
    num_clusters,
    max_points,
    labels,
    into,
    prepared=None,
):
    """The assignment kernel; with `into = (sums, totals, weights or None)` it also accumulates."""
    heads, dim = points.shape[1], points.shape[2]
    ieee = exact_dots(points.dtype)
    # Centroids in the points' dtype and their fp32 squared norms, made once per call: every
    # program of the launch reads them (through L2), so halving their bytes and computing the
    # norms once (not once per program) is what the tile loop saves.
    cent, norms = prepared or _prepare(centroids, _multiply_dtype(points.dtype))
    sums, totals, weights = into if into is not None else (labels, labels, None)
    w = weights if weights is not None else totals
    tile = _ASSIGN_TILE_FP32 if ieee else ASSIGN_TILE
    _assign_kernel[(point_start.shape[0] * heads, triton.cdiv(max_points, tile["BLOCK_P"]))](
        points,
        cent,
        norms,
        point_start,
        num_points,
        cluster_start,
        num_clusters,
        labels,
        w,
        sums,
        totals,
        heads,
        points.stride(0),
        points.stride(1),
        cent.stride(0),
        cent.stride(1),
        norms.stride(0),
        norms.stride(1),
        labels.stride(0),
        labels.stride(1),
        w.stride(0),
        w.stride(1),
        sums.stride(0),
        sums.stride(1),
        totals.stride(0),
        totals.stride(1),
        D=dim,
        IEEE=ieee,
        ACCUMULATE=into is not None,
        HAS_WEIGHTS=weights is not None,
        **tile,
    )


def _zero_sums(points: torch.Tensor, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    heads, dim = points.shape[1], points.shape[2]
    sums = torch.zeros(num_rows, heads, dim, dtype=torch.float32, device=points.device)
    return sums, torch.zeros(num_rows, heads, dtype=torch.float32, device=points.device)


@torch.no_grad()
def cluster_sums(
    points: torch.Tensor,
    labels: torch.Tensor,
    point_start: torch.Tensor,
    num_points: torch.Tensor,
    cluster_start: torch.Tensor,
    num_rows: int,
    max_points: int,
    weights: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cluster (weighted) sums `[num_rows, H, d]` and total weights `[num_rows, H]`, fp32."""
    heads, dim = points.shape[1], points.shape[2]
    sums, totals = _zero_sums(points, num_rows)
    if not use_triton(points, backend):
        for b in range(point_start.shape[0]):
            ps, n, cs = int(point_start[b]), int(num_points[b]), int(cluster_start[b])
            if n == 0:
                continue
            w = (
                torch.ones(n, heads, device=points.device)
                if weights is None
                else weights[ps : ps + n].float()
            )
            rows = labels[ps : ps + n].long() + cs  # [n, H]
            sums.scatter_add_(
                0, rows.unsqueeze(-1).expand(-1, -1, dim), points[ps : ps + n].float() * w.unsqueeze(-1)
            )
            totals.scatter_add_(0, rows, w)
        return sums, totals
    block_p = 64
    w = weights if weights is not None else totals
    _sums_kernel[(point_start.shape[0] * heads, triton.cdiv(max_points, block_p))](
        points,
        labels,
        w,
        point_start,
        num_points,
        cluster_start,
        sums,
        totals,
        heads,
        points.stride(0),
        points.stride(1),
        labels.stride(0),
        labels.stride(1),
        w.stride(0),
        w.stride(1),
        sums.stride(0),
        sums.stride(1),
        totals.stride(0),
        totals.stride(1),
        HAS_WEIGHTS=weights is not None,
        D=dim,
        BLOCK_P=block_p,
        num_warps=8,
    )
    return sums, totals


def cluster_means(
    points: torch.Tensor,
    labels: torch.Tensor,
    point_start: torch.Tensor,
    num_points: torch.Tensor,
    cluster_start: torch.Tensor,
    fallback: torch.Tensor,
    max_points: int,
    weights: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Member means `[R, H, d]` (an empty cluster keeps its `fallback` row) and totals `[R, H]`."""
    sums, totals = cluster_sums(
        points,
        labels,
        point_start,
        num_points,
        cluster_start,
        fallback.shape[0],
        max_points,
        weights,
        backend,
    )
    return _means(sums, totals, fallback), totals


def _means(sums: torch.Tensor, totals: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """Sums over totals; an empty cluster keeps its `fallback` row."""
    return torch.where(
        totals.unsqueeze(-1) > 0, sums / totals.clamp_min(1e-30).unsqueeze(-1), fallback.float()
    )


def lloyd(
    points: torch.Tensor,
    centroids: torch.Tensor,
    point_start: torch.Tensor,
    num_points: torch.Tensor,
    cluster_start: torch.Tensor,
    num_clusters: torch.Tensor,
    max_points: int,
    iters: int,
    generators: Sequence[torch.Generator],
    weights: torch.Tensor | None = None,
    backend: str | None = None,
    segments: Sequence[tuple[int, int, int, int]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd iterations of every segment, as `kmeans_reference.lloyd` on each: after every iteration but
    the last, a segment's empty clusters move to random points drawn from its own generator
    (`generators[b]`); returns fp32 centroids and labels.

    `segments` (host `(point start, point end, cluster start, cluster end)` per segment, as
    `_segments` reads them from the device tensors) spares that read: with it, no step waits for
    the GPU.
    """
    seg = (point_start, num_points, cluster_start)
    if segments is None:
        segments = list(_segments(point_start, num_points, cluster_start, num_clusters))
    draws = _reseed_rows(points, centroids.shape[0], iters, segments, generators)
    prepared = _prepare(centroids, _multiply_dtype(points.dtype))
    for it in range(iters + 1):
        labels, sums, totals = assign_and_sum(
            points, centroids, *seg, num_clusters, max_points, weights, backend, prepared
        )
        reseed = draws[it] if it < iters - 1 else None
        centroids, low, norms = update_centroids(sums, totals, centroids, points, reseed, backend)
        prepared = (low, norms)
    return centroids, labels


@torch.no_grad()
def update_centroids(
    sums: torch.Tensor,
    totals: torch.Tensor,
    centroids: torch.Tensor,
    points: torch.Tensor,
    reseed: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Lloyd iteration's new centroids `[R, H, d]` fp32 from its `sums` and `totals`, and the
    next assignment's inputs: those centroids in the dtype it multiplies in, and their norms.

    An empty cluster moves to the point row `reseed [R, H]` names, or keeps its centroid when
    there is none. On the GPU one kernel reads the sums once and writes all three: as separate
    torch ops (divide, select, gather, select, cast, square, sum) they were ~15 % of a 64K build's
    GPU time and 7 launches per iteration.
    """
    low_dtype = _multiply_dtype(points.dtype)
    if not use_triton(points, backend):
        new = _means(sums, totals, centroids)
        if reseed is not None:
            seeds = torch.gather(points, 0, reseed.unsqueeze(-1).expand(-1, -1, points.shape[2])).float()
            new = torch.where((totals == 0).unsqueeze(-1), seeds, new)
        return (new, *_prepare(new, low_dtype))
    rows, heads, dim = sums.shape
    new = torch.empty_like(sums)
    low = new if low_dtype == torch.float32 else torch.empty_like(sums, dtype=low_dtype)
    norms = torch.empty_like(totals)
    block = 16
    _update_kernel[(triton.cdiv(rows * heads, block),)](
        sums,
        totals,
        centroids.contiguous(),
        points,
        reseed if reseed is not None else totals,
        new,
        low,
        norms,
        rows * heads,
        heads,
        points.stride(0),
        points.stride(1),
        D=dim,
        BLOCK_V=block,
        RESEED=reseed is not None,
        LOW=low is not new,
        num_warps=4,
    )
    return new, low, norms


def _multiply_dtype(points_dtype: torch.dtype) -> torch.dtype:
    """What the assignment multiplies centroids in: the points' dtype, fp32 where dots are exact."""
    return torch.float32 if exact_dots(points_dtype) else points_dtype


def _prepare(centroids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Centroids as the assignment multiplies them, and their fp32 squared norms."""
    return centroids.to(dtype), centroids.float().square().sum(-1)


def solve_batched(
    tasks: Sequence[KMeansTask],
    points_dtype: torch.dtype | None = None,
    backend: str | None = None,
    max_bytes: int = 1 << 30,
) -> list[KMeansResult]:
    """`kmeans_reference.solve_each`, with the tasks of a round as the segments of a few `lloyd` calls.

    Tasks are grouped by what one launch must share (iterations, weighted or not, head and feature
    sizes) and concatenated up to `max_bytes` of fp32 points at a time. `points_dtype` (e.g. the
    KV cache's bf16) is what the assignment multiplies in; centroids and means stay fp32.
    """
    groups: dict[tuple, list[int]] = {}
    for i, task in enumerate(tasks):
        shape = (task.points.shape[0], task.points.shape[2], task.values.shape[2])
        groups.setdefault((task.iters, task.weights is not None, *shape), []).append(i)
    results: list[KMeansResult | None] = [None] * len(tasks)
    for members in groups.values():
        chunk: list[int] = []
        size = 0
        for i in members:
            task_bytes = tasks[i].points.numel() * 4
            if chunk and size + task_bytes > max_bytes:
                _solve_segments(tasks, chunk, results, points_dtype, backend)
                chunk, size = [], 0
            chunk.append(i)
            size += task_bytes
        _solve_segments(tasks, chunk, results, points_dtype, backend)
    return results  # type: ignore[return-value]


def _solve_segments(tasks, chosen, results, points_dtype, backend) -> None:
    """One `lloyd` over the tasks `chosen`, each one segment; fills their `results`."""
    group = [tasks[i] for i in chosen]
    sizes = [task.points.shape[1] for task in group]
    clusters = [task.init.shape[1] for task in group]
    point_starts = [0, *itertools.accumulate(sizes)][:-1]
    cluster_starts = [0, *itertools.accumulate(clusters)][:-1]
    host = torch.tensor([point_starts, sizes, cluster_starts, clusters], dtype=torch.int32)
    point_start, num_points, cluster_start, num_clusters = to_device(host, group[0].points.device)
    seg = (point_start, num_points, cluster_start)
    points = _rows_of([t.points for t in group], points_dtype or group[0].points.dtype)
    values = _rows_of([t.values for t in group], group[0].values.dtype)
    init = _rows_of([t.init for t in group], torch.float32)
    weights = None if group[0].weights is None else torch.cat([t.weights.t() for t in group])
    generators = [t.generator for t in group]
    bounds = zip(point_starts, sizes, cluster_starts, clusters, strict=True)
    segments = [(ps, ps + n, cs, cs + k) for ps, n, cs, k in bounds]
    centroids, labels = lloyd(
        points, init, *seg, num_clusters, max(sizes), group[0].iters, generators, weights, backend, segments
    )
    fallback = init.new_zeros(init.shape[0], init.shape[1], values.shape[2])
    value_means, totals = cluster_means(values, labels, *seg, fallback, max(sizes), weights, backend)
    starts = zip(point_starts, cluster_starts, strict=True)
    for i, (ps, cs), n, k in zip(chosen, starts, sizes, clusters, strict=True):
        results[i] = KMeansResult(
            centroids=centroids[cs : cs + k].transpose(0, 1),
            value_means=value_means[cs : cs + k].transpose(0, 1),
            totals=totals[cs : cs + k].t(),
            labels=labels[ps : ps + n].t().long(),
        )


def _rows_of(parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """`[H, n_i, d]` parts as the rows `[sum n_i, H, d]` of one tensor in `dtype`: one copy per
    part that transposes and casts at once (a fold's points are ~0.5 GiB per request)."""
    heads, _, dim = parts[0].shape
    out = parts[0].new_empty(sum(part.shape[1] for part in parts), heads, dim, dtype=dtype)
    start = 0
    for part in parts:
        out[start : start + part.shape[1]].copy_(part.transpose(0, 1))
        start += part.shape[1]
    return out


def _reseed_rows(
    points: torch.Tensor,
    num_rows: int,
    iters: int,
    segments: Sequence[tuple[int, int, int, int]],
    generators: Sequence[torch.Generator],
) -> torch.Tensor:
    """Point rows `[iters - 1, num_rows, H]` that each centroid row moves to if it is left empty
    after an iteration, as `kmeans_reference.lloyd` places a segment's (`kmeans_reference.reseed_points`): the
    segments' offsets are drawn up front and the rows computed on the device in one go, so no
    iteration draws, copies or reads anything back."""
    heads = points.shape[1]
    rows = points.new_zeros(max(0, iters - 1), num_rows, heads, dtype=torch.long)  # outside segments: unused
    live = [
        (seg, gen)
        for seg, gen in zip(segments, generators, strict=True)
        if seg[1] > seg[0] and seg[3] > seg[2]
    ]
    if not live or iters < 2:
        return rows
    offsets = torch.stack(
        [kmeans_reference.reseed_offsets(gen, iters, heads, pe - ps) for (ps, pe, _, _), gen in live], 1
    )  # [iters - 1, segments, H]
    bounds = torch.tensor([[ps, pe - ps, cs, ce - cs] for (ps, pe, cs, ce), _ in live]).t()
    uploaded = to_device(torch.cat([offsets.flatten(), bounds.flatten()]), points.device)
    offsets = uploaded[: offsets.numel()].view(offsets.shape)
    start, size, first, count = uploaded[offsets.numel() :].view(4, -1)
    # Every centroid row of a segment: its segment and its cluster id there (sized on the host).
    clustered = sum(ce - cs for (_, _, cs, ce), _ in live)
    segment = torch.repeat_interleave(
        torch.arange(len(live), device=points.device), count, output_size=clustered
    )
    cluster = torch.arange(clustered, device=points.device) - (count.cumsum(0) - count)[segment]
    point = kmeans_reference.reseed_points(
        offsets[:, segment], cluster.unsqueeze(-1), count[segment].unsqueeze(-1), size[segment].unsqueeze(-1)
    )
    rows[:, first[segment] + cluster] = point + start[segment].unsqueeze(-1)
    return rows


def _segments(point_start, num_points, cluster_start, num_clusters):
    for ps, n, cs, c in zip(
        point_start.tolist(), num_points.tolist(), cluster_start.tolist(), num_clusters.tolist(), strict=True
    ):
        yield ps, ps + n, cs, cs + c


@triton.jit
def _assign_kernel(
    points,
    centroids,
    norms,
    point_start,
    num_points,
    cluster_start,
    num_clusters,
    labels,
    weights,
    sums,
    totals,
    H,
    stride_pr,
    stride_ph,
    stride_cr,
    stride_ch,
    stride_nr,
    stride_nh,
    stride_lr,
    stride_lh,
    stride_wr,
    stride_wh,
    stride_sr,
    stride_sh,
    stride_tr,
    stride_th,
    D: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    n = tl.load(num_points + b)
    nc = tl.load(num_clusters + b)
    rows = tl.load(point_start + b).to(tl.int64) + tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    valid = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P) < n
    c0 = tl.load(cluster_start + b).to(tl.int64)
    d = tl.arange(0, D)
    pts = tl.load(
        points + rows[:, None] * stride_pr + h * stride_ph + d[None, :], mask=valid[:, None], other=0.0
    )
    best = tl.full([BLOCK_P], float("inf"), tl.float32)
    best_id = tl.zeros([BLOCK_P], tl.int32)
    for k0 in range(0, nc, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_valid = k < nc
        cent = tl.load(
            centroids + (c0 + k)[:, None] * stride_cr + h * stride_ch + d[None, :],
            mask=k_valid[:, None],
            other=0.0,
        )
        norm = tl.load(norms + (c0 + k) * stride_nr + h * stride_nh, mask=k_valid, other=0.0)
        if IEEE:
            dots = tl.dot(pts.to(tl.float32), tl.trans(cent.to(tl.float32)), input_precision="ieee")
        else:
            dots = tl.dot(pts, tl.trans(cent))  # bf16/fp16 tensor cores; norms stay fp32
        dist = tl.where(k_valid[None, :], norm[None, :] - 2.0 * dots, float("inf"))
        tile_best = tl.min(dist, axis=1)
        tile_id = tl.argmin(dist, axis=1).to(tl.int32) + k0
        better = tile_best < best
        best = tl.where(better, tile_best, best)
        best_id = tl.where(better, tile_id, best_id)
    tl.store(labels + rows * stride_lr + h * stride_lh, best_id, mask=valid)
    if ACCUMULATE:
        w_at = weights + rows * stride_wr + h * stride_wh
        sums_h, totals_h = sums + h * stride_sh, totals + h * stride_th
        _accumulate(pts, c0 + best_id, valid, w_at, sums_h, stride_sr, totals_h, stride_tr, D, HAS_WEIGHTS)


@triton.jit
def _accumulate(
    pts,
    target,
    valid,
    w_at,
    sums_h,
    stride_sr,
    totals_h,
    stride_tr,
    D: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
):
    """Add (weighted) points to rows `target` of one head's sums, and the weights to its totals
    (fp32 atomics); `w_at` points at the points' weights when there are any."""
    if HAS_WEIGHTS:
        w = tl.load(w_at, mask=valid, other=0.0).to(tl.float32)
    else:
        w = tl.where(valid, 1.0, 0.0)
    d = tl.arange(0, D)
    tl.atomic_add(
        sums_h + target[:, None] * stride_sr + d[None, :],
        pts.to(tl.float32) * w[:, None],
        mask=valid[:, None],
        sem="relaxed",
    )
    tl.atomic_add(totals_h + target * stride_tr, w, mask=valid, sem="relaxed")


@triton.jit
def _sums_kernel(
    points,
    labels,
    weights,
    point_start,
    num_points,
    cluster_start,
    sums,
    totals,
    H,
    stride_pr,
    stride_ph,
    stride_lr,
    stride_lh,
    stride_wr,
    stride_wh,
    stride_sr,
    stride_sh,
    stride_tr,
    stride_th,
    HAS_WEIGHTS: tl.constexpr,
    D: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    n = tl.load(num_points + b)
    offs = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    valid = offs < n
    rows = tl.load(point_start + b).to(tl.int64) + offs
    d = tl.arange(0, D)
    lab = tl.load(labels + rows * stride_lr + h * stride_lh, mask=valid, other=0)
    pts = tl.load(
        points + rows[:, None] * stride_pr + h * stride_ph + d[None, :], mask=valid[:, None], other=0.0
    )
    target = tl.load(cluster_start + b).to(tl.int64) + lab
    w_at = weights + rows * stride_wr + h * stride_wh
    sums_h, totals_h = sums + h * stride_sh, totals + h * stride_th
    _accumulate(pts, target, valid, w_at, sums_h, stride_sr, totals_h, stride_tr, D, HAS_WEIGHTS)


@triton.jit
def _update_kernel(
    sums,
    totals,
    centroids,
    points,
    reseed,
    new,
    low,
    norms,
    num_vectors,
    H,
    stride_pr,
    stride_ph,
    D: tl.constexpr,
    BLOCK_V: tl.constexpr,
    RESEED: tl.constexpr,
    LOW: tl.constexpr,
):
    # Vectors are (centroid row, head) pairs of contiguous [R, H, D] tensors.
    v = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    ok = v < num_vectors
    d = tl.arange(0, D)
    at = v.to(tl.int64)[:, None] * D + d[None, :]
    total = tl.load(totals + v, mask=ok, other=0.0)
    mean = tl.math.div_rn(tl.load(sums + at, mask=ok[:, None], other=0.0), tl.maximum(total, 1e-30)[:, None])
    empty = ok & (total == 0.0)
    if RESEED:
        row = tl.load(reseed + v, mask=empty, other=0).to(tl.int64)
        fill = tl.load(
            points + row[:, None] * stride_pr + (v % H).to(tl.int64)[:, None] * stride_ph + d[None, :],
            mask=empty[:, None],
            other=0.0,
        ).to(tl.float32)
    else:
        fill = tl.load(centroids + at, mask=empty[:, None], other=0.0)
    value = tl.where(empty[:, None], fill, mean)
    tl.store(new + at, value, mask=ok[:, None])
    if LOW:
        tl.store(low + at, value.to(low.dtype.element_ty), mask=ok[:, None])
    tl.store(norms + v, tl.sum(value * value, axis=1), mask=ok)
