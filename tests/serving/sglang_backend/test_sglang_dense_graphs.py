"""DECODE batches without any index go through the dense backend: eagerly, and in CUDA graphs
through a dense twin of each decode graph (mp_sglang.serving.dense_graphs). The graphs themselves
need a GPU; here the rig plays the replays (metadata through the out-of-graph hook, then the
forward the graph recorded) and the hooks run against sglang's own graph runner class."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("sglang.srt", reason="sglang is not installed (see docs/sglang.md)")

from _sglang_rig import LAYERS, Rig, set_config
from sglang.srt.model_executor.forward_batch_info import ForwardMode
from sglang.srt.model_executor.runner.decode_cuda_graph_runner import DecodeCudaGraphRunner

from mp_sglang.method.config import MultipoleConfig
from mp_sglang.method.reference import dense_attention
from mp_sglang.serving import crossover, dense_graphs
from mp_sglang.serving.plugin import decode_graph_hooks_applied

TOL = 1e-4


def _with_dense_twins(monkeypatch: pytest.MonkeyPatch, rig: Rig) -> None:
    """Graph state as on a GPU, where the dense backend (flashinfer) has CUDA graphs."""
    monkeypatch.setattr(rig.backend.dense, "init_cuda_graph_state", lambda max_bs, max_num_tokens: None)
    rig.backend.init_cuda_graph_state(max_bs=rig.req_pool.size, max_num_tokens=rig.req_pool.size)


def _decode_and_check(rig: Rig, short, longer, dense_below: int, graph_pad: int | None, expect_dense) -> None:
    for step in range(15):
        out = rig.forward([(short, 1), (longer, 1)], ForwardMode.DECODE, graph_pad=graph_pad)
        indexed = longer.length >= dense_below  # the length this pass decoded at
        assert rig.backend.dense_pass == expect_dense(indexed), step
        assert (len(rig.backend._rows) == 2 + (graph_pad or 0)) == (not rig.backend.dense_pass), step
        for layer in range(LAYERS):
            q = out.queries[layer]
            dense = dense_attention(q[0], short.keys[layer], short.values[layer])
            assert torch.allclose(out.outputs[layer][0], dense, atol=TOL)


@pytest.mark.parametrize("unindexed_decode", ["dense", "kernels"])
def test_an_eager_decode_batch_without_any_index_goes_where_the_setting_says(
    monkeypatch: pytest.MonkeyPatch, unindexed_decode: str
) -> None:
    """Below dense_below no row has an index: the whole batch is the dense backend's (the default)
    or every row is attended exactly by our kernels. Once a row is indexed, the batch is the
    method's again. The short request's output is exact either way."""
    set_config(
        monkeypatch,
        token_budget=0.1,
        dense_below=150,
        decode_path="kernels",
        unindexed_decode=unindexed_decode,
    )
    rig = Rig()
    short, longer = rig.new_request(), rig.new_request()
    rig.forward([(short, 60), (longer, 140)], ForwardMode.EXTEND)
    _decode_and_check(
        rig, short, longer, 150, None, lambda indexed: unindexed_decode == "dense" and not indexed
    )


def test_graph_replays_take_the_dense_twin_until_a_row_is_indexed(monkeypatch: pytest.MonkeyPatch) -> None:
    """With dense twins captured, a replay of a batch without an index prepares the dense backend
    and is marked for the twin (padding rows included); from the step a row reaches dense_below, the
    method's graph. Without twins (a dense backend with no CUDA graphs), replays stay on the kernels."""
    set_config(monkeypatch, token_budget=0.1, dense_below=150, decode_path="kernels")
    rig = Rig(rows=6)
    _with_dense_twins(monkeypatch, rig)
    assert rig.backend.dense_graphs
    short, longer = rig.new_request(), rig.new_request()
    rig.forward([(short, 60), (longer, 140)], ForwardMode.EXTEND)
    _decode_and_check(rig, short, longer, 150, 2, lambda indexed: not indexed)

    without = Rig(rows=6)
    without.backend.init_cuda_graph_state(max_bs=6, max_num_tokens=6)  # torch_native: no graphs
    assert not without.backend.dense_graphs
    short, longer = without.new_request(), without.new_request()
    without.forward([(short, 60), (longer, 100)], ForwardMode.EXTEND)
    _decode_and_check(without, short, longer, 150, 2, lambda indexed: False)


def test_capture_records_each_shape_twice_and_replay_picks_by_the_backends_choice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The hooks sglang applied to its decode graph runner: a second capture of every shape under
    the dense label, with the backend capturing its dense path; at replay, the dense label exactly
    when the backend prepared the dense path."""
    assert decode_graph_hooks_applied()
    set_config(monkeypatch, decode_path="kernels")
    rig = Rig(rows=6)
    _with_dense_twins(monkeypatch, rig)
    runner = SimpleNamespace(attn_backend=rig.backend, record_nolora_graph=False)

    captured = []

    def capture(runner, size, forward, stream_idx, variant_label, *rest):
        captured.append((size, variant_label, runner.attn_backend.capturing_dense, rest))

    for label in (None, "lora"):
        dense_graphs.around_capture_one_shape(capture, runner, 8, print, None, label, "attention-variant")
    assert captured == [
        (8, None, False, ("attention-variant",)),
        (8, "multipole-dense", True, ("attention-variant",)),
        (8, "lora", False, ("attention-variant",)),
        (8, "lora+multipole-dense", True, ("attention-variant",)),
    ]
    assert not rig.backend.capturing_dense

    batch = SimpleNamespace(lora_ids=None)
    for dense in (True, False):
        rig.backend.dense_pass = dense
        expected = "multipole-dense" if dense else None
        assert DecodeCudaGraphRunner._resolve_lora_variant(runner, batch) == expected
    rig.backend.dense_graphs = False  # no twins captured: never their label
    rig.backend.dense_pass = True
    assert DecodeCudaGraphRunner._resolve_lora_variant(runner, batch) is None


def _measured_table(points: tuple[tuple[int, int], ...], **settings: object) -> None:
    """A crossover table for the rig's attention shape on the CPU, in the test's own cache,
    measured with the settings in the environment (and `settings` over them)."""
    from _sglang_rig import DIM, HEADS_KV, HEADS_Q

    shape = crossover.AttentionShape(q_heads=HEADS_Q, kv_heads=HEADS_KV, head_dim=DIM, dtype="torch.float32")
    measured = crossover.measured_settings(replace(MultipoleConfig.from_env(), **settings))
    crossover.save(crossover.Crossover(points, measured), shape, "cpu", source="test")


def test_a_measured_crossover_decides_per_batch(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    """With a table for this GPU and shape, indexes start at its lowest crossover, and a DECODE
    batch takes the dense path while its mean context is below its batch size's crossover, though
    a row has an index; then the method's. MULTIPOLE_DENSE_BELOW, set, turns the table off, and
    a table measured with another budget is not used."""
    set_config(monkeypatch, token_budget=0.1, decode_path="kernels")
    monkeypatch.delenv("MULTIPOLE_DENSE_BELOW")
    _measured_table(((1, 150), (4, 100)))
    with caplog.at_level("INFO", logger="mp_sglang.serving.backend"):
        rig = Rig()
    assert rig.backend.cfg.dense_below == 100 and "measured crossover" in caplog.text
    threshold = rig.backend.crossover.context_for(2)
    assert threshold == 133  # 150 + (100 - 150) / 3, between the measured batch sizes 1 and 4
    short, longer = rig.new_request(), rig.new_request()
    rig.forward([(short, 100), (longer, 140)], ForwardMode.EXTEND)
    seen = set()
    for _ in range(20):
        out = rig.forward([(short, 1), (longer, 1)], ForwardMode.DECODE)
        dense = (short.length + longer.length) / 2 < threshold
        assert rig.backend.dense_pass == dense
        assert [row.indexed for row in rig.backend._rows] == ([] if dense else [True, True])
        seen.add(dense)
        if dense:
            for layer in range(LAYERS):
                exact = dense_attention(out.queries[layer][1], longer.keys[layer], longer.values[layer])
                assert torch.allclose(out.outputs[layer][1], exact, atol=TOL)
    assert seen == {True, False}

    set_config(monkeypatch, token_budget=0.1, decode_path="kernels", dense_below=120)
    fixed = Rig()
    assert fixed.backend.crossover is None and fixed.backend.cfg.dense_below == 120

    monkeypatch.delenv("MULTIPOLE_DENSE_BELOW")
    _measured_table(((1, 150), (4, 100)), token_budget=0.05)
    with caplog.at_level("WARNING", logger="mp_sglang.serving.backend"):
        other = Rig()
    assert other.backend.crossover is None and other.backend.cfg.dense_below == 4096
    assert "token_budget=0.1 (measured: 0.05)" in caplog.text
