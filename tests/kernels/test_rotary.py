"""The rotary kernel vs `rope.rotate_pairs`, for the two ways the method uses it."""

from __future__ import annotations

import pytest
import torch

from mp_kernels.rotary import rotate, rotate_pairs
from mp_sglang.method.rope import Rope


@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("dim", [16, 12])
def test_keys_of_a_window_unrotated_per_token(generator, neox, dim):
    """A fold's keys: `[H, n, d]` as a transposed view of the pool's `[n, H, d]`, bf16, one
    angle per token, out in float32."""
    pool = torch.randn(37, 5, dim, generator=generator).to(torch.bfloat16)
    keys = pool.transpose(0, 1)
    rope = Rope.standard(dim, 500000.0, neox=neox)
    cos, sin = rope.cos_sin(-torch.arange(100, 137), "cpu", torch.float32)
    got = rotate(keys, cos, sin, neox, torch.float32, backend="triton")
    want = rotate_pairs(keys.float(), cos, sin, neox)
    assert got.dtype == torch.float32 and got.shape == keys.shape
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("neox", [True, False])
def test_queries_rotated_per_request(generator, neox):
    """Decode queries: `[B, Hq, d]` bf16, one angle per request broadcast over heads, out bf16."""
    q = torch.randn(3, 8, 16, generator=generator).to(torch.bfloat16)
    rope = Rope.standard(16, 10000.0, neox=neox)
    cos, sin = rope.query_frame([5, 900, 70000], 64, "cpu")
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    got = rotate(q, cos, sin, neox, backend="triton")
    want = rotate_pairs(q.float(), cos, sin, neox).to(torch.bfloat16)
    assert got.dtype == torch.bfloat16
    assert (got.float() - want.float()).abs().max() <= 2**-7 * want.float().abs().max()


def test_reference_backend_and_rope_agree(generator):
    """The kernel's torch path is `Rope.apply`'s: same result, computed in the angles' dtype."""
    x = torch.randn(2, 9, 16, generator=generator)
    rope = Rope.standard(16)
    cos, sin = rope.cos_sin(torch.arange(9), "cpu", torch.float32)
    torch.testing.assert_close(rotate(x, cos, sin, True, backend="torch"), rope.apply(x, cos, sin))


def test_odd_head_dim_is_refused():
    x = torch.zeros(1, 2, 15)
    with pytest.raises(ValueError, match="even d"):
        rotate(x, torch.zeros(2, 7), torch.zeros(2, 7), True, backend="torch")
