"""MultipoleConfig: every knob of the method, validated where it is made.

Defaults follow the paper's released settings (Hooper et al., 2025): one centroid per 16 keys
(6.25 % clusters), k-means in contiguous blocks of 8192 keys with 10 Lloyd iterations, a cluster
update every 128 generated tokens with 3 warm-started refinement iterations, 10 attention-sink
tokens, and the windowed-RoPE lookup frame (keys at position 0, query at position 2048).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

ENV_PREFIX = "MULTIPOLE_"
ENV_CONFIG_FILE = "MULTIPOLE_CONFIG"
ENV_CACHE_DIR = "MULTIPOLE_CACHE_DIR"  # where measured tables live (serving.crossover), not a setting
DECODE_PATHS = ("auto", "kernels", "reference")
UNINDEXED_DECODES = ("dense", "kernels")


@dataclass(frozen=True)
class MultipoleConfig:
    """Settings of Multipole Attention.

    token_budget: keys attended exactly, chosen cluster by cluster. A float in [0, 1] is a
        fraction of the context length (1.0: all of it); an int, or a whole float above 1, is a
        number of tokens. Sink and recent-window tokens are always exact and come on top of it.
    tokens_per_cluster: average keys per k-means cluster (the paper uses 16, i.e. 6.25 %).
    kmeans_block: keys per k-means block; only the final block is ever re-clustered. The final
        block holds between half and one and a half blocks of keys.
    kmeans_iters: Lloyd iterations when a block is clustered from scratch.
    update_iters: warm-started Lloyd iterations over the final block at each update.
    update_block: generated tokens (B) folded into the clusters at each update.
    recent_window: newest tokens always attended exactly (not yet clustered).
    sink_tokens: first tokens always attended exactly (attention sinks).
    levels: 1 for flat centroids; 2 or more adds coarser levels (clusters of clusters).
    level_ratio: fine clusters per coarse cluster, between consecutive levels.
    level_budget_multiplier: a coarser level admits this many times the budget of the level below.
    windowed_rope: cluster keys un-rotated to position 0 and look up with the query rotated to
        `rope_window`, so centroids do not mix rotations of different positions.
    rope_window: the fixed query position of the windowed-RoPE lookup frame.
    dense_below: contexts shorter than this decode densely; sparsity buys nothing there.
    seed: seeds the k-means initialisation, so that an index is reproducible.
    decode_path: how the sglang backend and the transformers integration compute decode steps:
        "kernels" (mp_kernels, batched; Triton on CUDA, their torch references elsewhere),
        "reference" (mp_sglang.method.reference, one request at a time), or "auto" (kernels on CUDA,
        reference elsewhere). The kernels serve flat indexes only (levels=1).
    dense_backend: the sglang backend that computes prefill (and short or mixed rows): a name in
        sglang's attention registry, or "auto" (flashinfer on CUDA when installed, else triton;
        torch_native without CUDA).
    index_capacity: clustered tokens the kernel path's preallocated index holds per layer, as a
        multiple of the KV pool's slots. 1.0 covers any batch of distinct requests; requests that
        share long prefixes through the radix cache each cluster them, and need more.
    max_request_budget: the largest `token_budget` (a fraction in [0, 1]) a request may ask for
        through the API (`custom_params`, serving.request_settings); the kernel path sizes its
        per-step token list for it, so a larger one costs memory in every decode step.
    unindexed_decode: how the sglang kernel path attends a DECODE batch in which no row has an
        index (every context below `dense_below`, or every request asked for dense): "dense"
        through the dense backend's decode kernel (with CUDA graphs, a second graph per batch size
        is captured for it, serving.dense_graphs), or "kernels" through our exact kernels.
    """

    token_budget: float = 0.02
    tokens_per_cluster: int = 16
    kmeans_block: int = 8192
    kmeans_iters: int = 10
    update_iters: int = 3
    update_block: int = 128
    recent_window: int = 128
    sink_tokens: int = 10
    levels: int = 1
    level_ratio: int = 8
    level_budget_multiplier: float = 4.0
    windowed_rope: bool = True
    rope_window: int = 2048
    dense_below: int = 4096
    seed: int = 0
    decode_path: str = "auto"
    dense_backend: str = "auto"
    index_capacity: float = 1.0
    max_request_budget: float = 0.1
    unindexed_decode: str = "dense"

    def __post_init__(self) -> None:
        budget = self.token_budget
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget < 0:
            raise ValueError(f"token_budget must be a fraction in [0, 1] or a token count; got {budget!r}")
        if budget > 1 and float(budget) != int(budget):
            raise ValueError(f"token_budget >= 1 is a token count and must be whole; got {budget!r}")
        _check_int(self, "tokens_per_cluster", 1, 1 << 16)
        _check_int(self, "kmeans_block", 16, 1 << 22)
        _check_int(self, "kmeans_iters", 1, 1000)
        _check_int(self, "update_iters", 0, 1000)
        _check_int(self, "update_block", 1, 1 << 20)
        _check_int(self, "recent_window", 0, 1 << 20)
        _check_int(self, "sink_tokens", 0, 1 << 20)
        _check_int(self, "levels", 1, 4)
        _check_int(self, "level_ratio", 2, 1 << 10)
        _check_int(self, "rope_window", 0, 1 << 24)
        _check_int(self, "dense_below", 0, 1 << 30)
        _check_int(self, "seed", 0, (1 << 63) - 1)
        if self.tokens_per_cluster > self.kmeans_block:
            raise ValueError(
                f"tokens_per_cluster ({self.tokens_per_cluster}) must not exceed kmeans_block "
                f"({self.kmeans_block})"
            )
        if not isinstance(self.windowed_rope, bool):
            raise ValueError(f"windowed_rope must be true or false; got {self.windowed_rope!r}")
        if self.decode_path not in DECODE_PATHS:
            raise ValueError(f"decode_path must be one of {DECODE_PATHS}; got {self.decode_path!r}")
        if self.decode_path == "kernels" and self.levels != 1:
            raise ValueError("decode_path=kernels serves flat indexes (levels=1); use decode_path=reference")
        if self.unindexed_decode not in UNINDEXED_DECODES:
            raise ValueError(
                f"unindexed_decode must be one of {UNINDEXED_DECODES}; got {self.unindexed_decode!r}"
            )
        capacity = self.index_capacity
        if isinstance(capacity, bool) or not isinstance(capacity, (int, float)) or not 0 < capacity <= 64:
            raise ValueError(f"index_capacity must be a number in (0, 64]; got {capacity!r}")
        limit = self.max_request_budget
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not 0 <= limit <= 1:
            raise ValueError(f"max_request_budget must be a fraction in [0, 1]; got {limit!r}")
        multiplier = self.level_budget_multiplier
        if isinstance(multiplier, bool) or not isinstance(multiplier, (int, float)) or multiplier < 1:
            raise ValueError(f"level_budget_multiplier must be a number >= 1; got {multiplier!r}")

    def decodes_with_kernels(self, device: object) -> bool:
        """Whether decode steps on `device` run the mp_kernels chain: "kernels" anywhere, "auto" on
        CUDA (where Triton runs) for a flat index; the kernels do not serve hierarchies."""
        if self.decode_path == "auto":
            return str(device).startswith("cuda") and self.levels == 1
        return self.decode_path == "kernels"

    def budget_tokens(self, context_len: int) -> int:
        """Exact-attention budget in tokens for a context of `context_len` tokens."""
        return budget_tokens(self.token_budget, context_len)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MultipoleConfig:
        """Build from a mapping, rejecting unknown keys by name (typos must not pass silently)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown MultipoleConfig field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> MultipoleConfig:
        """Read `MULTIPOLE_<FIELD>` variables, on top of the JSON file named by `MULTIPOLE_CONFIG`.

        This is the channel through which serving processes (which sglang starts itself) get
        their settings.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        path = env.get(ENV_CONFIG_FILE)
        if path:
            try:
                values.update(json.loads(Path(path).read_text()))
            except (OSError, json.JSONDecodeError) as err:
                raise ValueError(f"{ENV_CONFIG_FILE}={path!r} is not a readable JSON file: {err}") from err
        types = {f.name: f.type for f in fields(cls)}
        for key, raw in env.items():
            if not key.startswith(ENV_PREFIX) or key in (ENV_CONFIG_FILE, ENV_CACHE_DIR):
                continue
            name = key[len(ENV_PREFIX) :].lower()
            if name not in types:
                raise ValueError(
                    f"unknown setting {key}; known: {sorted(ENV_PREFIX + n.upper() for n in types)}"
                )
            values[name] = _parse_env_value(key, raw, types[name])
        return cls.from_dict(values)


def budget_tokens(token_budget: float, context_len: int) -> int:
    """Tokens of a `token_budget` (a float fraction in [0, 1], else a token count) for a context
    of `context_len` tokens; a request's own budget (always a fraction) follows the same rule."""
    if isinstance(token_budget, float) and token_budget <= 1:
        return int(token_budget * context_len)
    return int(token_budget)


def _check_int(cfg: MultipoleConfig, name: str, low: int, high: int) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}]; got {value!r}")


def _parse_env_value(key: str, raw: str, type_name: str) -> Any:
    text = raw.strip()
    if type_name == "bool":
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{key}={raw!r} is not a boolean (use true/false)")
    if type_name == "str":
        return text
    try:
        return int(text) if type_name == "int" else _number(text)
    except ValueError:
        raise ValueError(f"{key}={raw!r} is not a {type_name}") from None


def _number(text: str) -> float | int:
    """An integer literal stays an int (a token count); anything else is a float (maybe a fraction)."""
    try:
        return int(text)
    except ValueError:
        return float(text)
