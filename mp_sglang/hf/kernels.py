"""Decode steps of the transformers integration through the mp_kernels chain (`multipole_decode`).

The kernels read keys and values from a pool `[slots, H_kv, d]` through a page table (page size 1).
transformers' cache is `[B, H_kv, T, d]` per layer, maybe with left padding, which no page table
over slots of `[H_kv, d]` can address without a copy. So each layer keeps `SlotKV`: every batch
row's valid tokens, token-major, filled at prefill and grown by one token per decode step (capacity
doubles, so an append costs O(1) amortised and a step never copies the context).

The rows' `ClusterIndex` objects are laid out for the kernels (`pack_indices`) only when one of
them changed its clusters, i.e. at a fold every `update_block` tokens; between folds only the
per-row lengths move, and they go up in one small copy per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from mp_kernels.decode import multipole_decode
from mp_kernels.dispatch import to_device
from mp_kernels.layout import BatchIndex, PagedKV
from mp_sglang.method.config import MultipoleConfig
from mp_sglang.method.packing import pack_indices
from mp_sglang.method.reference import ClusterIndex, ClusterLevel, build_index
from mp_sglang.method.rope import Rope


class SlotKV:
    """One layer's keys/values for the kernels: row b's token t in slot `b * capacity + t`."""

    def __init__(self, batch: int, heads: int, dim: int, dtype: torch.dtype, device: torch.device) -> None:
        self.lengths = [0] * batch
        self._allocate(torch.zeros(2, batch, 0, heads, dim, dtype=dtype, device=device), 0)

    def holds(self, key: torch.Tensor) -> bool:
        """Whether this holds rows like those of the cache `key [B, H_kv, T, d]` (batch, dtype, device)."""
        kv = self._kv
        return len(self.lengths) == key.shape[0] and kv.dtype == key.dtype and kv.device == key.device

    def write(self, row: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Replace row `row` with `keys`/`values` `[H_kv, n, d]` (a prefill, or a cache that moved on)."""
        self._place(row, 0, keys, values)

    def append(self, row: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Add the step's tokens `[H_kv, n, d]` after row `row`'s last one."""
        self._place(row, self.lengths[row], keys, values)

    def paged(self) -> PagedKV:
        """The kernels' view of the buffers (no copy)."""
        _, batch, capacity, heads, dim = self._kv.shape
        flat = self._kv.view(2, batch * capacity, heads, dim)
        return PagedKV(flat[0], flat[1], self._page_table, self._table_rows, 1)

    def _place(self, row: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        end = start + keys.shape[1]
        if end > self._kv.shape[2]:
            self._allocate(self._kv, max(end, 2 * self._kv.shape[2]))
        self._kv[0, row, start:end] = keys.transpose(0, 1)
        self._kv[1, row, start:end] = values.transpose(0, 1)
        self.lengths[row] = end

    def _allocate(self, old: torch.Tensor, capacity: int) -> None:
        _, batch, used, heads, dim = old.shape
        self._kv = old.new_zeros(2, batch, capacity, heads, dim)
        self._kv[:, :, :used] = old
        slots = torch.arange(batch * capacity, dtype=torch.int32, device=old.device)
        self._page_table = slots.view(batch, capacity)
        self._table_rows = torch.arange(batch, dtype=torch.int32, device=old.device)


class PackedIndexes:
    """A batch's indexes in the kernels' layout, packed again only when a row's clusters changed.

    `update_index` keeps an index's `levels` object until a fold replaces it, so comparing the
    levels by identity tells a fold (or a rebuild) from a step that only grew the recent window.
    A row without an index (below `dense_below`, attended densely by the reference path) gets an
    index with no sinks and no clusters, so every token is in its exact recent window; it is made
    once and kept, so that it never looks changed.
    """

    def __init__(self) -> None:
        self._levels: tuple[tuple[ClusterLevel, ...], ...] = ()
        self._packed: BatchIndex | None = None
        self._all_exact: ClusterIndex | None = None

    def complete(
        self, indexes: Sequence[ClusterIndex | None], cfg: MultipoleConfig, kv: PagedKV
    ) -> list[ClusterIndex]:
        """`indexes` with the all-exact stand-in in place of None."""
        if self._all_exact is None and any(index is None for index in indexes):
            _, heads, dim = kv.k_buffer.shape
            empty = torch.zeros(heads, 0, dim, device=kv.k_buffer.device)
            self._all_exact = build_index(empty, empty, replace(cfg, sink_tokens=0))
        return [self._all_exact if index is None else index for index in indexes]

    def get(self, indexes: Sequence[ClusterIndex], kv: PagedKV) -> BatchIndex:
        """The packed layout of `indexes` (from `complete`), in the pool's dtype and device."""
        levels = tuple(index.levels for index in indexes)
        if (
            self._packed is None
            or len(levels) != len(self._levels)
            or any(a is not b for a, b in zip(levels, self._levels, strict=True))
        ):
            self._packed = pack_indices(indexes, kv.k_buffer.dtype, kv.k_buffer.device)
            self._levels = levels
        return self._packed


def kernel_decode(
    q: torch.Tensor,
    kv: SlotKV,
    indexes: Sequence[ClusterIndex | None],
    packed: PackedIndexes,
    cfg: MultipoleConfig,
    rope: Rope | None,
    backend: str | None = None,
) -> torch.Tensor:
    """Multipole attention `[B, Hq, d]` of decode queries `q [B, Hq, d]` over `kv`'s rows.

    indexes: per row, covering all its tokens, or None for a row attended densely.
    rope: the model's RoPE under the windowed-RoPE frame (the query is rotated into it), else None.
    backend: the kernels' backend (None: Triton on CUDA, their torch references elsewhere).
    """
    pool = kv.paged()
    indexes = packed.complete(indexes, cfg, pool)
    lengths = kv.lengths
    budgets = [
        cfg.budget_tokens(n) if index.num_clustered else 0 for n, index in zip(lengths, indexes, strict=True)
    ]
    sinks = [min(index.start, n) for n, index in zip(lengths, indexes, strict=True)]
    per_row = to_device(torch.tensor([lengths, sinks, budgets], dtype=torch.int32), q.device)
    # Exact tokens of a row: sinks + selected clusters (<= its budget) + its recent window.
    max_exact = max(
        s + b + max(0, n - index.recent_start)
        for n, s, b, index in zip(lengths, sinks, budgets, indexes, strict=True)
    )
    index = replace(packed.get(indexes, pool), seq_lens=per_row[0], sink_len=per_row[1])
    return multipole_decode(
        q,
        _lookup_query(q, lengths, cfg, rope),
        pool,
        index,
        per_row[2],
        max(max_exact, 1),
        level_budget_multiplier=cfg.level_budget_multiplier,
        backend=backend,
    )


def _lookup_query(
    q: torch.Tensor, lengths: list[int], cfg: MultipoleConfig, rope: Rope | None
) -> torch.Tensor:
    """q in the index's frame: rotated from its position (the row's last) to `rope_window`."""
    if rope is None:
        return q
    cos, sin = (to_device(t, q.device) for t in rope.query_frame(lengths, cfg.rope_window, "cpu"))
    return rope.apply(q, cos.unsqueeze(1), sin.unsqueeze(1), out_dtype=q.dtype)
