"""Greedy agreement of a model decoding with Multipole vs. dense attention.

The dense model generates greedily; the Multipole model is then fed the same tokens (teacher
forcing), so every step compares next-token distributions on the same prefix: token agreement
(argmax equal to the dense token), the first step where they differ, and the mean KL(dense ‖
multipole). Free-running comparison would stop meaning anything after the first divergence.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

import mp_sglang.hf  # noqa: F401  (registers attn_implementation="multipole")


@dataclass(frozen=True)
class Agreement:
    steps: int
    agreement: float
    first_divergence: int | None
    mean_kl: float


@torch.no_grad()
def dense_greedy(model, input_ids: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens `[steps]` and their logits `[steps, vocab]` with dense (SDPA) attention."""
    model.set_attn_implementation("sdpa")
    out = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=steps,
        min_new_tokens=steps,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    return out.sequences[0, input_ids.shape[1] :], torch.stack(out.logits, dim=1)[0].float()


@torch.no_grad()
def teacher_forced_agreement(
    model, input_ids: torch.Tensor, tokens: torch.Tensor, dense_logits: torch.Tensor, settings: dict
) -> Agreement:
    """Step the Multipole model along the dense tokens and compare each next-token distribution."""
    model.set_attn_implementation("multipole")
    model.config.multipole = settings
    for module in model.modules():
        module.__dict__.pop("_multipole", None)
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(input_ids=input_ids, use_cache=True)
    logits = [out.logits[0, -1].float()]
    for token in tokens[:-1]:
        out = model(input_ids=token.view(1, 1), use_cache=True, **{cache_arg: _cache_of(out)})
        logits.append(out.logits[0, -1].float())
    sparse = torch.log_softmax(torch.stack(logits), dim=-1)
    dense = torch.log_softmax(dense_logits, dim=-1)
    agree = sparse.argmax(dim=-1) == dense.argmax(dim=-1)
    misses = (~agree).nonzero()
    return Agreement(
        steps=len(tokens),
        agreement=agree.float().mean().item(),
        first_divergence=int(misses[0]) if len(misses) else None,
        mean_kl=(dense.exp() * (dense - sparse)).sum(dim=-1).mean().item(),
    )


def _cache_of(output):
    return output.cache if hasattr(output, "cache") else output.past_key_values
