"""One Multipole decode step for a batch: lookup, exact part, approximate part, merge.

This composes the four kernel modules exactly as `mp_sglang.method.reference.decode_attention` composes
its steps, so it is both the end-to-end check of the kernels and the call an attention backend
makes. All sizes that shape a launch are static arguments (CUDA-graph capture works).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from mp_kernels._softmax import SPLIT_ALIGN
from mp_kernels.centroid_lookup import expand_selection, select_levels
from mp_kernels.centroid_replace import centroid_replace, merge_partials
from mp_kernels.dispatch import use_triton
from mp_kernels.layout import BatchIndex, PagedKV
from mp_kernels.sparse_decode import sparse_decode

MAX_EXACT_SPLITS = 64


def default_splits(batch: int, heads: int, max_len: int, num_sms: int = 132) -> int:
    """Splits of the exact part per (request, KV head): about eight programs per SM, at least
    `SPLIT_ALIGN` tokens each, at most `MAX_EXACT_SPLITS` (the merge holds every partial of a
    head in registers). The sparse kernel holds one program per SM at a time, so many
    short splits even out the last wave (H100, 2 % budget, 64K x 8: 5 splits 38.8 us, 10 splits
    34.1 us, 15 splits 34.9 us; 128K x 8: 60.0, 58.5, 52.3 us; docs/perf.md)."""
    wanted = min(MAX_EXACT_SPLITS, -(-8 * num_sms // max(1, batch * heads)))
    return max(1, min(wanted, -(-max_len // SPLIT_ALIGN)))


def replacement_splits(batch: int, heads: int, max_clusters: int, num_sms: int = 132) -> int:
    """Splits of the replacement: as many as fill exactly one wave of its programs, two resident
    per SM (its registers allow two). A partial second wave would cost as much as the first (on
    the H100, 64K x 8: 5 splits 48.6 us, 4 splits 48.6 us; 32 x 8: 1 split 142.6 us, 2 splits
    165.1 us; docs/perf.md)."""
    wanted = 2 * num_sms // max(1, batch * heads)
    return max(1, min(wanted, -(-max_clusters // SPLIT_ALIGN)))


def multipole_decode(
    q: torch.Tensor,
    q_lookup: torch.Tensor,
    kv: PagedKV,
    index: BatchIndex,
    budget: torch.Tensor,
    max_exact: int,
    exact_splits: int | None = None,
    approx_splits: int | None = None,
    level_budget_multiplier: float = 4.0,
    sm_scale: float | None = None,
    out: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Multipole attention output `[B, Hq, d]` (dtype of q) for decode queries `q [B, Hq, d]`.

    q_lookup: q in the index's frame (equal to q without windowed RoPE). budget `[B]` int32 tokens;
    max_exact >= sinks + budget + recent window for every request (see `lookup`). sm_scale
    defaults to 1/sqrt(d); out, if given, receives the result (`[B, Hq, d]`, any dtype).

    Captured in a CUDA graph, the approximate part runs on a side stream while the token list is
    expanded and the exact part runs: both need only the selection, and at small batches
    neither fills the GPU alone (docs/perf.md, kernel item 20).
    """
    batch, num_q_heads, dim = q.shape
    heads = kv.k_buffer.shape[1]
    logits, selections = select_levels(q_lookup, index, budget, level_budget_multiplier, sm_scale, backend)
    exact_splits = exact_splits or default_splits(batch, heads, max_exact)
    approx_splits = approx_splits or replacement_splits(batch, heads, index.levels[0].max_clusters)
    parts = exact_splits + approx_splits * len(index.levels)
    out_ws = torch.empty(batch, num_q_heads, parts, dim, dtype=torch.float32, device=q.device)
    lse_ws = torch.empty(batch, num_q_heads, parts, dtype=torch.float32, device=q.device)

    def approximate() -> None:
        for lvl, level in enumerate(index.levels):
            lo = exact_splits + lvl * approx_splits
            centroid_replace(
                logits[lvl],
                selections[lvl].selected,
                level,
                approx_splits,
                out=out_ws[:, :, lo : lo + approx_splits],
                lse=lse_ws[:, :, lo : lo + approx_splits],
                backend=backend,
            )

    with beside(q.device if use_triton(q, backend) else None, approximate):
        exact = expand_selection(selections[0], index, max_exact, backend)
        sparse_decode(
            q,
            kv,
            exact,
            exact_splits,
            sm_scale,
            out=out_ws[:, :, :exact_splits],
            lse=lse_ws[:, :, :exact_splits],
            backend=backend,
        )
    merged, _ = merge_partials(out_ws, lse_ws, q.dtype, out=out, backend=backend)
    return merged


_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}


@contextlib.contextmanager
def beside(device: torch.device | None, work: Callable[[], None]) -> Iterator[None]:
    """Run `work` on a side stream of `device`, concurrently with the body (on the current
    stream), when a CUDA graph is being captured: the fork and join become graph edges and cost
    the host nothing at replay. Otherwise `work` runs first, in line: eagerly, the stream switch
    and events cost the host ~60 us per call (H100 host, 16-layer step 4.5 -> 5.4 ms), more than
    the overlap saves on the GPU, which waits for the host anyway."""
    if device is None or device.type != "cuda" or not torch.cuda.is_current_stream_capturing():
        work()
        yield
        return
    main = torch.cuda.current_stream(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    side = _SIDE_STREAMS.get(index)
    if side is None:
        side = _SIDE_STREAMS[index] = torch.cuda.Stream(device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        work()
    yield
    main.wait_stream(side)
