"""Serving smoke test: launch sglang once per attention backend, ask one question, shut down.

For each backend named in ``--attention-backend`` this starts ``python -m sglang.launch_server`` on
the given model in its own process group, waits for ``/health``, sends one chat request through the
OpenAI-compatible API (greedy, ``ignore_eos`` so a random model still answers), checks the answer is
non-empty, then stops the server (SIGTERM to it, SIGKILL to whatever is left of its process group) so
no scheduler or detokenizer process outlives it. A summary table comes last; the exit code is non-zero
if any backend failed.

    python3 scripts/smoke_serve.py --model-path /tmp/rand-llama --attention-backend triton flashinfer
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Result:
    backend: str
    ok: bool = False
    startup_s: float = 0.0
    request_s: float = 0.0
    tokens: int = 0
    answer: str = ""
    error: str = ""


def _get(url: str, timeout: float) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0


def _post(url: str, body: dict, timeout: float) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def _stop(proc: subprocess.Popen, grace: float) -> None:
    """Stop the server, then anything left in its process group.

    SIGTERM goes to the server process alone: sglang's handler drains and stops its scheduler and
    detokenizer itself (signalling them directly makes it log a crash and wait 5 s). Whatever is still
    in the group after ``grace`` seconds gets SIGKILL.
    """
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    deadline = time.monotonic() + grace
    while _orphans(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10.0)
    deadline = time.monotonic() + 10.0
    while _orphans(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)


def _orphans(pgid: int) -> list[str]:
    """Processes still in the server's process group (should be none after a clean stop)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":  # zombies hold no resources
            out.append(stat.parent.name)
    return out


def run_backend(args: argparse.Namespace, backend: str, port: int, log_dir: Path) -> Result:
    """One launch, one request, one shutdown; every failure ends up in the Result, not an exception."""
    res = Result(backend)
    base = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable, "-m", "sglang.launch_server", "--model-path", str(args.model_path),
        "--attention-backend", backend, "--host", "127.0.0.1", "--port", str(port),
        "--mem-fraction-static", str(args.mem_fraction), "--log-level", "info", *args.extra,
    ]
    log_path = log_dir / f"server-{backend}.log"
    print(f"[{backend}] {' '.join(cmd)}\n[{backend}] log: {log_path}", flush=True)
    t0 = time.monotonic()
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while _get(f"{base}/health", 2.0) != 200:
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited with {proc.returncode} before /health")
                if time.monotonic() - t0 > args.startup_timeout:
                    raise RuntimeError(f"no /health after {args.startup_timeout:.0f} s")
                time.sleep(1.0)
            res.startup_s = time.monotonic() - t0
            t1 = time.monotonic()
            reply = _post(f"{base}/v1/chat/completions", {
                "model": "default",
                "messages": [{"role": "user", "content": args.prompt}],
                "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True,
            }, timeout=args.request_timeout)
            res.request_s = time.monotonic() - t1
            res.answer = reply["choices"][0]["message"]["content"] or ""
            res.tokens = int(reply.get("usage", {}).get("completion_tokens", 0))
            if not res.answer.strip() or res.tokens <= 0:
                raise RuntimeError(f"empty answer: {json.dumps(reply)[:300]}")
            res.ok = True
        except Exception as e:  # noqa: BLE001 - reported in the table, the next backend still runs
            res.error = f"{type(e).__name__}: {e}"
        finally:
            _stop(proc, args.shutdown_grace)
            left = _orphans(proc.pid)
            if left:
                res.ok = False
                res.error = (res.error + "; " if res.error else "") + f"orphans left: {left}"
    if not res.ok:
        tail = log_path.read_text(errors="replace").splitlines()[-25:]
        print(f"[{backend}] FAILED: {res.error}\n" + "\n".join(f"  | {x}" for x in tail), flush=True)
    return res


def table(results: list[Result]) -> str:
    rows = [("backend", "result", "startup s", "request s", "tokens", "answer (first 40 chars)")]
    for r in results:
        rows.append((r.backend, "PASS" if r.ok else "FAIL", f"{r.startup_s:.1f}", f"{r.request_s:.2f}",
                     str(r.tokens), repr(r.answer[:40]) if r.ok else r.error[:80]))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", type=Path, required=True)
    ap.add_argument("--attention-backend", nargs="+", default=["triton", "flashinfer"])
    ap.add_argument("--port", type=int, default=30000)
    ap.add_argument("--mem-fraction", type=float, default=0.3, help="--mem-fraction-static for sglang")
    ap.add_argument("--prompt", default="What is the capital of France?")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--startup-timeout", type=float, default=300.0)
    ap.add_argument("--request-timeout", type=float, default=120.0)
    ap.add_argument("--shutdown-grace", type=float, default=20.0)
    ap.add_argument("--log-dir", type=Path, default=Path(os.environ.get("OUT", ".")))
    ap.add_argument("extra", nargs="*", help="more sglang.launch_server arguments, after --")
    args = ap.parse_args(argv)
    if not (args.model_path / "config.json").is_file():
        ap.error(f"{args.model_path} has no config.json: build one with scripts/make_random_model.py")
    args.log_dir.mkdir(parents=True, exist_ok=True)

    # a port per backend: the last server's socket may linger in TIME_WAIT
    backends = args.attention_backend
    results = [run_backend(args, b, args.port + i, args.log_dir) for i, b in enumerate(backends)]
    answers = {r.answer for r in results if r.ok}
    print("\n" + table(results))
    if len(answers) > 1:
        print("note: greedy answers differ between backends (random weights leave near-ties; not a failure)")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
