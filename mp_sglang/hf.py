"""Multipole in HF transformers: `attn_implementation="multipole"`, through the public attention interface.

Importing this module registers the implementation. Prefill (several query tokens) runs dense SDPA
and builds each sequence's cluster index; every decode step folds the new token in with
`update_index` (blockwise, never re-clustering from scratch) and attends with `decode_attention`.
The index lives on the attention module, one per batch row, and is checked against the cache
length at every step, so a new prompt or a reordered cache rebuilds it instead of going wrong.

Settings: `model.config.multipole` (a dict of MultipoleConfig fields, set before the first
forward), else the MULTIPOLE_* environment.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from mp_sglang.config import MultipoleConfig
from mp_sglang.reference import ClusterIndex, build_index, decode_attention, dense_attention, update_index
from mp_sglang.rope import Rope

IMPLEMENTATION = "multipole"
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
log = logging.getLogger(__name__)


@dataclass
class _LayerState:
    """Per attention module: the settings, the model's RoPE, and one index per batch row."""

    cfg: MultipoleConfig
    rope: Rope
    indexes: list[ClusterIndex | None] = field(default_factory=list)


def multipole_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """The transformers attention function: `[B, H, T, d]` tensors in, `[B, T, Hq, d]` out."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    state = _layer_state(module, query.shape[-1], scaling)
    batch, _, q_len, _ = query.shape
    valid = _valid_keys(attention_mask, batch, key.shape[2], key.device)
    if len(state.indexes) != batch:
        state.indexes = [None] * batch
    if q_len > 1:
        out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        for row in range(batch):
            state.indexes[row] = _fresh_index(state, key[row][:, valid[row]], value[row][:, valid[row]])
        return out, None
    rows = []
    for row in range(batch):
        keys, values = key[row][:, valid[row]], value[row][:, valid[row]]
        index = _advance(state, state.indexes[row], keys, values)
        state.indexes[row] = index
        q = query[row, :, 0]
        if index is None:
            rows.append(dense_attention(q, keys, values).to(query.dtype))
        else:
            rows.append(decode_attention(q, keys, values, index, state.cfg).to(query.dtype))
    return torch.stack(rows).unsqueeze(1), None


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


def _fresh_index(state: _LayerState, keys: torch.Tensor, values: torch.Tensor) -> ClusterIndex | None:
    if keys.shape[1] < max(state.cfg.dense_below, 1):
        return None
    return build_index(keys.float(), values.float(), state.cfg, rope=state.rope)


def _advance(
    state: _LayerState, index: ClusterIndex | None, keys: torch.Tensor, values: torch.Tensor
) -> ClusterIndex | None:
    """Bring a row's index up to date with its cache: fold in the new token, or build once when due."""
    seq = keys.shape[1]
    if index is not None and index.num_tokens == seq - 1:
        return update_index(index, keys[:, -1:].float(), values[:, -1:].float(), state.cfg)
    if index is not None:
        log.warning(
            "multipole: index covers %d tokens but the cache has %d; rebuilding", index.num_tokens, seq
        )
    return _fresh_index(state, keys, values)


register()
