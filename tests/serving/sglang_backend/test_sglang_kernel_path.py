"""The backend's kernel decode path with the real Triton kernels: in the CPU interpreter at small
sizes, and on the GPU. (test_sglang_backend.py runs every backend test on both decode paths, the
kernels there as their torch references.)"""

from __future__ import annotations

import logging

import pytest
import torch

pytest.importorskip("sglang.srt", reason="sglang is not installed (see docs/sglang.md)")

from _sglang_rig import LAYERS, Replay, Rig, set_config
from sglang.srt.model_executor.forward_batch_info import ForwardMode

from mp_sglang.method.config import MultipoleConfig
from mp_sglang.method.reference import dense_attention
from mp_sglang.serving.kernel_path import ALL_LAYERS

TOL = 1e-4


def _decode_follows_reference(rig: Rig, lengths: tuple[int, ...], steps: int) -> list:
    """Prefill requests of `lengths`, decode `steps` tokens each, compare every output with the
    reference replay of the same index rule."""
    assert rig.backend.kernels is not None, "decode_path=kernels must select the kernel path"
    replay = Replay(MultipoleConfig.from_env())
    requests = [rig.new_request() for _ in lengths]
    rig.forward(list(zip(requests, lengths, strict=True)), ForwardMode.EXTEND)
    for _ in range(steps):
        out = rig.forward([(r, 1) for r in requests], ForwardMode.DECODE)
        for layer in range(LAYERS):
            for i, r in enumerate(requests):
                expected = replay.decode(r, out.queries[layer][i], layer)
                assert torch.allclose(out.outputs[layer][i], expected, atol=TOL)
    return requests


def test_triton_kernels_in_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    set_config(monkeypatch, token_budget=0.2, decode_path="kernels")
    rig = Rig()
    rig.backend.kernels.kernel_backend = "triton"
    (first, _) = _decode_follows_reference(rig, (90, 130), steps=10)
    index = rig.backend.table._entries[first.row].layers[ALL_LAYERS]
    # One index over all layers' heads, folded lazily: it lags the cache between folds (the
    # kernels attend the rest exactly).
    assert index.window_keys.shape[0] == LAYERS * first.keys[0].shape[0]
    assert index.num_clustered > 0 and index.num_tokens < first.length


@pytest.mark.gpu
def test_triton_kernels_on_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    set_config(monkeypatch, token_budget=0.1, decode_path="kernels")
    _decode_follows_reference(Rig(device="cuda", context=4096, kv_slots=8192), (700, 1500, 2300), steps=20)


def test_decode_graph_replay_metadata_with_padding_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a CUDA-graph replay does, minus the graph: padding rows (request row 0, length 1)
    appended, metadata through the out-of-graph hook, a request below dense_below attended
    exactly by the kernels, the others by the method; the static buffers keep their addresses."""
    set_config(monkeypatch, token_budget=0.1, dense_below=100, decode_path="kernels")
    rig = Rig(rows=6)
    rig.backend.init_cuda_graph_state(max_bs=6, max_num_tokens=6)
    buffers = rig.backend.kernels.buffers
    addresses = (
        buffers.centroids.data_ptr(),
        buffers.members.data_ptr(),
        rig.backend.kernels.ints.data_ptr(),
    )
    replay = Replay(MultipoleConfig.from_env())
    short, long_a, long_b = (rig.new_request() for _ in range(3))
    rig.forward([(short, 60), (long_a, 180), (long_b, 333)], ForwardMode.EXTEND)
    for step in range(20):
        out = rig.forward([(short, 1), (long_a, 1), (long_b, 1)], ForwardMode.DECODE, graph_pad=step % 3)
        for layer in range(LAYERS):
            q = out.queries[layer]
            dense = dense_attention(q[0], short.keys[layer], short.values[layer])
            assert torch.allclose(out.outputs[layer][0], dense, atol=TOL)
            for i, r in ((1, long_a), (2, long_b)):
                assert torch.allclose(out.outputs[layer][i], replay.decode(r, q[i], layer), atol=TOL)
    assert (
        buffers.centroids.data_ptr(),
        buffers.members.data_ptr(),
        rig.backend.kernels.ints.data_ptr(),
    ) == addresses
    assert len(rig.backend.table) == 2  # padding rows (request row 0 is `short`) built nothing


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_requests_whose_indexes_do_not_fit_decode_exactly(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, device: str
) -> None:
    """An index capacity too small for the batch (as requests sharing long prefixes make it) does
    not stop decoding: the largest index that fits is used, the request left out is attended
    exactly over its whole context, and the log says so once. (CPU: the kernels' torch twins.)"""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    # Room for ~245 clustered tokens a layer: the 180-token request's index, not the 333-token one's.
    set_config(monkeypatch, token_budget=0.1, dense_below=100, decode_path="kernels", index_capacity=0.015)
    rig = Rig(rows=4, device=device)
    replay = Replay(MultipoleConfig.from_env())
    short, fits, too_large = (rig.new_request() for _ in range(3))
    rig.forward([(short, 60), (fits, 180), (too_large, 333)], ForwardMode.EXTEND)
    with caplog.at_level(logging.WARNING, logger="mp_sglang.serving.kernel_path"):
        for _ in range(12):
            out = rig.forward([(short, 1), (fits, 1), (too_large, 1)], ForwardMode.DECODE)
            for layer in range(LAYERS):
                q = out.queries[layer]
                for i, r in ((0, short), (2, too_large)):
                    dense = dense_attention(q[i], r.keys[layer], r.values[layer])
                    assert torch.allclose(out.outputs[layer][i], dense, atol=TOL)
                assert torch.allclose(out.outputs[layer][1], replay.decode(fits, q[1], layer), atol=TOL)
    warnings = [r for r in caplog.records if "outgrow the index buffers" in r.getMessage()]
    assert len(warnings) == 1 and "1 of its 2 indexed requests" in warnings[0].getMessage()
    assert rig.backend.kernels.buffers.left_out == [2]
