"""A second decode CUDA graph per batch size, for batches that no row of has an index.

Below `dense_below` (the first ~4K tokens of every request in the reasoning shape) no row has an
index, and the dense backend's decode kernel reads a whole context faster than our exact kernels
(H200, batch 32 at 1.5K-3K tokens: 60-112 against 77-146 µs a layer in the server; docs/perf.md,
item 27). sglang captures one decode graph per batch size (and LoRA variant), and which path a
batch needs is known only before each replay. So two hooks into sglang's decode graph runner:

- around `capture_one_shape`: each shape is captured a second time under the variant label
  `dense_label(...)`, with the backend's `capturing_dense` set, so its attention is the dense
  backend's decode;
- after `_resolve_lora_variant` (which sglang calls after the backend prepared the replay's
  metadata and before it picks the graph): the dense label whenever the backend chose the dense
  path for this replay (`MultipoleAttnBackend.dense_pass`).

The graphs share sglang's graph memory pool; the second set costs its capture time and little
memory. Without the hooks (another sglang), the backend attends such batches with its kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_RUNNER = "sglang.srt.model_executor.runner.decode_cuda_graph_runner.DecodeCudaGraphRunner"
CAPTURE_TARGET = f"{_RUNNER}.capture_one_shape"
VARIANT_TARGET = f"{_RUNNER}._resolve_lora_variant"
DENSE_VARIANT = "multipole-dense"


def dense_label(variant_label: str | None) -> str:
    """The label of the dense twin of a graph labelled `variant_label` (None, or LoRA's)."""
    return DENSE_VARIANT if variant_label is None else f"{variant_label}+{DENSE_VARIANT}"


def captures_dense(runner: Any) -> Any | None:
    """The runner's multipole backend when it wants dense twins of its decode graphs, else None."""
    backend = getattr(runner, "attn_backend", None)
    backend = getattr(backend, "decode_backend", backend)  # a hybrid prefill/decode backend
    return backend if getattr(backend, "dense_graphs", False) else None


def around_capture_one_shape(
    original: Callable[..., Any],
    runner: Any,
    size: int,
    forward: Callable[..., Any],
    stream_idx: int | None = None,
    variant_label: str | None = None,
    *args: Any,
    **kwargs: Any,
) -> Any:
    """Capture the shape as sglang does, then its dense twin."""
    result = original(runner, size, forward, stream_idx, variant_label, *args, **kwargs)
    backend = captures_dense(runner)
    if backend is None:
        return result
    backend.capturing_dense = True
    try:
        original(runner, size, forward, stream_idx, dense_label(variant_label), *args, **kwargs)
    finally:
        backend.capturing_dense = False
    return result


def after_resolve_variant(result: str | None, runner: Any, *args: Any, **kwargs: Any) -> str | None:
    """The dense twin's label when the backend prepared this replay for the dense path."""
    backend = captures_dense(runner)
    if backend is not None and backend.dense_pass:
        return dense_label(result)
    return result
