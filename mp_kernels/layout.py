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

`mp_sglang.method.packing.pack_indices` lays the method's reference indexes out this way (tests,
benchmarks, and a description of the layout by example).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


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


@dataclass(frozen=True)
class ExactTokens:
    """The tokens each (request, KV head) attends exactly, in list order: positions
    `[0, sink_len)`, then `chosen[b, h, :num_chosen[b, h]]` (members of the selected clusters, at
    most as many as `chosen` holds), then `[recent_start, seq_len)`.

    Only the chosen tokens are listed. The sinks and the recent window are ranges a kernel
    enumerates for free, so a row with no clusters (all of it recent) costs no list, and has no
    length limit: a request whose index is missing is attended exactly over its whole context.
    sink_len / recent_start / seq_lens `[B]` int32; chosen `[B, H, cap]` int32 (entries past
    num_chosen unspecified); num_chosen `[B, H]` int32.
    """

    sink_len: torch.Tensor
    chosen: torch.Tensor
    num_chosen: torch.Tensor
    recent_start: torch.Tensor
    seq_lens: torch.Tensor

    def lengths(self) -> torch.Tensor:
        """`[B, H]` int64 list lengths."""
        recent = (self.seq_lens - self.recent_start).clamp_min(0).long()
        chosen = self.num_chosen.long().clamp_max(self.chosen.shape[-1])
        return self.sink_len.long().unsqueeze(1) + chosen + recent.unsqueeze(1)

    def positions(self, b: int, h: int) -> torch.Tensor:
        """The list of (request b, head h) as int64 positions (references and tests)."""
        sink = torch.arange(int(self.sink_len[b]))
        chosen = self.chosen[b, h, : int(self.num_chosen[b, h])].long().cpu()
        start = int(self.recent_start[b])
        recent = torch.arange(start, max(int(self.seq_lens[b]), start))
        return torch.cat([sink, chosen, recent]).to(self.chosen.device)

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
