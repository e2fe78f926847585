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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mp_kernels.layout import BatchIndex, LevelTensors
from mp_sglang.reference import ClusterIndex


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
        self.packed: tuple[ClusterIndex | None, ...] = ()

    def fill(self, indexes: Sequence[ClusterIndex | None], sink_tokens: int) -> None:
        """Pack `indexes` (batch order) into the buffers, unless exactly these are packed already."""
        if len(indexes) == len(self.packed) and all(
            a is b for a, b in zip(indexes, self.packed, strict=True)
        ):
            return
        cap = self.capacity
        if len(indexes) > cap.rows:
            raise RuntimeError(f"multipole: a batch of {len(indexes)} requests; the index holds {cap.rows}")
        per_row = torch.zeros(3, len(indexes), dtype=torch.int32)
        row = member = 0
        for b, index in enumerate(indexes):
            if index is None:
                per_row[:, b] = torch.tensor([row, 0, sink_tokens])
                continue
            level = index.levels[0]
            if level.centroids.shape[0] != self.layers * self.heads:
                raise ValueError(
                    f"an index of {level.centroids.shape[0]} heads; the buffers hold "
                    f"{self.layers} layers x {self.heads} heads"
                )
            clusters, clustered = level.centroids.shape[1], level.labels.shape[1]
            if row + clusters > cap.cluster_rows or member + clustered > cap.member_rows:
                raise RuntimeError(
                    "multipole: the batch's cluster index outgrew its preallocated buffers "
                    f"({cap.cluster_rows} clusters, {cap.member_rows} tokens per layer); raise "
                    "MULTIPOLE_INDEX_CAPACITY (requests sharing long prefixes need more than 1)"
                )
            if clusters > cap.max_clusters:
                raise RuntimeError(
                    f"multipole: {clusters} clusters in one request; the bound is {cap.max_clusters}"
                )
            rows = slice(row, row + clusters)
            self.centroids[:, rows] = self._by_layer(level.centroids)
            self.value_centroids[:, rows] = self._by_layer(level.value_centroids)
            counts = level.counts.to(torch.int32)  # [L*H, C]: scanned along its last dim, the fast one
            self.counts[:, rows] = self._by_layer(counts)
            starts = member + torch.cumsum(counts, -1, dtype=torch.int32) - counts
            self.member_start[:, rows] = self._by_layer(starts)
            order = torch.sort(level.labels, dim=-1, stable=True).indices
            self.members[:, member : member + clustered] = self._by_layer(order + index.start)
            per_row[:, b] = torch.tensor([row, clusters, index.recent_start])
            row += clusters
            member += clustered
        self.per_row[:, : len(indexes)].copy_(per_row)
        self.packed = tuple(indexes)

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
