"""Choosing between a Triton kernel and its plain-torch reference.

Every public kernel function takes `backend`: "triton", "torch", or None (auto). Auto runs Triton on
CUDA tensors and the torch reference elsewhere, so CPU callers never need Triton; tests ask for
"triton" on the CPU under `TRITON_INTERPRET=1` to run the real kernels in the interpreter.
"""

from __future__ import annotations

import torch
import triton

BACKENDS = ("triton", "torch")


def use_triton(tensor: torch.Tensor, backend: str | None) -> bool:
    """Whether to run the Triton kernel for inputs living where `tensor` lives."""
    if backend is None:
        return tensor.is_cuda
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None; got {backend!r}")
    return backend == "triton"


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= max(n, 1): Triton block sizes must be powers of two."""
    return 1 << max(0, int(n) - 1).bit_length()


def programs_per_row(rows: int, tiles: int, per_sm: int = 8, num_sms: int = 132) -> int:
    """Programs that share the `tiles` of each of `rows` rows, each looping over every P-th tile:
    enough for `per_sm` programs on every SM, never more than there are tiles.

    A grid sized by a static bound (a server's longest request) and not by the data would launch
    mostly programs that exit at once, and thousands of those cost ~12 us (H200, a 2K-token
    batch of 32 under a 70K-token server's bounds: docs/perf.md, item 26)."""
    return max(1, min(tiles, -(-per_sm * num_sms // max(1, rows))))


def exact_dots(dtype: torch.dtype) -> bool:
    """Whether kernels must multiply in fp32 ("ieee"): for fp32 inputs (tf32 would cost ~1e-3), and
    always in Triton's CPU interpreter, whose bf16/fp16 `tl.dot` is wrong (Triton 3.6)."""
    return dtype == torch.float32 or triton.knobs.runtime.interpret


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor (random picks, per-row metadata) onto `device` without waiting for the
    GPU's queue to drain.

    A copy from pageable memory blocks the host until the stream catches up; a copy from pinned
    memory is queued instead (the host allocator keeps the buffer until the copy has run).
    """
    if torch.device(device).type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
