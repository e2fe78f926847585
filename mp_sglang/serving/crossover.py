"""Per batch size, the context from which the method's decode step beats the dense one: measured
once per GPU and attention shape on the served path, cached, read at start-up.

A dense decode step reads every cached token, so its attention grows with the batch's context; the
method's step is a fixed chain of launches plus its budget and window, nearly flat in context. For
each batch size there is therefore a context where the two cross, and it moves with the batch: at
batch 32 the dense step's bytes dominate early, at batch 1 the method's fixed chain does. A fixed
`dense_below` is right for one batch size at best.

The crossover is measured where it matters, on served decode steps: `scripts/bench_e2e.py` runs a
dense server and a multipole server that indexes from a low context (MULTIPOLE_DENSE_BELOW=1024)
through the same short-prompt, long-output batches, and logs both servers' throughput per context
bucket; `python -m mp_sglang.serving.crossover BENCH_JSON` turns the buckets into a table (for
each batch size, the first bucket from which multipole is at least as fast in every later bucket,
index builds and folds included) and writes it to the cache under a key of the GPU's name and the
attention shape per rank. A multipole server finds it there at start-up: its indexes start at the
table's lowest crossover, and a decode batch whose mean context is below its own batch size's
crossover replays the dense twin (`dense_graphs`). MULTIPOLE_DENSE_BELOW, set explicitly, turns
the table off.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from mp_sglang.method.config import ENV_CACHE_DIR, ENV_CONFIG_FILE, ENV_PREFIX, MultipoleConfig

OVERRIDE_ENV = f"{ENV_PREFIX}DENSE_BELOW"


@dataclass(frozen=True)
class AttentionShape:
    """What sets a decode step's attention cost on one GPU: heads per rank, head size, KV dtype."""

    q_heads: int
    kv_heads: int
    head_dim: int
    dtype: str  # "bfloat16", "float16", "float32" (torch's name without "torch.")

    def key(self, device: str) -> str:
        """The cache file's name for this shape on `device` (e.g. "NVIDIA H100 80GB HBM3")."""
        slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
        dtype = self.dtype.removeprefix("torch.")
        return f"{slug}-q{self.q_heads}-kv{self.kv_heads}-d{self.head_dim}-{dtype}"


@dataclass(frozen=True)
class Crossover:
    """Measured crossovers: `points` are (batch size, context from which the method is faster);
    `settings`, the method's settings they were measured with (`measured_settings`): a budget or
    cluster size of another server moves them."""

    points: tuple[tuple[int, int], ...]
    settings: tuple[tuple[str, object], ...] = ()

    def __post_init__(self) -> None:
        if not self.points:
            raise ValueError("a crossover table needs at least one (batch, context) point")
        batches = [batch for batch, _ in self.points]
        if batches != sorted(set(batches)) or any(b < 1 or c < 1 for b, c in self.points):
            raise ValueError(f"crossover points must be distinct batch sizes >= 1, sorted: {self.points}")

    def context_for(self, batch: int) -> int:
        """The crossover of a batch of `batch` rows: linear in the batch size between measured
        ones, the nearest measured one outside them."""
        points = self.points
        if batch <= points[0][0]:
            return points[0][1]
        for (b0, c0), (b1, c1) in zip(points, points[1:], strict=False):
            if batch <= b1:
                return round(c0 + (c1 - c0) * (batch - b0) / (b1 - b0))
        return points[-1][1]

    def lowest(self) -> int:
        """The smallest crossover: where indexes must start so that any batch can use them."""
        return min(context for _, context in self.points)

    def differences(self, cfg: MultipoleConfig) -> list[str]:
        """Settings of `cfg` that differ from those the table was measured with (none: it applies)."""
        own = dict(measured_settings(cfg))
        return [
            f"{name}={own.get(name)!r} (measured: {value!r})"
            for name, value in self.settings
            if own.get(name) != value
        ]


def measured_settings(cfg: MultipoleConfig) -> tuple[tuple[str, object], ...]:
    """The settings that move a crossover: all of them but dense_below (what the table replaces)
    and those that only choose how the same work runs or is seeded."""
    ignored = {"dense_below", "seed", "decode_path", "dense_backend", "index_capacity", "max_request_budget"}
    return tuple(sorted((k, v) for k, v in cfg.to_dict().items() if k not in ignored))


def from_buckets(
    dense: Mapping[int, Mapping[int, float]],
    method: Mapping[int, Mapping[int, float]],
    bucket_tokens: int,
    method_from: int = 0,
    tolerance: float = 0.02,
) -> Crossover:
    """The table from per-bucket decode throughputs (tok/s by bucket start) of both backends, per
    batch size: the first bucket from which the method is at least as fast (within `tolerance`,
    the buckets' noise) in every later bucket both measured; where it never is, the end of the
    measured range (the dense step grows with context and the method's does not, so beyond it
    the method is taken to win). Buckets below `method_from`, where the multipole server did not
    index yet (its dense_below), did not measure the method and are left out."""
    points = []
    for batch in sorted(set(dense) & set(method)):
        shared = sorted(b for b in set(dense[batch]) & set(method[batch]) if b >= method_from)
        if not shared:
            continue
        crossover = shared[-1] + bucket_tokens
        for bucket in reversed(shared):
            if method[batch][bucket] < (1 - tolerance) * dense[batch][bucket]:
                break
            crossover = bucket
        points.append((batch, max(crossover, 1)))
    if not points:
        raise ValueError("no batch size has buckets measured for both backends")
    return Crossover(tuple(points))


def cache_dir() -> Path:
    """Where tables live: $MULTIPOLE_CACHE_DIR, else ~/.cache/multipole."""
    return Path(os.environ.get(ENV_CACHE_DIR) or Path.home() / ".cache" / "multipole") / "crossover"


def save(
    crossover: Crossover, shape: AttentionShape, device: str, source: str, folder: Path | None = None
) -> Path:
    """Write the table for `shape` on `device`; `source` says what measured it."""
    path = (folder or cache_dir()) / f"{shape.key(device)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "device": device,
        "shape": shape.__dict__,
        "points": crossover.points,
        "settings": dict(crossover.settings),
        "source": source,
    }
    path.write_text(json.dumps(record, indent=1))
    return path


def load(shape: AttentionShape, device: str, folder: Path | None = None) -> tuple[Crossover | None, Path]:
    """The cached table for `shape` on `device`, or None; and the path looked at."""
    path = (folder or cache_dir()) / f"{shape.key(device)}.json"
    if not path.is_file():
        return None, path
    record = json.loads(path.read_text())
    points = tuple((int(batch), int(context)) for batch, context in record["points"])
    return Crossover(points, tuple(sorted(record.get("settings", {}).items()))), path


def explicit_dense_below(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the user fixed dense_below (MULTIPOLE_DENSE_BELOW, or the MULTIPOLE_CONFIG file),
    which overrides any table. (A bad file was refused earlier, by `MultipoleConfig.from_env`.)"""
    env = os.environ if environ is None else environ
    if env.get(OVERRIDE_ENV, "").strip():
        return True
    path = env.get(ENV_CONFIG_FILE)
    return bool(path) and "dense_below" in json.loads(Path(path).read_text())


def from_bench(result: dict) -> tuple[Crossover, AttentionShape, str]:
    """The table, shape and device of a `scripts/bench_e2e.py` result: its first backend is the
    dense baseline, its first multipole backend the method (server-log buckets of each batch)."""
    rows = result["rows"]
    labels = list(dict.fromkeys(row["backend"] for row in rows))
    method_labels = [label for label in labels[1:] if "multipole" in label.split()]
    if len(labels) < 2 or not method_labels:
        raise ValueError("the result needs a dense backend first and a multipole backend after it")

    def buckets(label: str) -> dict[int, dict[int, float]]:
        return {
            row["batch"]: {int(k): float(v) for k, v in row["server_buckets"].items()}
            for row in rows
            if row["backend"] == label
        }

    method = method_labels[0]
    cfg = MultipoleConfig.from_env(_environment_of(method))
    table = from_buckets(
        buckets(labels[0]), buckets(method), int(result["args"]["bucket_tokens"]), method_from=cfg.dense_below
    )
    table = Crossover(table.points, measured_settings(cfg))
    shape = AttentionShape(**result["attention_shape"])
    return table, shape, result["device"]


def _environment_of(label: str) -> dict[str, str]:
    """The MULTIPOLE_* variables of a bench backend label ("[VAR=VALUE ...] multipole [flags]")."""
    pairs = (word.partition("=") for word in label.split() if not word.startswith("-"))
    return {name: value for name, sep, value in pairs if sep and name.startswith("MULTIPOLE_")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Write the measured crossover table of a bench_e2e.py run.")
    ap.add_argument("bench_json", type=Path, help="bench_e2e.py --out file: a dense and a multipole server")
    ap.add_argument("--cache-dir", type=Path, help=f"default: ${ENV_CACHE_DIR} or ~/.cache/multipole")
    args = ap.parse_args(argv)
    table, shape, device = from_bench(json.loads(args.bench_json.read_text()))
    folder = args.cache_dir / "crossover" if args.cache_dir else None
    path = save(table, shape, device, source=str(args.bench_json), folder=folder)
    for batch, context in table.points:
        print(f"batch {batch}: multipole from {context} tokens of context")
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
