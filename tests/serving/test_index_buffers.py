"""The serving index buffers hold exactly what `pack_indices` lays out, at fixed addresses, also
when folds rewrite only their tails."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch
from clustered_data import clustered_kv

from mp_sglang.method.config import MultipoleConfig
from mp_sglang.method.packing import pack_indices
from mp_sglang.method.reference import ClusterIndex, build_index, stack_heads, update_index
from mp_sglang.serving.index_buffers import IndexBuffers, IndexCapacity

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
    assert buffers.occupancy() == (0, 0)
    buffers.fill(indexes, CFG.sink_tokens)
    _assert_rows_hold(buffers, indexes)
    assert buffers.centroids.data_ptr() == address
    # Slots are packed back to back from row 0, each with room to grow.
    clusters, members = buffers.occupancy()
    held = [sum(sizes) for sizes in zip(*(buffers._size(i) for i in indexes), strict=True)]
    assert held[0] <= clusters <= 200 and held[1] <= members <= 800


def test_rows_without_index_are_exact_from_the_sinks_on(generator: torch.Generator) -> None:
    buffers = _buffers()
    buffers.fill([None, *_indexes((150,), generator), None], CFG.sink_tokens)
    per_row = buffers.per_row[:, :3]
    assert per_row[1].tolist()[0] == 0 and per_row[1].tolist()[2] == 0  # no clusters
    assert per_row[2].tolist()[0] == CFG.sink_tokens == per_row[2].tolist()[2]


def test_indexes_that_outgrow_the_buffers_leave_out_the_smallest_that_do_not_fit(
    generator: torch.Generator,
) -> None:
    """No stop on capacity: the largest indexes are packed, a row whose index does not fit gets
    none (attended exactly), and it is packed again once the batch has room for it."""
    small, middle, large = _indexes((70, 150, 333), generator)
    clusters = {id(i): i.levels[0].centroids.shape[1] for i in (small, middle, large)}
    buffers = _buffers(cluster_rows=clusters[id(large)] + clusters[id(small)] + 1)
    assert buffers.fill([small, middle, large], CFG.sink_tokens) == [1]
    assert buffers.packed == (small, None, large)
    _assert_rows_hold(buffers, [small, None, large])
    address = buffers.centroids.data_ptr()
    buffers.centroids[:, 0] = float("nan")  # a repack would overwrite this
    assert buffers.fill([small, middle, large], CFG.sink_tokens) == [1]  # asked again: nothing moves
    assert buffers.centroids[:, 0].isnan().all()
    assert buffers.fill([small, middle], CFG.sink_tokens) == []  # the large one finished
    _assert_rows_hold(buffers, [small, middle])
    assert buffers.centroids.data_ptr() == address


def test_every_layer_of_stacked_indexes_matches_pack_indices(generator: torch.Generator) -> None:
    """Requests whose indexes cover two layers' heads (`stack_heads`): each layer's view holds
    exactly what `pack_indices` lays out for that layer's part."""
    per_layer = [_indexes((70, 150, 333), generator) for _ in range(2)]
    stacked = [stack_heads(parts) for parts in zip(*per_layer, strict=True)]
    buffers = _buffers(layers=2)
    buffers.fill(stacked, CFG.sink_tokens)
    for layer, parts in enumerate(per_layer):
        _assert_rows_hold(buffers, parts, layer)
    with pytest.raises(ValueError, match="2 layers x 2 heads"):
        buffers.fill(per_layer[0], CFG.sink_tokens)


FOLDING = replace(CFG, update_block=8, update_iters=1)


def _assert_rows_hold(buffers: IndexBuffers, indexes: list[ClusterIndex | None], layer: int = 0) -> None:
    """Each row's slice of layer `layer` is what `pack_indices` lays out for its index alone."""
    seq_lens = torch.tensor([i.num_tokens if i else 1 for i in indexes], dtype=torch.int32)
    sinks = torch.full((len(indexes),), CFG.sink_tokens, dtype=torch.int32)
    got = buffers.batch_index(layer, len(indexes), seq_lens, sinks)
    for b, index in enumerate(indexes):
        if index is None:
            assert int(got.levels[0].num_clusters[b]) == 0
            assert int(got.recent_start[b]) == CFG.sink_tokens
            continue
        want = pack_indices([index])
        first, clusters = int(got.levels[0].cluster_start[b]), int(got.levels[0].num_clusters[b])
        rows = slice(first, first + clusters)
        assert clusters == want.levels[0].centroids.shape[0]
        assert int(got.recent_start[b]) == index.recent_start
        assert torch.equal(got.levels[0].centroids[rows], want.levels[0].centroids)
        assert torch.equal(got.levels[0].value_centroids[rows], want.levels[0].value_centroids)
        assert torch.equal(got.levels[0].counts[rows], want.levels[0].counts)
        base = got.member_start[first]  # per head; the row's first member
        assert torch.equal(got.member_start[rows] - base, want.member_start)
        clustered = want.members.shape[0]
        for h in range(HEADS):
            members = got.members[int(base[h]) : int(base[h]) + clustered, h]
            assert torch.equal(members, want.members[:, h])


def _fold(index: ClusterIndex, tokens: int, generator: torch.Generator) -> ClusterIndex:
    return update_index(index, *clustered_kv(HEADS, tokens, DIM, 5, generator), FOLDING)


def test_folds_rewrite_only_their_tails(generator: torch.Generator) -> None:
    """Folded rows keep their place (no repack) and still hold exactly their indexes, through
    warm folds and final blocks split in two, next to a row without an index."""
    indexes: list[ClusterIndex | None] = [*_indexes((70, 150), generator), None]
    buffers = _buffers(cluster_rows=400, member_rows=1600)
    buffers.fill(indexes, CFG.sink_tokens)
    starts = buffers.per_row[0, :3].clone()
    blocks = indexes[1].block_tokens
    for step in range(12):
        grown = [
            _fold(index, 8 + 3 * (b + step % 2), generator) if index else None
            for b, index in enumerate(indexes)
        ]
        buffers.fill(grown, CFG.sink_tokens, grown_from=indexes)
        assert torch.equal(buffers.per_row[0, :3], starts)  # nothing moved: tails only
        _assert_rows_hold(buffers, grown)
        indexes = grown
    assert len(indexes[1].block_tokens) > len(blocks)  # a final block was split on the way


def test_a_fold_past_its_room_packs_again(generator: torch.Generator) -> None:
    """Row 0 grows past the room a pack left it (half the spare rows); the batch packs again."""
    growing, steady = _indexes((150, 70), generator)
    history = [growing]
    for _ in range(6):
        history.append(_fold(history[-1], 30, generator))
    largest = history[-1].levels[0].centroids.shape[1] + steady.levels[0].centroids.shape[1]
    buffers = _buffers(cluster_rows=largest + 2, member_rows=1600)
    buffers.fill([growing, steady], CFG.sink_tokens)
    places = {int(buffers.per_row[0, 1])}
    for before, after in itertools.pairwise(history):
        buffers.fill([after, steady], CFG.sink_tokens, grown_from=[before, steady])
        _assert_rows_hold(buffers, [after, steady])
        places.add(int(buffers.per_row[0, 1]))
    assert len(places) > 1  # row 1 moved: packed again


def test_an_index_not_grown_from_what_its_row_holds_packs_again(generator: torch.Generator) -> None:
    """A rebuilt index (e.g. its request's cache was cut) is never written as a tail, whatever
    `grown_from` claims, unless the row holds that very object."""
    first, rebuilt = _indexes((150, 150), generator)
    other = _indexes((70,), generator)[0]
    buffers = _buffers()
    buffers.fill([first, other], CFG.sink_tokens)
    buffers.fill([rebuilt, other], CFG.sink_tokens, grown_from=[rebuilt, other])
    _assert_rows_hold(buffers, [rebuilt, other])
    stranger = _fold(rebuilt, 8, generator)
    buffers.fill([stranger, other], CFG.sink_tokens, grown_from=[first, other])
    _assert_rows_hold(buffers, [stranger, other])


def _starts(buffers: IndexBuffers, batch: int) -> list[int]:
    return buffers.per_row[0, :batch].tolist()


def test_requests_keep_their_slots_as_others_join_leave_or_reorder(generator: torch.Generator) -> None:
    """A batch change moves nobody: a leaving request frees its slot, a joining one gets a new
    slot after the others, a reordered batch points its rows at the same slots."""
    a, b, c, d = _indexes((150, 70, 333, 90), generator)
    buffers = _buffers(cluster_rows=400, member_rows=1600)
    buffers.fill([a, b, c], CFG.sink_tokens)
    start_a, start_b, start_c = _starts(buffers, 3)
    buffers.fill([c, a], CFG.sink_tokens)  # b left, order changed
    assert _starts(buffers, 2) == [start_c, start_a]
    _assert_rows_hold(buffers, [c, a])
    grown = _fold(a, 8, generator)
    buffers.fill([c, grown, d, None], CFG.sink_tokens, grown_from=[c, a, None, None])  # d joins
    starts = _starts(buffers, 4)
    assert starts[:2] == [start_c, start_a] and starts[2] > max(start_a, start_b, start_c)
    _assert_rows_hold(buffers, [c, grown, d, None])


def test_joins_past_the_free_rows_pack_everything_again(generator: torch.Generator) -> None:
    """Slots of requests that left are reclaimed only by packing again, once a join no longer fits
    after the last slot; the packed rows then hold their indexes as ever."""
    first = _indexes((150, 150), generator)
    later = _indexes((150, 150, 150), generator)
    need = sum(i.levels[0].centroids.shape[1] for i in first[:1] + later)
    buffers = _buffers(cluster_rows=need + 4, member_rows=1600)
    buffers.fill(first, CFG.sink_tokens)
    places = set()
    for i in range(len(later)):  # one of the first leaves, the later ones join one by one
        batch = first[:1] + later[: i + 1]
        buffers.fill(batch, CFG.sink_tokens)
        _assert_rows_hold(buffers, batch)
        places.add(_starts(buffers, 2)[1])
    assert len(places) > 1  # the first joiner moved: everything was packed again
