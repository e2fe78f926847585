"""A miniature sglang runtime on the CPU around the multipole backend.

The pools, ForwardBatch, RadixAttention layers and the dense torch_native backend are sglang's own;
the rig plays the scheduler (request rows, KV slots in shuffled order so pages are not contiguous,
req_to_token) and the model (random q/k/v per layer), and keeps every request's K/V so that tests
can recompute the expected attention with `mp_sglang.method.reference`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch
from sglang.srt.layers.radix_attention import RadixAttention
from sglang.srt.layers.rotary_embedding import base as rope_base
from sglang.srt.layers.rotary_embedding import get_rope
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode
from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

from mp_sglang.method.config import MultipoleConfig
from mp_sglang.method.reference import (
    build_index,
    decode_attention,
    decode_view,
    heads_of,
    stack_heads,
    update_index,
)
from mp_sglang.serving.index import fold_due
from mp_sglang.serving.plugin import create_backend

HEADS_Q, HEADS_KV, DIM, LAYERS = 4, 2, 16, 2

# Small blocks so that a few hundred tokens exercise blocks, the recent window and updates.
SMALL_CONFIG = {
    "tokens_per_cluster": 4,
    "kmeans_block": 64,
    "kmeans_iters": 4,
    "update_iters": 2,
    "update_block": 8,
    "recent_window": 16,
    "sink_tokens": 4,
    "dense_below": 0,
}


@dataclass
class Request:
    """One request's row and, per layer, every key and value it has cached `[H_kv, n, d]`."""

    row: int
    keys: list[torch.Tensor] = field(default_factory=lambda: [_empty() for _ in range(LAYERS)])
    values: list[torch.Tensor] = field(default_factory=lambda: [_empty() for _ in range(LAYERS)])

    @property
    def length(self) -> int:
        return self.keys[0].shape[1]


@dataclass
class Pass:
    """What one forward pass computed: per layer, queries and outputs `[tokens, H_q, d]`."""

    queries: list[torch.Tensor]
    outputs: list[torch.Tensor]
    last_token: list[int]  # row of each request's last new token in queries/outputs


def set_config(monkeypatch: pytest.MonkeyPatch, **values: object) -> None:
    """Settings reach the backend as they do in serving: through MULTIPOLE_* variables."""
    for name, value in {**SMALL_CONFIG, **values}.items():
        monkeypatch.setenv(f"MULTIPOLE_{name.upper()}", str(value).lower())


class Rig:
    def __init__(
        self,
        rows: int = 4,
        context: int = 1024,
        kv_slots: int = 16384,
        model: torch.nn.Module | None = None,
        seed: int = 0,
        device: str = "cpu",
        heads_q: int = HEADS_Q,
        **runner_fields: object,
    ) -> None:
        """`device` holds the pools and tensors; the runner stays "cpu", so the dense path is
        torch_native (device-agnostic) even on a GPU, and the rig needs no full sglang runtime.
        `heads_q` query heads share the `HEADS_KV` KV heads (GQA; equal counts: MHA).

        A CPU rig runs where there is no GPU (CI): on a CUDA host sglang writes the KV pool with
        a CUDA-only op whatever the pool's device, so there the CPU rig skips (its CUDA twins run)."""
        if device == "cpu" and torch.cuda.is_available():
            pytest.skip("a CPU rig on a CUDA host: sglang's KV write there is CUDA-only")
        self.device = device
        self.heads_q = heads_q
        self.req_pool = ReqToTokenPool(
            size=rows, max_context_len=context, device=device, enable_memory_saver=False
        )
        self.kv_pool = MHATokenToKVPool(
            size=kv_slots,
            page_size=1,
            dtype=torch.float32,
            head_num=HEADS_KV,
            head_dim=DIM,
            layer_num=LAYERS,
            device=device,
            enable_memory_saver=False,
        )
        self.generator = torch.Generator().manual_seed(seed)
        self._free_kv = (torch.randperm(kv_slots, generator=self.generator) + 1).tolist()  # slot 0 pads
        self.runner = SimpleNamespace(
            device="cpu",
            req_to_token_pool=self.req_pool,
            token_to_kv_pool=self.kv_pool,
            model_config=SimpleNamespace(
                is_encoder_decoder=False, is_hybrid_swa=False, num_attention_heads=heads_q
            ),
            use_mla_backend=False,
            sliding_window_size=None,
            spec_algorithm=SpeculativeAlgorithm.NONE,
            model=model,
        )
        vars(self.runner).update(runner_fields)
        self.backend = create_backend(self.runner)
        self.layers = [RadixAttention(heads_q, DIM, DIM**-0.5, HEADS_KV, layer_id=i) for i in range(LAYERS)]

    def new_request(self, prefix_of: Request | None = None, prefix_len: int = 0) -> Request:
        """A request on a fresh row; with `prefix_of`, its first tokens are a radix-cache hit on
        that request's KV slots (shared, not copied), as sglang's prefix cache hands them out."""
        row = _alloc_row(self.req_pool)
        request = Request(row)
        request.keys = [k.to(self.device) for k in request.keys]
        request.values = [v.to(self.device) for v in request.values]
        if prefix_of is not None:
            self.req_pool.req_to_token[row, :prefix_len] = self.req_pool.req_to_token[
                prefix_of.row, :prefix_len
            ]
            request.keys = [k[:, :prefix_len] for k in prefix_of.keys]
            request.values = [v[:, :prefix_len] for v in prefix_of.values]
        return request

    def finish(self, request: Request) -> None:
        _free_row(self.req_pool, request.row)

    def forward(
        self, steps: list[tuple[Request, int]], mode: ForwardMode, graph_pad: int | None = None
    ) -> Pass:
        """One forward pass in which each request of `steps` adds that many tokens.

        graph_pad: run it as a CUDA-graph replay of a DECODE batch does: `graph_pad` padding rows
        (request row 0, length 1, KV slot 0) appended, metadata through the out-of-graph hook.
        """
        batch = self._forward_batch(steps, mode, graph_pad or 0)
        if graph_pad is None:
            self.backend.init_forward_metadata(batch)
        else:
            self.backend.init_forward_metadata_out_graph(batch)
        tokens = batch.out_cache_loc.shape[0]
        queries, outputs = [], []
        for layer in self.layers:
            q, k, v = (
                torch.randn(tokens, heads, DIM, generator=self.generator).to(self.device)
                for heads in (self.heads_q, HEADS_KV, HEADS_KV)
            )
            out = self.backend.forward(q.reshape(tokens, -1), k, v, layer, batch)
            queries.append(q)
            outputs.append(out.reshape(tokens, self.heads_q, DIM))
            start = 0
            for request, count in steps:
                new = slice(start, start + count)
                lid = layer.layer_id
                request.keys[lid] = torch.cat([request.keys[lid], k[new].transpose(0, 1)], dim=1)
                request.values[lid] = torch.cat([request.values[lid], v[new].transpose(0, 1)], dim=1)
                start += count
        ends = torch.tensor([count for _, count in steps]).cumsum(0) - 1
        return Pass(queries, outputs, ends.tolist())

    def _forward_batch(
        self, steps: list[tuple[Request, int]], mode: ForwardMode, pad: int = 0
    ) -> ForwardBatch:
        prefix = [request.length for request, _ in steps]
        counts = [count for _, count in steps]
        seq_lens = [p + c for p, c in zip(prefix, counts, strict=True)]
        locs = []
        for (request, count), start in zip(steps, prefix, strict=True):
            slots = torch.tensor([self._free_kv.pop() for _ in range(count)], dtype=torch.int32)
            self.req_pool.req_to_token[request.row, start : start + count] = slots
            locs.append(slots)
        rows = [request.row for request, _ in steps] + [0] * pad
        seq_lens += [1] * pad
        prefix += [0] * pad
        locs.append(torch.zeros(pad, dtype=torch.int32))
        dev = self.device
        extend = {}
        if mode != ForwardMode.DECODE:
            extend = {
                "extend_num_tokens": sum(counts),
                "extend_seq_lens": torch.tensor(counts, device=dev),
                "extend_prefix_lens": torch.tensor(prefix, device=dev),
                "extend_start_loc": torch.tensor([0, *counts[:-1]]).cumsum(0).to(dev),
                "extend_seq_lens_cpu": counts,
                "extend_prefix_lens_cpu": prefix,
            }
        return ForwardBatch(
            forward_mode=mode,
            batch_size=len(rows),
            input_ids=torch.zeros(sum(counts) + pad, dtype=torch.int64, device=dev),
            req_pool_indices=torch.tensor(rows, device=dev),
            seq_lens=torch.tensor(seq_lens, device=dev),
            seq_lens_cpu=torch.tensor(seq_lens),
            out_cache_loc=torch.cat(locs).long().to(dev),
            seq_lens_sum=sum(seq_lens),
            positions=torch.cat([torch.arange(p, s) for p, s in zip(prefix, seq_lens, strict=True)]).to(dev),
            **extend,
        )


class Replay:
    """The index a request should have by the rule the backend follows: built at the first
    decode-like step after a prefill over the tokens before that step's own, then folded whenever
    its recent window is due; every token past the index is attended exactly.

    The reference decode path keeps an index per layer. The kernel path (decode_path=kernels)
    builds per layer and then keeps one index over the heads of all layers (`stack_heads`), whose
    folds draw their random numbers over all those heads: replayed the same way here.
    """

    def __init__(self, cfg: MultipoleConfig, rope=None) -> None:
        self.cfg, self.rope, self.indexes = cfg, rope, {}
        self.stacked = cfg.decode_path == "kernels"

    def reset(self, request) -> None:
        for key in [key for key in self.indexes if key[0] == request.row]:
            del self.indexes[key]

    def decode(self, request, query: torch.Tensor, layer: int) -> torch.Tensor:
        keys, values = request.keys[layer], request.values[layer]
        if self.stacked:
            heads = keys.shape[0]
            index = heads_of(self._index(request, "all"), slice(layer * heads, (layer + 1) * heads))
        else:
            index = self._index(request, layer)
        return decode_attention(query, keys, values, decode_view(index, keys.shape[1]), self.cfg)

    def _index(self, request, part: int | str) -> object:
        layers = range(LAYERS) if part == "all" else [part]
        keys = torch.cat([request.keys[layer] for layer in layers])
        values = torch.cat([request.values[layer] for layer in layers])
        before = keys.shape[1] - 1
        index = self.indexes.get((request.row, part))
        if index is None:
            parts = [
                build_index(
                    request.keys[layer][:, :before],
                    request.values[layer][:, :before],
                    self.cfg,
                    rope=self.rope,
                )
                for layer in layers
            ]
            index = stack_heads(parts)
        elif fold_due(index, before, self.cfg):
            start = index.num_tokens
            index = update_index(index, keys[:, start:before], values[:, start:before], self.cfg)
        self.indexes[(request.row, part)] = index
        return index


def model_with_rope(monkeypatch: pytest.MonkeyPatch, **scaling: object) -> torch.nn.Module:
    """A model holding a real sglang RotaryEmbedding. Without a GPU sglang would import vllm's
    rotary kernel for it; its CPU-engine flag selects the torch path instead."""
    monkeypatch.setattr(rope_base, "_is_cpu", True)
    rotary = get_rope(
        head_size=DIM,
        rotary_dim=DIM,
        max_position=4096,
        base=10000,
        is_neox_style=True,
        dtype=torch.float32,
        rope_scaling=scaling or None,
    )
    return torch.nn.ModuleDict({"rotary_emb": rotary})


def _alloc_row(pool: ReqToTokenPool) -> int:
    """A request row from the pool's own allocator: `alloc_rows` in newer sglang, `alloc` of
    request objects (of which it reads and sets only req_pool_idx) in 0.5.17."""
    if hasattr(pool, "alloc_rows"):
        return pool.alloc_rows(1)[0]
    holder = SimpleNamespace(req_pool_idx=None)
    pool.alloc([holder])
    return holder.req_pool_idx


def _free_row(pool: ReqToTokenPool, row: int) -> None:
    if hasattr(pool, "free_rows"):
        pool.free_rows([row])
    else:
        pool.free(SimpleNamespace(req_pool_idx=row))


def _empty() -> torch.Tensor:
    return torch.zeros(HEADS_KV, 0, DIM)
