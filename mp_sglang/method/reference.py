"""Plain-PyTorch reference of Multipole Attention: the specification every kernel is tested against.

One request, one layer, float32 on any device. Shapes: keys and values `[num_kv_heads, seq, d]`
(keys as stored in the cache, i.e. after RoPE), a decode query `[num_q_heads, d]`. Token layout:

    [0, start)                      attention sinks, always exact
    [start, start + num_clustered)  clustered in k-means blocks; only the final block is re-clustered
    [start + num_clustered, seq)    recent window, always exact, folded into the final block
                                    `update_block` tokens at a time once it outgrows `recent_window`
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from mp_kernels.centroid_lookup import ranking_key
from mp_kernels.dispatch import to_device
from mp_kernels.kmeans_reference import KMeansResult, KMeansTask, assign, cluster_sums
from mp_sglang.method.clustering import block_sizes, clusters_for, seeded
from mp_sglang.method.config import MultipoleConfig
from mp_sglang.method.kmeans_tasks import Steps, random_init_task, run
from mp_sglang.method.rope import Rope


@dataclass(frozen=True)
class ClusterLevel:
    """One level of centroids. Level 0 clusters tokens; level l > 0 clusters level l-1's clusters.

    centroids: `[H, C, d]` key centroids (mean of member keys, in the lookup frame).
    value_centroids: `[H, C, d]` mean of member values.
    counts: `[H, C]` int64 number of tokens in each cluster (0 for an empty cluster).
    labels: level 0: `[H, num_clustered]` cluster of each clustered token;
            level l > 0: `[H, C_{l-1}]` parent of each cluster of the level below.
    """

    centroids: torch.Tensor
    value_centroids: torch.Tensor
    counts: torch.Tensor
    labels: torch.Tensor


@dataclass(frozen=True)
class ClusterIndex:
    """The cluster index of one request's layer: tensors a kernel consumes plus block bookkeeping.

    block_tokens: boundaries of the k-means blocks, as token offsets from `start` (first is 0).
    block_clusters: per level, the matching boundaries in cluster ids.
    window_keys / window_values: lookup-frame keys and raw values of the final block and the
        recent window (tokens from `window_start` on): what the blockwise update re-clusters.
    rope: the model's rotary embedding when the index is in the windowed-RoPE frame, else None.
    next_position: the RoPE position the next token added by `update_index` will have.
    """

    levels: tuple[ClusterLevel, ...]
    start: int
    num_clustered: int
    num_tokens: int
    block_tokens: tuple[int, ...]
    block_clusters: tuple[tuple[int, ...], ...]
    window_start: int
    window_keys: torch.Tensor
    window_values: torch.Tensor
    rope: Rope | None
    rope_window: int
    next_position: int

    @property
    def recent_start(self) -> int:
        """First token of the exact recent window."""
        return self.start + self.num_clustered


# --------------------------------------------------------------------------- exact attention


def dense_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Exact softmax attention of one decode query over all cached tokens (GQA aware)."""
    mask = torch.ones(keys.shape[:2], dtype=torch.bool, device=keys.device)
    out, _ = masked_attention(q, keys, values, mask)
    return out


def masked_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the tokens where `mask[kv_head, token]` is set: output `[Hq, d]`, LSE `[Hq]`.

    An empty selection gives output 0 and LSE -inf, which merges as "no contribution".
    """
    qg = _group(q, keys.shape[0]).float()
    logits = qg @ keys.float().transpose(1, 2) / math.sqrt(q.shape[-1])
    logits = logits.masked_fill(~mask.unsqueeze(1), float("-inf"))
    return _softmax_combine(logits, values.float(), q.shape[0])


def merge_partials(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two softmax partials over disjoint sets into the softmax over their union."""
    lse = torch.logaddexp(lse_a, lse_b)
    finite = torch.isfinite(lse)
    safe = torch.where(finite, lse, torch.zeros_like(lse))
    w_a = torch.where(finite, torch.exp(lse_a - safe), torch.zeros_like(lse)).unsqueeze(-1)
    w_b = torch.where(finite, torch.exp(lse_b - safe), torch.zeros_like(lse)).unsqueeze(-1)
    return w_a * out_a + w_b * out_b, lse


def _softmax_combine(
    logits: torch.Tensor, values: torch.Tensor, num_q_heads: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax-weighted sum of `values[h, n, d]` (shared by a GQA group) by `logits[h, g, n]`."""
    lse = torch.logsumexp(logits, dim=-1)
    finite = torch.isfinite(lse)
    weights = torch.exp(logits - torch.where(finite, lse, torch.zeros_like(lse)).unsqueeze(-1))
    out = weights @ values
    return out.reshape(num_q_heads, -1), lse.reshape(num_q_heads)


def _group(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    num_q_heads, dim = q.shape
    if num_q_heads % num_kv_heads:
        raise ValueError(f"num_q_heads ({num_q_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    return q.reshape(num_kv_heads, num_q_heads // num_kv_heads, dim)


# --------------------------------------------------------------------------- index building


def build_index(
    keys: torch.Tensor,
    values: torch.Tensor,
    cfg: MultipoleConfig,
    positions: torch.Tensor | None = None,
    rope: Rope | None = None,
) -> ClusterIndex:
    """Cluster a request's cached keys (after prefill) into blocks of k-means centroids.

    positions: the tokens' RoPE positions (default 0..seq-1); only used with `rope`.
    rope: the model's rotary embedding. With it and `cfg.windowed_rope`, keys are clustered
        un-rotated to position 0 (the windowed-RoPE frame); without it keys are clustered as stored.
    """
    return run(build_index_steps(keys, values, cfg, positions, rope))


def build_index_steps(
    keys: torch.Tensor,
    values: torch.Tensor,
    cfg: MultipoleConfig,
    positions: torch.Tensor | None = None,
    rope: Rope | None = None,
) -> Steps[ClusterIndex]:
    """`build_index` as k-means steps (`kmeans_tasks`): every block is one task of one round."""
    _check_kv(keys, values)
    heads, seq, dim = keys.shape
    frame_rope = rope if cfg.windowed_rope else None
    if positions is None:
        positions = torch.arange(seq, device=keys.device)
        next_position = seq  # known on the host: no read-back from the device
    elif positions.shape != (seq,):
        raise ValueError(f"positions must have shape ({seq},); got {tuple(positions.shape)}")
    else:
        next_position = int(positions[-1]) + 1 if seq else 0
    lookup_keys = _to_lookup_frame(keys, positions, frame_rope)
    start = cfg.sink_tokens
    num_clustered = max(0, seq - start - cfg.recent_window)
    index = ClusterIndex(
        levels=tuple(_empty_level(heads, dim, keys.device) for _ in range(cfg.levels)),
        start=start,
        num_clustered=0,
        num_tokens=seq,
        block_tokens=(0,),
        block_clusters=tuple((0,) for _ in range(cfg.levels)),
        window_start=start,
        window_keys=lookup_keys[:, start:],
        window_values=values.float()[:, start:],
        rope=frame_rope,
        rope_window=cfg.rope_window,
        next_position=next_position,
    )
    return (yield from _append_blocks(index, block_sizes(num_clustered, cfg.kmeans_block), cfg))


def update_index(
    index: ClusterIndex, new_keys: torch.Tensor, new_values: torch.Tensor, cfg: MultipoleConfig
) -> ClusterIndex:
    """Account for newly generated tokens (keys as stored, after RoPE), blockwise.

    New tokens join the exact recent window. Whenever the window reaches
    `recent_window + update_block` tokens, its oldest `update_block` tokens are folded into the
    final block: assigned to the nearest centroids (running means), `update_block //
    tokens_per_cluster` new clusters seeded from them, then `update_iters` warm-started Lloyd
    iterations over the final block alone. A final block grown past 3/2 `kmeans_block` is split
    and re-clustered, so earlier blocks never change.
    """
    return run(update_index_steps(index, new_keys, new_values, cfg))


def update_index_steps(
    index: ClusterIndex, new_keys: torch.Tensor, new_values: torch.Tensor, cfg: MultipoleConfig
) -> Steps[ClusterIndex]:
    """`update_index` as k-means steps: one round per fold."""
    _check_kv(new_keys, new_values)
    if new_keys.shape[0] != index.window_keys.shape[0]:
        raise ValueError(
            f"new_keys has {new_keys.shape[0]} heads; the index has {index.window_keys.shape[0]}"
        )
    count = new_keys.shape[1]
    positions = torch.arange(index.next_position, index.next_position + count, device=new_keys.device)
    lookup_keys = _to_lookup_frame(new_keys, positions, index.rope)
    skip = max(0, index.window_start - index.num_tokens)  # tokens still inside the sink region
    index = replace(
        index,
        num_tokens=index.num_tokens + count,
        next_position=index.next_position + count,
        window_keys=torch.cat([index.window_keys, lookup_keys[:, skip:]], dim=1),
        window_values=torch.cat([index.window_values, new_values.float()[:, skip:]], dim=1),
    )
    return (yield from _fold_while_due(index, cfg))


def update_windowless_index_steps(
    index: ClusterIndex,
    keys: torch.Tensor,
    values: torch.Tensor,
    cfg: MultipoleConfig,
    window_dtype: torch.dtype = torch.float32,
) -> Steps[ClusterIndex]:
    """`update_index_steps` for an index held without its window (`without_window`), from one read
    of the cache: `keys`/`values` `[H, n, d]` are its tokens from `window_start` to the new end,
    as stored (after RoPE). Gives what the index with its window would give, with no copy of the
    window kept in between. `window_dtype` is what the window is held in while the fold runs (see
    `with_window`)."""
    if index.window_start > index.num_tokens:
        raise ValueError("the index's sinks are not full yet: use update_index_steps")
    _check_kv(keys, values)
    count = index.window_start + keys.shape[1] - index.num_tokens
    if count < 0:
        raise ValueError(f"the cache from token {index.window_start} holds fewer tokens than the index")
    grown = replace(index, num_tokens=index.num_tokens + count, next_position=index.next_position + count)
    return (yield from _fold_while_due(with_window(grown, keys, values, window_dtype), cfg))


def _fold_while_due(index: ClusterIndex, cfg: MultipoleConfig) -> Steps[ClusterIndex]:
    while index.num_tokens - index.recent_start >= cfg.recent_window + cfg.update_block:
        index = yield from _fold_recent_tokens(index, cfg)
    return index


def _fold_recent_tokens(index: ClusterIndex, cfg: MultipoleConfig) -> Steps[ClusterIndex]:
    """Move the oldest `update_block` recent tokens into the final block and re-cluster only it."""
    final_size = index.block_tokens[-1] - index.block_tokens[-2] if index.num_clustered else 0
    grown = final_size + cfg.update_block
    if final_size == 0 or grown >= cfg.kmeans_block + cfg.kmeans_block // 2:
        index = _drop_final_block(index)
        return (yield from _append_blocks(index, block_sizes(grown, cfg.kmeans_block), cfg))
    old_final = _final_block_level0(index)
    index = _drop_final_block(index)
    return (yield from _append_blocks(index, [grown], cfg, warm_from=old_final))


def _append_blocks(
    index: ClusterIndex, sizes: list[int], cfg: MultipoleConfig, warm_from: ClusterLevel | None = None
) -> Steps[ClusterIndex]:
    """Cluster the window tokens right after the clustered region as new blocks of `sizes` tokens.

    All blocks are clustered in one round (one task each; a block's generator is seeded by where it
    ends). The window is then cut at the last block's start, every earlier block being final. The
    cut is a view: in the usual fold (no split) it is all but nothing of its tensor, and the next
    update concatenates the window into a new tensor anyway, which frees the old one.
    """
    if not sizes:
        return index
    offset = index.recent_start - index.window_start
    bounds = [offset + sum(sizes[:i]) for i in range(len(sizes) + 1)]
    tasks = []
    for lo, hi in itertools.pairwise(bounds):
        keys, values = index.window_keys[:, lo:hi], index.window_values[:, lo:hi]
        generator = seeded(cfg.seed, index.window_start + hi)
        if warm_from is None:
            tasks.append(
                random_init_task(
                    keys, values, clusters_for(hi - lo, cfg.tokens_per_cluster), cfg.kmeans_iters, generator
                )
            )
        else:
            tasks.append(_warm_task(keys, values, warm_from, cfg, generator))
    fine = yield tasks
    blocks = [[_level_of(result)] for result in fine]
    for _ in range(1, cfg.levels):
        coarse = yield [
            _coarse_task(levels[-1], cfg, task.generator) for levels, task in zip(blocks, tasks, strict=True)
        ]
        for levels, result in zip(blocks, coarse, strict=True):
            levels.append(_level_of(result))
    levels = []
    for lvl, old in enumerate(index.levels):
        levels.append(_concat_levels([old] + [block[lvl] for block in blocks]))
    last = bounds[-2]
    block_counts = [[block[lvl].centroids.shape[1] for block in blocks] for lvl in range(cfg.levels)]
    return replace(
        index,
        levels=tuple(levels),
        num_clustered=index.num_clustered + sum(sizes),
        block_tokens=index.block_tokens + tuple(index.block_tokens[-1] + b - offset for b in bounds[1:]),
        block_clusters=tuple(
            cuts + tuple(itertools.accumulate(counts, initial=cuts[-1]))[1:]
            for cuts, counts in zip(index.block_clusters, block_counts, strict=True)
        ),
        window_start=index.window_start + last,
        window_keys=index.window_keys[:, last:],
        window_values=index.window_values[:, last:],
    )


def _warm_task(
    keys: torch.Tensor,
    values: torch.Tensor,
    old: ClusterLevel,
    cfg: MultipoleConfig,
    generator: torch.Generator,
) -> KMeansTask:
    """Re-cluster a grown final block starting from its previous centroids.

    The newest `update_block` keys seed the extra clusters the block is now owed; the rest of
    them join their nearest centroid as running means; then warm-started Lloyd iterations.
    """
    heads, size, dim = keys.shape
    new_keys = keys[:, -cfg.update_block :].float()  # the window may be held in the cache's dtype
    extra = min(
        max(0, clusters_for(size, cfg.tokens_per_cluster) - old.centroids.shape[1]), new_keys.shape[1]
    )
    order = to_device(torch.randperm(new_keys.shape[1], generator=generator), keys.device)  # all heads
    seeds = new_keys[:, order[:extra]]
    rest = new_keys[:, order[extra:]]
    centroids = torch.cat([old.centroids.float(), seeds], dim=1)  # a held level may be compact
    counts = torch.cat([old.counts.float(), new_keys.new_ones(heads, extra)], dim=1)
    sums, added = cluster_sums(rest, assign(rest, centroids), centroids.shape[1])
    centroids = (centroids * counts.unsqueeze(-1) + sums) / (counts + added).clamp_min(1).unsqueeze(-1)
    return KMeansTask(keys, values, centroids, cfg.update_iters, generator)


def _coarse_task(child: ClusterLevel, cfg: MultipoleConfig, generator: torch.Generator) -> KMeansTask:
    """Clusters of a block's clusters, weighted by their counts.

    A coarse centroid is then the count-weighted mean of its children, i.e. the mean of all keys
    under it, so a coarse cluster approximates its tokens exactly as a fine one would.
    """
    coarse = max(1, math.ceil(child.centroids.shape[1] / cfg.level_ratio))
    weights = child.counts.to(child.centroids.dtype)
    return random_init_task(
        child.centroids, child.value_centroids, coarse, cfg.kmeans_iters, generator, weights
    )


def _level_of(result: KMeansResult) -> ClusterLevel:
    """A block's level from its k-means solution (cluster ids local to the block)."""
    return ClusterLevel(result.centroids, result.value_means, result.totals.round().long(), result.labels)


def _concat_levels(parts: list[ClusterLevel]) -> ClusterLevel:
    """Append blocks' clusters to a level; each block's local ids move past the ones before it.
    The level keeps the dtypes of its first part (see `compact_levels`)."""
    offsets = itertools.accumulate((part.centroids.shape[1] for part in parts[:-1]), initial=0)
    first = parts[0]
    return ClusterLevel(
        centroids=torch.cat([part.centroids.to(first.centroids.dtype) for part in parts], dim=1),
        value_centroids=torch.cat(
            [part.value_centroids.to(first.value_centroids.dtype) for part in parts], dim=1
        ),
        counts=torch.cat([part.counts for part in parts], dim=1),
        labels=torch.cat(
            [
                (part.labels + offset).to(first.labels.dtype)
                for part, offset in zip(parts, offsets, strict=True)
            ],
            dim=1,
        ),
    )


def compact_levels(index: ClusterIndex, dtype: torch.dtype) -> ClusterIndex:
    """The index with its centroids held in `dtype` (e.g. the cache's bf16) and its labels in int32.

    For a holder that decodes from its own packed copy in that dtype (the GPU backend's buffers)
    and keeps the index only to fold it: later folds append in these dtypes (`_concat_levels`), so
    the whole level is copied at half the bytes each fold and held in half the memory. Warm starts
    and means are still computed in float32.
    """
    levels = tuple(
        replace(
            level,
            centroids=level.centroids.to(dtype),
            value_centroids=level.value_centroids.to(dtype),
            labels=level.labels.to(torch.int32),
        )
        for level in index.levels
    )
    return replace(index, levels=levels)


def _drop_final_block(index: ClusterIndex) -> ClusterIndex:
    """Forget the final block's clusters; its tokens return to the (re-clusterable) window."""
    if len(index.block_tokens) < 2:
        return index
    token_cut = index.block_tokens[-2]
    cuts = [bounds[-2] for bounds in index.block_clusters]
    levels = []
    for lvl, level in enumerate(index.levels):
        member_cut = token_cut if lvl == 0 else cuts[lvl - 1]
        levels.append(
            ClusterLevel(
                centroids=level.centroids[:, : cuts[lvl]],
                value_centroids=level.value_centroids[:, : cuts[lvl]],
                counts=level.counts[:, : cuts[lvl]],
                labels=level.labels[:, :member_cut],
            )
        )
    return replace(
        index,
        levels=tuple(levels),
        num_clustered=token_cut,
        block_tokens=index.block_tokens[:-1],
        block_clusters=tuple(bounds[:-1] for bounds in index.block_clusters),
    )


def _final_block_level0(index: ClusterIndex) -> ClusterLevel:
    level = index.levels[0]
    first = index.block_clusters[0][-2]
    return ClusterLevel(
        centroids=level.centroids[:, first:],
        value_centroids=level.value_centroids[:, first:],
        counts=level.counts[:, first:],
        labels=level.labels[:, index.block_tokens[-2] :] - first,
    )


def stack_heads(indexes: Sequence[ClusterIndex]) -> ClusterIndex:
    """Indexes of the same tokens (e.g. every layer of a request) as one index over all their heads.

    Heads are independent everywhere in the method, and indexes built from the same number of
    tokens with the same settings have the same blocks, so one fold of the stacked index does the
    work of one fold per part in a fraction of the launches. `heads_of` takes a part back out.
    """
    first = indexes[0]
    shared = _shared_fields(first)
    for other in indexes[1:]:
        if _shared_fields(other) != shared:
            raise ValueError("stack_heads needs indexes of the same tokens, blocks and frame")

    def cat(tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(tensors, dim=0)

    levels = tuple(
        ClusterLevel(
            centroids=cat([ix.levels[lvl].centroids for ix in indexes]),
            value_centroids=cat([ix.levels[lvl].value_centroids for ix in indexes]),
            counts=cat([ix.levels[lvl].counts for ix in indexes]),
            labels=cat([ix.levels[lvl].labels for ix in indexes]),
        )
        for lvl in range(len(first.levels))
    )
    return replace(
        first,
        levels=levels,
        window_keys=cat([ix.window_keys for ix in indexes]),
        window_values=cat([ix.window_values for ix in indexes]),
    )


def heads_of(index: ClusterIndex, heads: slice) -> ClusterIndex:
    """The index of a range of its heads (views, no copies)."""
    return replace(
        index,
        levels=tuple(
            ClusterLevel(lv.centroids[heads], lv.value_centroids[heads], lv.counts[heads], lv.labels[heads])
            for lv in index.levels
        ),
        window_keys=index.window_keys[heads],
        window_values=index.window_values[heads],
    )


def without_window(index: ClusterIndex) -> ClusterIndex:
    """The index without its window copies (float32 keys and values of up to 1.5 k-means blocks,
    per head): a holder that can read the cache again (`with_window`) keeps only the clusters
    between folds, a fraction of the memory."""
    heads, _, dim = index.window_keys.shape
    return replace(
        index,
        window_keys=index.window_keys.new_zeros(heads, 0, dim),
        window_values=index.window_values.new_zeros(heads, 0, index.window_values.shape[2]),
    )


def with_window(
    index: ClusterIndex, keys: torch.Tensor, values: torch.Tensor, dtype: torch.dtype = torch.float32
) -> ClusterIndex:
    """The index with its window made again from the cache: `keys`/`values` `[H, n, d]` are the
    tokens `[window_start, num_tokens)` as stored (after RoPE), at consecutive positions ending
    just before `next_position` (as a server's are). Undoes `without_window` exactly.

    The window is held in `dtype`: float32 by default; a k-means that multiplies in the cache's
    dtype anyway (the GPU's, `mp_kernels.kmeans`) takes the cache's dtype here, which saves a
    fold two float32 copies of its whole window (values as stored, keys rounded once after their
    float32 un-rotation). Means are taken in float32 either way."""
    _check_kv(keys, values)
    count = max(0, index.num_tokens - index.window_start)
    if keys.shape[1] != count:
        raise ValueError(
            f"the window holds tokens {index.window_start}..{index.num_tokens}; got {keys.shape[1]}"
        )
    positions = torch.arange(index.next_position - count, index.next_position, device=keys.device)
    return replace(
        index,
        window_keys=_to_lookup_frame(keys, positions, index.rope, dtype),
        window_values=values.to(dtype),
    )


def _shared_fields(index: ClusterIndex) -> tuple:
    return (
        index.start,
        index.num_clustered,
        index.num_tokens,
        index.block_tokens,
        index.block_clusters,
        index.window_start,
        index.next_position,
        index.rope_window,
        index.rope is None,
    )


def _empty_level(heads: int, dim: int, device: torch.device) -> ClusterLevel:
    return ClusterLevel(
        centroids=torch.zeros(heads, 0, dim, device=device),
        value_centroids=torch.zeros(heads, 0, dim, device=device),
        counts=torch.zeros(heads, 0, dtype=torch.long, device=device),
        labels=torch.zeros(heads, 0, dtype=torch.long, device=device),
    )


def _to_lookup_frame(
    keys: torch.Tensor, positions: torch.Tensor, rope: Rope | None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Keys as the clustering sees them: un-rotated to position 0 in the windowed-RoPE frame.

    Computed in float32 (angles formed in float64), returned in `dtype`: keys come from a bf16 or
    fp16 cache, and a fold turns a whole window back into this frame (`with_window`), where
    float64 would cost several times more.
    """
    if rope is None:
        return keys.to(dtype)
    return rope.apply(keys, *rope.cos_sin(-positions, keys.device, torch.float32), out_dtype=dtype)


def _check_kv(keys: torch.Tensor, values: torch.Tensor) -> None:
    if keys.dim() != 3 or keys.shape != values.shape:
        raise ValueError(
            "keys and values must both be [num_kv_heads, seq, head_dim]; "
            f"got {tuple(keys.shape)} and {tuple(values.shape)}"
        )


# --------------------------------------------------------------------------- decoding


@dataclass(frozen=True)
class Selection:
    """What one decode step attends to.

    exact: `[H_kv, seq]` tokens attended exactly (sinks, recent window, selected clusters).
    approx: per level, `[H_kv, C_l]` clusters whose centroids stand in for their tokens.
    scores: per level, `[H_kv, G, C_l]` q·centroid / sqrt(d) in the lookup frame (G = GQA group).
    """

    exact: torch.Tensor
    approx: tuple[torch.Tensor, ...]
    scores: tuple[torch.Tensor, ...]


def lookup(
    q: torch.Tensor, index: ClusterIndex, cfg: MultipoleConfig, q_position: int | None = None
) -> Selection:
    """Centroid lookup and budgeted selection, coarsest level first.

    Importance of cluster i for query head h is N_i exp(s_hi) normalised over the candidate
    clusters; a GQA group ranks by the mean importance over its query heads, so one selection
    serves the group. Clusters are taken in descending importance while their tokens fit the
    level's budget. At a coarse level, the selected clusters' children become the next level's
    candidates and the rest are approximated by the coarse centroids.
    """
    heads = index.window_keys.shape[0]
    seq = index.num_tokens
    exact = torch.zeros(heads, seq, dtype=torch.bool, device=q.device)
    exact[:, : min(index.start, seq)] = True
    exact[:, index.recent_start :] = True
    if index.num_clustered == 0:
        return Selection(
            exact,
            tuple(torch.zeros_like(lv.counts, dtype=torch.bool) for lv in index.levels),
            tuple(torch.zeros(heads, q.shape[0] // heads, 0, device=q.device) for _ in index.levels),
        )
    position = index.next_position - 1 if q_position is None else q_position
    q_lookup = q.float() if index.rope is None else index.rope.rotate(q.float(), index.rope_window - position)
    qg = _group(q_lookup, heads)
    budget = cfg.budget_tokens(seq)
    approx: list[torch.Tensor] = []
    scores: list[torch.Tensor] = []
    candidates = torch.ones_like(index.levels[-1].counts, dtype=torch.bool)
    for lvl in range(len(index.levels) - 1, -1, -1):
        level = index.levels[lvl]
        score = qg @ level.centroids.transpose(1, 2) / math.sqrt(q.shape[-1])
        eligible = candidates & (level.counts > 0)
        logits = (score + level.counts.clamp_min(1).log().unsqueeze(1)).masked_fill(
            ~eligible.unsqueeze(1), float("-inf")
        )
        importance = torch.softmax(logits, dim=-1).nan_to_num(0.0).mean(dim=1)
        selected = _take_within_budget(
            importance, level.counts, eligible, budget * cfg.level_budget_multiplier**lvl
        )
        approx.insert(0, eligible & ~selected)
        scores.insert(0, score)
        candidates = selected.gather(1, level.labels)
    exact[:, index.start : index.recent_start] = candidates
    return Selection(exact, tuple(approx), tuple(scores))


def _take_within_budget(
    importance: torch.Tensor, counts: torch.Tensor, eligible: torch.Tensor, budget: float
) -> torch.Tensor:
    """Clusters in descending importance while their cumulative size stays within `budget`."""
    ranked = ranking_key(importance).masked_fill(~eligible, -1.0)
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices
    sizes = torch.where(eligible, counts, torch.zeros_like(counts)).gather(1, order)
    fits = (sizes.cumsum(dim=-1) <= budget) & eligible.gather(1, order)
    return torch.zeros_like(eligible).scatter(1, order, fits)


def approximate_attention(
    selection: Selection, index: ClusterIndex, num_q_heads: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Centroid replacement: each approximated cluster adds N_i exp(s_i) Vc_i and N_i exp(s_i)."""
    logits = torch.cat(
        [
            (score + level.counts.clamp_min(1).log().unsqueeze(1)).masked_fill(
                ~mask.unsqueeze(1), float("-inf")
            )
            for score, level, mask in zip(selection.scores, index.levels, selection.approx, strict=True)
        ],
        dim=-1,
    )
    values = torch.cat([level.value_centroids for level in index.levels], dim=1)
    return _softmax_combine(logits, values.float(), num_q_heads)


def decode_view(index: ClusterIndex, seq_len: int) -> ClusterIndex:
    """The index as a decode query over `seq_len` cached tokens sees it.

    An index may lag the cache by tokens not yet folded (a server folds only every
    `update_block` tokens): those tokens belong to the exact recent window, so the index still
    describes the whole cache. For decoding only; `update_index` needs the index itself.
    """
    if seq_len < index.num_tokens:
        raise ValueError(f"the index covers {index.num_tokens} tokens, more than the {seq_len} cached")
    grown = seq_len - index.num_tokens
    return replace(index, num_tokens=seq_len, next_position=index.next_position + grown)


def decode_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    index: ClusterIndex,
    cfg: MultipoleConfig,
    q_position: int | None = None,
) -> torch.Tensor:
    """Multipole attention of one decode query: exact part and centroid part merged by LSE.

    q: `[num_q_heads, d]` after RoPE; keys/values: the request's whole cache `[H_kv, seq, d]`,
    which the index must cover (`update_index` first). q_position defaults to the newest token's.
    """
    _check_kv(keys, values)
    if keys.shape[1] != index.num_tokens:
        raise ValueError(
            f"the index covers {index.num_tokens} tokens but the cache holds {keys.shape[1]}; "
            "call update_index with the new tokens first"
        )
    selection = lookup(q, index, cfg, q_position)
    out_exact, lse_exact = masked_attention(q, keys, values, selection.exact)
    out_approx, lse_approx = approximate_attention(selection, index, q.shape[0])
    out, _ = merge_partials(out_exact, lse_exact, out_approx, lse_approx)
    return out.to(q.dtype)
