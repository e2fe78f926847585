"""Soak one multipole server with mixed traffic for minutes and account for every request.

    python3 scripts/soak_serve.py --model-path DIR --load-format dummy --minutes 5 --out $OUT/soak.json
    python3 scripts/soak_serve.py --url http://127.0.0.1:30000 --model-path DIR --minutes 5

Launches `sglang.launch_server --attention-backend multipole` (or attaches to `--url`) and keeps up
to `--concurrency` requests in flight on loopback until `--minutes` have passed. Each request is
drawn (seeded) from a mix: prompts of 1K-48K random token ids with 16-4,096 new tokens (EOS
ignored); a third continue one of a few shared prefixes (radix-cache hits); some ask for `n` > 1
samples; some are cancelled mid-stream by closing the connection; a few are bad on purpose (longer
than the window, invalid sampling parameters, an empty prompt) and must be refused with a 4xx.
Every request's outcome is recorded; every 5 s the server's health, its GPU memory (nvidia-smi) and
the index buffers' occupancy (the backend's log line) are sampled. The summary fails the soak when
a good request did not complete in full, a bad one was not refused, or the server stopped.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_e2e import streamed_tokens  # noqa: E402

from harness.server import attached, free_port, launched  # noqa: E402

SHARED_PREFIXES = (4096, 16384, 32768)  # tokens of the prefixes that a third of the requests share
OCCUPANCY = re.compile(rb"index buffers reserved (\d+) of (\d+) cluster rows and (\d+) of (\d+) token rows")


@dataclass
class Plan:
    """One request to send: what it is and what must come back."""

    kind: str  # plain | shared | parallel | cancel | too_long | bad_params | empty
    prompt_tokens: int
    new_tokens: int
    n: int = 1
    cancel_after: int = 0  # streamed chunks before the connection is closed (kind "cancel")
    prefix: int = -1  # index into SHARED_PREFIXES (kind "shared")

    @property
    def bad(self) -> bool:
        return self.kind in BAD_KINDS


@dataclass
class Outcome:
    kind: str
    status: str  # ok | cancelled | refused | incomplete | error
    tokens: int = 0
    expected: int = 0
    http: int | None = None
    detail: str = ""
    seconds: float = 0.0


@dataclass
class Sample:
    t: float
    healthy: bool
    gpu_mib: list[int] = field(default_factory=list)
    index_clusters: tuple[int, int] | None = None  # used, capacity
    index_tokens: tuple[int, int] | None = None


def draw(rng: random.Random, window: int) -> Plan:
    """One request of the mix (module doc); every good one fits the window."""
    roll = rng.random()
    new = int(round(2 ** rng.uniform(4, 12)))  # 16 .. 4096, log-uniform
    prompt = int(round(2 ** rng.uniform(10, 15.55)))  # 1K .. ~48K
    if roll < 0.05:
        kind = rng.choice(BAD_KINDS)
        return Plan(kind, {"too_long": window + 1024, "bad_params": 256, "empty": 0}[kind], 16)
    if roll < 0.38:
        prefix = rng.randrange(len(SHARED_PREFIXES))
        plan = Plan("shared", SHARED_PREFIXES[prefix] + rng.randint(64, 2048), new, prefix=prefix)
    elif roll < 0.48:
        plan = Plan("parallel", min(prompt, 16384), min(new, 1024), n=rng.choice((2, 4, 8)))
    elif roll < 0.58:
        plan = Plan("cancel", prompt, max(new, 256), cancel_after=rng.randint(1, 64))
    else:
        plan = Plan("plain", prompt, new)
    room = window - plan.new_tokens - 8
    if plan.kind == "shared" and SHARED_PREFIXES[plan.prefix] > room:
        plan = Plan("plain", prompt, new)  # a prefix this window cannot hold
    plan.prompt_tokens = min(plan.prompt_tokens, window - plan.new_tokens - 8)
    return plan


def prompt_ids(plan: Plan, rng: random.Random, prefixes: list[list[int]], vocab: int) -> list[int]:
    """The plan's prompt: a shared prefix plus a fresh tail, or fresh random ids."""
    if plan.kind == "shared":
        head = prefixes[plan.prefix]
        return head + [rng.randrange(10, vocab) for _ in range(plan.prompt_tokens - len(head))]
    return [rng.randrange(10, vocab) for _ in range(plan.prompt_tokens)]


def request_body(plan: Plan, ids: list[int]) -> dict:
    params = {"temperature": 0.0, "max_new_tokens": plan.new_tokens, "ignore_eos": True}
    if plan.kind == "bad_params":
        params["temperature"] = -1.0
    if plan.n > 1:
        params |= {"n": plan.n, "temperature": 0.8}
    return {"input_ids": ids, "sampling_params": params, "stream": plan.n == 1 and not plan.bad}


def send(base: str, plan: Plan, body: dict) -> Outcome:
    """Send one request and classify what came back."""
    started = time.monotonic()
    outcome = Outcome(plan.kind, "error", expected=plan.new_tokens * plan.n)
    request = urllib.request.Request(
        base + "/generate", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=1800) as resp:
            outcome.http = resp.status
            if body["stream"]:
                chunks = 0
                for raw in resp:
                    tokens = streamed_tokens(raw)
                    if tokens is None:
                        continue
                    outcome.tokens, chunks = tokens, chunks + 1
                    if plan.kind == "cancel" and chunks >= plan.cancel_after:
                        break  # leaving the with-block closes the connection mid-stream
            else:
                replies = json.loads(resp.read())
                replies = replies if isinstance(replies, list) else [replies]
                outcome.tokens = sum(r["meta_info"]["completion_tokens"] for r in replies)
        if plan.kind == "cancel" and outcome.tokens < outcome.expected:
            outcome.status = "cancelled"
        elif plan.bad:
            outcome.detail = "accepted a bad request"
        else:
            outcome.status = "ok" if outcome.tokens == outcome.expected else "incomplete"
    except urllib.error.HTTPError as err:
        outcome.http = err.code
        outcome.detail = err.read().decode(errors="replace")[:300]
        outcome.status = "refused" if plan.bad and 400 <= err.code < 500 else "error"
    except Exception as err:  # connection reset, timeout: recorded, never raised
        outcome.detail = f"{type(err).__name__}: {err}"[:300]
    outcome.seconds = round(time.monotonic() - started, 3)
    return outcome


BAD_KINDS = ("too_long", "bad_params", "empty")


def expected_status(kind: str) -> str:
    """What a request of `kind` must end in: refused (bad), cancelled (by us), else complete."""
    return "refused" if kind in BAD_KINDS else "cancelled" if kind == "cancel" else "ok"


def verdict(outcomes: list[Outcome], samples: list[Sample]) -> dict:
    """Counts by kind and status, and whether the soak passed (module doc)."""
    failures = [asdict(o) for o in outcomes if o.status != expected_status(o.kind)]
    counts = Counter(f"{o.kind} {o.status}" for o in outcomes)
    down = [s.t for s in samples if not s.healthy]
    return {
        "requests": len(outcomes),
        "by_kind_status": dict(sorted(counts.items())),
        "failures": failures[:20],
        "unhealthy_at_s": down,
        "passed": not failures and not down and bool(outcomes),
    }


def monitor(base: str, log: Path | None, stop: threading.Event, samples: list[Sample], t0: float) -> None:
    """Every 5 s: health, GPU memory, index occupancy from the server log (last report)."""
    while not stop.wait(5.0):
        samples.append(sample(base, log, time.monotonic() - t0))


def sample(base: str, log: Path | None, t: float) -> Sample:
    try:
        with urllib.request.urlopen(base + "/health", timeout=10) as resp:
            healthy = resp.status == 200
    except Exception:
        healthy = False
    gpu = subprocess.run(
        ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
        capture_output=True, text=True, check=False,
    ) if _has_nvidia_smi() else None  # fmt: skip
    found = OCCUPANCY.findall(log.read_bytes()[-1_000_000:]) if log and log.exists() else []
    last = [int(x) for x in found[-1]] if found else None
    return Sample(
        t=round(t, 1),
        healthy=healthy,
        gpu_mib=[int(x) for x in gpu.stdout.split()] if gpu and gpu.returncode == 0 else [],
        index_clusters=(last[0], last[1]) if last else None,
        index_tokens=(last[2], last[3]) if last else None,
    )


def _has_nvidia_smi() -> bool:
    from shutil import which

    return which("nvidia-smi") is not None


def soak(base: str, log: Path | None, args: argparse.Namespace, vocab: int) -> dict:
    rng = random.Random(args.seed)
    prefixes = [[rng.randrange(10, vocab) for _ in range(n)] for n in SHARED_PREFIXES]
    outcomes: list[Outcome] = []
    samples: list[Sample] = []
    t0 = time.monotonic()
    stop = threading.Event()
    watcher = threading.Thread(target=monitor, args=(base, log, stop, samples, t0), daemon=True)
    watcher.start()
    deadline = t0 + 60 * args.minutes
    with ThreadPoolExecutor(args.concurrency) as pool:
        running = set()
        while time.monotonic() < deadline or running:
            while time.monotonic() < deadline and len(running) < args.concurrency:
                plan = draw(rng, args.context_length)
                body = request_body(plan, prompt_ids(plan, rng, prefixes, vocab))
                running.add(pool.submit(send, base, plan, body))
            done, running = wait(running, timeout=1.0, return_when=FIRST_COMPLETED)
            outcomes += [f.result() for f in done]
            print(f"\r{time.monotonic() - t0:6.0f}s {len(outcomes)} requests done", end="", flush=True)
    stop.set()
    samples.append(sample(base, log, time.monotonic() - t0))  # the server after the last request
    print()
    return {"verdict": verdict(outcomes, samples), "outcomes": [asdict(o) for o in outcomes],
            "samples": [asdict(s) for s in samples]}  # fmt: skip


def main() -> int:
    args = _parse()
    vocab = json.loads((args.model_path / "config.json").read_text())["vocab_size"]
    if args.url:
        with attached(args.url, "/health"):
            result = soak(args.url.rstrip("/"), args.log, args, vocab)
    else:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        log = args.log or args.out.with_suffix(".server.log")
        command = [
            sys.executable, "-m", "sglang.launch_server", "--model-path", str(args.model_path),
            "--attention-backend", "multipole", "--port", str(port),
            "--context-length", str(args.context_length),
            *(["--load-format", args.load_format] if args.load_format else []), *args.server_args.split(),
        ]  # fmt: skip
        with launched(command, base, "/health", log, timeout_s=args.startup_timeout):
            result = soak(base, log, args, vocab)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["verdict"], indent=1))
    return 0 if result["verdict"]["passed"] else 1


def _parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", type=Path, required=True, help="its config.json gives the vocabulary")
    ap.add_argument("--url", help="attach to this running server instead of launching one")
    ap.add_argument("--log", type=Path, help="the server's log (read for index occupancy)")
    ap.add_argument("--load-format")
    ap.add_argument("--server-args", default="", help="more launch_server flags")
    ap.add_argument("--context-length", type=int, default=65536)
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--startup-timeout", type=float, default=900.0)
    ap.add_argument("--out", type=Path, default=Path("soak.json"))
    return ap.parse_args()


if __name__ == "__main__":
    raise SystemExit(main())
