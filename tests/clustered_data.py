"""Synthetic keys and values for the tests: clustered, as real keys are."""

from __future__ import annotations

import torch


def clustered_kv(
    heads: int, seq: int, dim: int, centres: int, generator: torch.Generator, spread: float = 0.15
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys scattered tightly around a few centres (as real keys are), values loosely tied to them."""
    centre_keys = torch.randn(heads, centres, dim, generator=generator) * 1.5
    centre_values = torch.randn(heads, centres, dim, generator=generator)
    which = torch.randint(0, centres, (heads, seq), generator=generator)
    pick = which.unsqueeze(-1).expand(-1, -1, dim)
    keys = torch.gather(centre_keys, 1, pick) + spread * torch.randn(heads, seq, dim, generator=generator)
    values = torch.gather(centre_values, 1, pick) + 0.5 * torch.randn(heads, seq, dim, generator=generator)
    return keys, values
