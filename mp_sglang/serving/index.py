"""Per-request cluster indexes kept beside sglang's KV pool, keyed by req_pool_idx.

sglang gives a request row (req_pool_idx) to a new request without telling the attention
backend, but it leaves two signals in `ReqToTokenPool`: `req_generation` (bumped on every
allocation of a row, never reset) and `free_slots` (rows of finished or aborted requests).
`IndexTable.sync` reads both at every forward pass and drops the index of any row that was freed
or handed to another request, so the table holds at most one entry per row and cannot grow as
requests come and go.

One `ClusterIndex` per (row, layer), built or brought up to date from the keys in the pool on
demand, on the pool's device. Both decode paths use it; the kernel path (`mp_sglang.serving.kernel_path`)
keeps one index per request over all layers' heads, packs it for the kernels, and asks for all
requests of a step at once (`ensure_many`), so their builds and folds run as a few batched
k-means rounds.

Indexes are held without their window copies (`reference.without_window`); a fold reads the
window back from the pool, which holds those tokens anyway. The copies (float32, up to 1.5
k-means blocks of every head) would otherwise be most of a long request's index memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import NamedTuple

import torch

from mp_kernels.kmeans_reference import Solver, solve_each
from mp_sglang.method.config import MultipoleConfig
from mp_sglang.method.kmeans_tasks import Steps, drive
from mp_sglang.method.reference import (
    ClusterIndex,
    build_index_steps,
    update_index_steps,
    update_windowless_index_steps,
    without_window,
)
from mp_sglang.method.rope import Rope

KVReader = Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]


def build_due(index: ClusterIndex | None, seq_len: int) -> bool:
    """Whether a decode step over `seq_len` cached tokens needs this index built afresh: there is
    none, or it covers more tokens than came before the step (the cache was cut or replaced)."""
    return index is None or index.num_tokens > seq_len - 1


def fold_due(index: ClusterIndex, seq_len: int, cfg: MultipoleConfig) -> bool:
    """Whether a cache of `seq_len` tokens has outgrown the index's recent window (see `update_index`)."""
    return seq_len - index.recent_start >= cfg.recent_window + cfg.update_block


@dataclass(frozen=True)
class IndexWant:
    """A (request row, layer) whose index a decode step over `seq_len` cached tokens needs."""

    row: int
    generation: int
    layer_id: int
    seq_len: int
    read: KVReader


class _Job(NamedTuple):
    """Upkeep due on one (row, layer): where the result goes, the steps, and the tokens they cluster."""

    entry: _Entry
    layer_id: int
    make_steps: Callable[[], Steps[ClusterIndex]]
    tokens: int


@dataclass
class _Entry:
    generation: int
    layers: dict[int, ClusterIndex] = field(default_factory=dict)


class IndexTable:
    """Cluster indexes of the requests in flight, one entry per req_to_token row."""

    def __init__(self, num_rows: int) -> None:
        self.num_rows = num_rows
        self._entries: dict[int, _Entry] = {}

    def sync(self, generations: torch.Tensor, free_rows: Iterable[int]) -> None:
        """Drop the entries of rows freed, or re-allocated to another request, since they were made."""
        if not self._entries:
            return
        free = set(free_rows)
        stale = [
            row
            for row, entry in self._entries.items()
            if row in free or int(generations[row]) != entry.generation
        ]
        self.drop(stale)

    def drop(self, rows: Iterable[int]) -> None:
        """Forget the indexes of `rows`; the next `ensure` rebuilds them from the pool."""
        for row in rows:
            self._entries.pop(row, None)

    def ensure(
        self,
        row: int,
        generation: int,
        layer_id: int,
        seq_len: int,
        read: KVReader,
        cfg: MultipoleConfig,
        rope: Rope | None,
    ) -> ClusterIndex:
        """The index of `row`'s layer for a decode step over `seq_len` cached tokens.

        It covers the tokens before the step's own (a server writes the step's key during the
        forward) and is folded (`update_index`) only when its recent window is due; until then it
        lags the cache, and the tokens past it are attended exactly (`reference.decode_view`), so
        nothing is read or copied per token. `read(start, end)` returns the request's keys/values
        `[H_kv, end - start, d]` from the pool (post-RoPE). A missing index, or one covering more
        tokens than the cache now holds, is built afresh (`build_index`), which is how radix-cache
        prefix hits and chunked prefills get indexed: from what the pool holds.
        """
        return self.ensure_many([IndexWant(row, generation, layer_id, seq_len, read)], cfg, rope)[0]

    def ensure_many(
        self,
        wants: Sequence[IndexWant],
        cfg: MultipoleConfig,
        rope: Rope | None,
        solve: Solver = solve_each,
        group_tokens: int = 1 << 17,
        window_dtype: torch.dtype = torch.float32,
    ) -> list[ClusterIndex]:
        """`ensure` for many (row, layer) pairs at once: the builds and folds due run in lockstep
        (`kmeans_tasks.drive`), each round's k-means problems solved by one `solve` call. A fold
        holds its window in `window_dtype` (`reference.with_window`).

        Work is taken in groups of about `group_tokens` tokens to cluster (at least one pair a
        group), which bounds the float32 copies held at once: with 8 KV heads of 128 dims, keys and
        values cost 8 KiB a token, so the default group holds about 1 GiB.
        """
        jobs: list[_Job] = []
        for want in wants:
            if not 0 <= want.row < self.num_rows:
                raise IndexError(f"req_pool_idx {want.row} outside the table of {self.num_rows} rows")
            entry = self._entry(want.row, want.generation)
            index = entry.layers.get(want.layer_id)
            before = want.seq_len - 1
            if build_due(index, want.seq_len):
                make = partial(_build_steps, want.read, before, cfg, rope)
                jobs.append(_Job(entry, want.layer_id, make, before))
            elif fold_due(index, before, cfg):
                make = partial(_fold_steps, index, want.read, before, cfg, window_dtype)
                jobs.append(_Job(entry, want.layer_id, make, before - index.window_start))
        for group in _groups(jobs, group_tokens):
            indexes = drive([job.make_steps() for job in group], solve)
            for job, index in zip(group, indexes, strict=True):
                job.entry.layers[job.layer_id] = without_window(index)
        return [self._entries[want.row].layers[want.layer_id] for want in wants]

    def upkeep_due(
        self, row: int, generation: int, layer_id: int, seq_len: int, cfg: MultipoleConfig
    ) -> bool:
        """Whether `ensure` would build, rebuild or fold this row's index for a step over `seq_len`."""
        index = self.current(row, generation, layer_id)
        return build_due(index, seq_len) or fold_due(index, seq_len - 1, cfg)

    def current(self, row: int, generation: int, layer_id: int) -> ClusterIndex | None:
        """The index held for this request's layer, as it is (None if there is none)."""
        entry = self._entries.get(row)
        return entry.layers.get(layer_id) if entry is not None and entry.generation == generation else None

    def put(self, row: int, generation: int, layer_id: int, index: ClusterIndex) -> None:
        """Hold `index` for this request's layer (an index made elsewhere, e.g. stacked)."""
        self._entry(row, generation).layers[layer_id] = without_window(index)

    def _entry(self, row: int, generation: int) -> _Entry:
        """The row's entry for this request, a fresh one if the row served another before."""
        entry = self._entries.get(row)
        if entry is None or entry.generation != generation:
            entry = self._entries[row] = _Entry(generation)
        return entry

    def __len__(self) -> int:
        """Rows currently holding an index."""
        return len(self._entries)

    def nbytes(self) -> int:
        """Bytes of tensor storage held by all indexes (what must stay flat under churn).

        Counted by storage, not by view: an index's window may be a view that keeps the whole
        tensor it was sliced from alive.
        """
        storages = {}
        for entry in self._entries.values():
            for index in entry.layers.values():
                for tensor in _index_tensors(index):
                    storage = tensor.untyped_storage()
                    storages[storage.data_ptr()] = storage.nbytes()
        return sum(storages.values())


def _index_tensors(index: ClusterIndex) -> list[torch.Tensor]:
    tensors = [index.window_keys, index.window_values]
    for level in index.levels:
        tensors += [level.centroids, level.value_centroids, level.counts, level.labels]
    return tensors


def _build_steps(read: KVReader, end: int, cfg: MultipoleConfig, rope: Rope | None) -> Steps[ClusterIndex]:
    return build_index_steps(*read(0, end), cfg, rope=rope)


def _fold_steps(
    index: ClusterIndex, read: KVReader, end: int, cfg: MultipoleConfig, window_dtype: torch.dtype
) -> Steps[ClusterIndex]:
    """Fold an index held without its window: one read of the pool from the window's first token
    gives the window back and the new tokens."""
    if index.window_start > index.num_tokens:  # the sinks are not full: no window to read back
        return update_index_steps(index, *read(index.num_tokens, end), cfg)
    return update_windowless_index_steps(index, *read(index.window_start, end), cfg, window_dtype)


def _groups(jobs: list[_Job], cap: int) -> Iterator[list[_Job]]:
    """Consecutive runs of jobs clustering at most `cap` tokens together (at least one job each)."""
    group: list[_Job] = []
    size = 0
    for job in jobs:
        if group and size + job.tokens > cap:
            yield group
            group, size = [], 0
        group.append(job)
        size += job.tokens
    if group:
        yield group
