"""The soak's request mix, its classification of what a server answers, and its verdict, against a
stub server that behaves as sglang's /generate does (no GPU)."""

from __future__ import annotations

import json
import random
import sys
import threading
from argparse import Namespace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import soak_serve  # noqa: E402

WINDOW = 8192


class _Stub(BaseHTTPRequestHandler):
    """/health; /generate refusing what sglang refuses, streaming one chunk per token."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.send_response(200)
        self.end_headers()

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        params, ids = body["sampling_params"], body["input_ids"]
        if not ids or params["temperature"] < 0 or len(ids) + params["max_new_tokens"] > WINDOW:
            self.send_response(400)
            self.end_headers()
            self.wfile.write(b'{"error": "bad request"}')
            return
        self.send_response(200)
        self.end_headers()
        new = params["max_new_tokens"]
        if not body["stream"]:
            replies = [{"text": "x", "meta_info": {"completion_tokens": new}}] * params.get("n", 1)
            self.wfile.write(json.dumps(replies).encode())
            return
        try:
            for k in range(1, new + 1):
                self.wfile.write(b'data: {"text": "x", "meta_info": {"completion_tokens": %d}}\n\n' % k)
            self.wfile.write(b"data: [DONE]\n\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client cancelled


@pytest.fixture
def stub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_the_mix_has_every_kind_within_the_window():
    rng, window = random.Random(0), 65536  # the default: every shared prefix fits
    plans = [soak_serve.draw(rng, window) for _ in range(2000)]
    kinds = {p.kind for p in plans}
    assert kinds == {"plain", "shared", "parallel", "cancel", "too_long", "bad_params", "empty"}
    shared = sum(p.kind == "shared" for p in plans) / len(plans)
    assert 0.28 < shared < 0.38
    good = [p for p in plans if not p.bad]
    assert all(p.prompt_tokens + p.new_tokens <= window for p in good)
    assert all(16 <= p.new_tokens <= 4096 for p in good)


@pytest.mark.parametrize(
    "plan, status",
    [
        (soak_serve.Plan("plain", 100, 40), "ok"),
        (soak_serve.Plan("parallel", 100, 30, n=4), "ok"),
        (soak_serve.Plan("cancel", 100, 500, cancel_after=5), "cancelled"),
        (soak_serve.Plan("too_long", WINDOW + 10, 16), "refused"),
        (soak_serve.Plan("bad_params", 10, 16), "refused"),
        (soak_serve.Plan("empty", 0, 16), "refused"),
    ],
)
def test_each_kind_is_classified_by_what_came_back(stub, plan, status):
    ids = soak_serve.prompt_ids(plan, random.Random(0), [], vocab=1000)
    outcome = soak_serve.send(stub, plan, soak_serve.request_body(plan, ids))
    assert outcome.status == status == soak_serve.expected_status(plan.kind), outcome
    if status == "ok":
        assert outcome.tokens == plan.new_tokens * plan.n


def test_a_short_soak_accounts_for_every_request_and_passes(stub, tmp_path, monkeypatch):
    monkeypatch.setattr(soak_serve, "SHARED_PREFIXES", (256, 512, 1024))
    args = Namespace(seed=1, context_length=WINDOW, minutes=0.03, concurrency=4)
    result = soak_serve.soak(stub, None, args, vocab=1000)
    verdict = result["verdict"]
    assert verdict["passed"], verdict["failures"]
    assert verdict["requests"] == len(result["outcomes"]) > 0
    assert result["samples"] and result["samples"][-1]["healthy"]


def test_the_verdict_fails_on_a_lost_request_or_a_down_server():
    ok = soak_serve.Outcome("plain", "ok", 10, 10)
    lost = soak_serve.Outcome("plain", "error", 3, 10, detail="ConnectionResetError")
    up, down = soak_serve.Sample(t=5, healthy=True), soak_serve.Sample(t=10, healthy=False)
    assert soak_serve.verdict([ok], [up])["passed"]
    assert not soak_serve.verdict([ok, lost], [up])["passed"]
    assert soak_serve.verdict([ok], [up, down])["unhealthy_at_s"] == [10]
    assert not soak_serve.verdict([ok], [up, down])["passed"]


def test_index_occupancy_is_read_from_the_backends_log_line(stub, tmp_path):
    from mp_sglang.serving.kernel_path import OCCUPANCY_LOG

    log = tmp_path / "server.log"
    log.write_text(
        f"[t] {OCCUPANCY_LOG % (10, 100, 200, 4000, 3)}\n[t] {OCCUPANCY_LOG % (12, 100, 260, 4000, 4)}\n"
    )
    sample = soak_serve.sample(stub, log, 5.0)
    assert sample.healthy and sample.index_clusters == (12, 100) and sample.index_tokens == (260, 4000)
