"""The server-profile summary: steps from graph launches, busy time as the union of kernels."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import server_profile  # noqa: E402


def _kernel(name: str, ts: float, dur: float) -> dict:
    return {"cat": "kernel", "name": name, "ts": ts, "dur": dur}


def test_summary_splits_each_step_by_family_and_counts_overlap_once(tmp_path):
    events = [
        {"cat": "cuda_runtime", "name": "cudaGraphLaunch", "ts": 0, "dur": 5},
        {"cat": "cuda_runtime", "name": "cudaGraphLaunch", "ts": 100, "dur": 5},
        _kernel("nvjet_tst_128x64", 10, 30),
        _kernel("_sparse_decode_kernel", 40, 20),
        _kernel("_replace_kernel", 50, 20),  # overlaps the sparse kernel by 10
        _kernel("_merge_kernel", 70, 4),
        _kernel("nvjet_tst_128x64", 110, 30),
        _kernel("BatchDecodeWithPagedKVCacheKernel", 150, 10),
        _kernel("some_unknown_thing", 170, 2),
    ]
    path = tmp_path / "ctx2048-TP-0.trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    summary = server_profile.summarize(server_profile.read_trace(path), layers=2)
    assert summary["steps"] == 2
    assert summary["span_us_per_step"] == (172 - 10) / 2
    assert summary["busy_us_per_step"] == (30 + 30 + 4 + 30 + 10 + 2) / 2  # 50..60 counted once
    families = summary["families_us_per_step"]
    assert families == {
        "gemm": 30.0,
        "multipole exact": 10.0,
        "multipole approx": 10.0,
        "multipole merge": 2.0,
        "dense attention": 5.0,
        "other": 1.0,
    }
    assert summary["attention_us_per_layer"] == (20 + 20 + 4 + 10) / 2 / 2
    table = server_profile.table({"a": summary})
    assert "| multipole exact | 10.0 |" in table and "| span / step (µs) | 81.0 |" in table
