"""Fixed buffers holding every layer's cluster index for a whole decode batch, in the kernels' layout.

Allocated once when the backend starts, sized from the KV pool: the requests of a batch together
hold at most as many clustered tokens as the pool has slots (times `index_capacity` when the radix
cache lets requests share prefixes), and a request has at most `context_len / tokens_per_cluster`
clusters (plus one per block for rounding). Every address is fixed, so a CUDA graph captured over
these buffers stays valid, and the index memory cannot grow as requests come and go.

`fill` packs the batch's `ClusterIndex` objects (reference layout, one per request over the heads
of all layers) into the buffers; a request with no index (its context is below `dense_below`, or
it is a padding row of a CUDA graph) gets no clusters and a recent window that starts right after
the sinks, so every one of its tokens is attended exactly.

Each request's index lives in a slot (cluster rows and member rows, with room to grow) that stays
put while the request is in the batch, whatever row of the batch it takes. A fold changes only
the final k-means block, so `fill` then rewrites only what follows the block that was final
before (clusters, counts, member offsets, and a sort of those tokens' labels), not the whole
context; a request that joins gets a new slot after the others; one that leaves frees its slot.
Only when a slot or the free space runs out is everything packed again, each request given
room to grow from half the free rows (the other half is for requests that join later).

A batch whose indexes together outgrow the buffers (requests that share long prefixes through the
radix cache each index them) does not stop the server: the largest indexes that fit are packed,
and the other requests are packed without one, i.e. attended exactly over their whole context,
until a later pass has room for them (`fill` returns which).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from mp_kernels.dispatch import to_device
from mp_kernels.layout import BatchIndex, LevelTensors
from mp_sglang.method.reference import ClusterIndex


@dataclass(frozen=True)
class IndexCapacity:
    """How much one layer's buffers hold: request rows, cluster rows, clustered tokens, and the
    static bound on clusters per request (it sizes the kernels' grids)."""

    rows: int
    cluster_rows: int
    member_rows: int
    max_clusters: int

    def nbytes(self, heads: int, dim: int, dtype: torch.dtype) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        return (
            self.cluster_rows * heads * (2 * dim * element + 8)
            + self.member_rows * heads * 4
            + self.rows * 12
        )


class _Slot(NamedTuple):
    """Where a request's index lives in the buffers: its first cluster row and member row, and how
    many of each it may fill before it must be packed again."""

    cluster_row: int
    cluster_room: int
    member_row: int
    member_room: int


class _Kept(NamedTuple):
    """The leading clusters and clustered tokens of a folded index that are packed already."""

    clusters: int
    tokens: int


# Slots by batch row (None: no index), the (row, kept) pairs to write, and the new end of the slots.
_Placement = tuple[list["_Slot | None"], list[tuple[int, _Kept]], tuple[int, int]]


class IndexBuffers:
    """Every layer's packed index for a batch of up to `capacity.rows` requests.

    A request's index covers the heads of all `layers` (layer-major, `reference.stack_heads`), so
    one copy per tensor and request fills every layer; `batch_index(layer, ...)` is one layer's
    view. Layers share the batch's layout (cluster and member offsets per request): their blocks
    are identical.
    """

    def __init__(
        self,
        capacity: IndexCapacity,
        layers: int,
        heads: int,
        dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        self.capacity = capacity
        self.layers, self.heads = layers, heads
        cap = capacity
        self.centroids = torch.zeros(layers, cap.cluster_rows, heads, dim, dtype=dtype, device=device)
        self.value_centroids = torch.zeros_like(self.centroids)
        self.counts = torch.zeros(layers, cap.cluster_rows, heads, dtype=torch.int32, device=device)
        self.member_start = torch.zeros_like(self.counts)
        self.members = torch.zeros(layers, cap.member_rows, heads, dtype=torch.int32, device=device)
        # cluster_start, num_clusters, recent_start per request row, filled in one copy.
        self.per_row = torch.zeros(3, cap.rows, dtype=torch.int32, device=device)
        self.packed: tuple[ClusterIndex | None, ...] = ()  # by batch row; None: attended exactly
        self._requested: tuple[ClusterIndex | None, ...] = ()
        self.left_out: list[int] = []  # batch rows whose index did not fit in the last `fill`
        self._slots: dict[int, tuple[ClusterIndex, _Slot]] = {}  # by id() of a packed index
        self._end = (0, 0)  # first cluster row and member row no slot holds

    def occupancy(self) -> tuple[int, int]:
        """Cluster rows and member rows (of `capacity`'s, per layer) that the packed indexes' slots
        reach, the room each slot keeps for its folds included."""
        return self._end

    def fill(
        self,
        indexes: Sequence[ClusterIndex | None],
        sink_tokens: int,
        grown_from: Sequence[ClusterIndex | None] | None = None,
    ) -> list[int]:
        """Pack `indexes` (batch order) into the buffers, unless exactly these were asked for last.

        `grown_from[b]`, when given, is the index that `indexes[b]` was folded from
        (`reference.update_index`): if that is packed, `indexes[b]` takes over its slot and only
        its tail is written. Returns the batch rows whose index did not fit (module doc): they are
        packed without one, and `packed[b]` is None for them.
        """
        if len(indexes) == len(self._requested) and all(
            a is b for a, b in zip(indexes, self._requested, strict=True)
        ):
            return self.left_out
        if len(indexes) > self.capacity.rows:
            raise RuntimeError(
                f"multipole: a batch of {len(indexes)} requests; the index holds {self.capacity.rows}"
            )
        requested = tuple(indexes)
        sizes = [self._size(index) for index in indexes]
        placed = self._place(indexes, grown_from or [None] * len(indexes), sizes, self._slots, self._end)
        left_out: list[int] = []
        if placed is None:
            left_out = self._left_out(sizes)
            indexes = [None if b in left_out else index for b, index in enumerate(indexes)]
            sizes = [(0, 0) if b in left_out else size for b, size in enumerate(sizes)]
            placed = self._pack_all(indexes, sizes)
        slots, writes, self._end = placed
        for b, kept in writes:
            self._write(slots[b], indexes[b], kept)
        per_row = torch.tensor(
            [
                [slot.cluster_row, clusters, index.recent_start] if index is not None else [0, 0, sink_tokens]
                for index, slot, (clusters, _) in zip(indexes, slots, sizes, strict=True)
            ],
            dtype=torch.int32,
        ).reshape(-1, 3)
        self.per_row[:, : len(indexes)].copy_(to_device(per_row.t().contiguous(), self.per_row.device))
        self.packed = tuple(indexes)
        self._requested, self.left_out = requested, left_out
        self._slots = {
            id(index): (index, slot) for index, slot in zip(indexes, slots, strict=True) if index is not None
        }
        return left_out

    def _left_out(self, sizes: list[tuple[int, int]]) -> list[int]:
        """The rows to pack without their index so that the rest fit: the largest indexes are kept
        first (a request left out is attended over its whole context, which costs most for the
        longest), and each smaller one while it still fits."""
        free_clusters, free_members = self.capacity.cluster_rows, self.capacity.member_rows
        left_out = []
        for b in sorted(range(len(sizes)), key=lambda b: sizes[b][1], reverse=True):
            clusters, clustered = sizes[b]
            if clusters <= free_clusters and clustered <= free_members:
                free_clusters -= clusters
                free_members -= clustered
            else:
                left_out.append(b)
        return sorted(left_out)

    def _place(
        self,
        indexes: Sequence[ClusterIndex | None],
        grown_from: Sequence[ClusterIndex | None],
        sizes: list[tuple[int, int]],
        held_slots: dict[int, tuple[ClusterIndex, _Slot]],
        end: tuple[int, int],
    ) -> _Placement | None:
        """Slots for `indexes` that keep every request of `held_slots` where it is: the same index,
        or one folded from a held one that still fits its slot, stays; the rest get new slots from
        `end` on. None when a fold outgrows its slot or the new ones do not fit."""
        slots: list[_Slot | None] = [None] * len(indexes)
        writes: list[tuple[int, _Kept]] = []
        fresh: list[int] = []
        for b, (index, before) in enumerate(zip(indexes, grown_from, strict=True)):
            if index is None:
                continue
            held = held_slots.get(id(index)) or (held_slots.get(id(before)) if before is not None else None)
            if held is None:
                fresh.append(b)
                continue
            packed, slot = held  # the packed objects are alive, so an id() names only them
            if packed is not index:
                kept = _kept_after_fold(packed, index)
                clusters, clustered = sizes[b]
                if kept is None or clusters > slot.cluster_room or clustered > slot.member_room:
                    return None
                writes.append((b, kept))
            if slot in slots:
                return None
            slots[b] = slot
        row, member = end
        cap = self.capacity
        # Each new slot gets room for this many more rows: half the free rows shared out, the
        # other half kept for requests that join later.
        share = 2 * max(1, sum(index is not None for index in indexes))
        spare_clusters = (cap.cluster_rows - row - sum(sizes[b][0] for b in fresh)) // share
        spare_members = (cap.member_rows - member - sum(sizes[b][1] for b in fresh)) // share
        if spare_clusters < 0 or spare_members < 0:
            return None
        for b in fresh:
            clusters, clustered = sizes[b]
            slots[b] = _Slot(
                row, min(clusters + spare_clusters, cap.max_clusters), member, clustered + spare_members
            )
            writes.append((b, _Kept(0, 0)))
            row += slots[b].cluster_room
            member += slots[b].member_room
        return slots, writes, (row, member)

    def _pack_all(self, indexes: Sequence[ClusterIndex | None], sizes: list[tuple[int, int]]) -> _Placement:
        """Every request laid out afresh from row 0 (they fit: `_left_out`): its index, then its
        share of the free rows."""
        placed = self._place(indexes, [None] * len(indexes), sizes, {}, (0, 0))
        assert placed is not None  # everything fits from row 0
        return placed

    def _size(self, index: ClusterIndex | None) -> tuple[int, int]:
        """Clusters and clustered tokens of a request's index (checked against the buffers)."""
        if index is None:
            return 0, 0
        level = index.levels[0]
        if level.centroids.shape[0] != self.layers * self.heads:
            raise ValueError(
                f"an index of {level.centroids.shape[0]} heads; the buffers hold "
                f"{self.layers} layers x {self.heads} heads"
            )
        clusters = level.centroids.shape[1]
        if clusters > self.capacity.max_clusters:
            raise RuntimeError(
                f"multipole: {clusters} clusters in one request; the bound is {self.capacity.max_clusters}"
            )
        return clusters, level.labels.shape[1]

    def _write(self, slot: _Slot, index: ClusterIndex, kept: _Kept) -> None:
        """Copy `index` into its slot from cluster `kept.clusters` and clustered token `kept.tokens` on.

        Members are the clustered tokens sorted by cluster, and clusters past `kept.clusters`
        hold exactly the tokens past `kept.tokens` (blocks partition both), so the tail's
        members are a sort of the tail's labels alone.
        """
        level = index.levels[0]
        c0, t0 = kept
        rows = slice(slot.cluster_row + c0, slot.cluster_row + level.centroids.shape[1])
        self.centroids[:, rows] = self._by_layer(level.centroids[:, c0:])
        self.value_centroids[:, rows] = self._by_layer(level.value_centroids[:, c0:])
        counts = level.counts[:, c0:].to(torch.int32)  # [L*H, C]: scanned along its last dim, the fast one
        self.counts[:, rows] = self._by_layer(counts)
        first = slot.member_row + t0
        self.member_start[:, rows] = self._by_layer(
            first + torch.cumsum(counts, -1, dtype=torch.int32) - counts
        )
        order = torch.sort(level.labels[:, t0:], dim=-1, stable=True).indices
        self.members[:, first : slot.member_row + level.labels.shape[1]] = self._by_layer(
            order + (index.start + t0)
        )

    def batch_index(
        self, layer: int, batch: int, seq_lens: torch.Tensor, sink_len: torch.Tensor
    ) -> BatchIndex:
        """The kernels' view of layer `layer` (its position in the buffers) of the first `batch`
        packed requests (fixed addresses)."""
        level = LevelTensors(
            centroids=self.centroids[layer],
            value_centroids=self.value_centroids[layer],
            counts=self.counts[layer],
            cluster_start=self.per_row[0, :batch],
            num_clusters=self.per_row[1, :batch],
            max_clusters=self.capacity.max_clusters,
        )
        return BatchIndex(
            levels=(level,),
            member_start=self.member_start[layer],
            members=self.members[layer],
            sink_len=sink_len,
            recent_start=self.per_row[2, :batch],
            seq_lens=seq_lens,
        )

    def _by_layer(self, tensor: torch.Tensor) -> torch.Tensor:
        """`[L*H, n, ...]` (heads first, layer-major) as `[L, n, H, ...]` (the buffers' order)."""
        return tensor.view(self.layers, self.heads, *tensor.shape[1:]).transpose(1, 2)


def _kept_after_fold(old: ClusterIndex, new: ClusterIndex) -> _Kept | None:
    """What `new`, folded from `old`, shares with it: every block before `old`'s final one (a fold
    re-clusters only the final block). None if the blocks say otherwise."""
    if old.num_clustered == 0:
        return _Kept(0, 0)
    blocks = len(old.block_tokens) - 1
    same = (
        new.start == old.start
        and new.block_tokens[:blocks] == old.block_tokens[:blocks]
        and new.block_clusters[0][:blocks] == old.block_clusters[0][:blocks]
    )
    return _Kept(old.block_clusters[0][blocks - 1], old.block_tokens[blocks - 1]) if same else None
