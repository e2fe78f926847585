"""The serving index buffers hold exactly what `pack_indices` lays out, at fixed addresses."""

from __future__ import annotations

import pytest
import torch
from clustered_data import clustered_kv

from mp_kernels.layout import pack_indices
from mp_sglang.config import MultipoleConfig
from mp_sglang.index_buffers import IndexBuffers, IndexCapacity
from mp_sglang.reference import build_index, stack_heads

CFG = MultipoleConfig(tokens_per_cluster=4, kmeans_block=64, kmeans_iters=3, recent_window=8, sink_tokens=3)
HEADS, DIM = 2, 8


def _indexes(lengths: tuple[int, ...], generator: torch.Generator) -> list:
    return [build_index(*clustered_kv(HEADS, n, DIM, 5, generator), CFG) for n in lengths]


def _buffers(rows: int = 4, cluster_rows: int = 200, member_rows: int = 800, layers: int = 1) -> IndexBuffers:
    capacity = IndexCapacity(rows, cluster_rows, member_rows, 128)
    return IndexBuffers(capacity, layers, HEADS, DIM, torch.float32, "cpu")


def test_fill_matches_pack_indices(generator: torch.Generator) -> None:
    indexes = _indexes((70, 150, 333), generator)
    buffers = _buffers()
    address = buffers.centroids.data_ptr()
    buffers.fill(indexes, CFG.sink_tokens)
    seq_lens = torch.tensor([i.num_tokens for i in indexes], dtype=torch.int32)
    sinks = torch.full((3,), CFG.sink_tokens, dtype=torch.int32)
    got, want = buffers.batch_index(0, 3, seq_lens, sinks), pack_indices(indexes)
    rows = want.levels[0].centroids.shape[0]
    assert torch.equal(got.levels[0].cluster_start, want.levels[0].cluster_start)
    assert torch.equal(got.levels[0].num_clusters, want.levels[0].num_clusters)
    assert torch.equal(got.recent_start, want.recent_start)
    assert torch.equal(got.levels[0].centroids[:rows], want.levels[0].centroids)
    assert torch.equal(got.levels[0].value_centroids[:rows], want.levels[0].value_centroids)
    assert torch.equal(got.levels[0].counts[:rows], want.levels[0].counts)
    assert torch.equal(got.member_start[:rows], want.member_start)
    assert torch.equal(got.members[: want.members.shape[0]], want.members)
    assert buffers.centroids.data_ptr() == address


def test_rows_without_index_are_exact_from_the_sinks_on(generator: torch.Generator) -> None:
    buffers = _buffers()
    buffers.fill([None, *_indexes((150,), generator), None], CFG.sink_tokens)
    per_row = buffers.per_row[:, :3]
    assert per_row[1].tolist()[0] == 0 and per_row[1].tolist()[2] == 0  # no clusters
    assert per_row[2].tolist()[0] == CFG.sink_tokens == per_row[2].tolist()[2]


def test_overflow_names_the_setting(generator: torch.Generator) -> None:
    buffers = _buffers(cluster_rows=10)
    with pytest.raises(RuntimeError, match="MULTIPOLE_INDEX_CAPACITY"):
        buffers.fill(_indexes((150,), generator), CFG.sink_tokens)


def test_every_layer_of_stacked_indexes_matches_pack_indices(generator: torch.Generator) -> None:
    """Requests whose indexes cover two layers' heads (`stack_heads`): each layer's view holds
    exactly what `pack_indices` lays out for that layer's part."""
    per_layer = [_indexes((70, 150, 333), generator) for _ in range(2)]
    stacked = [stack_heads(parts) for parts in zip(*per_layer, strict=True)]
    buffers = _buffers(layers=2)
    buffers.fill(stacked, CFG.sink_tokens)
    seq_lens = torch.tensor([i.num_tokens for i in stacked], dtype=torch.int32)
    sinks = torch.full((3,), CFG.sink_tokens, dtype=torch.int32)
    for layer, parts in enumerate(per_layer):
        got, want = buffers.batch_index(layer, 3, seq_lens, sinks), pack_indices(parts)
        rows = want.levels[0].centroids.shape[0]
        assert torch.equal(got.levels[0].cluster_start, want.levels[0].cluster_start)
        assert torch.equal(got.levels[0].centroids[:rows], want.levels[0].centroids)
        assert torch.equal(got.levels[0].value_centroids[:rows], want.levels[0].value_centroids)
        assert torch.equal(got.levels[0].counts[:rows], want.levels[0].counts)
        assert torch.equal(got.member_start[:rows], want.member_start)
        assert torch.equal(got.members[: want.members.shape[0]], want.members)
    with pytest.raises(ValueError, match="2 layers x 2 heads"):
        buffers.fill(per_layer[0], CFG.sink_tokens)
