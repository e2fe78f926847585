"""Per-request settings through sglang's own objects: SamplingParams.verify (the HTTP 400), the
OpenAI request models, Req, and the backend's rows in a batch that mixes settings."""

from __future__ import annotations

from array import array
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("sglang.srt", reason="sglang is not installed (see docs/sglang.md)")

from _sglang_rig import LAYERS, Replay, Request, Rig, set_config
from sglang.srt.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest
from sglang.srt.managers.schedule_batch import Req
from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode
from sglang.srt.sampling.sampling_params import SamplingParams

from mp_sglang.method.config import MultipoleConfig
from mp_sglang.method.reference import dense_attention
from mp_sglang.serving import plugin
from mp_sglang.serving.request_settings import ROW_SETTINGS, RequestSetting

TOL = 1e-4
VOCAB = 1000


@pytest.fixture(autouse=True)
def fresh_row_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows are numbered from 0 in every rig: start each test with none noted, as a process
    without a multipole backend."""
    monkeypatch.setattr(ROW_SETTINGS, "_by_row", {})
    monkeypatch.setattr(ROW_SETTINGS, "listening", False)


def _verify(custom_params: object) -> None:
    SamplingParams(custom_params=custom_params).verify(VOCAB)


@pytest.mark.parametrize(
    "custom_params",
    [None, {}, {"thinking_budget": 5}, {"multipole": "dense"}, {"multipole": {"token_budget": 0.05}}],
)
def test_verify_accepts_good_settings(custom_params: object) -> None:
    _verify(custom_params)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("sparse", r'must be "dense" or \{"token_budget": <fraction in \(0, 1\]>\}; got \'sparse\''),
        ({"budget": 0.05}, r"unknown key\(s\) \['budget'\]; accepted keys: \['token_budget'\]"),
        ({}, r"must be \"dense\" or"),
        ({"token_budget": 0}, r"got token_budget=0"),
        ({"token_budget": 1.5}, r"got token_budget=1.5"),
        ({"token_budget": True}, r"got token_budget=True"),
        ({"token_budget": "0.05"}, r"got token_budget='0.05'"),
        ({"token_budget": 0.2}, r"0.2 is above this server's limit 0.1 \(MULTIPOLE_MAX_REQUEST_BUDGET"),
    ],
)
def test_verify_refuses_bad_settings_with_a_clear_message(value: object, message: str) -> None:
    """sglang's verify raises ValueError, which its HTTP and OpenAI handlers answer with a 400."""
    with pytest.raises(ValueError, match=message):
        _verify({"multipole": value})


def test_limit_follows_the_server_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MULTIPOLE_MAX_REQUEST_BUDGET", "0.5")
    _verify({"multipole": {"token_budget": 0.2}})


def test_openai_requests_carry_custom_params_into_sampling_params() -> None:
    """The openai client's `extra_body={"custom_params": ...}` lands as a top-level request field."""
    setting = {"multipole": {"token_budget": 0.05}}
    chat = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "custom_params": setting}
    )
    assert chat.to_sampling_params(stop=[], model_generation_config={})["custom_params"] == setting
    completion = CompletionRequest.model_validate({"model": "m", "prompt": "hi", "custom_params": setting})
    assert completion.custom_params == setting  # serving_completions passes it on as is


def _note_batch(requests: list[Request], custom_params: list[object]) -> None:
    """What sglang does before a forward: `ForwardBatch.init_new` over the batch's `Req`s (here
    only the plugin's hook on it runs; the rig builds the ForwardBatch itself)."""
    reqs = []
    for request, params in zip(requests, custom_params, strict=True):
        req = Req(f"r{request.row}", "", array("i", [1, 2]), SamplingParams(custom_params=params))
        if hasattr(req, "req_pool_idx"):  # sglang 0.5.17
            req.req_pool_idx = request.row
        else:
            req.kv.req_pool_idx = request.row
        reqs.append(req)
    plugin._after_forward_batch(None, ForwardBatch, SimpleNamespace(reqs=reqs))


def test_hooks_are_applied_and_rows_follow_their_requests() -> None:
    plugin.require_request_hooks()
    settings = [{"multipole": "dense"}, {"multipole": {"token_budget": 0.05}}, None]
    rows = [Request(row) for row in range(3)]
    _note_batch(rows, settings)
    assert ROW_SETTINGS.get(0) is None  # no multipole backend in this process: nothing noted
    rig = Rig(rows=3)
    a, b, c = (rig.new_request() for _ in range(3))
    _note_batch([a, b, c], settings)
    assert ROW_SETTINGS.get(a.row) == RequestSetting(dense=True)
    assert ROW_SETTINGS.get(b.row) == RequestSetting(token_budget=0.05)
    assert ROW_SETTINGS.get(c.row) is None
    rig.finish(a)  # the row goes to a new request, without a setting, at its first batch
    fresh = rig.new_request()
    assert fresh.row == a.row
    _note_batch([fresh], [{"thinking_budget": 3}])
    assert ROW_SETTINGS.get(fresh.row) is None


def _mixed_batch(
    rig: Rig,
    server_budget: float,
    own_budget: float,
    graph_pad: int | None = None,
    lengths: tuple[int, int, int] = (150, 260, 200),
    steps: int = 12,
) -> None:
    """Three requests of `lengths` decode in one batch: one dense, one with its own budget, one
    with the server's; each output matches its own setting."""
    cfg = MultipoleConfig.from_env()
    replays = {"own": Replay(replace(cfg, token_budget=own_budget)), "server": Replay(cfg)}
    dense, own, default = (rig.new_request() for _ in range(3))
    requests = [dense, own, default]
    _note_batch(requests, [{"multipole": "dense"}, {"multipole": {"token_budget": own_budget}}, {}])
    rig.forward(list(zip(requests, lengths, strict=True)), ForwardMode.EXTEND)
    differs = False
    for step in range(steps):
        _note_batch(requests, [{"multipole": "dense"}, {"multipole": {"token_budget": own_budget}}, {}])
        pad = None if graph_pad is None else step % (graph_pad + 1)
        out = rig.forward([(r, 1) for r in requests], ForwardMode.DECODE, graph_pad=pad)
        budgets = {row.req: row.budget for row in rig.backend._rows}
        assert budgets.get(dense.row, 0) == 0  # kernel path: an exact row; reference: the dense output
        assert budgets[own.row] == int(own_budget * own.length)
        assert budgets[default.row] == int(server_budget * default.length)
        for layer in range(LAYERS):
            q = out.queries[layer]
            exact = dense_attention(q[0], dense.keys[layer], dense.values[layer])
            assert torch.allclose(out.outputs[layer][0], exact, atol=TOL)
            expected_own = replays["own"].decode(own, q[1], layer)
            assert torch.allclose(out.outputs[layer][1], expected_own, atol=TOL)
            differs |= not torch.allclose(replays["server"].decode(own, q[1], layer), expected_own, atol=TOL)
            expected_default = replays["server"].decode(default, q[2], layer)
            assert torch.allclose(out.outputs[layer][2], expected_default, atol=TOL)
    assert differs, "the request's own budget must change its output (else the test shows nothing)"
    assert len(rig.backend.table) == 2  # a dense request is never indexed


@pytest.mark.parametrize("decode_path", ["reference", "kernels"])
def test_mixed_batch_rows_follow_their_own_settings(monkeypatch: pytest.MonkeyPatch, decode_path: str):
    set_config(monkeypatch, token_budget=0.05, max_request_budget=0.4, decode_path=decode_path)
    _mixed_batch(Rig(rows=4), server_budget=0.05, own_budget=0.4)


def test_mixed_batch_in_a_graph_replay(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings are per-row data: the same buffers serve every mix, padding rows included."""
    set_config(monkeypatch, token_budget=0.05, max_request_budget=0.4, decode_path="kernels")
    rig = Rig(rows=6)
    rig.backend.init_cuda_graph_state(max_bs=6, max_num_tokens=6)
    _mixed_batch(rig, server_budget=0.05, own_budget=0.4, graph_pad=2)


@pytest.mark.gpu
def test_mixed_batch_on_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    set_config(monkeypatch, token_budget=0.05, max_request_budget=0.4, decode_path="kernels")
    rig = Rig(rows=6, device="cuda", context=4096, kv_slots=8192)
    rig.backend.kernels.kernel_backend = "triton"
    rig.backend.init_cuda_graph_state(max_bs=6, max_num_tokens=6)
    _mixed_batch(rig, server_budget=0.05, own_budget=0.4, graph_pad=2, lengths=(2300, 1500, 700))


def test_backend_refuses_to_start_without_the_hooks(monkeypatch: pytest.MonkeyPatch) -> None:
    """sglang logs, not raises, a hook it could not apply: the backend stops the start-up instead."""
    from sglang.srt.plugins.hook_registry import HookRegistry

    monkeypatch.setattr(HookRegistry, "_patched", set())
    with pytest.raises(ValueError, match="did not apply the plugin's hooks"):
        Rig()


def test_registration_names_a_hook_target_this_sglang_lacks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plugin, "_BATCH_TARGET", "sglang.srt.model_executor.forward_batch_info.Gone.init_new")
    with pytest.raises(RuntimeError, match="this sglang has no .*Gone.init_new to hook into"):
        plugin._join_request_path()


def test_mixed_batch_through_the_triton_kernels_in_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU's kernels (here in Triton's CPU interpreter) take each row's budget from the row."""
    set_config(monkeypatch, token_budget=0.05, max_request_budget=0.4, decode_path="kernels")
    rig = Rig(rows=4)
    rig.backend.kernels.kernel_backend = "triton"
    _mixed_batch(rig, server_budget=0.05, own_budget=0.4, steps=3)
