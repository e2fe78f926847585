"""Record the real queries, keys and values a transformers model attends with.

The fidelity benchmark needs real activations (real keys cluster very differently from random
ones). We hook transformers' public attention interface rather than patching model code, so any
architecture that uses it (Llama, Qwen2/3, ...) can be captured.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mp_sglang.method.rope import Rope

_CAPTURE = "multipole_capture"


@dataclass(frozen=True)
class LayerActivations:
    """One layer's attention inputs for one sequence: q `[Hq, T, d]`, k and v `[H_kv, T, d]` (after RoPE)."""

    queries: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor


def model_rope(model) -> Rope:
    """The rotary embedding of a transformers Llama-family model (its inverse frequencies, neox pairing)."""
    rotary = model.model.rotary_emb
    if getattr(rotary, "attention_scaling", 1.0) != 1.0:
        raise ValueError("RoPE variants that rescale cos/sin (e.g. YaRN) are not supported by the capture")
    return Rope(inv_freq=rotary.inv_freq.detach().float().cpu(), neox=True)


@torch.no_grad()
def capture_activations(model, input_ids: torch.Tensor) -> list[LayerActivations]:
    """Run one forward pass over `input_ids` `[1, T]`, returning every layer's q, k, v."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must be [1, T]; got {tuple(input_ids.shape)}")
    recorded: dict[int, LayerActivations] = {}

    def record(module, query, key, value, attention_mask, **kwargs):
        recorded[module.layer_idx] = LayerActivations(query[0].float(), key[0].float(), value[0].float())
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(_CAPTURE, record)
    previous = model.config._attn_implementation
    model.set_attn_implementation(_CAPTURE)
    try:
        model(input_ids=input_ids, use_cache=False)
    finally:
        model.set_attn_implementation(previous)
    return [recorded[i] for i in sorted(recorded)]
