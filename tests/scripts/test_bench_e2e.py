"""The serving benchmark's numbers and teacher-forced agreement probes, without a server."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import bench_e2e  # noqa: E402


def test_probe_positions_are_spread_and_leave_a_next_token():
    assert bench_e2e.probe_positions(300, 100)[:3] == [0, 3, 6]
    positions = bench_e2e.probe_positions(10, 50)
    assert positions == list(range(9))  # at most one per position, L + 1 <= 9
    assert bench_e2e.probe_positions(1, 5) == [] and bench_e2e.probe_positions(10, 0) == []
    assert bench_e2e.probe_positions(10, 1) == [0]


def test_probes_ask_for_the_forced_context_and_score_the_decoded_token(monkeypatch):
    reference = [(100 + i, 0.5 + i) for i in range(6)]  # (token, margin)
    seen = []

    def fake_post(base, body):
        ids = body["input_ids"]
        seen.append(ids)
        position = len(ids) - 2  # two prompt ids
        prefill = reference[position][0] if position != 3 else 7  # context differs at L = 3
        decoded = reference[position + 1][0] if position != 2 else 9  # decode disagrees at L = 2
        return {"meta_info": {"output_token_logprobs": [[-0.1, prefill, None], [-0.2, decoded, None]]}}

    monkeypatch.setattr(bench_e2e, "_post", fake_post)
    probes = bench_e2e._probe("http://x", [1, 2], reference, [0, 2, 3, 4])
    assert sorted(len(ids) for ids in seen) == [2, 4, 5, 6]
    assert [1, 2, 100, 101] in seen  # the prompt plus the reference's first two tokens
    summary = bench_e2e.summarize_probes(probes)
    assert summary == {
        "probes": 4,
        "same_context": 3,
        "decode_agreement": round(2 / 3, 4),
        "miss_positions": [2],
        "miss_reference_margins": [3.5],
    }


def test_repeated_batches_report_the_median_of_each_figure():
    def sample(ttft: float, tok_s: float) -> bench_e2e.Row:
        return bench_e2e.Row("multipole", 65536, 1, 160, ttft, 0.01, tok_s, 4.0)

    row = bench_e2e.median_row([sample(12.3, 250.0), sample(2.3, 262.0), sample(2.2, 258.0)])
    assert (row.ttft_s, row.decode_tok_s, row.samples) == (2.3, 258.0, 3)
    assert (row.backend, row.context, row.batch, row.itl_ms) == ("multipole", 65536, 1, 4.0)


def test_table_labels_drop_what_every_backend_shares():
    flags = "--cuda-graph-max-bs 32 --cuda-graph-backend-prefill disabled"
    specs = [f"triton {flags}", f"MULTIPOLE_TOKEN_BUDGET=1.0 multipole {flags}", f"multipole {flags}"]
    assert bench_e2e.short_labels(specs) == ["triton", "MULTIPOLE_TOKEN_BUDGET=1.0 multipole", "multipole"]
    tp = ["flashinfer --tp 2 --x 1", "multipole --tp 2 --x 2"]
    assert bench_e2e.short_labels(tp) == ["flashinfer --x 1", "multipole --x 2"]
    assert bench_e2e.short_labels(["multipole", "multipole"]) == ["multipole", "multipole"]  # no label left


def _lockstep_streams(batch: int, tokens: int, seconds_per_token) -> list[bench_e2e.Stream]:
    """Streams of `batch` requests that produce one token per chunk, token n after
    `seconds_per_token(n)` more seconds (the first token arrives at 0: prefill)."""
    times, now = [], 0.0
    for n in range(1, tokens + 1):
        now += seconds_per_token(n) if n > 1 else 0.0
        times.append(now)
    arrivals = [(t, n + 1) for n, t in enumerate(times)]
    return [bench_e2e.Stream(sent=-1.0, arrivals=list(arrivals)) for _ in range(batch)]


def test_client_buckets_follow_the_context_per_request():
    # 1K prompt, 5K new tokens in buckets of 2K context: 1 ms a token below 2K context, 2 ms after.
    streams = _lockstep_streams(8, 5 * 1024, lambda n: 0.001 if 1024 + n <= 2048 else 0.002)
    curve = bench_e2e.client_buckets(streams, 1024, 2048)
    assert list(curve) == [0, 2048, 4096]
    assert curve[0] == 8000.0 and curve[2048] == 4000.0 and curve[4096] == 4000.0


def test_server_buckets_read_sglang_decode_lines_of_the_full_batch():
    log = "\n".join(
        [
            "[2026-12-03 10:00:00] Decode batch, #running-req: 8, #token: 12000, token usage: 0.01, "
            "cuda graph: True, gen throughput (token/s): 2000.00, #queue-req: 0,",
            "[2026-12-03 10:00:01] Decode batch, #running-req: 8, #token: 14000, token usage: 0.01, "
            "cuda graph: True, gen throughput (token/s): 2200.00, #queue-req: 0,",
            "[2026-12-03 10:00:02] Decode batch, #running-req: 8, #token: 40000, token usage: 0.02, "
            "cuda graph: True, gen throughput (token/s): 1800.50, #queue-req: 0,",
            "[2026-12-03 10:00:03] Decode batch, #running-req: 3, #token: 15000, token usage: 0.01, "
            "cuda graph: True, gen throughput (token/s): 900.00, #queue-req: 0,",  # the tail: left out
            "[2026-12-03 10:00:04] Prefill batch, #new-seq: 8, #new-token: 8192, #cached-token: 0,",
        ]
    )
    assert bench_e2e.server_buckets(log, 8, 2048) == {0: 2100.0, 4096: 1800.5}


def test_bucket_table_shows_each_backend_over_the_first():
    def row(name, client, server):
        curves = {"client_buckets": client, "server_buckets": server}
        return {"backend": name, "context": 1024, "batch": 8, **curves}

    rows = [row("fi", {0: 2000.0, 2048: 1000.0}, {0: 2100.0})]
    rows.append(row("mp", {0: 1500.0, 2048: 1500.0}, {0: 1500.0}))
    lines = bench_e2e.bucket_table(rows, ["fi", "mp"], {"fi": "fi", "mp": "mp"})
    assert lines[-2:] == ["| fi | 2000 / 2100 | 1000 / - |", "| mp | 0.75 / 0.71 | 1.50 / - |"]
    assert "| backend | 0K | 2K |" in lines


def test_sglang_clients_throughput_is_read_from_its_report():
    report = (
        "batch size: 8\ninput_len: 1024\noutput_len: 16384\nlatency: 61.20 s\n"
        "input throughput: 40960.00 tok/s\noutput throughput: 2153.91 tok/s\nlast_ttft: 0.20 s\n"
    )
    assert bench_e2e.parse_one_batch_output(report) == 2153.91
    assert bench_e2e.parse_one_batch_output("Traceback (most recent call last):\n") is None


def test_client_table_shows_every_measure_a_row_has():
    rows = [
        {"backend": "fi", "context": 1024, "batch": 8, "decode_tok_s": 2200.0, "server_decode_tok_s": 2210.0,
         "sglang_client_tok_s": 2000.0},
        {"backend": "mp", "context": 1024, "batch": 8, "decode_tok_s": 2400.0, "server_decode_tok_s": 2420.0,
         "sglang_client_tok_s": None},
        {"backend": "mp", "context": 2048, "batch": 8, "decode_tok_s": 2400.0, "server_decode_tok_s": 0.0},
    ]  # fmt: skip
    lines = bench_e2e.client_table(rows, {"fi": "fi", "mp": "mp"})
    assert lines[-2:] == ["| fi | 1024 | 8 | 2200 | 2210 | 2000 |", "| mp | 1024 | 8 | 2400 | 2420 | - |"]
    assert bench_e2e.client_table(rows[2:], {"mp": "mp"}) == []


def test_server_decode_rate_weighs_windows_by_their_time_and_skips_the_first():
    line = "Decode batch, #running-req: {}, #token: 9000, cuda graph: True, gen throughput (token/s): {}\n"
    log = "".join(line.format(n, rate) for n, rate in [(8, 10.0), (8, 2000.0), (8, 1000.0), (3, 500.0)])
    assert bench_e2e.server_decode_rate(log, 8) == round(2 / (1 / 2000 + 1 / 1000), 1)
    assert bench_e2e.server_decode_rate(log, 32) == 0.0


def test_streamed_token_counts_come_from_the_raw_chunk_whatever_the_text_says():
    chunk = b'data: {"text": "say \\"completion_tokens\\": 99", "meta_info": {"completion_tokens": 7}}\n'
    assert bench_e2e.streamed_tokens(chunk) == 7
    assert bench_e2e.streamed_tokens(b"data: [DONE]\n") is None and bench_e2e.streamed_tokens(b"\n") is None


def test_generate_collects_every_streamed_chunk_from_a_live_server():
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Streamer(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for n in range(1, 6):
                text = "x" * 1000 * n  # every chunk repeats the text so far
                chunk = {"text": text, "meta_info": {"completion_tokens": n}}
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.write(b"data: [DONE]\n\n")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Streamer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        streams = bench_e2e._generate(f"http://127.0.0.1:{server.server_port}", [[1, 2], [3]], 5)
    finally:
        server.shutdown()
    assert [[tokens for _, tokens in s.arrivals] for s in streams] == [[1, 2, 3, 4, 5]] * 2
