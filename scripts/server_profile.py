"""Where a served decode step's GPU time goes: sglang's own profiler (`/start_profile`) run for a
few decode steps of a live server, and its trace summed per kernel family.

    python scripts/server_profile.py TRACE.json.gz [--layers 16]

`bench_e2e.py --profile-contexts ...` triggers the profiles while its batch decodes (each request
at the given context) and summarises them next to its throughput rows. A step's time is read from
the graph launches (one `cudaGraphLaunch` per decode step under CUDA graphs): the span between the
first and last kernel over the steps profiled. The GPU is idle for the rest of the span (host work
not hidden behind the GPU), so `busy` against `span` says whether a step is bound by the GPU.
"""

from __future__ import annotations

import argparse
import gzip
import json
import urllib.request
from pathlib import Path

# Kernel families by name fragment, first match wins: ours (mp_kernels' Triton kernels), the dense
# attention, and the rest of the model.
FAMILIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("multipole lookup", ("_scores_kernel", "_select_kernel", "_expand_kernel")),
    ("multipole exact", ("_sparse_decode_kernel",)),
    ("multipole approx", ("_replace_kernel", "_sums_kernel")),
    ("multipole merge", ("_merge_kernel",)),
    ("multipole upkeep", ("_assign_kernel", "_update_kernel", "_accumulate", "_rotate_kernel", "_add_pairs")),
    ("dense attention", ("BatchDecode", "BatchPrefill", "MergeStates")),
    ("gemm", ("gemm", "Gemm", "nvjet", "cutlass", "xmma", "sm90_", "cublas")),
    ("norm / rope / act / kv write",
     ("RMSNorm", "rms_norm", "rope", "Rope", "rotary", "silu", "act_and_mul", "store_kvcache", "set_kv")),
    ("sampling / logits", ("ampl", "ArgMax", "argmax", "softmax", "topk", "top_k", "logit")),
)  # fmt: skip


def start(base: str, output_dir: str, steps: int, profile_id: str) -> None:
    """Ask the server at `base` to profile its next `steps` forward steps (GPU activity only, no
    stacks or shapes, so the host is not slowed more than the profiler itself must)."""
    body = {
        "output_dir": output_dir,
        "num_steps": steps,
        "activities": ["GPU"],
        "with_stack": False,
        "record_shapes": False,
        "profile_id": profile_id,
    }
    request = urllib.request.Request(
        base + "/start_profile", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as resp:
        resp.read()


def family(kernel: str) -> str:
    """The family of a kernel by its name ("other" when no fragment matches)."""
    for name, fragments in FAMILIES:
        if any(fragment in kernel for fragment in fragments):
            return name
    return "other"


def summarize(events: list[dict], layers: int) -> dict:
    """Per decode step: span, GPU busy time and each kernel family's time (µs), from the trace's
    kernel and runtime events; attention families also per layer."""
    kernels = sorted((e for e in events if e.get("cat") == "kernel" and "dur" in e), key=lambda e: e["ts"])
    launches = [e for e in events if e.get("cat") == "cuda_runtime" and "GraphLaunch" in e.get("name", "")]
    if not kernels:
        raise ValueError("the trace holds no kernel events (was GPU activity profiled?)")
    steps = max(1, len(launches))
    span = kernels[-1]["ts"] + kernels[-1]["dur"] - kernels[0]["ts"]
    busy, end = 0.0, float("-inf")
    for e in kernels:  # union of the kernels' intervals
        begin, finish = e["ts"], e["ts"] + e["dur"]
        busy += max(0.0, finish - max(begin, end))
        end = max(end, finish)
    per_family: dict[str, float] = {}
    for e in kernels:
        per_family[family(e["name"])] = per_family.get(family(e["name"]), 0.0) + e["dur"]
    attention = sum(v for k, v in per_family.items() if k.startswith(("multipole", "dense attention")))
    return {
        "steps": steps,
        "graph_launches": len(launches),
        "span_us_per_step": round(span / steps, 1),
        "busy_us_per_step": round(busy / steps, 1),
        "families_us_per_step": {k: round(v / steps, 1) for k, v in sorted(per_family.items())},
        "attention_us_per_layer": round(attention / steps / layers, 1),
    }


def read_trace(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return json.load(f)["traceEvents"]


def table(summaries: dict[str, dict]) -> str:
    """One markdown column per profile (label → summary), one row per measure."""
    labels = list(summaries)
    names = sorted({k for s in summaries.values() for k in s["families_us_per_step"]})
    rows = {
        "steps": [s["steps"] for s in summaries.values()],
        "span / step (µs)": [s["span_us_per_step"] for s in summaries.values()],
        "GPU busy / step": [s["busy_us_per_step"] for s in summaries.values()],
    }
    rows |= {name: [s["families_us_per_step"].get(name, 0.0) for s in summaries.values()] for name in names}
    rows["attention / layer"] = [s["attention_us_per_layer"] for s in summaries.values()]
    lines = ["| | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    lines += [f"| {title} | " + " | ".join(map(str, cells)) + " |" for title, cells in rows.items()]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("traces", type=Path, nargs="+")
    ap.add_argument("--layers", type=int, default=16)
    args = ap.parse_args()
    summaries = {
        f"{p.parent.name}/{p.name.split('.trace')[0]}": summarize(read_trace(p), args.layers)
        for p in args.traces
    }
    print(table(summaries))


if __name__ == "__main__":
    main()
