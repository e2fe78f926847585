"""Centroid replacement (the approximate part) and the log-sum-exp merge of partials.

Every cluster that the lookup left unselected stands in for its tokens: it adds N_i exp(s_i) Vc_i
to the numerator and N_i exp(s_i) to the denominator, i.e. a softmax over the logits
`s_i + log N_i` that `centroid_lookup` already computed, against the value centroids. Like the
sparse kernel it returns split partials (output + LSE), so one `merge_partials` launch combines the
exact splits, the approximate splits of every level, and nothing else.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mp_kernels._softmax import SPLIT_ALIGN, online_update, split_bounds, store_partial
from mp_kernels.dispatch import exact_dots, next_power_of_2, use_triton
from mp_kernels.layout import LevelTensors

# Clusters per tile and warps (swept by bench_kernels.py). One stage: Triton's pipelining stages
# each tile in 86 KB of shared memory, which held the kernel to two programs per SM and cost it
# 20-30 % (docs/perf.md, kernel item 11).
REPLACE_TILE = {"BLOCK_C": 128, "num_warps": 4, "num_stages": 1}
MERGE_D_BLOCK = 32  # output dimensions per merge program


def centroid_replace(
    logits: torch.Tensor,
    selected: torch.Tensor,
    level: LevelTensors,
    num_splits: int,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Partials of the approximate part of one level.

    logits `[B, Hq, max_clusters]` fp32 (`s + log N`, -inf where not a candidate) and selected
    `[B, H_kv, max_clusters]` int8 as returned by `centroid_lookup.lookup`. Clusters that are
    candidates and not selected contribute. Returns (or fills) `out [B, Hq, num_splits, d]` and
    `lse [B, Hq, num_splits]`, fp32.
    """
    batch, num_q_heads, _ = logits.shape
    dim = level.value_centroids.shape[-1]
    if out is None:
        out = torch.empty(batch, num_q_heads, num_splits, dim, dtype=torch.float32, device=logits.device)
    if lse is None:
        lse = torch.empty(batch, num_q_heads, num_splits, dtype=torch.float32, device=logits.device)
    if use_triton(logits, backend):
        _launch_replace(logits, selected, level, num_splits, out, lse)
    else:
        centroid_replace_reference(logits, selected, level, num_splits, out, lse)
    return out, lse


def merge_partials(
    out_parts: torch.Tensor,
    lse_parts: torch.Tensor,
    out_dtype: torch.dtype,
    out: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the union of disjoint partials: `[B, Hq, P, d]`, `[B, Hq, P]` → out, lse.

    Partials with LSE -inf contribute nothing but must hold finite outputs (the kernels write 0);
    if all are empty the output is 0 and LSE -inf.
    `out` (`[B, Hq, d]`, unit last stride), if given, is written in place and its dtype wins:
    a caller's output buffer saves a copy.
    """
    batch, heads, parts, dim = out_parts.shape
    if out is None:
        out = torch.empty(batch, heads, dim, dtype=out_dtype, device=out_parts.device)
    elif out.shape != (batch, heads, dim) or out.stride(-1) != 1:
        raise ValueError(f"out must be [{batch}, {heads}, {dim}], unit last stride; got {tuple(out.shape)}")
    lse = torch.empty(batch, heads, dtype=torch.float32, device=out_parts.device)
    if use_triton(out_parts, backend):
        d_block = min(dim, MERGE_D_BLOCK)
        _merge_kernel[(batch * heads, dim // d_block)](
            out_parts,
            lse_parts,
            out,
            lse,
            heads,
            parts,
            out_parts.stride(0),
            out_parts.stride(1),
            out_parts.stride(2),
            lse_parts.stride(0),
            lse_parts.stride(1),
            lse_parts.stride(2),
            out.stride(0),
            out.stride(1),
            lse.stride(0),
            D_BLOCK=d_block,
            P_PAD=next_power_of_2(parts),
            num_warps=4,
        )
        return out, lse
    merged = torch.logsumexp(lse_parts, dim=-1)
    finite = torch.isfinite(merged)
    weights = torch.where(
        finite.unsqueeze(-1), torch.exp(lse_parts - torch.where(finite, merged, 0).unsqueeze(-1)), 0
    )
    out.copy_(torch.einsum("bhp,bhpd->bhd", weights, out_parts.float()))
    lse.copy_(merged)
    return out, lse


def centroid_replace_reference(
    logits: torch.Tensor,
    selected: torch.Tensor,
    level: LevelTensors,
    num_splits: int,
    out: torch.Tensor,
    lse: torch.Tensor,
) -> None:
    """The same partials as the kernel in plain torch, one request at a time."""
    heads = selected.shape[1]
    group = logits.shape[1] // heads
    out.zero_()
    lse.fill_(float("-inf"))
    for b in range(logits.shape[0]):
        n = int(level.num_clusters[b])
        rows = slice(int(level.cluster_start[b]), int(level.cluster_start[b]) + n)
        values = level.value_centroids[rows].float().transpose(0, 1)  # [H, n, d]
        approx = selected[b, :, :n] == 0
        weights = logits[b, :, :n].masked_fill(~approx.repeat_interleave(group, dim=0), float("-inf"))
        values = values.repeat_interleave(group, dim=0)
        for s in range(num_splits):
            lo, hi = split_bounds(n, num_splits, s)
            part = weights[:, lo:hi]
            if hi == lo:
                continue
            part_lse = torch.logsumexp(part, dim=-1)
            finite = torch.isfinite(part_lse)
            probs = torch.exp(part - torch.where(finite, part_lse, 0).unsqueeze(-1))
            lse[b, :, s] = part_lse
            out[b, :, s] = torch.einsum("hn,hnd->hd", probs, values[:, lo:hi])


def _launch_replace(
    logits: torch.Tensor,
    selected: torch.Tensor,
    level: LevelTensors,
    num_splits: int,
    out: torch.Tensor,
    lse: torch.Tensor,
) -> None:
    batch, num_q_heads, _ = logits.shape
    heads = selected.shape[1]
    group = num_q_heads // heads
    values = level.value_centroids
    _replace_kernel[(batch * heads, num_splits)](
        logits,
        selected,
        values,
        level.cluster_start,
        level.num_clusters,
        out,
        lse,
        heads,
        group,
        num_splits,
        logits.stride(0),
        logits.stride(1),
        selected.stride(0),
        selected.stride(1),
        values.stride(0),
        values.stride(1),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        lse.stride(0),
        lse.stride(1),
        lse.stride(2),
        D=values.shape[-1],
        G_PAD=max(16, next_power_of_2(group)),
        BLOCK_C=REPLACE_TILE["BLOCK_C"],
        ALIGN=SPLIT_ALIGN,
        IEEE=exact_dots(values.dtype),
        num_warps=REPLACE_TILE["num_warps"],
        num_stages=REPLACE_TILE["num_stages"],
    )


@triton.jit
def _replace_kernel(
    logits,
    selected,
    values,
    cluster_start,
    num_clusters,
    out,
    lse,
    H,
    G,
    num_splits,
    stride_lgb,
    stride_lgh,
    stride_sb,
    stride_sh,
    stride_vr,
    stride_vh,
    stride_ob,
    stride_oh,
    stride_os,
    stride_lb,
    stride_lh,
    stride_ls,
    D: tl.constexpr,
    G_PAD: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ALIGN: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // H
    h = pid % H
    n = tl.load(num_clusters + b)
    chunk = tl.cdiv(tl.cdiv(n, num_splits), ALIGN) * ALIGN
    start = tl.minimum(split * chunk, n)
    end = tl.minimum(start + chunk, n)
    row0 = tl.load(cluster_start + b).to(tl.int64)

    g = tl.arange(0, G_PAD)
    g_mask = g < G
    rows = h * G + g
    d = tl.arange(0, D)
    m = tl.full([G_PAD], float("-inf"), tl.float32)
    denom = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    for c0 in range(start, end, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        valid = c < end
        sel = tl.load(selected + b * stride_sb + h * stride_sh + c, mask=valid, other=1)
        lg = tl.load(
            logits + b * stride_lgb + rows[:, None] * stride_lgh + c[None, :],
            mask=g_mask[:, None] & valid[None, :],
            other=float("-inf"),
        )
        approx = valid & (sel == 0) & (tl.max(lg, axis=0) > float("-inf"))
        vals = tl.load(
            values + (row0 + c)[:, None] * stride_vr + h * stride_vh + d[None, :],
            mask=approx[:, None],
            other=0.0,
        )
        logits2 = tl.where(approx[None, :], lg * 1.4426950408889634, float("-inf"))
        m, denom, acc = online_update(logits2, vals, m, denom, acc, IEEE)

    store_partial(
        out + b * stride_ob + split * stride_os,
        lse + b * stride_lb + split * stride_ls,
        rows,
        g_mask,
        d,
        m,
        denom,
        acc,
        stride_oh,
        stride_lh,
    )


@triton.jit
def _merge_kernel(
    out_parts,
    lse_parts,
    out,
    lse,
    Hq,
    P,
    stride_pb,
    stride_ph,
    stride_pp,
    stride_qb,
    stride_qh,
    stride_qp,
    stride_ob,
    stride_oh,
    stride_lb,
    D_BLOCK: tl.constexpr,
    P_PAD: tl.constexpr,
):
    # A program per (row, head, slice of d): the partials' loads do not wait for the LSEs (an
    # empty partial holds output 0, so its weight 0 needs no mask), and each program reads a
    # quarter of a head's partials.
    pid = tl.program_id(0)
    b = pid // Hq
    h = pid % Hq
    p = tl.arange(0, P_PAD)
    d = tl.program_id(1) * D_BLOCK + tl.arange(0, D_BLOCK)
    lses = tl.load(lse_parts + b * stride_qb + h * stride_qh + p * stride_qp, mask=p < P, other=float("-inf"))
    parts = tl.load(
        out_parts + b * stride_pb + h * stride_ph + p[:, None] * stride_pp + d[None, :],
        mask=(p < P)[:, None],
        other=0.0,
    )
    m = tl.max(lses, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2((lses - m_safe) * 1.4426950408889634)
    total = tl.sum(w, axis=0)
    merged = tl.sum(parts * w[:, None], axis=0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out + b * stride_ob + h * stride_oh + d, merged.to(out.dtype.element_ty))
    if tl.program_id(1) == 0:
        tl.store(lse + b * stride_lb + h, tl.where(total == 0.0, float("-inf"), m_safe + tl.log(total)))
