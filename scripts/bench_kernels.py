# ruff: noqa: B023, E731  (timing closures over loop variables are called inside the loop)
"""Benchmark of the Multipole decode kernels against dense decoding (one GPU call).

    python scripts/bench_kernels.py --out $OUT/bench_kernels.json

Llama-3-8B / Qwen3-8B decode shapes (32 query heads, 8 KV heads, d=128, bf16), page size 16.
For each context x batch x budget: dense FlashInfer (BatchDecodeWithPagedKVCacheWrapper, measured
in a child process when the package is importable), dense torch SDPA, dense decoding through our
own sparse kernel over the full list, and Multipole split into lookup / sparse / replacement /
merge, each captured in a CUDA graph and timed by replaying it with triton.testing.do_bench (median,
L2 flushed before every replay); at 2 % also the whole step's kernel timeline from the profiler
(when each kernel started and on which stream: the parts overlap). Achieved GB/s is over the
bytes each part must read; the copy bandwidth is measured in the same run. Error is relative to
fp32 dense attention on the same inputs, for random keys (no cluster structure: the worst case)
and for clustered keys (drawn around a few hundred centres per head). Prints the table last;
writes all numbers as JSON.

A server sizes every step for its longest possible row (`kernel_path.static_bounds`), not for the
batch at hand. `--server-context N` also times each step as a server of N tokens runs it: the same
index with the server's cluster and exact-token bounds, and, for contexts below `dense_below`, the
row as that server attends it unindexed (every token exact through the same kernels). A second
table compares both with FlashInfer.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time

import torch

from mp_kernels import centroid_replace as replace_module
from mp_kernels import kmeans
from mp_kernels import sparse_decode as sparse_module
from mp_kernels.centroid_lookup import centroid_scores, lookup, select_within_budget
from mp_kernels.centroid_replace import centroid_replace, merge_partials
from mp_kernels.decode import default_splits, multipole_decode, replacement_splits
from mp_kernels.layout import BatchIndex, ExactTokens, LevelTensors, PagedKV
from mp_kernels.sparse_decode import sparse_decode
from mp_sglang.method.config import MultipoleConfig
from mp_sglang.serving.kernel_path import static_bounds

HQ, HKV, DIM, PAGE = 32, 8, 128, 16
SINKS, RECENT, BLOCK, TPC = 10, 128, 8192, 16
KMEANS_ITERS, UPDATE_ITERS, UPDATE_BLOCK = 10, 3, 128
LEVEL_RATIO, LEVEL_BUDGET_MULTIPLIER = 8, 4.0
DT = torch.bfloat16
CONTEXTS: list[int] = []
SERVER_CONTEXT: list[int] = []  # --server-context, when given
DEVICE = "cuda"  # --smoke-cpu switches to the CPU (torch references, host timers) to check the script


def main() -> None:
    args = _parse()
    if args.flashinfer_child:
        print(json.dumps(_flashinfer_times(json.loads(args.flashinfer_child))))
        return
    torch.manual_seed(0)
    if args.smoke_cpu:
        global DEVICE
        DEVICE = "cpu"
        result: dict = {
            "device": "cpu (smoke test)",
            "rows": [],
            "build": [],
            "tiles": [],
            "hierarchy": [],
            "timeline": [],
        }
    else:
        props = torch.cuda.get_device_properties(0)
        result = {
            "device": props.name,
            "sms": props.multi_processor_count,
            "rows": [],
            "build": [],
            "tiles": [],
            "hierarchy": [],
            "timeline": [],
        }
    result["copy_gbps"] = _copy_bandwidth()
    print(f"device {result['device']}; measured copy bandwidth {result['copy_gbps']:.0f} GB/s", flush=True)
    CONTEXTS[:] = args.contexts
    SERVER_CONTEXT[:] = [args.server_context] if args.server_context else []
    configs = [(c, b) for c in args.contexts for b in args.batches]
    fi = {"status": "not run"} if args.smoke_cpu else _run_flashinfer_child(configs, args.flashinfer_timeout)
    result["flashinfer"] = fi.get("status", "ok")
    result["flashinfer_ms"] = {k: v for k, v in fi.items() if k != "status"}
    for ctx, batch in configs:
        need = 2 * batch * ctx * HKV * DIM * 2 * 2.3  # pool + SDPA copy + headroom
        if DEVICE == "cuda" and need > torch.cuda.mem_get_info()[0]:
            print(f"skip ctx={ctx} batch={batch}: needs ~{need / 2**30:.0f} GiB", flush=True)
            result["rows"].append({"ctx": ctx, "batch": batch, "skipped": "memory"})
            continue
        for mode in ("random", "clustered") if batch == 1 else ("random",):
            result["rows"] += _bench_config(ctx, batch, mode, args.budgets, fi.get(f"{ctx}x{batch}"), result)
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
    _print_table(result)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench_kernels.json")
    p.add_argument("--contexts", type=int, nargs="+", default=[16384, 32768, 65536, 131072])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--budgets", type=float, nargs="+", default=[0.01, 0.02, 0.05])
    p.add_argument("--flashinfer-timeout", type=int, default=180)
    p.add_argument("--server-context", type=int, help="also time steps as a server of N tokens sizes them")
    p.add_argument("--flashinfer-child", default="")
    p.add_argument("--smoke-cpu", action="store_true", help="tiny run on the CPU to check the script")
    return p.parse_args()


# --------------------------------------------------------------------------- timing


def _time_graph(fn, reps: int = 200) -> float:
    """Median ms of `fn` captured in a CUDA graph, replayed with the L2 flushed before each."""
    import triton.testing

    if DEVICE == "cpu":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    return triton.testing.do_bench(_captured(fn).replay, warmup=25, rep=reps, return_mode="median")


def _captured(fn) -> torch.cuda.CUDAGraph:
    """`fn` run once (compiles), once on a side stream (as capture asks), then captured."""
    fn()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def _step_timeline(fn, replays: int = 5) -> list[dict]:
    """Kernels of one decode step as the GPU ran them: `fn` captured in a CUDA graph, replayed
    under the profiler with the L2 flushed (a fill kernel) before each replay; the last replay's
    kernels with their start (µs after its first kernel), duration and stream. Shows the step's
    critical path, which per-part timings cannot (parts on two streams overlap)."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    graph = _captured(fn)
    flush = torch.empty(64 << 20, dtype=torch.int32, device=DEVICE)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            flush.zero_()
            graph.replay()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as fh:
            events = json.load(fh)["traceEvents"]
    return kernel_timeline(events)


def kernel_timeline(events: list[dict]) -> list[dict]:
    """The kernels of the last replay in a chrome trace: replays are separated by the flush's fill
    kernel (the step itself launches none)."""
    kernels = sorted((e for e in events if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    replays: list[list[dict]] = []
    for event in kernels:
        if "FillFunctor" in event["name"]:
            replays.append([])
        elif replays:
            replays[-1].append(event)
    last = next((r for r in reversed(replays) if r), [])
    if not last:
        return []
    t0 = last[0]["ts"]
    return [
        {
            "name": e["name"],
            "start_us": round(e["ts"] - t0, 2),
            "dur_us": round(e["dur"], 2),
            "stream": e.get("args", {}).get("stream"),
        }
        for e in last
    ]


def _timeline_line(ctx: int, batch: int, kernels: list[dict], variant: str = "") -> str:
    head = f"timeline ctx={ctx} B={batch} 2%" + (f" ({variant})" if variant else "")
    if not kernels:
        return f"{head}: no kernels traced"
    span = max(k["start_us"] + k["dur_us"] for k in kernels)
    parts = "; ".join(
        f"{k['name'].strip('_').removesuffix('_kernel')} {k['start_us']:.1f}+{k['dur_us']:.1f} s{k['stream']}"
        for k in kernels
    )
    return f"{head}: span {span:.1f} us; {parts}"


def _host_median_ms(fn, reps: int = 5) -> float:
    """Median wall time of `fn` to completion, after one warm-up call: for work that syncs with the
    host (k-means re-seeds empty clusters), which a CUDA graph cannot hold."""
    fn()
    times = []
    for _ in range(reps):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def _copy_bandwidth() -> float:
    """Device-to-device copy of 2 GiB: (bytes read + bytes written) / time."""
    import triton.testing

    if DEVICE == "cpu":
        return 1.0
    src = torch.randn(2**29, device=DEVICE)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * src.numel() * 4 / ms / 1e6


# --------------------------------------------------------------------------- inputs


def _keys(batch: int, ctx: int, mode: str, gen: torch.Generator) -> torch.Tensor:
    """Keys `[batch * ctx, H, d]`: i.i.d. normal, or around 256 centres per head and request."""
    if mode == "random":
        return torch.randn(batch * ctx, HKV, DIM, device=DEVICE, generator=gen, dtype=DT)
    out = torch.empty(batch * ctx, HKV, DIM, device=DEVICE, dtype=DT)
    for b in range(batch):
        centres = torch.randn(256, HKV, DIM, device=DEVICE, generator=gen) * 2
        pick = torch.randint(0, 256, (ctx,), device=DEVICE, generator=gen)
        out[b * ctx : (b + 1) * ctx] = (
            centres[pick] + 0.5 * torch.randn(ctx, HKV, DIM, device=DEVICE, generator=gen)
        ).to(DT)
    return out


def _blocks(ctx: int) -> list[tuple[int, int]]:
    """(first token, size) of the k-means blocks of one request, as `clustering.block_sizes`."""
    from mp_sglang.method.clustering import block_sizes

    first, out = SINKS, []
    for size in block_sizes(ctx - SINKS - RECENT, BLOCK):
        out.append((first, size))
        first += size
    return out


def _build_index(k_pool, v_pool, batch: int, ctx: int, iters: int, levels: int = 1) -> BatchIndex:
    """Index of every request by our batched k-means, read in place from the pool (each k-means block
    of each request is one segment; bf16 keys, fp32 means)."""
    blocks = _blocks(ctx)
    first = torch.tensor([f for f, _ in blocks], dtype=torch.int32, device=DEVICE)
    ps = (torch.arange(batch, dtype=torch.int32, device=DEVICE).unsqueeze(1) * ctx + first).flatten()
    sizes = torch.tensor([s for _, s in blocks] * batch, dtype=torch.int32, device=DEVICE)
    ncl = sizes // TPC
    cs = (torch.cumsum(ncl, 0) - ncl).to(torch.int32)
    rows = ps.long().repeat_interleave(sizes.long()) + _ranks(sizes)  # pool rows of clustered tokens
    init = k_pool[(ps.long().repeat_interleave(ncl.long()) + _ranks(ncl))].float()
    max_pts = max(s for _, s in blocks)
    cen, labels = kmeans.lloyd(
        k_pool, init, ps, sizes, cs, ncl, max_pts, iters, [torch.Generator().manual_seed(0)] * len(sizes)
    )
    vcen, counts = kmeans.cluster_means(v_pool, labels, ps, sizes, cs, torch.zeros_like(cen), max_pts)
    cnt = counts.round().to(torch.int32)
    # members: token positions grouped by (global) cluster, per head
    global_label = labels[rows].long() + cs.long().repeat_interleave(sizes.long()).unsqueeze(-1)
    order = torch.sort(global_label, dim=0, stable=True).indices
    members = (rows % ctx)[order].to(torch.int32)
    per_req = ncl.view(batch, len(blocks)).sum(1)
    level = LevelTensors(
        centroids=cen.to(DT),
        value_centroids=vcen.to(DT),
        counts=cnt,
        cluster_start=(torch.cumsum(per_req, 0) - per_req).to(torch.int32),
        num_clusters=per_req.to(torch.int32),
        max_clusters=int(per_req.max()),
    )
    all_levels = (level,)
    if levels == 2:
        all_levels = _with_coarse_level(level, cen, vcen, counts, cs, ncl, batch, iters)
    full = lambda v: torch.full((batch,), v, dtype=torch.int32, device=DEVICE)  # noqa: E731
    index = BatchIndex(
        all_levels,
        (torch.cumsum(cnt, 0) - cnt).to(torch.int32),
        members,
        full(SINKS),
        full(ctx - RECENT),
        full(ctx),
    )
    return index


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _with_coarse_level(level, cen, vcen, counts, cs, ncl, batch, iters) -> tuple[LevelTensors, ...]:
    """Add a coarse level (clusters of clusters, LEVEL_RATIO children each, count-weighted k-means
    per block, as the reference's hierarchy); `parent` holds request-local coarse ids."""
    ncl1 = (ncl + LEVEL_RATIO - 1) // LEVEL_RATIO
    cs1 = (torch.cumsum(ncl1, 0) - ncl1).to(torch.int32)
    init = cen[(cs.long().repeat_interleave(ncl1.long()) + _ranks(ncl1))]
    max_c = int(ncl.max())
    gens = [torch.Generator().manual_seed(1)] * len(ncl)
    cen1, labels1 = kmeans.lloyd(cen, init, cs, ncl, cs1, ncl1, max_c, iters, gens, weights=counts)
    vcen1, counts1 = kmeans.cluster_means(vcen, labels1, cs, ncl, cs1, torch.zeros_like(cen1), max_c, counts)
    per_req = ncl1.view(batch, -1).sum(1)
    start1 = (torch.cumsum(per_req, 0) - per_req).to(torch.int32)
    nblocks = ncl1.shape[0] // batch
    block_offset = cs1 - start1.repeat_interleave(nblocks)  # first coarse id of each block in its request
    parent = (labels1 + block_offset.repeat_interleave(ncl.long()).unsqueeze(-1)).to(torch.int32)
    coarse = LevelTensors(
        centroids=cen1.to(DT),
        value_centroids=vcen1.to(DT),
        counts=counts1.round().to(torch.int32),
        cluster_start=start1,
        num_clusters=per_req.to(torch.int32),
        max_clusters=int(per_req.max()),
    )
    return (dataclasses.replace(level, parent=parent), coarse)


def _ranks(ncl: torch.Tensor) -> torch.Tensor:
    """0, 1, ..., n_i - 1 for every entry n_i, concatenated."""
    starts = torch.cumsum(ncl, 0) - ncl
    return torch.arange(int(ncl.sum()), device=ncl.device) - starts.repeat_interleave(ncl.long())


def _pool(k_pool, v_pool, batch, ctx) -> PagedKV:
    pages = ctx // PAGE
    table = torch.arange(batch * pages, dtype=torch.int32, device=DEVICE).reshape(batch, pages)
    return PagedKV(k_pool, v_pool, table, torch.arange(batch, dtype=torch.int32, device=DEVICE), PAGE)


# --------------------------------------------------------------------------- one configuration


def _bench_config(ctx, batch, mode, budgets, fi_ms, result) -> list[dict]:
    gen = torch.Generator(device=DEVICE).manual_seed(ctx + batch)
    k_pool = _keys(batch, ctx, mode, gen)
    v_pool = torch.randn(batch * ctx, HKV, DIM, device=DEVICE, generator=gen, dtype=DT)
    q = torch.randn(batch, HQ, DIM, device=DEVICE, generator=gen).to(DT)
    kv = _pool(k_pool, v_pool, batch, ctx)
    index = _build_index(k_pool, v_pool, batch, ctx, KMEANS_ITERS)
    if batch == 1 and ctx in (32768, 131072):
        # Timed apart from the first build, which may compile kernels (seconds on a fresh machine).
        build_ms = _host_median_ms(lambda: _build_index(k_pool, v_pool, batch, ctx, KMEANS_ITERS), reps=3)
        result["build"].append(_build_row(ctx, mode, build_ms, k_pool, v_pool, q, index))
        result["hierarchy"].append(_hierarchy_row(ctx, mode, k_pool, v_pool, q))

    kd = k_pool.view(batch, ctx, HKV, DIM).transpose(1, 2).contiguous()
    vd = v_pool.view(batch, ctx, HKV, DIM).transpose(1, 2).contiguous()
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q.unsqueeze(2), kd, vd, enable_gqa=True)  # noqa: E731
    sdpa_ms = _time_graph(sdpa)
    dense_ref = _dense_fp32(q, kd, vd) if batch == 1 else None
    # Every token exact: a row without clusters, all of it recent (nothing listed).
    zeros = torch.zeros(batch, dtype=torch.int32, device=DEVICE)
    no_list = torch.zeros(batch, HKV, 1, dtype=torch.int32, device=DEVICE)
    full = ExactTokens(zeros, no_list, no_list[..., 0], zeros, zeros + ctx)
    s_dense = default_splits(batch, HKV, ctx)
    tri_dense_ms = _time_graph(lambda: merge_partials(*sparse_decode(q, kv, full, s_dense), q.dtype))
    dense_bytes = 2 * batch * ctx * HKV * DIM * 2
    if ctx < MultipoleConfig().dense_below and mode == "random" and DEVICE == "cuda":
        sparse_ms = _time_graph(lambda: sparse_decode(q, kv, full, s_dense))
        result["tiles"].append(_tile_variants(ctx, batch, q, kv, full, s_dense, sparse_ms, "unindexed"))

    rows = []
    level = index.levels[0]
    for frac in budgets:
        budget = torch.full((batch,), int(frac * ctx), dtype=torch.int32, device=DEVICE)
        max_exact = SINKS + int(frac * ctx) + RECENT
        s_exact = default_splits(batch, HKV, max_exact)
        s_apx = replacement_splits(batch, HKV, level.max_clusters)
        found = lookup(q, index, budget, max_exact)
        parts = [
            sparse_decode(q, kv, found.exact, s_exact),
            centroid_replace(found.logits[0], found.selected[0], level, s_apx),
        ]
        out_ws, lse_ws = torch.cat([p[0] for p in parts], 2), torch.cat([p[1] for p in parts], 2)
        t = {
            "lookup": _time_graph(lambda: lookup(q, index, budget, max_exact)),  # noqa: B023
            "sparse": _time_graph(lambda: sparse_decode(q, kv, found.exact, s_exact)),  # noqa: B023
            "replace": _time_graph(
                lambda: centroid_replace(found.logits[0], found.selected[0], level, s_apx)
            ),  # noqa: B023
            "merge": _time_graph(lambda: merge_partials(out_ws, lse_ws, q.dtype)),  # noqa: B023
            "total": _time_graph(lambda: multipole_decode(q, q, kv, index, budget, max_exact)),  # noqa: B023
        }
        if batch == 1:  # the parts of the lookup
            scale = 1 / math.sqrt(DIM)
            t["scores"] = _time_graph(lambda: centroid_scores(q, level, None, scale))
            t["select"] = _time_graph(lambda: select_within_budget(found.logits[0], level, budget))
        server_err = {}
        if SERVER_CONTEXT:
            server_ms, server_err, steps = _server_sized(q, kv, index, ctx, frac, budget, max_exact)
            t.update(server_ms)
            for variant, step in steps.items():
                timeline = _step_timeline(step)
                entry = {"ctx": ctx, "batch": batch, "variant": variant, "kernels": timeline}
                result["timeline"].append(entry)
                print(_timeline_line(ctx, batch, timeline, variant), flush=True)
        if frac == 0.02 and ctx == max(CONTEXTS) and batch in (1, 8):
            result["tiles"].append(_tile_variants(ctx, batch, q, kv, found.exact, s_exact, t["sparse"]))
            result["tiles"].append(_replace_variants(ctx, batch, found, level, s_apx, t["replace"]))
        exact_tokens = int(found.exact.lengths().sum())
        clusters = int(level.num_clusters.sum()) * HKV
        approx = int(((found.selected[0] == 0) & torch.isfinite(found.logits[0][:, :: HQ // HKV])).sum())
        by = {
            "lookup": clusters * DIM * 2 + clusters * 4,
            "sparse": exact_tokens * DIM * 2 * 2 + exact_tokens * 4,
            "replace": approx * DIM * 2 + clusters * (HQ // HKV) * 4,
        }
        row = {
            "ctx": ctx,
            "batch": batch,
            "mode": mode,
            "budget": frac,
            "ms": t,
            "bytes": by,
            "sdpa_ms": sdpa_ms,
            "triton_dense_ms": tri_dense_ms,
            "flashinfer_ms": fi_ms,
            "dense_gbps": {
                "sdpa": dense_bytes / sdpa_ms / 1e6,
                "triton_dense": dense_bytes / tri_dense_ms / 1e6,
            },
            "gbps": {k: by[k] / t[k] / 1e6 for k in by},
        }
        if fi_ms:
            row["dense_gbps"]["flashinfer"] = dense_bytes / fi_ms / 1e6
        if server_err:
            row["server_context"] = SERVER_CONTEXT[0]
            row["server_err"] = server_err
        base = fi_ms or sdpa_ms
        row["speedup"] = base / t["total"]
        if dense_ref is not None:
            out = multipole_decode(q, q, kv, index, budget, max_exact).float()
            row["rel_err"] = float((out - dense_ref).norm() / dense_ref.norm())
        if frac == 0.02 and mode == "random" and DEVICE == "cuda":
            step = _step_timeline(lambda: multipole_decode(q, q, kv, index, budget, max_exact))
            result["timeline"].append({"ctx": ctx, "batch": batch, "kernels": step})
            print(_timeline_line(ctx, batch, step), flush=True)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _server_sized(q, kv, index, ctx, frac, budget, max_exact) -> tuple[dict, dict, dict]:
    """Step times with a server's static bounds (module doc), and how far each output is from the
    tightly sized step's (indexed) or from fp32 dense attention (unindexed): the bounds must change
    the cost, never the result beyond rounding. Also the steps themselves, for a kernel timeline
    at 2 % on the GPU."""
    cfg = MultipoleConfig(token_budget=frac)
    clusters, server_exact = static_bounds(cfg, SERVER_CONTEXT[0])
    level = index.levels[0]
    sized = dataclasses.replace(index, levels=(dataclasses.replace(level, max_clusters=clusters),))
    step = lambda: multipole_decode(q, q, kv, sized, budget, server_exact)
    tight = multipole_decode(q, q, kv, index, budget, max_exact).float()
    times = {"total_server": _time_graph(step)}
    errors = {"total_server": _rel_err(step().float(), tight)}
    steps = {"server bounds": step}
    if ctx < cfg.dense_below:
        none = torch.zeros_like(level.num_clusters)
        empty = dataclasses.replace(level, num_clusters=none, max_clusters=clusters)
        unindexed = dataclasses.replace(index, levels=(empty,), recent_start=index.sink_len)
        nothing = torch.zeros_like(budget)
        step = lambda: multipole_decode(q, q, kv, unindexed, nothing, server_exact)
        times["unindexed_server"] = _time_graph(step)
        kd, vd = (p.view(q.shape[0], ctx, HKV, DIM).transpose(1, 2) for p in (kv.k_buffer, kv.v_buffer))
        errors["unindexed_server"] = _rel_err(step().float(), _dense_fp32(q, kd, vd))
        steps["unindexed"] = step
    if frac != 0.02 or DEVICE != "cuda":
        steps = {}
    return times, errors, steps


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).norm() / ref.norm())


def _hierarchy_row(ctx, mode, k_pool, v_pool, q) -> dict:
    """Two levels (coarse level first) against the flat index at batch 1, 2 % budget."""
    kv = _pool(k_pool, v_pool, 1, ctx)
    budget = torch.full((1,), int(0.02 * ctx), dtype=torch.int32, device=DEVICE)
    max_exact = SINKS + int(0.02 * ctx) + RECENT
    kd = k_pool.view(1, ctx, HKV, DIM).transpose(1, 2)
    vd = v_pool.view(1, ctx, HKV, DIM).transpose(1, 2)
    dense = _dense_fp32(q, kd, vd)
    row = {"ctx": ctx, "mode": mode}
    for levels in (1, 2):
        index = _build_index(k_pool, v_pool, 1, ctx, KMEANS_ITERS, levels)

        def step():
            return multipole_decode(
                q, q, kv, index, budget, max_exact, level_budget_multiplier=LEVEL_BUDGET_MULTIPLIER
            )

        row[f"L{levels}_ms"] = _time_graph(step)
        row[f"L{levels}_err"] = float((step().float() - dense).norm() / dense.norm())
    print(json.dumps(row), flush=True)
    return row


def _tile_variants(ctx, batch, q, kv, exact, splits, current_ms, tokens="2 % list") -> dict:
    """The sparse kernel under other tile shapes (tokens per tile x warps), other pipelining
    depths, and other split counts (half, double, and whole waves of one program per SM) on the
    same `exact` tokens (`tokens` says which: a 2 % selection, or every token of an unindexed row)."""
    row = {"ctx": ctx, "batch": batch, "tokens": tokens, "current": dict(sparse_module.SPARSE_TILE)}
    row |= {"splits": splits, "current_ms": current_ms}
    saved = dict(sparse_module.SPARSE_TILE)
    shapes = ((32, 4, 2), (32, 8, 2), (16, 4, 2), (64, 4, 2), (64, 8, 1), (64, 8, 3), (32, 4, 3), (128, 8, 2))
    for block_n, warps, stages in shapes:
        sparse_module.SPARSE_TILE.update(BLOCK_N=block_n, num_warps=warps, num_stages=stages)
        row[f"{block_n}x{warps}" + ("" if stages == 2 else f"s{stages}")] = _time_graph(
            lambda: sparse_decode(q, kv, exact, splits)
        )
    sparse_module.SPARSE_TILE.update(saved)
    sms = torch.cuda.get_device_properties(0).multi_processor_count if DEVICE == "cuda" else 132
    waves = [w * sms // (batch * HKV) for w in (1, 2, 4)]
    for n in sorted({max(1, int(splits * 0.5)), max(1, int(splits * 2.0)), *(w for w in waves if w)}):
        row[f"splits={n}"] = _time_graph(lambda: sparse_decode(q, kv, exact, n))
    print(json.dumps(row), flush=True)
    return row


def _replace_variants(ctx, batch, found, level, splits, current_ms) -> dict:
    """The replacement kernel under other tile shapes (clusters per tile x warps) and split counts."""
    row = {
        "kernel": "replace",
        "ctx": ctx,
        "batch": batch,
        "current": dict(replace_module.REPLACE_TILE) | {"splits": splits},
        "current_ms": current_ms,
    }
    saved = dict(replace_module.REPLACE_TILE)

    def timed(n: int) -> float:
        return _time_graph(lambda: centroid_replace(found.logits[0], found.selected[0], level, n))

    for block_c, warps, stages in ((32, 4, 1), (64, 4, 1), (128, 8, 1), (128, 4, 3)):
        replace_module.REPLACE_TILE.update(BLOCK_C=block_c, num_warps=warps, num_stages=stages)
        row[f"{block_c}x{warps}s{stages}"] = timed(splits)
    replace_module.REPLACE_TILE.update(saved)
    for splits_x in (2, 4, 8):
        row[f"splits={splits * splits_x}"] = timed(splits * splits_x)
    print(json.dumps(row), flush=True)
    return row


def _dense_fp32(q, kd, vd) -> torch.Tensor:
    qg = q.float().view(q.shape[0], HKV, HQ // HKV, DIM)
    logits = torch.einsum("bhgd,bhnd->bhgn", qg, kd.float()) / math.sqrt(DIM)
    return torch.einsum("bhgn,bhnd->bhgd", torch.softmax(logits, -1), vd.float()).reshape(q.shape[0], HQ, DIM)


def _build_row(ctx, mode, build_ms, k_pool, v_pool, q, index) -> dict:
    """Index build vs one layer's causal attention prefill; one blockwise update vs its 128 steps."""
    qp = torch.randn(1, HQ, ctx, DIM, device=DEVICE, dtype=DT)
    kp = k_pool.view(1, ctx, HKV, DIM).transpose(1, 2)
    vp = v_pool.view(1, ctx, HKV, DIM).transpose(1, 2)
    prefill = lambda: torch.nn.functional.scaled_dot_product_attention(
        qp, kp, vp, is_causal=True, enable_gqa=True
    )  # noqa: E731
    prefill_ms = _host_median_ms(prefill, reps=3)
    first, size = _blocks(ctx)[-1]
    final = k_pool[first : first + size + UPDATE_BLOCK]
    n = final.shape[0]
    ncl = torch.tensor([n // TPC], dtype=torch.int32, device=DEVICE)
    zero = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    npts = torch.tensor([n], dtype=torch.int32, device=DEVICE)
    warm = final[: n // TPC].float()
    update = lambda: kmeans.lloyd(
        final, warm, zero, npts, zero, ncl, n, UPDATE_ITERS, [torch.Generator().manual_seed(0)]
    )  # noqa: E731
    update_ms = _host_median_ms(update)
    budget = torch.full((1,), int(0.02 * ctx), dtype=torch.int32, device=DEVICE)
    kv = _pool(k_pool, v_pool, 1, ctx)
    step_ms = _time_graph(lambda: multipole_decode(q, q, kv, index, budget, SINKS + int(0.02 * ctx) + RECENT))
    row = {
        "ctx": ctx,
        "mode": mode,
        "build_ms": build_ms,
        "prefill_attn_ms": prefill_ms,
        "update_ms": update_ms,
        "decode_2pct_ms": step_ms,
        "build_vs_prefill": build_ms / prefill_ms,
        "update_vs_128_steps": update_ms / (UPDATE_BLOCK * step_ms),
    }
    print(json.dumps(row), flush=True)
    return row


# --------------------------------------------------------------------------- FlashInfer


def _run_flashinfer_child(configs, timeout: int) -> dict:
    """FlashInfer in a child process, so a failing import or a long JIT build cannot sink the run."""
    try:
        proc = subprocess.run(
            [sys.executable, __file__, "--flashinfer-child", json.dumps(configs)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=os.environ.copy(),
        )
    except subprocess.TimeoutExpired:
        print(f"flashinfer: gave up after {timeout}s (JIT build)", flush=True)
        return {"status": f"timeout after {timeout}s"}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        print("flashinfer unavailable:", " | ".join(tail), flush=True)
        return {"status": "failed: " + " | ".join(tail)[-300:]}
    times = json.loads(proc.stdout.strip().splitlines()[-1])
    print("flashinfer:", times, flush=True)
    return times


def _flashinfer_times(configs) -> dict:
    import flashinfer

    out = {}
    ws = torch.empty(256 * 2**20, dtype=torch.uint8, device=DEVICE)
    for ctx, batch in configs:
        if 2 * batch * ctx * HKV * DIM * 2 * 1.2 > torch.cuda.mem_get_info()[0]:
            continue
        pages = ctx // PAGE
        cache = torch.randn(batch * pages, 2, PAGE, HKV, DIM, device=DEVICE, dtype=DT)
        wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD")
        indptr = torch.arange(batch + 1, dtype=torch.int32, device=DEVICE) * pages
        indices = torch.arange(batch * pages, dtype=torch.int32, device=DEVICE)
        last = torch.full((batch,), PAGE, dtype=torch.int32, device=DEVICE)
        wrapper.plan(indptr, indices, last, HQ, HKV, DIM, PAGE, data_type=DT, q_data_type=DT)
        q = torch.randn(batch, HQ, DIM, device=DEVICE).to(DT)
        try:
            out[f"{ctx}x{batch}"] = _time_graph(lambda: wrapper.run(q, cache))  # noqa: B023
            out[f"{ctx}x{batch} served"] = _flashinfer_served_ms(flashinfer, ws, ctx, batch, q)
        except RuntimeError:
            import triton.testing

            out[f"{ctx}x{batch}"] = triton.testing.do_bench(
                lambda: wrapper.run(q, cache), return_mode="median"
            )  # noqa: B023
            out["status"] = "ok (no CUDA graph)"
    return out


def _flashinfer_served_ms(flashinfer, ws, ctx, batch, q) -> float:
    """FlashInfer's decode as sglang serves this shape: page size 1 and, for a GQA group of 4 or
    more, the tensor-core kernel (sglang's `should_use_tensor_core`); faster than the page-16
    decode kernel above at small contexts and large batches (docs/perf.md, item 27)."""
    cache = torch.randn(batch * ctx, 2, 1, HKV, DIM, device=DEVICE, dtype=DT)
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=HQ // HKV >= 4)
    indptr = torch.arange(batch + 1, dtype=torch.int32, device=DEVICE) * ctx
    indices = torch.arange(batch * ctx, dtype=torch.int32, device=DEVICE)
    last = torch.ones(batch, dtype=torch.int32, device=DEVICE)
    wrapper.plan(indptr, indices, last, HQ, HKV, DIM, 1, data_type=DT, q_data_type=DT)
    return _time_graph(lambda: wrapper.run(q, cache))


# --------------------------------------------------------------------------- table


def _print_table(result: dict) -> None:
    bw = result["copy_gbps"]
    print(f"\n## {result['device']}: copy bandwidth {bw:.0f} GB/s; FlashInfer: {result['flashinfer']}")
    print(
        "times in us (CUDA-graph replay, median, L2 flushed); GB/s on the bytes each part must read; "
        "speedup vs FlashInfer (SDPA where FlashInfer is missing); err = rel. error vs fp32 dense"
    )
    head = (
        "ctx",
        "B",
        "keys",
        "budget",
        "FI",
        "SDPA",
        "tri-dense",
        "lookup",
        "sparse",
        "replace",
        "merge",
        "total",
        "speedup",
        "sparse GB/s",
        "err",
    )
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in result["rows"]:
        if "skipped" in r:
            print(f"| {r['ctx']} | {r['batch']} | skipped ({r['skipped']}) |")
            continue
        ms = r["ms"]
        fi = f"{r['flashinfer_ms'] * 1e3:.1f}" if r["flashinfer_ms"] else "-"
        err = f"{r['rel_err']:.2e}" if "rel_err" in r else "-"
        cells = (
            r["ctx"],
            r["batch"],
            r["mode"],
            f"{r['budget']:.0%}",
            fi,
            f"{r['sdpa_ms'] * 1e3:.1f}",
            f"{r['triton_dense_ms'] * 1e3:.1f}",
            *(f"{ms[k] * 1e3:.1f}" for k in ("lookup", "sparse", "replace", "merge", "total")),
            f"{r['speedup']:.2f}x",
            f"{r['gbps']['sparse']:.0f} ({r['gbps']['sparse'] / bw:.0%})",
            err,
        )
        print("| " + " | ".join(str(c) for c in cells) + " |")
    _print_server_table(result)
    for r in result["hierarchy"]:
        print(
            f"hierarchy ctx={r['ctx']} {r['mode']} 2%: flat {r['L1_ms'] * 1e3:.1f}us err {r['L1_err']:.3f}; "
            f"two levels {r['L2_ms'] * 1e3:.1f}us err {r['L2_err']:.3f}"
        )
    for r in result["timeline"]:
        print(_timeline_line(r["ctx"], r["batch"], r["kernels"], r.get("variant", "")))
    for r in result["tiles"]:
        print(
            f"{r.get('kernel', 'sparse')} tile shapes ctx={r['ctx']} B={r['batch']} {r.get('tokens', '')} "
            f"(now {r['current']}, {r.get('splits', '-')} splits): "
            + ", ".join(
                f"{k} {v * 1e3:.1f}us"
                for k, v in r.items()
                if k.endswith("_ms") or k[0].isdigit() or k.startswith("splits=")
            )
        )
    for r in result["rows"]:
        if "scores" in r.get("ms", {}):
            print(
                f"lookup parts ctx={r['ctx']} {r['mode']} {r['budget']:.0%}: "
                f"scores {r['ms']['scores'] * 1e3:.1f}us, "
                f"select {r['ms']['select'] * 1e3:.1f}us, lookup {r['ms']['lookup'] * 1e3:.1f}us"
            )
    for b in result["build"]:
        print(
            f"build ctx={b['ctx']} ({b['mode']}): index {b['build_ms']:.1f} ms vs causal attention prefill "
            f"of one layer {b['prefill_attn_ms']:.1f} ms ({b['build_vs_prefill']:.0%}); "
            f"update of {UPDATE_BLOCK} "
            f"tokens {b['update_ms']:.2f} ms vs {UPDATE_BLOCK} decode steps "
            f"({b['update_vs_128_steps']:.0%})"
        )


def _print_server_table(result: dict) -> None:
    rows = [r for r in result["rows"] if "server_context" in r]
    if not rows:
        return
    print(
        f"\nsteps sized as a server of {rows[0]['server_context']} tokens sizes them (us; x = FlashInfer's "
        "time over ours; err vs the tight step, unindexed vs fp32 dense)"
    )
    head = ("ctx", "B", "budget", "FI", "tight", "server bounds", "x", "unindexed", "x", "err")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        ms, fi = r["ms"], r["flashinfer_ms"]
        ratio = lambda key: f"{fi / ms[key]:.2f}x" if fi and key in ms else "-"  # noqa: E731
        cells = (
            r["ctx"],
            r["batch"],
            f"{r['budget']:.0%}",
            f"{fi * 1e3:.1f}" if fi else "-",
            f"{ms['total'] * 1e3:.1f}",
            f"{ms['total_server'] * 1e3:.1f}",
            ratio("total_server"),
            f"{ms['unindexed_server'] * 1e3:.1f}" if "unindexed_server" in ms else "-",
            ratio("unindexed_server"),
            ", ".join(f"{v:.1e}" for v in r["server_err"].values()),
        )
        print("| " + " | ".join(str(c) for c in cells) + " |")


if __name__ == "__main__":
    main()
