"""Rotary rotation of vectors by per-row angles in one pass: `rope.Rope.apply` as a kernel.

The windowed-RoPE lookup frame rotates every decode query (per layer and step) and, at each
index fold, un-rotates a whole window of keys (tens of thousands of tokens over all layers'
heads). In torch that is about ten elementwise launches and as many passes over the data (a
cast, four products, a sum, a difference, a concatenation, a cast back); here it is one read of
`x` in its own dtype and one write in the dtype asked for.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mp_kernels.dispatch import next_power_of_2, use_triton

ROWS_PER_PROGRAM = 32


def rotate(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    neox: bool,
    out_dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Rotate the pairs of `x [A, B, d]` by angles given as `cos`/`sin` broadcastable to
    `[A, B, d/2]`, computing in their dtype; returns `[A, B, d]` in `out_dtype` (default: `x`'s
    dtype) with `x`'s layout. The torch reference is `rope.rotate_pairs`.

    neox=True pairs dimension i with i + d/2, neox=False pairs (2i, 2i+1) (as `Rope`).
    """
    if x.dim() != 3 or x.shape[-1] % 2:
        raise ValueError(f"x must be [A, B, d] with an even d; got {tuple(x.shape)}")
    out_dtype = out_dtype or x.dtype
    half = x.shape[-1] // 2
    cos = cos.expand(*x.shape[:2], half)
    sin = sin.expand(*x.shape[:2], half)
    if not use_triton(x, backend):
        return rotate_pairs(x.to(cos.dtype), cos, sin, neox).to(out_dtype)
    if x.stride(-1) != 1:
        x = x.contiguous()
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty_like(x, dtype=out_dtype)
    rows = x.shape[0] * x.shape[1]
    _rotate_kernel[(triton.cdiv(rows, ROWS_PER_PROGRAM),)](
        x,
        cos,
        sin,
        out,
        rows,
        x.shape[1],
        x.stride(0),
        x.stride(1),
        cos.stride(0),
        cos.stride(1),
        out.stride(0),
        out.stride(1),
        HALF=half,
        HALF_PAD=next_power_of_2(half),
        NEOX=neox,
        BLOCK_R=ROWS_PER_PROGRAM,
        num_warps=4,
    )
    return out


@triton.jit(do_not_specialize=["rows", "B"])  # token counts vary per fold: no recompiles
def _rotate_kernel(
    x,
    cos,
    sin,
    out,
    rows,
    B,
    stride_xa,
    stride_xb,
    stride_ca,
    stride_cb,
    stride_oa,
    stride_ob,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
    NEOX: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    a = (r // B).to(tl.int64)
    b = (r % B).to(tl.int64)
    j = tl.arange(0, HALF_PAD)
    mask = (r < rows)[:, None] & (j < HALF)[None, :]
    if NEOX:
        first, second = j, j + HALF
    else:
        first, second = 2 * j, 2 * j + 1
    x_row = (a * stride_xa + b * stride_xb)[:, None]
    c_row = (a * stride_ca + b * stride_cb)[:, None]
    o_row = (a * stride_oa + b * stride_ob)[:, None]
    c = tl.load(cos + c_row + j[None, :], mask=mask, other=0.0)
    s = tl.load(sin + c_row + j[None, :], mask=mask, other=0.0)
    x1 = tl.load(x + x_row + first[None, :], mask=mask, other=0.0).to(c.dtype)
    x2 = tl.load(x + x_row + second[None, :], mask=mask, other=0.0).to(c.dtype)
    y1 = x1 * c - x2 * s
    y2 = x2 * c + x1 * s
    tl.store(out + o_row + first[None, :], y1.to(out.dtype.element_ty), mask=mask)
    tl.store(out + o_row + second[None, :], y2.to(out.dtype.element_ty), mask=mask)


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, neox: bool) -> torch.Tensor:
    """The rotation in plain torch, in `x`'s dtype: neox pairs dimension i with i + d/2,
    otherwise neighbours (2i, 2i+1)."""
    if neox:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
