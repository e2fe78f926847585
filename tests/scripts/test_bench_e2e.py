"""The serving benchmark's numbers and teacher-forced agreement probes, without a server."""

from __future__ import annotations

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
