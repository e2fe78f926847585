"""Rotary position embedding, enough to move keys and queries between positions.

Keys sit in the KV cache already rotated to their own positions. The windowed-RoPE lookup frame
needs them un-rotated (to position 0) and the query rotated to a fixed position, which is the same
rotation by a different angle: RoPE(x, a) rotated by b equals RoPE(x, a + b).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mp_kernels.rotary import rotate, rotate_pairs


@dataclass(frozen=True)
class Rope:
    """A model's rotary embedding: its inverse frequencies and its pairing of dimensions.

    neox=True rotates dimension i with i + d/2 (Llama, Qwen, and sglang's default);
    neox=False rotates neighbouring pairs (2i, 2i+1).
    """

    inv_freq: torch.Tensor
    neox: bool = True
    _freqs_on: dict[str, torch.Tensor] = field(
        default_factory=dict, init=False, hash=False, compare=False, repr=False
    )

    @classmethod
    def standard(cls, head_dim: int, theta: float = 10000.0, neox: bool = True) -> Rope:
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
        return cls(inv_freq=(1.0 / theta**exponents).float(), neox=neox)

    def rotate(self, x: torch.Tensor, positions: torch.Tensor | int) -> torch.Tensor:
        """Rotate `x[..., n, d]` (or `x[..., d]`) by `positions` (shape [n], or a scalar).

        Negative positions undo a rotation. Computed in float64 so that a rotation and its
        inverse cancel to float32 rounding.
        """
        cos, sin = self.cos_sin(positions, x.device, torch.float64)
        return self.apply(x, cos, sin, out_dtype=x.dtype)

    def cos_sin(
        self, positions: torch.Tensor | int, device: torch.device | str, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin `[n, d/2]` (or `[d/2]`) of the rotation by `positions`, for `apply`.

        Angles are formed in float64 whatever `dtype` is, so large positions keep their precision.
        """
        positions = torch.as_tensor(positions, device=device, dtype=torch.float64)
        angles = positions.unsqueeze(-1) * self._freqs(positions.device)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def query_frame(
        self, seq_lens: list[int], window: int, device: torch.device | str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 cos/sin `[B, d/2]` that move each decode query (at the last position of a cache of
        `seq_lens[b]` tokens) to position `window`, the windowed-RoPE lookup frame."""
        angles = torch.tensor([window - (n - 1) for n in seq_lens], dtype=torch.float64)
        return self.cos_sin(angles, device, torch.float32)

    def _freqs(self, device: torch.device) -> torch.Tensor:
        """`inv_freq` in float64 on `device`, copied there once: a copy from the host per rotation
        would make the host wait for the GPU (one stall per index fold)."""
        freqs = self._freqs_on.get(str(device))
        if freqs is None:
            freqs = self._freqs_on[str(device)] = self.inv_freq.to(device=device, dtype=torch.float64)
        return freqs

    def apply(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out_dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Rotate `x[..., n, d]` by precomputed `cos_sin` (a batch reuses them for every layer),
        computing in their dtype; the result is in `out_dtype` (default: that dtype).

        On a GPU, `[A, B, d]` inputs with float32 angles go through one kernel
        (`mp_kernels.rotary`): a fold un-rotates whole windows of keys this way.
        """
        if x.is_cuda and x.dim() == 3 and cos.dtype == torch.float32:
            return rotate(x, cos, sin, self.neox, out_dtype or cos.dtype)
        return rotate_pairs(x.to(cos.dtype), cos, sin, self.neox).to(out_dtype or cos.dtype)
