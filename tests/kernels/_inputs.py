"""Random batches for the kernel tests: ragged requests, their reference indices, a shuffled pool."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mp_kernels.layout import BatchIndex, PagedKV, contiguous_pool
from mp_sglang.method.config import MultipoleConfig
from mp_sglang.method.packing import pack_indices
from mp_sglang.method.reference import ClusterIndex, build_index

POISON_INT = -7777


def poisoned_empty(original):
    """torch.empty that fills floats with NaN and integers with a sentinel: unwritten output shows."""

    def empty(*args, **kwargs):
        tensor = original(*args, **kwargs)
        if tensor.is_floating_point():
            return tensor.fill_(float("nan"))
        if tensor.dtype != torch.bool:
            return tensor.fill_(POISON_INT if tensor.dtype != torch.int8 else -77)
        return tensor

    return empty


@dataclass
class Batch:
    keys: list[torch.Tensor]  # [H, n, d] fp32 (already rounded to the pool dtype)
    values: list[torch.Tensor]
    indices: list[ClusterIndex]
    index: BatchIndex
    kv: PagedKV
    q: torch.Tensor  # [B, Hq, d] in the pool dtype
    budget: torch.Tensor  # [B] int32
    max_exact: int


def make_batch(
    lens: list[int],
    heads: int,
    group: int,
    dim: int,
    cfg: MultipoleConfig,
    dtype: torch.dtype = torch.float32,
    page_size: int = 1,
    seed: int = 0,
    device: str = "cpu",
    centres: int = 0,
) -> Batch:
    """Requests of lengths `lens`; keys around `centres` random centres when > 0 (clustered data)."""
    gen = torch.Generator().manual_seed(seed)
    keys, values = [], []
    for n in lens:
        if centres:
            anchors = torch.randn(heads, centres, dim, generator=gen) * 2
            pick = torch.randint(0, centres, (heads, n), generator=gen)
            k = anchors.gather(1, pick.unsqueeze(-1).expand(-1, -1, dim)) + 0.5 * torch.randn(
                heads, n, dim, generator=gen
            )
        else:
            k = torch.randn(heads, n, dim, generator=gen)
        keys.append(k.to(dtype).float())
        values.append(torch.randn(heads, n, dim, generator=gen).to(dtype).float())
    indices = [build_index(k, v, cfg) for k, v in zip(keys, values, strict=True)]
    kv = contiguous_pool(keys, values, page_size, dtype, gen)
    kv = PagedKV(*(t.to(device) if isinstance(t, torch.Tensor) else t for t in vars(kv).values()))
    budget = torch.tensor([cfg.budget_tokens(n) for n in lens], dtype=torch.int32, device=device)
    max_exact = max(  # a list never holds more than the whole sequence
        min(min(ix.start, ix.num_tokens) + int(b) + ix.num_tokens - ix.recent_start, ix.num_tokens)
        for ix, b in zip(indices, budget.tolist(), strict=True)
    )
    q = torch.randn(len(lens), heads * group, dim, generator=gen).to(dtype).to(device)
    index = pack_indices(indices, torch.float32, device)
    return Batch(keys, values, indices, index, kv, q, budget, max_exact)


def small_config(**overrides) -> MultipoleConfig:
    """Tiny clusters and blocks so that CPU-interpreter tests see many clusters and blocks."""
    settings = dict(
        token_budget=0.25,
        tokens_per_cluster=4,
        kmeans_block=32,
        kmeans_iters=3,
        update_iters=2,
        update_block=8,
        recent_window=8,
        sink_tokens=3,
        levels=1,
        level_ratio=3,
        windowed_rope=False,
    )
    settings.update(overrides)
    return MultipoleConfig(**settings)
