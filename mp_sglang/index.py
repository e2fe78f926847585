"""Per-request cluster indexes kept beside sglang's KV pool, keyed by req_pool_idx.

sglang gives a request row (req_pool_idx) to a new request without telling the attention
backend, but it leaves two signals in `ReqToTokenPool`: `req_generation` (bumped on every
allocation of a row, never reset) and `free_slots` (rows of finished or aborted requests).
`IndexTable.sync` reads both at every forward pass and drops the index of any row that was freed
or handed to another request, so the table holds at most one entry per row and cannot grow as
requests come and go.

This is the storage of the torch reference path: one `ClusterIndex` per (row, layer), built or
brought up to date from the keys in the pool on demand. The GPU path will keep the same keys
(row, layer) over fixed buffers sized from the pool at start-up.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from mp_sglang.config import MultipoleConfig
from mp_sglang.reference import ClusterIndex, build_index, update_index
from mp_sglang.rope import Rope


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
        keys: torch.Tensor,
        values: torch.Tensor,
        cfg: MultipoleConfig,
        rope: Rope | None,
    ) -> ClusterIndex:
        """The index of `row`'s layer over exactly the request's cached tokens `keys`/`values`.

        `keys`/`values` are `[H_kv, seq, d]` read from the pool (post-RoPE). An index covering a
        prefix of them is brought up to date blockwise (`update_index`); a missing one, or one that
        covers more tokens than the cache now holds, is built afresh (`build_index`), which is how
        radix-cache prefix hits and chunked prefills get indexed: from what the pool holds.
        """
        if not 0 <= row < self.num_rows:
            raise IndexError(f"req_pool_idx {row} outside the table of {self.num_rows} rows")
        entry = self._entries.get(row)
        if entry is None or entry.generation != generation:
            entry = self._entries[row] = _Entry(generation)
        index = entry.layers.get(layer_id)
        seq = keys.shape[1]
        if index is None or index.num_tokens > seq:
            index = build_index(keys, values, cfg, rope=rope)
        elif index.num_tokens < seq:
            index = update_index(index, keys[:, index.num_tokens :], values[:, index.num_tokens :], cfg)
        entry.layers[layer_id] = index
        return index

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
