"""Decode steps of the sglang backend through mp_kernels: one batched call per layer.

The reference path attends request by request and re-reads every request's whole cache each step.
Here every method row of the batch goes through `mp_kernels.decode.multipole_decode` at once, which
reads keys and values straight from sglang's pool (`req_to_token` is the page table, page size 1)
and only the tokens it attends to exactly.

What changes when:
- per forward pass (`plan`): which rows, their context lengths, budgets, the static token-list
  capacity and the query positions; shared by all layers.
- per fold (every `update_block` tokens of a request): its `ClusterIndex` (kept in the backend's
  `IndexTable`, updated lazily with `fold_only`) and therefore the packed `BatchIndex` of the layer,
  which is cached and re-packed only when the batch's rows or one of their indexes changed.
Between folds a step costs the kernels plus a few small host-to-device copies per pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from mp_kernels.decode import multipole_decode
from mp_kernels.layout import BatchIndex, PagedKV, pack_indices
from mp_sglang.config import MultipoleConfig
from mp_sglang.index import IndexTable
from mp_sglang.reference import ClusterIndex

if TYPE_CHECKING:
    from sglang.srt.layers.radix_attention import RadixAttention


@dataclass(frozen=True)
class MethodRow:
    """A query the method answers: its row in q, its request row, context length and generation."""

    query: int
    req: int
    seq_len: int
    generation: int


@dataclass(frozen=True)
class _Plan:
    rows: tuple[MethodRow, ...]
    queries: torch.Tensor  # [B] rows of q/out
    table_rows: torch.Tensor  # [B] int32 req_pool_idx
    seq_lens: torch.Tensor  # [B] int32
    sink_len: torch.Tensor  # [B] int32
    budget: torch.Tensor  # [B] int32
    rotation: tuple[torch.Tensor, torch.Tensor] | None  # cos/sin [B, d/2] into the lookup frame
    max_exact: int


@dataclass
class _Packed:
    indexes: tuple[ClusterIndex, ...]
    batch: BatchIndex


class KernelDecoder:
    """Multipole decode of a batch's method rows with the mp_kernels kernels."""

    def __init__(self, cfg: MultipoleConfig, req_to_token_pool, kv_pool, table: IndexTable, rope) -> None:
        self.cfg = cfg
        self.req_to_token_pool = req_to_token_pool
        self.kv_pool = kv_pool
        self.table = table
        self.rope = rope
        self.kernel_backend: str | None = None  # auto: Triton on CUDA, torch references elsewhere
        self._plan: _Plan | None = None
        self._packed: dict[int, _Packed] = {}

    def plan(self, rows: list[MethodRow], device: torch.device) -> None:
        """Per-pass metadata of the method rows, shared by every layer."""
        if not rows:
            self._plan = None
            return
        cfg = self.cfg
        seq_lens = [row.seq_len for row in rows]
        budgets = [cfg.budget_tokens(n) for n in seq_lens]
        # Exact tokens: sinks + selected clusters (<= budget) + a recent window that grows to just
        # under recent_window + update_block before it folds.
        max_exact = cfg.sink_tokens + max(budgets) + cfg.recent_window + cfg.update_block

        def ints(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int32).to(device, non_blocking=True)

        self._plan = _Plan(
            rows=tuple(rows),
            queries=torch.tensor([row.query for row in rows], dtype=torch.long).to(device, non_blocking=True),
            table_rows=ints([row.req for row in rows]),
            seq_lens=ints(seq_lens),
            sink_len=ints([min(cfg.sink_tokens, n) for n in seq_lens]),
            budget=ints(budgets),
            rotation=self._rotation(seq_lens, device),
            max_exact=max_exact,
        )

    def attend(self, q: torch.Tensor, out: torch.Tensor, layer: RadixAttention) -> torch.Tensor:
        """Write the method's output for the planned rows of `out` (in place) and return it."""
        plan = self._plan
        if plan is None:
            return out
        dim = layer.qk_head_dim
        heads = layer.tp_q_head_num
        key_buffer = self.kv_pool.get_key_buffer(layer.layer_id)
        value_buffer = self.kv_pool.get_value_buffer(layer.layer_id)
        batch = self._batch_index(layer.layer_id, plan, key_buffer)
        # The kernels compute softmax(q.k / sqrt(d)); fold the layer's own scaling into q.
        queries = q.reshape(-1, heads, dim).index_select(0, plan.queries) * (layer.scaling * math.sqrt(dim))
        q_lookup = self._lookup_frame(queries, plan)
        kv = PagedKV(key_buffer, value_buffer, self.req_to_token_pool.req_to_token, plan.table_rows, 1)
        result = multipole_decode(
            queries,
            q_lookup,
            kv,
            batch,
            plan.budget,
            plan.max_exact,
            level_budget_multiplier=self.cfg.level_budget_multiplier,
            backend=self.kernel_backend,
        )
        outputs = out.view(-1, heads, layer.v_head_dim)
        outputs.index_copy_(0, plan.queries, result.to(outputs.dtype))
        return out

    def forget(self) -> None:
        """Drop the packed copies (the table dropped or rebuilt indexes; they repack on use)."""
        self._packed.clear()

    # ------------------------------------------------------------------ internals

    def _batch_index(self, layer_id: int, plan: _Plan, key_buffer: torch.Tensor) -> BatchIndex:
        """The layer's packed index for this pass: repacked only if a row's index changed."""
        indexes = tuple(
            self.table.ensure(
                row.req,
                row.generation,
                layer_id,
                row.seq_len,
                self._reader(row, layer_id),
                self.cfg,
                self.rope,
                fold_only=True,
            )
            for row in plan.rows
        )
        packed = self._packed.get(layer_id)
        if (
            packed is None
            or len(packed.indexes) != len(indexes)
            or any(a is not b for a, b in zip(packed.indexes, indexes, strict=False))
        ):
            batch = pack_indices(indexes, dtype=key_buffer.dtype, device=key_buffer.device)
            packed = self._packed[layer_id] = _Packed(indexes, batch)
        return replace(packed.batch, seq_lens=plan.seq_lens, sink_len=plan.sink_len)

    def _reader(self, row: MethodRow, layer_id: int):
        """Reads a request's keys/values `[H_kv, n, d]` for tokens [start, end) from the pool."""

        def read(start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
            slots = self.req_to_token_pool.req_to_token[row.req, start:end].long()
            keys = self.kv_pool.get_key_buffer(layer_id)[slots].transpose(0, 1)
            values = self.kv_pool.get_value_buffer(layer_id)[slots].transpose(0, 1)
            return keys, values

        return read

    def _rotation(
        self, seq_lens: list[int], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """cos/sin moving each row's newest query from its position to `rope_window`."""
        if self.rope is None or not self.cfg.windowed_rope:
            return None
        angles = torch.tensor([self.cfg.rope_window - (n - 1) for n in seq_lens], dtype=torch.float64)
        cos, sin = self.rope.cos_sin(angles, "cpu", torch.float32)
        return cos.to(device, non_blocking=True), sin.to(device, non_blocking=True)

    def _lookup_frame(self, queries: torch.Tensor, plan: _Plan) -> torch.Tensor:
        """Queries `[B, Hq, d]` in the index's frame (rotated to `rope_window` under windowed RoPE)."""
        if plan.rotation is None:
            return queries
        cos, sin = plan.rotation
        return self.rope.apply(queries.float(), cos.unsqueeze(1), sin.unsqueeze(1)).to(queries.dtype)
