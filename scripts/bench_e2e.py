"""End-to-end serving benchmark: sglang with a dense backend vs. `--attention-backend multipole`.

    python scripts/bench_e2e.py --model-path DIR --load-format dummy \\
        --backend flashinfer --backend "multipole --disable-cuda-graph" \\
        --contexts 8192 32768 65536 --batches 1 8 32 --out $OUT/bench_e2e.json

Each backend gets its own server, launched in turn on the same model with the same flags, and the
same requests: for every context x batch that fits the KV pool, `batch` concurrent /generate
requests of `context` random prompt tokens (seeded, so both backends see identical inputs; the
radix cache is off, so nothing is reused) that each stream `--new-tokens` greedy tokens with EOS
ignored (`--samples N` repeats each batch and reports medians). Per row: time to first token
(prefill), the first decode step (where multipole builds its
cluster index), and steady-state decode throughput and per-token latency over the tokens after
`--warmup-tokens`. With `--agreement-prompt FILE` each backend also decodes that prompt greedily
and the outputs are compared token by token with the first backend's. Free-running outputs part at
the first near tie, so `--agreement-probes N` also teacher-forces: N requests per backend, each
prompted with the prompt plus the first backend's output up to a position L and asked for two
greedy tokens; the first comes from prefill, the second from the backend's first decode step over
that context (for multipole: an index built over it), and is compared with the first backend's
token at L + 1. Prints a side-by-side table last and writes all numbers as JSON.

The reasoning shape (a short prompt, a long output) is the same command with a small context and
many new tokens, e.g. `--contexts 1024 --batches 8 32 --new-tokens 16384`. Decode speed then moves
with the context as it grows, so every row also carries a curve per `--bucket-tokens` of context
per request: from the client's streams (each request's time through the bucket, times the batch)
and from the server's own log (its `Decode batch` lines, each the throughput of the last 40 decode
steps, placed by the context per running request). A second table prints both curves as
multipole / dense ratios per bucket. `--sglang-client` cross-checks every row with sglang's own
client, `sglang.bench_one_batch_server --base-url` against the same server right after it (its
"output throughput", with the same shape of random token ids). `--profile-contexts C...` profiles
`--profile-steps` decode steps with sglang's profiler when every request of a batch has reached
context C, and adds a table of where each step's GPU time went (`server_profile.py`); the profiled
steps are slower, so use it on runs kept apart from the throughput runs.

The JSON also names the GPU and the attention shape per rank, so that a run of a dense backend
and `MULTIPOLE_DENSE_BELOW=1024 multipole` over several batch sizes is what
`python -m mp_sglang.serving.crossover OUT.json` turns into the measured crossover table a
multipole server reads at start-up (docs/sglang.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shlex
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import server_profile  # noqa: E402

from harness.server import free_port, launched  # noqa: E402


@dataclass
class Stream:
    """Arrival times of one request's streamed chunks, and how many tokens each had generated."""

    sent: float
    arrivals: list[tuple[float, int]] = field(default_factory=list)
    output_ids: list[int] = field(default_factory=list)
    error: str | None = None


@dataclass
class Row:
    backend: str
    context: int
    batch: int
    new_tokens: int
    ttft_s: float
    first_step_s: float
    decode_tok_s: float
    itl_ms: float
    samples: int = 1
    client_buckets: dict[int, float] = field(default_factory=dict)
    server_buckets: dict[int, float] = field(default_factory=dict)
    server_decode_tok_s: float = 0.0  # whole-run decode throughput from the server's log (0: no windows)
    sglang_client_tok_s: float | None = None  # bench_one_batch_server's output throughput


def main() -> int:
    args = _parse()
    backends = [_backend(spec) for spec in args.backend]
    rng = random.Random(args.seed)
    vocab = json.loads((args.model_path / "config.json").read_text())["vocab_size"]
    shapes = [(c, b) for c in args.contexts for b in args.batches if c * b <= args.max_batch_tokens]
    prompts = {shape: [_random_ids(rng, shape[0], vocab) for _ in range(shape[1])] for shape in shapes}
    agreement_prompt = args.agreement_prompt.read_text() if args.agreement_prompt else None
    result: dict = {
        "args": vars(args) | {"agreement_prompt": str(args.agreement_prompt)},
        "device": _device_name(),
        "attention_shape": attention_shape(args.model_path, backends),
        "rows": [],
        "samples": [],
        "agreement": {},
    }
    outputs: dict[str, list[tuple[int, float]]] = {}
    forced: tuple[list[int], list[tuple[int, float]]] | None = None  # prompt ids, reference output
    for number, (label, name, extra, env) in enumerate(backends):
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        command = [
            sys.executable, "-m", "sglang.launch_server", "--model-path", str(args.model_path),
            "--attention-backend", name, "--port", str(port), "--disable-radix-cache",
            "--mem-fraction-static", str(args.mem_fraction), "--context-length", str(args.context_length),
            *(["--load-format", args.load_format] if args.load_format else []),
            # Each streamed chunk carries only its new text (not the whole text so far, O(n^2) bytes
            # per request), so the clients keep up at batch 32 x 16K tokens (docs/perf.md, item 27).
            "--incremental-streaming-output", *extra,
        ]  # fmt: skip
        log = args.log_dir / f"server-{number}-{name}.log"
        started = time.monotonic()
        with _environment(env), launched(command, base, "/health", log, timeout_s=args.startup_timeout):
            print(f"[{label}] up in {time.monotonic() - started:.0f}s", flush=True)
            _generate(base, [[1] * 64], 8)  # warm-up: compile/capture paths outside the timings
            for context, batch in shapes:
                samples = []
                for _ in range(args.samples):
                    log_start = log.stat().st_size
                    profiles = args.log_dir / f"profile-{number}-{name}-{context}x{batch}"
                    watch = _profiler(base, context, args.profile_contexts, args.profile_steps, profiles)
                    streams = _generate(base, prompts[(context, batch)], args.new_tokens, watch)
                    row = _row(label, context, batch, args.new_tokens, args.warmup_tokens, streams)
                    row.client_buckets = client_buckets(streams, context, args.bucket_tokens)
                    server_log = _read_from(log, log_start)
                    row.server_buckets = server_buckets(server_log, batch, args.bucket_tokens)
                    row.server_decode_tok_s = server_decode_rate(server_log, batch)
                    samples.append(row)
                row = median_row(samples)
                if args.profile_contexts:
                    found = _profile_summaries(profiles, args.profile_contexts, _layers(args.model_path))
                    result.setdefault("profiles", {})[f"{label} {context}x{batch}"] = found
                    print(server_profile.table({f"{label} @{k}": v for k, v in found.items()}), flush=True)
                if args.sglang_client:
                    report = args.log_dir / f"one-batch-{number}-{name}-{context}x{batch}.txt"
                    row.sglang_client_tok_s = sglang_client(base, args, context, batch, report)
                result["rows"].append(asdict(row))
                result["samples"] += [asdict(sample) for sample in samples]
                print(f"[{label}] {row}", flush=True)
                _dump(args.out, result)
            if agreement_prompt is not None:
                prompt_ids, outputs[label] = _greedy(base, agreement_prompt, args.agreement_tokens)
                forced = forced or (prompt_ids, outputs[label])
                if args.agreement_probes:
                    probes = _probe(base, *forced, probe_positions(len(forced[1]), args.agreement_probes))
                    result.setdefault("forced_agreement", {})[label] = summarize_probes(probes)
                    print(f"[{label}] forced: {result['forced_agreement'][label]}", flush=True)
                    _dump(args.out, result)
    if outputs:
        result["agreement"] = _agreement(outputs)
    _dump(args.out, result)
    print(_table(result, [label for label, *_ in backends]))
    return 0


# ---------------------------------------------------------------------- requests


def _generate(
    base: str, prompts: list[list[int]], new_tokens: int, watch: Callable[[list[Stream]], None] | None = None
) -> list[Stream]:
    """Send every prompt at once (one thread each) and collect the streamed chunks; `watch`, if
    given, runs in a thread of its own beside them and sees the streams as they fill."""
    streams = [Stream(sent=0.0) for _ in prompts]
    threads = [
        threading.Thread(target=_stream_one, args=(base, ids, new_tokens, stream))
        for ids, stream in zip(prompts, streams, strict=True)
    ]
    if watch is not None:
        threads.append(threading.Thread(target=watch, args=(streams,), daemon=True))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    failed = [s.error for s in streams if s.error]
    if failed:
        raise RuntimeError(f"{len(failed)} request(s) failed: {failed[0]}")
    return streams


def _stream_one(base: str, ids: list[int], new_tokens: int, stream: Stream) -> None:
    body = {
        "input_ids": ids,
        "stream": True,
        "sampling_params": {"temperature": 0.0, "max_new_tokens": new_tokens, "ignore_eos": True},
    }
    request = urllib.request.Request(
        base + "/generate", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    stream.sent = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=1800) as resp:
            for raw in resp:
                arrived = time.perf_counter()
                tokens = streamed_tokens(raw)
                if tokens is not None:
                    stream.arrivals.append((arrived, tokens))
    except Exception as err:  # reported by _generate with the others
        stream.error = f"{type(err).__name__}: {err}"


_COMPLETION_TOKENS = re.compile(rb'"completion_tokens":\s*(\d+)')


def streamed_tokens(raw: bytes) -> int | None:
    """Tokens generated so far, from one streamed line of /generate (None for other lines).

    The count is read from the raw bytes, not by parsing the chunk as JSON (a key with unescaped
    quotes cannot occur inside a JSON string): without `--incremental-streaming-output` each chunk
    repeats the whole text so far (docs/perf.md, items 26 and 27)."""
    if not raw.startswith(b"data:") or raw.startswith(b"data: [DONE]"):
        return None
    found = _COMPLETION_TOKENS.findall(raw)
    return int(found[-1]) if found else None


def _greedy(base: str, prompt: str, new_tokens: int) -> tuple[list[int], list[tuple[int, float]]]:
    """Greedy continuation of a prompt: the prompt's token ids, and per new token its id and its
    log-probability margin over the runner-up (a small margin is a near tie that any numerical
    difference may flip)."""
    reply = _post(
        base,
        {
            "text": prompt,
            "sampling_params": {"temperature": 0.0, "max_new_tokens": new_tokens, "ignore_eos": True},
            "return_logprob": True,
            "logprob_start_len": 0,
            "top_logprobs_num": 2,
        },
    )
    meta = reply["meta_info"]
    prompt_ids = [int(entry[1]) for entry in meta["input_token_logprobs"]]
    tokens = [int(entry[1]) for entry in meta["output_token_logprobs"]]
    margins = [float(top[0][0]) - float(top[1][0]) for top in meta["output_top_logprobs"]]
    return prompt_ids, list(zip(tokens, margins, strict=True))


def _probe(
    base: str, prompt_ids: list[int], reference: list[tuple[int, float]], positions: list[int]
) -> list[dict]:
    """Teacher-forced probes (module doc): per position L, the two greedy tokens after the prompt
    plus the reference's first L tokens, beside the reference's tokens there."""

    def one(position: int) -> dict:
        ids = prompt_ids + [token for token, _ in reference[:position]]
        body = {
            "input_ids": ids,
            "sampling_params": {"temperature": 0.0, "max_new_tokens": 2, "ignore_eos": True},
            "return_logprob": True,
        }
        got = [int(entry[1]) for entry in _post(base, body)["meta_info"]["output_token_logprobs"]]
        return {
            "position": position,
            "prefill_token": got[0],
            "decode_token": got[1],
            "reference": [reference[position][0], reference[position + 1][0]],
            "reference_margin": reference[position + 1][1],
        }

    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(one, positions))


def probe_positions(tokens: int, probes: int) -> list[int]:
    """Up to `probes` distinct positions L, spread evenly, with L + 1 inside the reference output."""
    last = tokens - 2
    if last < 0 or probes < 1:
        return []
    if probes == 1:
        return [0]
    return sorted({round(i * last / (probes - 1)) for i in range(probes)})


def summarize_probes(probes: list[dict]) -> dict:
    """Decode-token agreement over the probes whose prefill token equals the reference's (only
    there is the decoded context the reference's), and the reference's margin where they differ."""
    same_context = [p for p in probes if p["prefill_token"] == p["reference"][0]]
    misses = [p for p in same_context if p["decode_token"] != p["reference"][1]]
    return {
        "probes": len(probes),
        "same_context": len(same_context),
        "decode_agreement": round(1 - len(misses) / len(same_context), 4) if same_context else None,
        "miss_positions": [p["position"] for p in misses],
        "miss_reference_margins": [round(p["reference_margin"], 4) for p in misses],
    }


def _profiler(
    base: str, context: int, targets: list[int], steps: int, out_dir: Path
) -> Callable[[list[Stream]], None] | None:
    """A watcher that starts one server profile each time every stream's context (prompt plus
    tokens so far) reaches the next of `targets`; None when there is nothing to profile."""
    pending = sorted(t for t in targets if t > context)
    if not pending:
        return None

    def watch(streams: list[Stream]) -> None:
        for target in pending:
            while min((s.arrivals[-1][1] if s.arrivals else 0) for s in streams) + context < target:
                if any(s.error for s in streams):
                    return
                time.sleep(0.005)
            server_profile.start(base, str(out_dir), steps, profile_id=f"ctx{target}")

    return watch


def _profile_summaries(out_dir: Path, targets: list[int], layers: int) -> dict[int, dict]:
    """Each profile's summary by its target context (targets whose trace is missing are left out)."""
    found = {}
    for target in targets:
        traces = sorted(out_dir.glob(f"ctx{target}*.trace.json*"))
        if traces:
            found[target] = server_profile.summarize(server_profile.read_trace(traces[-1]), layers)
    return found


def _layers(model_path: Path) -> int:
    return json.loads((model_path / "config.json").read_text())["num_hidden_layers"]


def _post(base: str, body: dict) -> dict:
    request = urllib.request.Request(
        base + "/generate", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=1800) as resp:
        return json.loads(resp.read())


# ---------------------------------------------------------------------- numbers


def _row(name: str, context: int, batch: int, new_tokens: int, warmup: int, streams: list[Stream]) -> Row:
    """Prefill, first decode step, and steady-state decode of one batch.

    Steady state runs from the moment every request has `warmup` tokens to the moment the last one
    finishes, so each request's first decode step (and a backend's one-off work there) is excluded.
    """
    ttft = [s.arrivals[0][0] - s.sent for s in streams]
    first_step = [_time_of(s, 2) - _time_of(s, 1) for s in streams]
    begin = max(_time_of(s, warmup) for s in streams)
    end = max(s.arrivals[-1][0] for s in streams)
    produced = sum(new_tokens - warmup for _ in streams)
    itl = [(s.arrivals[-1][0] - _time_of(s, warmup)) / max(1, new_tokens - warmup) for s in streams]
    return Row(
        backend=name,
        context=context,
        batch=batch,
        new_tokens=new_tokens,
        ttft_s=round(statistics.median(ttft), 4),
        first_step_s=round(statistics.median(first_step), 4),
        decode_tok_s=round(produced / max(end - begin, 1e-9), 1),
        itl_ms=round(1000 * statistics.median(itl), 2),
    )


def sglang_client(
    base: str, args: argparse.Namespace, context: int, batch: int, report: Path
) -> float | None:
    """Decode throughput of one batch as sglang's own client measures it against the server at
    `base` (None if the client failed; its output is kept in `report` either way)."""
    command = [
        sys.executable, "-m", "sglang.bench_one_batch_server", "--model-path", str(args.model_path),
        "--base-url", base, "--batch-size", str(batch), "--input-len", str(context),
        "--output-len", str(args.new_tokens), "--dataset-name", "random-ids", "--skip-warmup",
        "--result-filename", str(report.with_suffix(".jsonl")),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    report.write_text(done.stdout + done.stderr)
    found = parse_one_batch_output(done.stdout)
    if found is None:
        print(f"sglang's client gave no throughput (exit {done.returncode}); see {report}", flush=True)
    return found


def parse_one_batch_output(stdout: str) -> float | None:
    """The "output throughput: X tok/s" that bench_one_batch_server prints for its batch."""
    found = re.findall(r"^output throughput: ([0-9.]+) tok/s", stdout, flags=re.MULTILINE)
    return float(found[-1]) if found else None


def median_row(samples: list[Row]) -> Row:
    """One row from repeated runs of the same batch: the median of every figure, so that a
    one-off (a dense backend's first request at a new size, a scheduling hiccup) does not decide it."""
    first = samples[0]
    figures = ("ttft_s", "first_step_s", "decode_tok_s", "itl_ms", "server_decode_tok_s")
    medians = {name: statistics.median(getattr(s, name) for s in samples) for name in figures}
    curves = {
        name: {
            bucket: round(statistics.median(c[bucket] for c in curves if bucket in c), 1)
            for bucket in sorted({b for c in curves for b in c})
        }
        for name in ("client_buckets", "server_buckets")
        for curves in [[getattr(s, name) for s in samples]]
    }
    return replace(first, **medians, **curves, samples=len(samples))


def client_buckets(streams: list[Stream], prompt_tokens: int, bucket: int) -> dict[int, float]:
    """Decode throughput (tokens/s over the batch) per context bucket, from the client's streams.

    Bucket `k` holds contexts `[k * bucket, (k + 1) * bucket)` per request. Each request's time
    through the part of the bucket it generated is measured from its stream; the batch's rate is
    the batch size over the median request's time per token. A bucket the requests only partly
    cover counts the tokens they made in it; one with fewer than 2 tokens is left out.
    """
    generated = min(s.arrivals[-1][1] for s in streams)
    curve = {}
    for k in range(prompt_tokens // bucket, (prompt_tokens + generated - 1) // bucket + 1):
        first = max(k * bucket - prompt_tokens, 1)  # the first token is prefill's
        last = min((k + 1) * bucket - prompt_tokens, generated)
        if last - first < 2:
            continue
        spans = [_time_of(s, last) - _time_of(s, first) for s in streams]
        per_token = statistics.median(spans) / (last - first)
        curve[k * bucket] = round(len(streams) / max(per_token, 1e-9), 1)
    return curve


# sglang's scheduler logs every 40 decode steps (0.5.17): "Decode batch, #running-req: 8, #token: 12345,
# ... gen throughput (token/s): 2112.34, ..."
_DECODE_LOG = re.compile(
    r"Decode batch.*?#running-req: (\d+), #token: (\d+),.*?gen throughput \(token/s\): ([\d.]+)"
)


def server_buckets(log_text: str, batch: int, bucket: int) -> dict[int, float]:
    """Decode throughput per context bucket from the server's log: the mean of the windows whose
    running requests (all `batch` of them; windows with fewer are the batch's ramp or tail) held a
    context in the bucket, per request."""
    windows: dict[int, list[float]] = {}
    for running, tokens, rate in _DECODE_LOG.findall(log_text):
        if int(running) == batch and float(rate) > 0:
            windows.setdefault(int(tokens) // batch // bucket * bucket, []).append(float(rate))
    return {start: round(statistics.mean(rates), 1) for start, rates in sorted(windows.items())}


def server_decode_rate(log_text: str, batch: int) -> float:
    """Whole-run decode throughput from the server's log: the tokens of every window of the full
    batch over their summed time (each window's tokens / its rate), so no client can limit it.
    The first such window is left out: it also spans the idle time before the batch arrived."""
    rates = [float(rate) for running, _, rate in _DECODE_LOG.findall(log_text) if int(running) == batch]
    rates = [rate for rate in rates[1:] if rate > 0]
    return round(len(rates) / sum(1 / rate for rate in rates), 1) if rates else 0.0


def _time_of(stream: Stream, tokens: int) -> float:
    """When the stream had produced at least `tokens` tokens."""
    return next(t for t, n in stream.arrivals if n >= tokens)


def _agreement(outputs: dict[str, list[tuple[int, float]]]) -> dict:
    """Each backend's free-running greedy output against the first backend's.

    Once two greedy runs part, their contexts differ, so positions after the first divergence say
    little; what is reported is where they part and the reference's top-1 margin there (a near tie,
    or a real disagreement), plus the plain position-by-position match for completeness.
    """
    names = list(outputs)
    base = outputs[names[0]]
    report: dict = {"reference": names[0], "tokens": len(base)}
    for name in names[1:]:
        other = outputs[name]
        same = [a[0] == b[0] for a, b in zip(base, other, strict=False)]
        first = next((i for i, ok in enumerate(same) if not ok), None)
        report[name] = {
            "first_divergence": first,
            "reference_margin_there": None if first is None else round(base[first][1], 4),
            "position_match": round(sum(same) / max(1, len(base)), 4),
        }
    return report


def short_labels(specs: list[str]) -> list[str]:
    """Column labels for backend specs: each spec without the flags (a flag with its value) and
    settings that every spec shares, so that a table of "flashinfer $P" and "multipole $P" reads
    "flashinfer" and "multipole". A spec left empty or equal to another keeps its full text."""
    units = [_units(spec) for spec in specs]
    shared = set.intersection(*(set(u) for u in units)) if units else set()
    labels = [" ".join(unit for unit in u if unit not in shared) for u in units]
    return [
        label if label and labels.count(label) == 1 else spec
        for label, spec in zip(labels, specs, strict=True)
    ]


def _units(spec: str) -> list[str]:
    """A spec's words, each flag joined with the value that follows it."""
    units: list[str] = []
    for word in shlex.split(spec):
        if units and units[-1].startswith("-") and " " not in units[-1] and not word.startswith("-"):
            units[-1] += " " + word
        else:
            units.append(word)
    return units


def _table(result: dict, names: list[str]) -> str:
    rows = {(r["backend"], r["context"], r["batch"]): r for r in result["rows"]}
    dense, others = names[0], names[1:]
    label = dict(zip(names, short_labels(names), strict=True))
    head = ["ctx", "B", f"{label[dense]} tok/s", f"{label[dense]} ITL ms", f"{label[dense]} TTFT s"]
    for name in others:
        shown = label[name]
        head += [f"{shown} tok/s", f"{shown} ITL ms", f"{shown} TTFT s", f"{shown} 1st step s", "speedup"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for context, batch in sorted({(r["context"], r["batch"]) for r in result["rows"]}):
        base = rows.get((dense, context, batch))
        if base is None:
            continue
        cells = [
            str(context),
            str(batch),
            f"{base['decode_tok_s']:.0f}",
            f"{base['itl_ms']:.2f}",
            f"{base['ttft_s']:.2f}",
        ]
        for name in others:
            row = rows.get((name, context, batch))
            if row is None:
                cells += ["-"] * 5
                continue
            speedup = row["decode_tok_s"] / base["decode_tok_s"]
            cells += [f"{row['decode_tok_s']:.0f}", f"{row['itl_ms']:.2f}", f"{row['ttft_s']:.2f}",
                      f"{row['first_step_s']:.2f}", f"{speedup:.2f}x"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    if result["agreement"]:
        lines.append(f"greedy agreement: {json.dumps(result['agreement'])}")
    return "\n".join(lines + client_table(result["rows"], label) + bucket_table(result["rows"], names, label))


def client_table(rows: list[dict], label: dict[str, str]) -> list[str]:
    """Each row's whole-run decode throughput three ways: our client's streams, the server's log,
    and sglang's own client (bench_one_batch_server) where it ran. At large batches a Python
    client that reads every streamed token can fall behind the server; the log cannot."""
    checked = [r for r in rows if r.get("server_decode_tok_s") or r.get("sglang_client_tok_s")]
    if not checked:
        return []
    lines = ["", "| backend | ctx | B | our client tok/s | server log tok/s | sglang client tok/s |"]
    lines.append("|---" * 6 + "|")
    for r in checked:
        figures = [r["decode_tok_s"], r.get("server_decode_tok_s"), r.get("sglang_client_tok_s")]
        cells = [f"{value:.0f}" if value else "-" for value in figures]
        lines.append(f"| {label[r['backend']]} | {r['context']} | {r['batch']} | " + " | ".join(cells) + " |")
    return lines


def bucket_table(rows: list[dict], names: list[str], label: dict[str, str]) -> list[str]:
    """Per context bucket, each backend's throughput over the first's: client curve / server-log
    curve, for every context x batch whose rows span more than one bucket."""
    by_key = {(r["backend"], r["context"], r["batch"]): r for r in rows}
    lines = []
    for context, batch in sorted({(r["context"], r["batch"]) for r in rows}):
        base = by_key.get((names[0], context, batch))
        if base is None or len(base["client_buckets"]) < 2:
            continue
        buckets = sorted(base["client_buckets"], key=int)
        title = f"context {context} x {batch}: per-bucket tok/s over {label[names[0]]} (client / server log)"
        lines += ["", title]
        lines += ["| backend | " + " | ".join(f"{int(b) // 1024}K" for b in buckets) + " |"]
        lines += ["|" + "---|" * (len(buckets) + 1)]
        for name in names:
            row = by_key.get((name, context, batch))
            if row is None:
                continue
            cells = [_ratio(row, base, "client_buckets", b) + " / " + _ratio(row, base, "server_buckets", b)
                     for b in buckets]  # fmt: skip
            lines.append(f"| {label[name]} | " + " | ".join(cells) + " |")
    return lines


def _ratio(row: dict, base: dict, curve: str, bucket) -> str:
    mine, theirs = row[curve].get(bucket), base[curve].get(bucket)
    if row is base:
        return f"{mine:.0f}" if mine else "-"
    return f"{mine / theirs:.2f}" if mine and theirs else "-"


# ---------------------------------------------------------------------- plumbing


def _random_ids(rng: random.Random, length: int, vocab: int) -> list[int]:
    return [rng.randrange(10, vocab) for _ in range(length)]


def _device_name() -> str:
    """The GPU's name as torch reports it (what a server keys its crossover table by)."""
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", "0"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "cpu"
    return done.stdout.strip() or "cpu"


def attention_shape(model_path: Path, backends: list[tuple[str, str, list[str], dict[str, str]]]) -> dict:
    """Heads per rank, head size and dtype of the model's attention, as a server of the first
    multipole backend shards it (`--tp N`, default 1)."""
    config = json.loads((model_path / "config.json").read_text())
    config = config.get("text_config", config)
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    flags = next((extra for _, name, extra, _ in backends if name == "multipole"), [])
    tp = 1
    for flag, value in zip(flags, flags[1:], strict=False):
        if flag in ("--tp", "--tp-size", "--tensor-parallel-size"):
            tp = int(value)
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16")
    return {"q_heads": heads // tp, "kv_heads": max(1, kv_heads // tp), "head_dim": head_dim, "dtype": dtype}


def _backend(spec: str) -> tuple[str, str, list[str], dict[str, str]]:
    """ "[VAR=VALUE ...] NAME [server flags]" -> (label, NAME, flags, environment of that server)."""
    words = shlex.split(spec)
    is_env = [("=" in word and not word.startswith("-")) for word in words]
    env = dict(word.split("=", 1) for word, flag in zip(words, is_env, strict=True) if flag)
    rest = [word for word, flag in zip(words, is_env, strict=True) if not flag]
    return spec, rest[0], rest[1:], env


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """Set variables for the server launched inside (it inherits the environment), then restore."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _read_from(path: Path, offset: int) -> str:
    """What the server has logged since `offset` (its log is appended to while it runs)."""
    with path.open("rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


def _dump(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=str))


def _parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", type=Path, required=True)
    ap.add_argument("--load-format", help="e.g. dummy: random weights from the config, no checkpoint")
    ap.add_argument(
        "--backend",
        action="append",
        required=True,
        help='"NAME [server flags]", repeated; the first is the baseline',
    )
    ap.add_argument("--contexts", type=int, nargs="*", default=[8192, 32768, 65536])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--max-batch-tokens", type=int, default=600_000, help="skip context x batch above this")
    ap.add_argument("--new-tokens", type=int, default=160)
    ap.add_argument("--samples", type=int, default=1, help="runs of each context x batch; medians reported")
    ap.add_argument("--warmup-tokens", type=int, default=8)
    ap.add_argument("--bucket-tokens", type=int, default=2048, help="context per request per curve bucket")
    ap.add_argument("--context-length", type=int, default=70_000)
    ap.add_argument("--mem-fraction", type=float, default=0.6)
    ap.add_argument("--agreement-prompt", type=Path, help="text file decoded greedily by every backend")
    ap.add_argument("--agreement-tokens", type=int, default=1000)
    ap.add_argument(
        "--agreement-probes", type=int, default=0, help="teacher-forced probes per backend (module doc)"
    )
    ap.add_argument(
        "--sglang-client",
        action="store_true",
        help="also measure every row with sglang.bench_one_batch_server against the same server",
    )
    ap.add_argument(
        "--profile-contexts", type=int, nargs="*", default=[], help="profile decode steps at these contexts"
    )
    ap.add_argument("--profile-steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--startup-timeout", type=float, default=600.0)
    ap.add_argument("--log-dir", type=Path, default=Path("."))
    ap.add_argument("--out", type=Path, default=Path("bench_e2e.json"))
    return ap.parse_args()


if __name__ == "__main__":
    raise SystemExit(main())
