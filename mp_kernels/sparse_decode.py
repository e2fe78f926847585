"""Sparse flash decoding: exact attention of each decode query over a ragged list of its tokens.

The list of a (request, KV head) is its sinks, the tokens the centroid lookup chose and its recent
window (`layout.ExactTokens`: only the chosen ones are stored, the two ranges are enumerated), and
the kernel reads K and V for them straight from the paged pool (`layout.PagedKV`). The list of one
(request, head) is cut into `num_splits` chunks (split-K), each program attends its chunk for the
whole GQA group at once (one K/V read serves G query heads) and writes a partial output + LSE;
`centroid_replace.merge_partials` combines them.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from mp_kernels._softmax import LOG2E, SPLIT_ALIGN, dot, online_update, split_bounds, store_partial
from mp_kernels.dispatch import exact_dots, next_power_of_2, use_triton
from mp_kernels.layout import ExactTokens, PagedKV

# Tokens per tile and warps: 64 x 8 uses 241 registers with no spill on sm_90 (ptxas report); 64 x 4
# and 128 x 8 spill. Module-level so the benchmark can compare tile shapes.
SPARSE_TILE = {"BLOCK_N": 64, "num_warps": 8, "num_stages": 2}


def sparse_decode(
    q: torch.Tensor,
    kv: PagedKV,
    exact: ExactTokens,
    num_splits: int,
    sm_scale: float | None = None,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial attention of `q [B, Hq, d]` over each (request, KV head)'s exact tokens.

    Returns (or fills) `out [B, Hq, num_splits, d]` fp32 and `lse [B, Hq,
    num_splits]` fp32; an empty split has LSE -inf and output 0. `out`/`lse` may be views into a
    larger workspace (any strides with a unit last dim for `out`).
    """
    batch, num_q_heads, dim = q.shape
    scale = 1.0 / math.sqrt(dim) if sm_scale is None else sm_scale
    if out is None:
        out = torch.empty(batch, num_q_heads, num_splits, dim, dtype=torch.float32, device=q.device)
    if lse is None:
        lse = torch.empty(batch, num_q_heads, num_splits, dtype=torch.float32, device=q.device)
    if use_triton(q, backend):
        _launch(q, kv, exact, num_splits, scale, out, lse)
    else:
        sparse_decode_reference(q, kv, exact, num_splits, scale, out, lse)
    return out, lse


def token_slots(kv: PagedKV, batch_entry: int, positions: torch.Tensor) -> torch.Tensor:
    """Pool slots of token `positions` of one batch entry (the page-table arithmetic, in torch)."""
    row = kv.page_table[int(kv.table_rows[batch_entry])].long()
    positions = positions.long()
    return row[positions // kv.page_size] * kv.page_size + positions % kv.page_size


def sparse_decode_reference(
    q: torch.Tensor,
    kv: PagedKV,
    exact: ExactTokens,
    num_splits: int,
    scale: float,
    out: torch.Tensor,
    lse: torch.Tensor,
) -> None:
    """The same partials as the kernel, in plain torch (fp32), one (request, head) at a time."""
    heads = kv.k_buffer.shape[1]
    group = q.shape[1] // heads
    out.zero_()
    lse.fill_(float("-inf"))
    for b in range(q.shape[0]):
        for h in range(heads):
            positions = exact.positions(b, h)
            n = len(positions)
            slots = token_slots(kv, b, positions)
            keys = kv.k_buffer[slots, h].float()
            values = kv.v_buffer[slots, h].float()
            logits = q[b, h * group : (h + 1) * group].float() @ keys.t() * scale
            for s in range(num_splits):
                lo, hi = split_bounds(n, num_splits, s)
                if hi > lo:
                    part = logits[:, lo:hi]
                    lse[b, h * group : (h + 1) * group, s] = torch.logsumexp(part, dim=-1)
                    out[b, h * group : (h + 1) * group, s] = torch.softmax(part, dim=-1) @ values[lo:hi]


def _launch(
    q: torch.Tensor,
    kv: PagedKV,
    exact: ExactTokens,
    num_splits: int,
    scale: float,
    out: torch.Tensor,
    lse: torch.Tensor,
) -> None:
    batch, num_q_heads, dim = q.shape
    heads = kv.k_buffer.shape[1]
    group = num_q_heads // heads
    ieee = exact_dots(q.dtype)
    _sparse_decode_kernel[(batch * heads, num_splits)](
        q,
        kv.k_buffer,
        kv.v_buffer,
        kv.page_table,
        kv.table_rows,
        exact.sink_len,
        exact.chosen,
        exact.num_chosen,
        exact.recent_start,
        exact.seq_lens,
        out,
        lse,
        scale * LOG2E,
        heads,
        group,
        num_splits,
        exact.chosen.shape[-1],
        q.stride(0),
        q.stride(1),
        kv.k_buffer.stride(0),
        kv.k_buffer.stride(1),
        kv.v_buffer.stride(0),
        kv.v_buffer.stride(1),
        kv.page_table.stride(0),
        exact.chosen.stride(0),
        exact.chosen.stride(1),
        exact.num_chosen.stride(0),
        exact.num_chosen.stride(1),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        lse.stride(0),
        lse.stride(1),
        lse.stride(2),
        PAGE_SIZE=kv.page_size,
        D=dim,
        G_PAD=max(16, next_power_of_2(group)),
        BLOCK_N=32 if ieee else SPARSE_TILE["BLOCK_N"],
        ALIGN=SPLIT_ALIGN,
        IEEE=ieee,
        num_warps=SPARSE_TILE["num_warps"],
        num_stages=SPARSE_TILE["num_stages"],
    )


@triton.jit
def _sparse_decode_kernel(
    q,
    k_buf,
    v_buf,
    table,
    table_rows,
    sink_len,
    chosen,
    num_chosen,
    recent_start,
    seq_lens,
    out,
    lse,
    scale2,
    H,
    G,
    num_splits,
    chosen_cap,
    stride_qb,
    stride_qh,
    stride_ks,
    stride_kh,
    stride_vs,
    stride_vh,
    stride_table,
    stride_cb,
    stride_ch,
    stride_nb,
    stride_nh,
    stride_ob,
    stride_oh,
    stride_os,
    stride_lb,
    stride_lh,
    stride_ls,
    PAGE_SIZE: tl.constexpr,
    D: tl.constexpr,
    G_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ALIGN: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // H
    h = pid % H
    n_sink = tl.load(sink_len + b)
    n_chosen = tl.minimum(tl.load(num_chosen + b * stride_nb + h * stride_nh), chosen_cap)
    recent = tl.load(recent_start + b)
    n = n_sink + n_chosen + tl.maximum(tl.load(seq_lens + b) - recent, 0)
    chunk = tl.cdiv(tl.cdiv(n, num_splits), ALIGN) * ALIGN
    start = tl.minimum(split * chunk, n)
    end = tl.minimum(start + chunk, n)

    g = tl.arange(0, G_PAD)
    g_mask = g < G
    rows = h * G + g
    d = tl.arange(0, D)
    qv = tl.load(q + b * stride_qb + rows[:, None] * stride_qh + d[None, :], mask=g_mask[:, None], other=0.0)
    table_row = table + tl.load(table_rows + b).to(tl.int64) * stride_table
    chosen_row = chosen + b * stride_cb + h * stride_ch

    m = tl.full([G_PAD], float("-inf"), tl.float32)
    denom = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    for t0 in range(start, end, BLOCK_N):
        offs = t0 + tl.arange(0, BLOCK_N)
        valid = offs < end
        # Entry -> position: sinks and the recent window are ranges, only chosen tokens are listed.
        k = offs - n_sink
        listed = valid & (k >= 0) & (k < n_chosen)
        pos = tl.load(chosen_row + k, mask=listed, other=0)
        pos = tl.where(offs < n_sink, offs, tl.where(listed, pos, recent + k - n_chosen))
        page = tl.load(table_row + pos // PAGE_SIZE, mask=valid, other=0).to(tl.int64)
        slot = page * PAGE_SIZE + pos % PAGE_SIZE
        keys = tl.load(
            k_buf + slot[:, None] * stride_ks + h * stride_kh + d[None, :], mask=valid[:, None], other=0.0
        )
        vals = tl.load(
            v_buf + slot[:, None] * stride_vs + h * stride_vh + d[None, :], mask=valid[:, None], other=0.0
        )
        logits2 = dot(qv, tl.trans(keys), IEEE) * scale2
        logits2 = tl.where(valid[None, :], logits2, float("-inf"))
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
