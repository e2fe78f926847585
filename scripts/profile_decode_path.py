"""Host-side cost of the sglang backend's kernel decode path, eager, as a server runs it without
CUDA graphs: wall time per decode step over all layers, and the ops that take the host's time.

    python scripts/profile_decode_path.py --context 8192 --batch 8 --layers 16 --out $OUT/profile.json

Needs torch and Triton on a GPU, not sglang: the backend's `KernelDecoder` runs over a pool laid out
as sglang's (`[slots, H_kv, d]` K/V per layer, `req_to_token`), filled with random keys. The first
step builds every request's index (timed apart, and again warm and profiled on fresh decoders:
a server's first decode step of a request); the next steps are timed with a synchronize after
each, then a few more run under torch.profiler, whose tables (host time per op, GPU time per
kernel) are printed. The step that folds `update_block` new tokens into every index is timed
and profiled too, and one more is split into k-means (`solve`), buffer packing (`fill`) and the
rest; the memory the index table holds per request after the builds is reported too. With
`--compare-upkeep`, the first step and the fold are timed again on fresh indexes with the index
k-means solved task by task (`kmeans_reference.solve_each`) instead of batched, side by side.
`--server-context N` sizes the decoder's static bounds as a server of N tokens does
(`kernel_path.static_bounds`) instead of for this context. Other settings come from `MULTIPOLE_*`
variables, as a server reads them (e.g. MULTIPOLE_UPDATE_BLOCK=512).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.profiler import ProfilerActivity, profile

from mp_kernels.kmeans_reference import solve_each
from mp_sglang.method.config import MultipoleConfig
from mp_sglang.method.rope import Rope
from mp_sglang.serving.index import IndexTable
from mp_sglang.serving.kernel_path import KernelDecoder, MethodRow


def main() -> None:
    args = _parse()
    torch.manual_seed(0)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    cfg = replace(MultipoleConfig.from_env(), token_budget=args.budget)  # MULTIPOLE_* as a server
    length = args.context + 3 * cfg.update_block + 8
    slots = args.batch * length
    keys = [
        torch.randn(slots, args.heads_kv, args.dim, device=dev, dtype=torch.bfloat16)
        for _ in range(args.layers)
    ]
    values = [torch.randn_like(k) for k in keys]
    req_to_token = torch.arange(slots, device=dev, dtype=torch.int32).view(args.batch, length)
    kv_pool = SimpleNamespace(get_key_buffer=keys.__getitem__, get_value_buffer=values.__getitem__)
    if args.steps >= cfg.update_block:
        raise SystemExit(
            f"--steps must stay below update_block ({cfg.update_block}): the fold is timed apart"
        )

    def make_decoder() -> KernelDecoder:
        return KernelDecoder(
            cfg,
            req_to_token,
            kv_pool,
            range(args.layers),
            pool_tokens=slots,
            context_len=args.server_context or length,
            table=IndexTable(args.batch),
            rope=Rope.standard(args.dim, 500000.0),
        )

    decoder = make_decoder()
    layers = [
        SimpleNamespace(
            layer_id=i,
            qk_head_dim=args.dim,
            v_head_dim=args.dim,
            tp_q_head_num=args.heads_q,
            scaling=args.dim**-0.5,
        )
        for i in range(args.layers)
    ]
    q = torch.randn(args.batch, args.heads_q * args.dim, device=dev, dtype=torch.bfloat16)
    out = torch.empty_like(q)

    def plan(seq: int) -> None:
        budget = decoder.cfg.budget_tokens(seq)
        decoder.plan([MethodRow(b, b, seq, 0, budget) for b in range(args.batch)], args.batch)

    def layers_forward() -> None:
        for layer in layers:
            decoder.attend(q, out, layer)

    def step(seq: int) -> None:
        plan(seq)
        layers_forward()

    def timed(seq: int) -> float:
        sync()
        start = time.perf_counter()
        step(seq)
        sync()
        return time.perf_counter() - start

    build_s = timed(args.context)
    table_bytes = decoder.table.nbytes()  # what the requests' indexes hold between folds
    times = [timed(args.context + i) for i in range(1, args.steps + 1)]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for i in range(args.steps + 1, args.steps + 4):
            step(args.context + i)
        sync()
    table, device_table = _tables(prof, args.rows, dev.type == "cuda")
    fold_ms = 1000 * timed(args.context + cfg.update_block)  # after the steps: a fold is not undone
    with profile(activities=activities) as fold_prof:
        step(args.context + 2 * cfg.update_block)  # the next fold, under the profiler
        sync()
    fold_table, fold_device_table = _tables(fold_prof, args.rows, dev.type == "cuda")
    graph_ms = (
        _graph_replay_ms(plan, layers_forward, args.context + 2 * cfg.update_block + 1)
        if dev.type == "cuda"
        else None
    )
    breakdown = _fold_breakdown(decoder, timed, args.context + 3 * cfg.update_block, sync)
    # The first step above also compiled the decode kernels; a second decoder builds warm, which
    # is what a server's first decode step of a request costs (its time to the second token).
    del decoder
    decoder = make_decoder()
    warm_build_s = timed(args.context)
    del decoder
    decoder = make_decoder()
    with profile(activities=activities) as build_prof:
        step(args.context)
        sync()
    build_table, build_device_table = _tables(build_prof, args.rows, dev.type == "cuda")
    with_solve_each = {}
    if args.compare_upkeep:
        del decoder
        decoder = make_decoder()
        decoder.solve = solve_each
        with_solve_each = {
            "first_step_with_index_build_s_solve_each": timed(args.context),
            "fold_step_ms_solve_each": 1000 * timed(args.context + cfg.update_block),
        }
    result = {
        "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu",
        "args": vars(args) | {"out": str(args.out)},
        "first_step_with_index_build_s": build_s,
        "warm_first_step_with_index_build_s": warm_build_s,
        "step_ms_median": 1000 * statistics.median(times),
        "step_ms_all": [round(1000 * t, 3) for t in times],
        "per_layer_ms_median": 1000 * statistics.median(times) / args.layers,
        "graph_replay_ms_per_step": graph_ms,
        "fold_step_ms": fold_ms,
        "fold_breakdown_ms": breakdown,
        "index_table_mib_per_request": table_bytes / 2**20 / args.batch,
        **with_solve_each,
    }
    print(table)
    print(device_table)
    print(fold_table)
    print(fold_device_table)
    print(build_table)
    print(build_device_table)
    print(json.dumps({k: v for k, v in result.items() if k != "step_ms_all"}, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tables = {
        "profile": table,
        "device_profile": device_table,
        "fold_profile": fold_table,
        "fold_device_profile": fold_device_table,
        "build_profile": build_table,
        "build_device_profile": build_device_table,
    }
    args.out.write_text(json.dumps(result | tables, indent=1))


def _tables(prof: profile, rows: int, on_gpu: bool) -> tuple[str, str]:
    """The profile's ops by host time, and by GPU time (empty without a GPU)."""
    averages = prof.key_averages()
    by_device = averages.table(sort_by="self_device_time_total", row_limit=rows) if on_gpu else ""
    return averages.table(sort_by="self_cpu_time_total", row_limit=rows), by_device


def _fold_breakdown(decoder: KernelDecoder, timed, seq: int, sync) -> dict[str, float]:
    """One more fold, with the k-means solver and the buffer packing timed apart (synchronized
    around each, so the parts add up to a little more than an unsplit fold)."""
    parts = {"solve": 0.0, "fill": 0.0}

    def timing(name, fn):
        def wrapped(*args, **kwargs):
            sync()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync()
                parts[name] += time.perf_counter() - start

        return wrapped

    solve, fill = decoder.solve, decoder.buffers.fill
    decoder.solve, decoder.buffers.fill = timing("solve", solve), timing("fill", fill)
    try:
        total = timed(seq)
    finally:
        decoder.solve, decoder.buffers.fill = solve, fill
    ms = {name: 1000 * t for name, t in parts.items()}
    return {"total": 1000 * total, **ms, "rest": 1000 * total - sum(ms.values())}


def _graph_replay_ms(plan, layers_forward, seq: int) -> float:
    """All layers' attention captured in one CUDA graph (as sglang's decode graphs hold it), timed
    by replaying it after the host-side plan: GPU time per step without launch overhead."""
    plan(seq)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        layers_forward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        layers_forward()
    times = []
    for _ in range(20):
        plan(seq)
        torch.cuda.synchronize()
        start = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def _parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--heads-q", type=int, default=32)
    ap.add_argument("--heads-kv", type=int, default=8)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--budget", type=float, default=0.02)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rows", type=int, default=30, help="profiler table rows")
    ap.add_argument("--server-context", type=int, help="size the static bounds as a server of N tokens")
    ap.add_argument("--compare-upkeep", action="store_true", help="also time index upkeep with solve_each")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test of the script (torch references)")
    ap.add_argument("--out", type=Path, default=Path("profile_decode_path.json"))
    return ap.parse_args()


if __name__ == "__main__":
    main()
