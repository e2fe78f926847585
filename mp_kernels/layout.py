"""The batched, ragged tensors the kernels read: a paged KV pool and per-request cluster indices.

Everything is addressed the way SGLang addresses its pool, so a backend can hand its own buffers
over without copies:

* KV pool: `k_buffer`/`v_buffer [num_slots, H_kv, d]`. Token `t` of batch entry `b` lives in slot
  `page_table[table_rows[b], t // page_size] * page_size + t % page_size`. With page size 1 this is
  SGLang's `req_to_token[req_pool_indices[b], t]`.
* Cluster index: each level stores the clusters of all requests as rows `[R, H_kv, ...]`; request
  `b` owns rows `cluster_start[b] : cluster_start[b] + num_clusters[b]` and its cluster ids are
  local (0-based) within that range. `max_clusters` is a static bound (grid and workspace sizes do
  not depend on data, so a decode step can be captured in a CUDA graph).

`pack_indices` turns reference `ClusterIndex` objects into this layout (tests, benchmarks, and a
description of the layout by example).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mp_sglang.reference import ClusterIndex


@dataclass(frozen=True)
class PagedKV:
    """SGLang-style KV pool of one layer plus the token → slot map of the batch."""

    k_buffer: torch.Tensor
    v_buffer: torch.Tensor
    page_table: torch.Tensor
    table_rows: torch.Tensor
    page_size: int = 1


@dataclass(frozen=True)
class LevelTensors:
    """One level of centroids of the whole batch.

    counts: `[R, H]` int32 tokens under each cluster (0: empty, never looked at).
    parent: `[R, H]` int32 local id of each cluster's parent in the next coarser level, or None at
        the coarsest level.
    """

    centroids: torch.Tensor
    value_centroids: torch.Tensor
    counts: torch.Tensor
    cluster_start: torch.Tensor
    num_clusters: torch.Tensor
    max_clusters: int
    parent: torch.Tensor | None = None


@dataclass(frozen=True)
class BatchIndex:
    """The cluster indices of a batch (levels fine → coarse) and what is always exact.

    members `[M, H]` int32: token positions grouped by level-0 cluster; cluster row `r` of head `h`
    owns `members[member_start[r, h] : member_start[r, h] + counts[r, h], h]`.
    sink_len / recent_start / seq_lens `[B]` int32: tokens `[0, sink_len)` and
    `[recent_start, seq_len)` are always attended exactly.
    """

    levels: tuple[LevelTensors, ...]
    member_start: torch.Tensor
    members: torch.Tensor
    sink_len: torch.Tensor
    recent_start: torch.Tensor
    seq_lens: torch.Tensor


def pack_indices(
    indices: Sequence[ClusterIndex], dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> BatchIndex:
    """Lay out the reference indices of a batch (one per request, same layer) for the kernels."""
    num_levels = len(indices[0].levels)
    levels = []
    for lvl in range(num_levels):
        per_req = [index.levels[lvl] for index in indices]
        sizes = [level.centroids.shape[1] for level in per_req]
        parents = None
        if lvl + 1 < num_levels:
            parents = _rows([index.levels[lvl + 1].labels.t() for index in indices], torch.int32, device)
        levels.append(
            LevelTensors(
                centroids=_rows([lv.centroids.transpose(0, 1) for lv in per_req], dtype, device),
                value_centroids=_rows([lv.value_centroids.transpose(0, 1) for lv in per_req], dtype, device),
                counts=_rows([lv.counts.t() for lv in per_req], torch.int32, device),
                cluster_start=_int32(_exclusive_cumsum(sizes), device),
                num_clusters=_int32(sizes, device),
                max_clusters=max(sizes),
                parent=parents,
            )
        )
    member_start, members = _members(indices, device)
    return BatchIndex(
        levels=tuple(levels),
        member_start=member_start,
        members=members,
        sink_len=_int32([min(index.start, index.num_tokens) for index in indices], device),
        recent_start=_int32([index.recent_start for index in indices], device),
        seq_lens=_int32([index.num_tokens for index in indices], device),
    )


def contiguous_pool(
    keys: Sequence[torch.Tensor],
    values: Sequence[torch.Tensor],
    page_size: int = 1,
    dtype: torch.dtype = torch.float32,
    generator: torch.Generator | None = None,
) -> PagedKV:
    """A pool holding each request's `[H, seq, d]` cache in shuffled pages (tests, benchmarks).

    Pages are scattered at random over the pool, so a kernel that ignores the page table fails.
    """
    pages_per_req = [-(-k.shape[1] // page_size) for k in keys]
    total_pages = sum(pages_per_req) + 1
    perm = torch.randperm(total_pages, generator=generator)
    heads, dim = keys[0].shape[0], keys[0].shape[2]
    k_buffer = torch.randn(total_pages * page_size, heads, dim, generator=generator).to(dtype)
    v_buffer = torch.randn(total_pages * page_size, heads, dim, generator=generator).to(dtype)
    table = torch.zeros(len(keys), max(pages_per_req + [1]), dtype=torch.int32)
    used = 0
    for b, (k, v) in enumerate(zip(keys, values, strict=True)):
        pages = perm[used : used + pages_per_req[b]]
        used += pages_per_req[b]
        table[b, : len(pages)] = pages.to(torch.int32)
        pos = torch.arange(k.shape[1])
        slots = pages[pos // page_size] * page_size + pos % page_size
        k_buffer[slots] = k.transpose(0, 1).to(dtype)
        v_buffer[slots] = v.transpose(0, 1).to(dtype)
    return PagedKV(k_buffer, v_buffer, table, torch.arange(len(keys), dtype=torch.int32), page_size)


def _members(
    indices: Sequence[ClusterIndex], device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    starts, members = [], []
    base = 0
    for index in indices:
        level = index.levels[0]
        labels = level.labels  # [H, num_clustered]
        order = torch.sort(labels, dim=-1, stable=True).indices
        members.append((order + index.start).t())
        counts = level.counts.t()  # [C, H]
        starts.append(base + torch.cumsum(counts, 0) - counts)
        base += labels.shape[1]
    return _rows(starts, torch.int32, device), _rows(members, torch.int32, device)


def _rows(parts: Sequence[torch.Tensor], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    return torch.cat([p.to(dtype) for p in parts], dim=0).contiguous().to(device)


def _int32(values: Sequence[int], device: torch.device | str) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.int32, device=device)


def _exclusive_cumsum(sizes: Sequence[int]) -> list[int]:
    out, total = [], 0
    for size in sizes:
        out.append(total)
        total += size
    return out
