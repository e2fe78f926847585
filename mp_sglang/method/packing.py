"""The reference indexes of a batch in the kernels' layout (`mp_kernels.layout.BatchIndex`).

Tests, benchmarks and the transformers path hand `ClusterIndex` objects to the kernels this way;
it is also the layout described by example. Serving fills the same layout in place
(`serving.index_buffers`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mp_kernels.layout import BatchIndex, LevelTensors
from mp_sglang.method.reference import ClusterIndex


def pack_indices(
    indices: Sequence[ClusterIndex], dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> BatchIndex:
    """Lay out the reference indices of a batch (one per request, same layer) for the kernels."""
    num_levels = len(indices[0].levels)
    levels = []
    for lvl in range(num_levels):
        per_req = [index.levels[lvl] for index in indices]
        sizes = [level.centroids.shape[1] for level in per_req]
        parents = None
        if lvl + 1 < num_levels:
            parents = _rows([index.levels[lvl + 1].labels.t() for index in indices], torch.int32, device)
        levels.append(
            LevelTensors(
                centroids=_rows([lv.centroids.transpose(0, 1) for lv in per_req], dtype, device),
                value_centroids=_rows([lv.value_centroids.transpose(0, 1) for lv in per_req], dtype, device),
                counts=_rows([lv.counts.t() for lv in per_req], torch.int32, device),
                cluster_start=_int32(_exclusive_cumsum(sizes), device),
                num_clusters=_int32(sizes, device),
                max_clusters=max(sizes),
                parent=parents,
            )
        )
    member_start, members = _members(indices, device)
    return BatchIndex(
        levels=tuple(levels),
        member_start=member_start,
        members=members,
        sink_len=_int32([min(index.start, index.num_tokens) for index in indices], device),
        recent_start=_int32([index.recent_start for index in indices], device),
        seq_lens=_int32([index.num_tokens for index in indices], device),
    )


def _members(
    indices: Sequence[ClusterIndex], device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    starts, members = [], []
    base = 0
    for index in indices:
        level = index.levels[0]
        labels = level.labels  # [H, num_clustered]
        order = torch.sort(labels, dim=-1, stable=True).indices
        members.append((order + index.start).t())
        counts = level.counts.t()  # [C, H]
        starts.append(base + torch.cumsum(counts, 0) - counts)
        base += labels.shape[1]
    return _rows(starts, torch.int32, device), _rows(members, torch.int32, device)


def _rows(parts: Sequence[torch.Tensor], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    return torch.cat([p.to(dtype) for p in parts], dim=0).contiguous().to(device)


def _int32(values: Sequence[int], device: torch.device | str) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.int32, device=device)


def _exclusive_cumsum(sizes: Sequence[int]) -> list[int]:
    out, total = [], 0
    for size in sizes:
        out.append(total)
        total += size
    return out
