"""Triton building blocks shared by the attention kernels: the online-softmax step and partials.

A partial is what one program contributes for its GQA group: `out [G, d]` (already normalised)
and `lse [G]` (natural log), merged later by `centroid_replace.merge_partials`. Inside a kernel
logits are kept in base 2 (`LOG2E`-scaled) because `exp2` is the native instruction.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = tl.constexpr(0.6931471805599453)
SPLIT_ALIGN = 64  # split boundaries fall on multiples of this many list entries


@triton.jit
def online_update(logits2, values, m, denom, acc, IEEE: tl.constexpr):
    """Fold a tile into a running softmax: logits2 `[G, N]` base-2, values `[N, d]`.

    Masked entries must be -inf. Returns the new running max `m [G]`, sum `denom [G]`, and
    unnormalised output `acc [G, d]`.
    """
    m_new = tl.maximum(m, tl.max(logits2, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m - m_safe)
    p = tl.exp2(logits2 - m_safe[:, None])
    denom = denom * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + dot(p.to(values.dtype), values, IEEE)
    return m_new, denom, acc


@triton.jit
def store_partial(
    out_ptr, lse_ptr, row_offs, row_mask, dim_offs, m, denom, acc, stride_out_row, stride_lse_row
):
    """Write a group's partial: normalised output and natural-log LSE (-inf and 0 when empty)."""
    empty = denom == 0.0
    l_safe = tl.where(empty, 1.0, denom)
    lse = tl.where(empty, float("-inf"), (m + tl.log2(l_safe)) * LN2)
    out = tl.where(empty[:, None], 0.0, acc / l_safe[:, None])
    tl.store(lse_ptr + row_offs * stride_lse_row, lse, mask=row_mask)
    tl.store(out_ptr + row_offs[:, None] * stride_out_row + dim_offs[None, :], out, mask=row_mask[:, None])


@triton.jit
def dot(a, b, IEEE: tl.constexpr):
    """`a @ b` with fp32 accumulation; exact fp32 products when IEEE (fp32 inputs), else tensor cores."""
    if IEEE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


def split_bounds(length: int, num_splits: int, split: int) -> tuple[int, int]:
    """Token range `[lo, hi)` of split `split` of a list: equal chunks rounded up to `SPLIT_ALIGN`.

    The kernels compute the same bounds, so partials of a kernel and of its reference match split
    for split.
    """
    per_split = -(-length // num_splits)
    chunk = -(-per_split // SPLIT_ALIGN) * SPLIT_ALIGN
    lo = min(split * chunk, length)
    return lo, min(lo + chunk, length)
