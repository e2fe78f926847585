"""The multipole backend on real sglang pools and ForwardBatches, against mp_sglang.method.reference."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("sglang.srt", reason="sglang is not installed (see docs/sglang.md)")

from _sglang_rig import DIM, HEADS_KV, HEADS_Q, LAYERS, Replay, Rig, model_with_rope, set_config
from sglang.srt.model_executor.forward_batch_info import ForwardMode

from mp_sglang.method.config import MultipoleConfig
from mp_sglang.method.reference import dense_attention
from mp_sglang.method.rope import Rope

TOL = 1e-5


def _causal_dense(rig_pass, request, first: int, count: int, offset: int, layer: int) -> torch.Tensor:
    """Expected outputs of `count` new tokens at positions first.. of `request` (dense, causal)."""
    return torch.stack(
        [
            dense_attention(
                rig_pass.queries[layer][offset + i],
                request.keys[layer][:, : first + i + 1],
                request.values[layer][:, : first + i + 1],
            )
            for i in range(count)
        ]
    )


@pytest.fixture(autouse=True, params=["reference", "kernels"])
def decode_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs on both decode paths (the kernels as their torch references on the CPU)."""
    monkeypatch.setenv("MULTIPOLE_DECODE_PATH", request.param)
    return request.param


def test_extend_is_dense_causal_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    set_config(monkeypatch, token_budget=0.1)
    rig = Rig()
    a, b = rig.new_request(), rig.new_request()
    out = rig.forward([(a, 37), (b, 120)], ForwardMode.EXTEND)
    for layer in range(LAYERS):
        assert torch.allclose(out.outputs[layer][:37], _causal_dense(out, a, 0, 37, 0, layer), atol=TOL)
        assert torch.allclose(out.outputs[layer][37:], _causal_dense(out, b, 0, 120, 37, layer), atol=TOL)
    assert len(rig.backend.table) == 0  # prefill builds nothing: the index is made at the first decode


def test_decode_full_budget_equals_dense(monkeypatch: pytest.MonkeyPatch) -> None:
    set_config(monkeypatch, token_budget=1.0)
    rig = Rig()
    dense_decodes = []
    original = rig.backend.dense.forward_decode
    rig.backend.dense.forward_decode = lambda *a, **k: dense_decodes.append(1) or original(*a, **k)
    requests = [rig.new_request() for _ in range(3)]
    rig.forward([(r, n) for r, n in zip(requests, (70, 150, 301), strict=True)], ForwardMode.EXTEND)
    for _ in range(20):  # crosses several blockwise updates (update_block 8 beyond a window of 16)
        out = rig.forward([(r, 1) for r in requests], ForwardMode.DECODE)
        for layer in range(LAYERS):
            for i, r in enumerate(requests):
                expected = dense_attention(out.queries[layer][i], r.keys[layer], r.values[layer])
                assert torch.allclose(out.outputs[layer][i], expected, atol=TOL)
    assert len(rig.backend.table) == 3
    assert not dense_decodes  # every row was the method's: the backend wrote K/V, no dense decode ran


@pytest.mark.parametrize("heads_q", [HEADS_Q, HEADS_KV], ids=["gqa", "mha"])
def test_decode_partial_budget_follows_reference(monkeypatch: pytest.MonkeyPatch, heads_q: int) -> None:
    set_config(monkeypatch, token_budget=0.1, dense_below=100)
    rig = Rig(heads_q=heads_q)
    replay = Replay(MultipoleConfig.from_env())
    short, long_a, long_b = (rig.new_request() for _ in range(3))
    rig.forward([(short, 60), (long_a, 180), (long_b, 333)], ForwardMode.EXTEND)
    farthest = 0.0
    for _ in range(24):
        out = rig.forward([(short, 1), (long_a, 1), (long_b, 1)], ForwardMode.DECODE)
        for layer in range(LAYERS):
            q = out.queries[layer]
            dense_short = dense_attention(q[0], short.keys[layer], short.values[layer])
            assert torch.allclose(out.outputs[layer][0], dense_short, atol=TOL)  # below dense_below
            for i, r in ((1, long_a), (2, long_b)):
                assert torch.allclose(out.outputs[layer][i], replay.decode(r, q[i], layer), atol=TOL)
                dense = dense_attention(q[i], r.keys[layer], r.values[layer])
                farthest = max(farthest, (out.outputs[layer][i] - dense).abs().max().item())
    assert farthest > 1e-3  # the method ran: 10 % of random keys does not reproduce dense attention
    assert len(rig.backend.table) == 2


@pytest.mark.usefixtures("published_server_args")
def test_windowed_rope_frame_from_the_models_rotary_embedding(monkeypatch: pytest.MonkeyPatch) -> None:
    set_config(monkeypatch, token_budget=0.1, rope_window=64)
    rig = Rig(model=model_with_rope(monkeypatch))
    cfg = MultipoleConfig.from_env()
    replay = Replay(cfg, rope=Rope.standard(DIM, theta=10000.0))
    unrotated = Replay(cfg)  # the same settings in the stored-key frame: must differ somewhere
    farthest = 0.0
    a, b = rig.new_request(), rig.new_request()
    rig.forward([(a, 140), (b, 230)], ForwardMode.EXTEND)
    for _ in range(12):
        out = rig.forward([(a, 1), (b, 1)], ForwardMode.DECODE)
        for layer in range(LAYERS):
            for i, r in enumerate((a, b)):
                expected = replay.decode(r, out.queries[layer][i], layer)
                assert torch.allclose(out.outputs[layer][i], expected, atol=TOL)
                other = unrotated.decode(r, out.queries[layer][i], layer)
                farthest = max(farthest, (out.outputs[layer][i] - other).abs().max().item())
    assert farthest > 1e-4


def test_chunked_prefill_and_prefix_hit_are_indexed_from_the_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    set_config(monkeypatch, token_budget=0.15)
    rig = Rig()
    replay = Replay(MultipoleConfig.from_env())
    owner = rig.new_request()
    rig.forward([(owner, 64)], ForwardMode.EXTEND)
    rig.forward([(owner, 100)], ForwardMode.EXTEND)  # second chunk of a chunked prefill
    hit = rig.new_request(prefix_of=owner, prefix_len=150)  # radix hit on 150 of the owner's tokens
    first = rig.forward([(hit, 40)], ForwardMode.EXTEND)
    for layer in range(LAYERS):  # the extend attends to the shared prefix through the pool
        assert torch.allclose(first.outputs[layer], _causal_dense(first, hit, 150, 40, 0, layer), atol=TOL)
    for _ in range(10):
        out = rig.forward([(owner, 1), (hit, 1)], ForwardMode.DECODE)
        for layer in range(LAYERS):
            for i, r in enumerate((owner, hit)):
                assert torch.allclose(
                    out.outputs[layer][i], replay.decode(r, out.queries[layer][i], layer), atol=TOL
                )


def test_mixed_batch_prefill_chunk_with_decodes(monkeypatch: pytest.MonkeyPatch) -> None:
    set_config(monkeypatch, token_budget=0.1, dense_below=90)
    rig = Rig()
    replay = Replay(MultipoleConfig.from_env())
    running, short, newcomer = rig.new_request(), rig.new_request(), rig.new_request()
    rig.forward([(running, 200), (short, 30)], ForwardMode.EXTEND)
    out = rig.forward([(running, 1), (short, 1)], ForwardMode.DECODE)
    for layer in range(LAYERS):
        replay.decode(running, out.queries[layer][0], layer)
    for chunk in (50, 70):
        out = rig.forward([(newcomer, chunk), (running, 1), (short, 1)], ForwardMode.MIXED)
        first = newcomer.length - chunk
        for layer in range(LAYERS):
            outputs, queries = out.outputs[layer], out.queries[layer]
            assert torch.allclose(
                outputs[:chunk], _causal_dense(out, newcomer, first, chunk, 0, layer), atol=TOL
            )
            assert torch.allclose(outputs[chunk], replay.decode(running, queries[chunk], layer), atol=TOL)
            dense_short = dense_attention(queries[chunk + 1], short.keys[layer], short.values[layer])
            assert torch.allclose(outputs[chunk + 1], dense_short, atol=TOL)
    out = rig.forward([(newcomer, 1), (running, 1)], ForwardMode.DECODE)
    for layer in range(LAYERS):
        assert torch.allclose(
            out.outputs[layer][0], replay.decode(newcomer, out.queries[layer][0], layer), atol=TOL
        )


def test_reused_row_gets_a_fresh_index_and_table_stays_flat(monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests of equal length come and go on the same rows: every one is answered from its own
    keys (a stale index would match the length and be silently reused), and nothing accumulates."""
    set_config(monkeypatch, token_budget=0.1)
    rig = Rig(rows=2)
    replay = Replay(MultipoleConfig.from_env())
    sizes = []
    for generation in range(8):
        pair = [rig.new_request(), rig.new_request()]
        rig.forward([(r, 96) for r in pair], ForwardMode.EXTEND)
        for r in pair:
            replay.reset(r)
        for _ in range(3):
            out = rig.forward([(r, 1) for r in pair], ForwardMode.DECODE)
            for layer in range(LAYERS):
                for i, r in enumerate(pair):
                    expected = replay.decode(r, out.queries[layer][i], layer)
                    assert torch.allclose(out.outputs[layer][i], expected, atol=TOL), generation
        sizes.append((len(rig.backend.table), rig.backend.table.nbytes()))
        if generation % 2:
            rig.finish(pair[0])  # finished: released at the next forward pass
            rig.forward([(pair[1], 1)], ForwardMode.DECODE)
            assert len(rig.backend.table) == 1
            rig.finish(pair[1])
        else:
            for r in pair:  # freed and re-allocated before any forward pass sees it
                rig.finish(r)
    assert len(set(sizes)) == 1, sizes  # same work each round: same rows, same bytes
    rig.forward([(rig.new_request(), 5)], ForwardMode.EXTEND)
    assert len(rig.backend.table) == 0 and rig.backend.table.nbytes() == 0


def test_row_reallocated_unseen_is_caught_by_its_generation(monkeypatch: pytest.MonkeyPatch) -> None:
    """A finished request's row handed to a new request between two passes, whose first step is a
    one-token row of a MIXED batch (a prefix hit on all but one token): only req_generation tells
    the backend that the index it holds for that row belongs to someone else. That step is
    attended exactly (the row changed hands since it was last listed); the next one builds the
    newcomer's own index."""
    set_config(monkeypatch, token_budget=0.1)
    rig = Rig(rows=3)
    replay = Replay(MultipoleConfig.from_env())
    old, owner, other = rig.new_request(), rig.new_request(), rig.new_request()
    rig.forward([(old, 100), (owner, 160), (other, 40)], ForwardMode.EXTEND)
    rig.forward([(old, 1), (other, 1)], ForwardMode.DECODE)  # indexes old's row (101 tokens)
    rig.finish(old)
    reuser = rig.new_request(prefix_of=owner, prefix_len=150)
    assert reuser.row == old.row
    out = rig.forward([(reuser, 1), (other, 1)], ForwardMode.MIXED)
    for layer in range(LAYERS):
        dense = dense_attention(out.queries[layer][0], reuser.keys[layer], reuser.values[layer])
        assert torch.allclose(out.outputs[layer][0], dense, atol=TOL)
    out = rig.forward([(reuser, 1), (other, 1)], ForwardMode.DECODE)
    for layer in range(LAYERS):
        expected = replay.decode(reuser, out.queries[layer][0], layer)
        assert torch.allclose(out.outputs[layer][0], expected, atol=TOL)


def test_stale_pass_after_the_row_changed_hands_leaves_no_index(monkeypatch: pytest.MonkeyPatch) -> None:
    """The overlap scheduler's race: a decode pass of a request that has meanwhile finished runs
    after its row went to a new request (generation bumped) but before the newcomer's prefix was
    written to the row. Indexing the row then would file the old request's keys under the
    newcomer, whose first one-token step would use them."""
    set_config(monkeypatch, token_budget=0.1)
    rig = Rig(rows=3)
    replay = Replay(MultipoleConfig.from_env())
    old, owner, other = rig.new_request(), rig.new_request(), rig.new_request()
    rig.forward([(old, 100), (owner, 160), (other, 40)], ForwardMode.EXTEND)
    rig.forward([(old, 1), (other, 1)], ForwardMode.DECODE)
    stale = rig._forward_batch([(old, 1), (other, 1)], ForwardMode.DECODE)  # scheduled before...
    old_slots = rig.req_pool.req_to_token[old.row, :150].clone()
    rig.finish(old)  # ...old finished and its row went to the newcomer
    reuser = rig.new_request(prefix_of=owner, prefix_len=150)
    assert reuser.row == old.row
    new_slots = rig.req_pool.req_to_token[reuser.row, :150].clone()
    rig.req_pool.req_to_token[reuser.row, :150] = old_slots  # the newcomer's prefix not yet written
    rig.backend.init_forward_metadata(stale)
    for layer in rig.layers:
        q, k, v = (torch.randn(2, h, DIM, generator=rig.generator) for h in (HEADS_Q, HEADS_KV, HEADS_KV))
        rig.backend.forward(q.reshape(2, -1), k, v, layer, stale)
    rig.req_pool.req_to_token[reuser.row, :150] = new_slots
    out = rig.forward([(reuser, 1), (other, 1)], ForwardMode.MIXED)  # settled now: indexed
    for layer in range(LAYERS):
        expected = replay.decode(reuser, out.queries[layer][0], layer)
        assert torch.allclose(out.outputs[layer][0], expected, atol=TOL)
