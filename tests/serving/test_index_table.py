"""IndexTable: the upkeep of many (row, layer) pairs at once equals ensure one by one, and equals
the reference with its windows read back from the pool."""

from __future__ import annotations

import pytest
import torch
from clustered_data import clustered_kv

from mp_sglang.method.config import MultipoleConfig
from mp_sglang.method.reference import build_index, update_index
from mp_sglang.method.rope import Rope
from mp_sglang.serving.index import IndexTable, IndexWant

CFG = MultipoleConfig(
    kmeans_block=64, tokens_per_cluster=8, recent_window=8, update_block=8, sink_tokens=2, dense_below=0
)
ROPE = Rope.standard(16)


def _caches(generator):
    """Keys/values of (row, layer) pairs of different lengths, and readers over them."""
    caches = {
        (row, layer): clustered_kv(2, 300 - 70 * row, 16, 6, generator)
        for row in range(3)
        for layer in range(2)
    }

    def reader(row, layer):
        keys, values = caches[row, layer]
        return lambda start, end: (keys[:, start:end], values[:, start:end])

    return caches, reader


def _wants(caches, reader, grow):
    return [
        IndexWant(row, 1, layer, keys.shape[1] - 40 + grow, reader(row, layer))
        for (row, layer), (keys, _) in caches.items()
    ]


def _same(a, b):
    assert a.block_tokens == b.block_tokens and a.num_tokens == b.num_tokens
    for x, y in zip(a.levels, b.levels, strict=True):
        assert torch.equal(x.centroids, y.centroids) and torch.equal(x.labels, y.labels)


@pytest.mark.parametrize("group_tokens", [1, 1 << 17])
def test_ensure_many_equals_ensure_one_by_one(generator, group_tokens):
    caches, reader = _caches(generator)
    many, single = IndexTable(4), IndexTable(4)
    for grow in (0, 3, 20, 40):  # build, nothing due (the index lags), a fold, another fold
        wants = _wants(caches, reader, grow)
        got = many.ensure_many(wants, CFG, ROPE, group_tokens=group_tokens)
        for want, index in zip(wants, got, strict=True):
            expected = single.ensure(want.row, 1, want.layer_id, want.seq_len, want.read, CFG, ROPE)
            _same(index, expected)
            assert index.num_tokens <= want.seq_len - 1
    assert len(many) == 3


def test_ensure_many_leaves_an_index_that_is_not_due_untouched(generator):
    caches, reader = _caches(generator)
    table = IndexTable(4)
    first = table.ensure_many(_wants(caches, reader, 0), CFG, ROPE)
    again = table.ensure_many(_wants(caches, reader, 3), CFG, ROPE)
    assert all(a is b for a, b in zip(first, again, strict=True))


def test_ensure_many_refuses_a_row_outside_the_table(generator):
    caches, reader = _caches(generator)
    want = IndexWant(7, 1, 0, 100, reader(0, 0))
    with pytest.raises(IndexError, match="req_pool_idx 7"):
        IndexTable(4).ensure_many([want], CFG, ROPE)


def test_the_table_holds_no_windows_and_folds_as_the_reference(generator):
    """Indexes are held without their window copies; a fold reads the window back from the pool
    and gives exactly what the reference gives with the window it kept."""
    keys, values = clustered_kv(2, 400, 16, 6, generator)

    def read(start, end):
        return keys[:, start:end], values[:, start:end]

    table = IndexTable(1)
    expected = build_index(keys[:, :199], values[:, :199], CFG, rope=ROPE)
    held = table.ensure(0, 1, 0, 200, read, CFG, ROPE)
    for seq_len in (230, 260, 300, 330, 400):  # folds, past a block boundary on the way
        expected = update_index(
            expected,
            keys[:, expected.num_tokens : seq_len - 1],
            values[:, expected.num_tokens : seq_len - 1],
            CFG,
        )
        held = table.ensure(0, 1, 0, seq_len, read, CFG, ROPE)
        _same(held, expected)
        assert held.window_start == expected.window_start and held.window_keys.shape[1] == 0
        for x, y in zip(held.levels, expected.levels, strict=True):
            assert torch.equal(x.value_centroids, y.value_centroids) and torch.equal(x.counts, y.counts)
    assert len(expected.block_tokens) > 2
    assert table.nbytes() < sum(t.nbytes for t in (expected.window_keys, expected.window_values))


def test_an_index_built_inside_the_sinks_folds_as_the_reference(generator):
    """Built from fewer tokens than the sinks (no window yet), then folded: as the reference."""
    keys, values = clustered_kv(2, 60, 16, 6, generator)

    def read(start, end):
        return keys[:, start:end], values[:, start:end]

    table = IndexTable(1)
    table.ensure(0, 1, 0, 2, read, CFG, ROPE)  # one token before the step, sinks of 2
    held = table.ensure(0, 1, 0, 60, read, CFG, ROPE)
    expected = update_index(
        build_index(keys[:, :1], values[:, :1], CFG, rope=ROPE), keys[:, 1:59], values[:, 1:59], CFG
    )
    _same(held, expected)
    assert held.num_clustered > 0
