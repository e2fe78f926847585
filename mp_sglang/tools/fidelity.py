"""How far Multipole attention strays from dense attention on given activations.

Replays decoding over captured (or synthetic) q/k/v: the index is built over a prefix, then every
later token is added with `update_index` and its query attends through `decode_attention`,
exactly as a serving runtime would step. Metrics per query head, averaged:
- rel_l2: ||out - dense|| / ||dense|| of the attention output;
- top1: how often the key with the largest dense attention weight is attended exactly;
- mass: the share of dense attention probability that falls on exactly attended tokens.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from mp_sglang.method.config import MultipoleConfig
from mp_sglang.method.reference import build_index, decode_attention, dense_attention, lookup, update_index
from mp_sglang.method.rope import Rope
from mp_sglang.tools.capture import LayerActivations


@dataclass(frozen=True)
class Fidelity:
    rel_l2: float
    top1: float
    mass: float
    queries: int


def layer_fidelity(
    layer: LayerActivations, cfg: MultipoleConfig, decode_steps: int, rope: Rope | None
) -> Fidelity:
    """Replay the last `decode_steps` tokens of one layer as decoding; average the metrics."""
    seq = layer.keys.shape[1]
    prefix = seq - decode_steps
    if prefix <= 0:
        raise ValueError(
            f"need more than {decode_steps} tokens to replay {decode_steps} decode steps; got {seq}"
        )
    index = build_index(layer.keys[:, :prefix], layer.values[:, :prefix], cfg, rope=rope)
    errors, top1, mass = [], [], []
    for t in range(prefix, seq):
        index = update_index(index, layer.keys[:, t : t + 1], layer.values[:, t : t + 1], cfg)
        q, keys, values = layer.queries[:, t], layer.keys[:, : t + 1], layer.values[:, : t + 1]
        out = decode_attention(q, keys, values, index, cfg)
        ref = dense_attention(q, keys, values)
        errors.append(((out - ref).norm(dim=-1) / ref.norm(dim=-1)).mean().item())
        exact = lookup(q, index, cfg).exact.repeat_interleave(q.shape[0] // keys.shape[0], dim=0)
        probs = _dense_probs(q, keys)
        top1.append(exact.gather(1, probs.argmax(dim=-1, keepdim=True)).float().mean().item())
        mass.append((probs * exact).sum(dim=-1).mean().item())
    return Fidelity(_mean(errors), _mean(top1), _mean(mass), len(errors))


def average(results: Iterable[Fidelity]) -> Fidelity:
    results = list(results)
    weights = [r.queries for r in results]
    total = sum(weights)
    return Fidelity(
        rel_l2=sum(r.rel_l2 * w for r, w in zip(results, weights, strict=True)) / total,
        top1=sum(r.top1 * w for r, w in zip(results, weights, strict=True)) / total,
        mass=sum(r.mass * w for r, w in zip(results, weights, strict=True)) / total,
        queries=total,
    )


def format_table(header: list[str], rows: list[list[object]]) -> str:
    """A markdown table (what the benchmarks print and docs/perf.md records)."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    line = lambda values: "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)) + " |"  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def _dense_probs(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    group = q.shape[0] // keys.shape[0]
    logits = torch.einsum("hd,hsd->hs", q, keys.repeat_interleave(group, dim=0)) / math.sqrt(q.shape[-1])
    return torch.softmax(logits, dim=-1)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _cell(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)
