"""Start-up: settings validated, unsupported models refused by name, the model's RoPE found."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("sglang.srt", reason="sglang is not installed (see docs/sglang.md)")

from _sglang_rig import DIM, Rig, model_with_rope, set_config

from mp_sglang.method.rope import Rope


def test_bad_setting_fails_start_up_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    set_config(monkeypatch, token_budget=-1)
    with pytest.raises(ValueError, match="MULTIPOLE_.*token_budget"):
        Rig()
    set_config(monkeypatch)
    monkeypatch.setenv("MULTIPOLE_TOKEN_BUGDET", "0.1")
    with pytest.raises(ValueError, match="unknown setting MULTIPOLE_TOKEN_BUGDET"):
        Rig()


@pytest.mark.parametrize(
    ("runner_fields", "message"),
    [
        ({"use_mla_backend": True}, "MLA .* use --attention-backend flashinfer"),
        ({"sliding_window_size": 4096}, "sliding-window .* use --attention-backend triton"),
        (
            {"model_config": SimpleNamespace(is_encoder_decoder=True, is_hybrid_swa=False)},
            "encoder-decoder .* use --attention-backend flashinfer",
        ),
    ],
)
def test_unsupported_models_are_refused_with_an_alternative(
    monkeypatch: pytest.MonkeyPatch, runner_fields: dict, message: str
) -> None:
    set_config(monkeypatch)
    with pytest.raises(ValueError, match=f"multipole: {message}"):
        Rig(**runner_fields)


def test_cross_attention_layer_is_refused_at_its_first_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    set_config(monkeypatch)
    rig = Rig()
    rig.layers[0] = RadixAttention(4, DIM, DIM**-0.5, 2, layer_id=0, is_cross_attention=True)
    with pytest.raises(NotImplementedError, match="layer 0 uses cross-attention"):
        rig.forward([(rig.new_request(), 20)], ForwardMode.EXTEND)


def test_cuda_graphs_are_refused_with_the_flag_to_use(monkeypatch: pytest.MonkeyPatch) -> None:
    set_config(monkeypatch, decode_path="reference")
    backend = Rig().backend
    with pytest.raises(NotImplementedError, match="--cuda-graph-backend-decode disabled"):
        backend.init_cuda_graph_state(max_bs=8, max_num_tokens=8)
    set_config(monkeypatch, decode_path="kernels")
    backend = Rig(rows=4).backend
    backend.init_cuda_graph_state(max_bs=4, max_num_tokens=4)  # decode graphs: accepted
    with pytest.raises(ValueError, match="batch 8"):
        backend.init_cuda_graph_state(max_bs=8, max_num_tokens=8)
    with pytest.raises(NotImplementedError, match="--cuda-graph-backend-prefill disabled"):
        backend.init_forward_metadata_for_breakable_cuda_graph_capture(None)


@pytest.mark.usefixtures("published_server_args")
def test_windowed_rope_uses_the_models_rotary_embedding(monkeypatch: pytest.MonkeyPatch) -> None:
    set_config(monkeypatch)
    rig = Rig(model=model_with_rope(monkeypatch))
    assert rig.backend.cfg.windowed_rope
    expected = Rope.standard(DIM, theta=10000.0)
    assert rig.backend.rope is not None and rig.backend.rope.neox
    assert torch.allclose(rig.backend.rope.inv_freq, expected.inv_freq, rtol=1e-6)


@pytest.mark.usefixtures("published_server_args")
def test_unverifiable_rope_falls_back_to_stored_keys(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    set_config(monkeypatch)
    model = model_with_rope(monkeypatch, rope_type="linear", factor=4.0)
    with caplog.at_level(logging.WARNING, logger="mp_sglang.serving.backend"):
        rig = Rig(model=model)
    assert rig.backend.rope is None and not rig.backend.cfg.windowed_rope
    assert "LinearScalingRotaryEmbedding" in caplog.text and "windowed_rope disabled" in caplog.text


@pytest.mark.parametrize(
    ("radix_off", "capacity", "warned"), [(False, 1.0, True), (True, 1.0, False), (False, 2.0, False)]
)
def test_prefix_sharing_through_the_radix_cache_is_warned_of(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    radix_off: bool,
    capacity: float,
    warned: bool,
) -> None:
    """Requests sharing a prefix each index it: with the radix cache on and the index sized 1:1
    from the pool, start-up says how a batch can outgrow it and what to change."""
    set_config(monkeypatch, decode_path="kernels", index_capacity=capacity)
    with caplog.at_level(logging.WARNING, logger="mp_sglang.serving.backend"):
        Rig(server_args=SimpleNamespace(disable_radix_cache=radix_off))
    assert ("radix cache is on" in caplog.text) is warned
    if warned:
        assert "MULTIPOLE_INDEX_CAPACITY" in caplog.text and "--disable-radix-cache" in caplog.text
