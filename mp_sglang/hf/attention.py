"""Multipole in HF transformers: `attn_implementation="multipole"`, through the public attention interface.

Importing this module (or the package) registers the implementation. Prefill (several query
tokens) runs dense SDPA and builds each sequence's cluster index; every decode step folds the new
token in with `update_index` (blockwise, never re-clustering from scratch) and attends. The index lives on the
attention module, one per batch row, and is checked against the cache length at every step, so a
new prompt or a reordered cache rebuilds it instead of going wrong.

Decode steps attend (`decode_path`): on CUDA through the Triton kernel chain, all rows in one call
per layer (`mp_sglang.hf.kernels`, which keeps its own copy of the rows' tokens in the kernels'
layout); elsewhere, or for hierarchical indexes (levels > 1), with the torch reference
(`decode_attention`), row by row. decode_path="kernels" takes the kernel path anywhere, with the
kernels' backend `KERNEL_BACKEND`.

Settings: `model.config.multipole` (a dict of MultipoleConfig fields, set before the first
forward), else the MULTIPOLE_* environment.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from mp_sglang.hf.kernels import PackedIndexes, SlotKV, kernel_decode
from mp_sglang.method.config import MultipoleConfig
from mp_sglang.method.reference import (
    ClusterIndex,
    build_index,
    decode_attention,
    dense_attention,
    update_index,
)
from mp_sglang.method.rope import Rope

IMPLEMENTATION = "multipole"
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
# The kernels' backend on the kernel path (see mp_kernels.dispatch): None runs Triton on CUDA and
# the kernels' torch references elsewhere; "triton" runs Triton anywhere (its CPU interpreter under
# TRITON_INTERPRET=1, as the tests do).
KERNEL_BACKEND: str | None = None
log = logging.getLogger(__name__)


@dataclass
class _LayerState:
    """Per attention module: the settings, the model's RoPE, one index per batch row, and (kernel
    path only) the rows' tokens in the kernels' layout."""

    cfg: MultipoleConfig
    rope: Rope
    indexes: list[ClusterIndex | None] = field(default_factory=list)
    kv: SlotKV | None = None
    packed: PackedIndexes = field(default_factory=PackedIndexes)


@dataclass(frozen=True)
class _Row:
    """One batch row of the cache `[H_kv, T, d]`: `seq` valid keys, gathered only when needed."""

    key: torch.Tensor
    value: torch.Tensor
    valid: torch.Tensor
    seq: int

    def whole(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The valid keys/values (a copy: left padding is skipped)."""
        return self.key[:, self.valid], self.value[:, self.valid]

    def newest(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The decode step's own key/value (always the last position, always valid)."""
        return self.key[:, -1:], self.value[:, -1:]


def multipole_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """The transformers attention function: `[B, H, T, d]` tensors in, `[B, T, Hq, d]` out."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    state = _layer_state(module, query.shape[-1], scaling)
    batch, _, q_len, _ = query.shape
    valid = _valid_keys(attention_mask, batch, key.shape[2], key.device)
    rows = [_Row(key[b], value[b], valid[b], seq) for b, seq in enumerate(valid.sum(1).tolist())]
    if len(state.indexes) != batch:
        state.indexes = [None] * batch
    kernels = state.cfg.decodes_with_kernels(query.device)
    if q_len > 1:
        out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        for b, row in enumerate(rows):
            state.indexes[b] = _fresh_index(state, row)
        if kernels:
            kv = _slot_kv(state, key)
            for b, row in enumerate(rows):
                kv.write(b, *row.whole())
        return out, None
    for b, row in enumerate(rows):
        state.indexes[b] = _advance(state, state.indexes[b], row)
    if kernels:
        out = _kernel_step(state, query[:, :, 0].contiguous(), key, rows)
    else:
        out = torch.stack(
            [_reference_step(state, query[b, :, 0], row, state.indexes[b]) for b, row in enumerate(rows)]
        )
    return out.unsqueeze(1), None


def register() -> None:
    """Make `attn_implementation="multipole"` known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, multipole_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


def model_config(config) -> MultipoleConfig:
    """The settings for a model: its `multipole` config entry, else the environment."""
    values = getattr(config, "multipole", None)
    return MultipoleConfig.from_dict(dict(values)) if values else MultipoleConfig.from_env()


def _layer_state(module, head_dim: int, scaling: float | None) -> _LayerState:
    state = module.__dict__.get("_multipole")
    if state is None:
        config = module.config
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"attn_implementation='multipole' supports {SUPPORTED_MODEL_TYPES}; "
                f"{config.model_type!r} is not supported: use attn_implementation='sdpa'"
            )
        if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
            raise ValueError("sliding-window attention is not supported by multipole: use 'sdpa'")
        if scaling is not None and not math.isclose(scaling, head_dim**-0.5, rel_tol=1e-6):
            raise ValueError(
                f"multipole assumes 1/sqrt(head_dim) attention scaling; this model uses {scaling}"
            )
        state = _LayerState(cfg=model_config(config), rope=_rope_of(config, head_dim))
        module.__dict__["_multipole"] = state
    return state


def _rope_of(config, head_dim: int) -> Rope:
    params = getattr(config, "rope_parameters", None) or {}
    if params.get("rope_type", "default") != "default":
        raise ValueError(f"multipole supports plain RoPE only; this model uses {params['rope_type']!r}")
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    return Rope.standard(head_dim, theta=theta, neox=True)


def _valid_keys(attention_mask, batch: int, seq: int, device) -> torch.Tensor:
    """`[B, S]` keys the last query of each row may see (excludes left padding)."""
    if attention_mask is None:
        return torch.ones(batch, seq, dtype=torch.bool, device=device)
    last = attention_mask[:, 0, -1, -seq:]
    return last if last.dtype == torch.bool else last == 0


def _slot_kv(state: _LayerState, key: torch.Tensor) -> SlotKV:
    """The layer's kernel-side copy of the cache, made anew for another batch, dtype or device."""
    batch, heads, _, dim = key.shape
    if state.kv is None or not state.kv.holds(key):
        state.kv = SlotKV(batch, heads, dim, key.dtype, key.device)
    return state.kv


def _kernel_step(state: _LayerState, q: torch.Tensor, key: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
    """`[B, Hq, d]`: the step's token joins each row's slots, then one batched kernel call."""
    kv = _slot_kv(state, key)
    for b, row in enumerate(rows):
        if kv.lengths[b] == row.seq - 1:
            kv.append(b, *row.newest())
        else:
            kv.write(b, *row.whole())
    rope = state.rope if state.cfg.windowed_rope else None
    return kernel_decode(q, kv, state.indexes, state.packed, state.cfg, rope, KERNEL_BACKEND)


def _reference_step(
    state: _LayerState, q: torch.Tensor, row: _Row, index: ClusterIndex | None
) -> torch.Tensor:
    """`[Hq, d]` for one row with the plain-PyTorch reference (re-reads the row's whole cache)."""
    keys, values = row.whole()
    if index is None:
        return dense_attention(q, keys, values).to(q.dtype)
    return decode_attention(q, keys, values, index, state.cfg).to(q.dtype)


def _fresh_index(state: _LayerState, row: _Row) -> ClusterIndex | None:
    if row.seq < max(state.cfg.dense_below, 1):
        return None
    keys, values = row.whole()
    return build_index(keys.float(), values.float(), state.cfg, rope=state.rope)


def _advance(state: _LayerState, index: ClusterIndex | None, row: _Row) -> ClusterIndex | None:
    """Bring a row's index up to date with its cache: fold in the new token, or build once when due."""
    if index is not None and index.num_tokens == row.seq - 1:
        keys, values = row.newest()
        return update_index(index, keys.float(), values.float(), state.cfg)
    if index is not None:
        log.warning(
            "multipole: index covers %d tokens but the cache has %d; rebuilding", index.num_tokens, row.seq
        )
    return _fresh_index(state, row)


register()
