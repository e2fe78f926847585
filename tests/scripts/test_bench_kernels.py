"""The kernel benchmark's step timeline, from a synthetic profiler trace (no GPU)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import bench_kernels  # noqa: E402


def _kernel(name: str, ts: float, dur: float, stream: int) -> dict:
    return {"cat": "kernel", "name": name, "ts": ts, "dur": dur, "args": {"stream": stream}}


def test_timeline_is_the_last_replay_after_its_flush():
    fill = "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<int>>"
    events = [
        _kernel(fill, 0.0, 50.0, 7),
        _kernel("_scores_kernel", 60.0, 5.0, 7),
        {"cat": "cuda_runtime", "name": "cudaGraphLaunch", "ts": 55.0, "dur": 3.0},
        _kernel(fill, 100.0, 50.0, 7),
        _kernel("_replace_kernel", 170.0, 7.0, 9),  # out of order in the trace
        _kernel("_scores_kernel", 160.0, 5.5, 7),
        _kernel("_merge_kernel", 180.0, 3.0, 7),
    ]
    timeline = bench_kernels.kernel_timeline(events)
    assert [k["name"] for k in timeline] == ["_scores_kernel", "_replace_kernel", "_merge_kernel"]
    assert [k["start_us"] for k in timeline] == [0.0, 10.0, 20.0]
    assert timeline[1]["stream"] == 9 and timeline[0]["dur_us"] == 5.5
    line = bench_kernels._timeline_line(32768, 1, timeline)
    assert line.startswith("timeline ctx=32768 B=1 2%: span 23.0 us; scores 0.0+5.5 s7; replace 10.0+7.0 s9")
    assert bench_kernels.kernel_timeline([_kernel("_scores_kernel", 0.0, 1.0, 7)]) == []
    labelled = bench_kernels._timeline_line(2048, 8, timeline, "unindexed")
    assert labelled.startswith("timeline ctx=2048 B=8 2% (unindexed): span 23.0 us")
