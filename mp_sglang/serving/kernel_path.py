"""Decode steps of the sglang backend through mp_kernels: one batched call per layer, CUDA-graph safe.

The reference path attends request by request and re-reads every request's whole cache each step.
Here every method row of the batch goes through `mp_kernels.decode.multipole_decode` at once, which
reads keys and values straight from sglang's pool (`req_to_token` is the page table, page size 1)
and only the tokens it attends to exactly.

Host work and GPU work are split the way CUDA graphs need:
- `plan` (before the forward, outside any graph): brings each request's `ClusterIndex` up to date
  over the tokens already in the pool (the step's own token is written during the forward, and is
  always in the exact recent window), packs every layer's indexes into fixed `IndexBuffers` when
  they changed (a fold happens every `update_block` tokens of a request), and copies the per-pass
  metadata (rows, lengths, budgets, the cos/sin into the windowed-RoPE frame) into fixed buffers.
- `attend` (inside the forward, capturable): only kernels over those fixed buffers. Grid sizes
  come from static bounds (the context length and the budget), not from the batch.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from mp_kernels.decode import multipole_decode
from mp_kernels.kmeans import solve_batched
from mp_kernels.kmeans_reference import KMeansResult, KMeansTask, Solver
from mp_kernels.layout import PagedKV
from mp_sglang.method.clustering import max_clusters
from mp_sglang.method.config import MultipoleConfig, budget_tokens
from mp_sglang.method.kmeans_tasks import run
from mp_sglang.method.reference import (
    build_index_steps,
    compact_levels,
    stack_heads,
    update_windowless_index_steps,
    without_window,
)
from mp_sglang.method.rope import Rope
from mp_sglang.serving.index import IndexTable, IndexWant, KVReader, build_due
from mp_sglang.serving.index_buffers import IndexBuffers, IndexCapacity

if TYPE_CHECKING:
    from sglang.srt.layers.radix_attention import RadixAttention


logger = logging.getLogger(__name__)

ALL_LAYERS = -1  # the IndexTable layer key of a request's index over the heads of all layers
OCCUPANCY_LOG_S = 30.0
OCCUPANCY_LOG = (  # scripts/soak_serve.py reads it from the server's log
    "multipole: index buffers reserved %d of %d cluster rows and %d of %d token rows per layer "
    "(%d indexed requests)"
)


@dataclass(frozen=True)
class MethodRow:
    """A query the method answers: its row in q, its request row, context length, generation and
    exact-token budget (the server's, or the request's own: serving.request_settings).

    `indexed` is False for a row attended exactly in full by the kernels (context below
    `dense_below`, a request that asked for dense attention, or a padding row of a CUDA graph):
    it has no cluster index, and its budget is 0.
    """

    query: int
    req: int
    seq_len: int
    generation: int
    budget: int
    indexed: bool = True


def static_bounds(cfg: MultipoleConfig, context_len: int) -> tuple[int, int]:
    """(clusters, exact tokens) a row of a server of `context_len` tokens may need at most: what
    every decode step's grids and workspaces are sized for, whatever the batch's contexts, so that
    one CUDA graph per batch size serves them all.

    Sinks and the recent window are never clustered; the cluster bound sizes the selection's lanes
    (a power of two): at context lengths of 2^k it keeps them at 2^k / 16. Exact tokens: everything
    below dense_below, else sinks + selected clusters (<= the server's budget, or the largest a
    request may ask for) + a recent window that grows to just under recent_window + update_block.
    """
    clusters = max_clusters(
        context_len - cfg.sink_tokens - cfg.recent_window, cfg.tokens_per_cluster, cfg.kmeans_block
    )
    budget = max(cfg.budget_tokens(context_len), budget_tokens(float(cfg.max_request_budget), context_len))
    exact = max(cfg.dense_below, cfg.sink_tokens + budget + cfg.recent_window + cfg.update_block)
    return clusters, exact


class _Staging:
    """Pinned host buffers for the per-pass metadata, two in turn.

    A copy from pageable memory makes CUDA wait for the stream first, which would stop sglang
    from preparing the next step while the GPU runs this one; a pinned buffer copies without
    waiting. Each buffer is refilled only after its previous copy has run (an event).
    """

    def __init__(self, rows: int, half_dim: int, device: torch.device) -> None:
        pinned = device.type == "cuda"
        self.ints = [torch.zeros(5, rows, dtype=torch.int32, pin_memory=pinned) for _ in range(2)]
        self.rotation = [torch.zeros(2, rows, half_dim, pin_memory=pinned) for _ in range(2)]
        self.events = [torch.cuda.Event() if pinned else None for _ in range(2)]
        self.turn = 0

    def upload(
        self,
        ints: list[list[int]],
        rotation: torch.Tensor | None,
        ints_dev: torch.Tensor,
        rotation_dev: torch.Tensor,
    ) -> None:
        turn, self.turn = self.turn, 1 - self.turn
        if self.events[turn] is not None:
            self.events[turn].synchronize()
        batch = len(ints[0])
        host = self.ints[turn][:, :batch]
        host.copy_(torch.tensor(ints, dtype=torch.int32))
        ints_dev[:, :batch].copy_(host, non_blocking=True)
        if rotation is not None:
            self.rotation[turn][:, :batch].copy_(rotation)
            rotation_dev[:, :batch].copy_(self.rotation[turn][:, :batch], non_blocking=True)
        if self.events[turn] is not None:
            self.events[turn].record()


class KernelDecoder:
    """Multipole decode of a batch's method rows with the mp_kernels kernels."""

    def __init__(
        self,
        cfg: MultipoleConfig,
        req_to_token: torch.Tensor,
        kv_pool,
        layer_ids: range,
        pool_tokens: int,
        context_len: int,
        table: IndexTable,
        rope: Rope | None,
    ) -> None:
        self.cfg = cfg
        self.req_to_token = req_to_token
        self.kv_pool = kv_pool
        self.layer_ids = layer_ids
        self.table = table
        self.rope = rope if cfg.windowed_rope else None
        self.kernel_backend: str | None = None  # auto: Triton on CUDA, torch references elsewhere
        keys = kv_pool.get_key_buffer(layer_ids[0])
        self.device = keys.device
        self.cluster_dtype = keys.dtype
        self.solve: Solver = self._solve_batched  # how index k-means runs (a benchmark may swap it)
        rows = req_to_token.shape[0]
        bound_clusters, self.max_exact = static_bounds(cfg, context_len)
        self.capacity = IndexCapacity(
            rows=rows,
            # clusters_for() rounds up by at most one cluster per k-means block (>= kmeans_block / 2
            # tokens each, but a request's single first block may be shorter).
            cluster_rows=math.ceil(
                cfg.index_capacity * pool_tokens * (1 / cfg.tokens_per_cluster + 2 / cfg.kmeans_block)
            )
            + 2 * rows,
            member_rows=math.ceil(cfg.index_capacity * pool_tokens) + 1,
            max_clusters=bound_clusters,
        )
        heads, dim = keys.shape[1], keys.shape[2]
        self.buffers = IndexBuffers(self.capacity, len(layer_ids), heads, dim, keys.dtype, self.device)
        # A fold copies a request's window (final block + recent tokens) of every layer in float32,
        # keys and values, about twice over; requests fold in groups of ~2 GiB of such copies.
        self._fold_group_tokens = max(1, (2 << 30) // (len(layer_ids) * heads * dim * 16))
        self.index_bytes = len(layer_ids) * self.capacity.nbytes(heads, dim, keys.dtype)
        # Per-pass metadata: query row, request row, length, sink length, budget; and cos/sin.
        self.ints = torch.zeros(5, rows, dtype=torch.int32, device=self.device)
        self.rotation = torch.zeros(2, rows, dim // 2, dtype=torch.float32, device=self.device)
        self._staging = _Staging(rows, dim // 2, self.device)
        self.batch = 0
        self.all_queries = False
        self._held: tuple[tuple[int, int, bool], ...] = ()
        self._left_out: list[int] = []  # batch rows the buffers had no room for (`_upkeep`)
        self._occupancy_logged = float("-inf")
        if self.device.type == "cuda":
            self._compile_upkeep_kernels(heads, dim)

    # ------------------------------------------------------------------ host side (outside graphs)

    def plan(self, rows: list[MethodRow], num_queries: int) -> None:
        """Index upkeep and per-pass metadata for `rows`; `num_queries` is the pass's query count."""
        self.batch = len(rows)
        if not rows:
            return
        self.all_queries = [row.query for row in rows] == list(range(num_queries))
        held = tuple((row.req, row.generation, row.indexed) for row in rows)
        # Between folds, with the same requests in the same rows, every layer's buffers are current:
        # skip the per-layer, per-request upkeep (the host time a CUDA-graph replay waits for).
        if held != self._held or any(row.indexed and self._upkeep_due(row) for row in rows):
            self._upkeep(rows)
            self._held = held
        cfg = self.cfg
        ints = [
            [row.query for row in rows],
            [row.req for row in rows],
            [row.seq_len for row in rows],
            [min(cfg.sink_tokens, row.seq_len) for row in rows],
            [min(row.budget, self.max_exact) for row in rows],  # the list holds max_exact
        ]
        rotation = None
        if self.rope is not None:
            seq_lens = [row.seq_len for row in rows]
            rotation = torch.stack(self.rope.query_frame(seq_lens, cfg.rope_window, "cpu"))
        self._staging.upload(ints, rotation, self.ints, self.rotation)

    def _upkeep_due(self, row: MethodRow) -> bool:
        """Whether the row's index must be built, rebuilt or folded."""
        return self.table.upkeep_due(row.req, row.generation, ALL_LAYERS, row.seq_len, self.cfg)

    def _upkeep(self, rows: list[MethodRow]) -> None:
        """Bring every row's index up to date and repack the buffers.

        A request holds one index over the heads of all its layers (`reference.stack_heads`):
        layers share their tokens and blocks, so one fold serves all of them. Builds run layer by
        layer, which bounds the float32 copies held at once, and are stacked afterwards; the folds
        due then run as batched k-means rounds (`IndexTable.ensure_many`, in memory-bounded groups),
        and the buffers take only what each fold changed.
        """
        indexed = [row for row in rows if row.indexed]
        self._build_missing(indexed)
        before = [
            self.table.current(row.req, row.generation, ALL_LAYERS) if row.indexed else None for row in rows
        ]
        wants = [
            IndexWant(row.req, row.generation, ALL_LAYERS, row.seq_len, self._reader(row.req, self.layer_ids))
            for row in indexed
        ]
        found = iter(
            self.table.ensure_many(
                wants, self.cfg, self.rope, self.solve, self._fold_group_tokens, self._held_dtype()
            )
        )
        after = [next(found) if row.indexed else None for row in rows]
        left_out = self.buffers.fill(after, self.cfg.sink_tokens, grown_from=before)  # folds: tails only
        if left_out and left_out != self._left_out:
            cap = self.capacity
            logger.warning(
                "multipole: the batch's indexes outgrow the index buffers (%d clusters, %d tokens per "
                "layer): %d of its %d indexed requests are attended exactly, over their whole context, "
                "until there is room. Requests that share long prefixes each index them; "
                "MULTIPOLE_INDEX_CAPACITY > 1 makes room (docs/sglang.md).",
                cap.cluster_rows,
                cap.member_rows,
                len(left_out),
                len(indexed),
            )
        self._left_out = left_out
        self._log_occupancy(len(indexed))

    def _log_occupancy(self, indexed: int) -> None:
        """How full the index buffers are, at most every OCCUPANCY_LOG_S (a soak reads it from the log)."""
        now = time.monotonic()
        if now - self._occupancy_logged < OCCUPANCY_LOG_S:
            return
        self._occupancy_logged = now
        clusters, members = self.buffers.occupancy()
        cap = self.capacity
        logger.info(
            OCCUPANCY_LOG,
            clusters,
            cap.cluster_rows,
            members,
            cap.member_rows,
            indexed,
        )

    def _build_missing(self, rows: list[MethodRow]) -> None:
        """Build the stacked index of every row that has none (or one the cache no longer holds)."""
        fresh = [
            row
            for row in rows
            if build_due(self.table.current(row.req, row.generation, ALL_LAYERS), row.seq_len)
        ]
        if not fresh:
            return
        scratch = IndexTable(self.table.num_rows)
        wants = [
            IndexWant(row.req, row.generation, lid, row.seq_len, self._reader(row.req, [lid]))
            for row in fresh
            for lid in self.layer_ids
        ]
        built = scratch.ensure_many(wants, self.cfg, self.rope, self.solve)
        for row in fresh:  # stack row by row, letting go of each row's parts as it goes
            parts = [built.pop(0) for _ in self.layer_ids]
            scratch.drop([row.req])
            held = compact_levels(stack_heads(parts), self._held_dtype())  # see reference.compact_levels
            self.table.put(row.req, row.generation, ALL_LAYERS, held)

    def _held_dtype(self) -> torch.dtype:
        """What a fold's window and the held indexes' centroids are kept in: the dtype the batched
        k-means clusters in (the buffers decode from their own copy in it anyway); float32 for any
        other solver (the reference clusters what it is given)."""
        return self.cluster_dtype if self.solve == self._solve_batched else torch.float32

    def _solve_batched(self, tasks: Sequence[KMeansTask]) -> list[KMeansResult]:
        """Index k-means in the cache's dtype (bf16: tensor-core assignment), means in fp32."""
        return solve_batched(tasks, points_dtype=self.cluster_dtype, backend=self.kernel_backend)

    def _compile_upkeep_kernels(self, heads: int, dim: int) -> None:
        """Build and fold a tiny index through `solve` once, at start-up, so that Triton compiles
        the k-means and rotation kernels for this cache's dtype and head size here rather than
        inside the first request's decode steps (seconds of them). Builds and folds run as a
        server's do: from keys in the cache's dtype, folds without a held window."""
        tiny = replace(
            self.cfg,
            kmeans_block=64,
            tokens_per_cluster=8,
            recent_window=8,
            update_block=8,
            sink_tokens=2,
            dense_below=0,
        )
        keys = torch.randn(heads, 128, dim, device=self.device, dtype=self.cluster_dtype)
        values = torch.randn_like(keys)
        index = run(build_index_steps(keys[:, :96], values[:, :96], tiny, rope=self.rope), self.solve)
        stacked = without_window(stack_heads([index] * len(self.layer_ids)))  # folds run over all layers
        window = (t[:, stacked.window_start :].repeat(len(self.layer_ids), 1, 1) for t in (keys, values))
        folds = update_windowless_index_steps(stacked, *window, tiny, self._held_dtype())
        run(folds, self.solve)  # warm and fresh folds

    def _reader(self, req: int, layer_ids: Sequence[int]) -> KVReader:
        """Keys and values of `req`'s tokens in the pool, the heads of `layer_ids` stacked in order."""

        def read(start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
            slots = self.req_to_token[req, start:end].long()
            keys = _gather_layers([self.kv_pool.get_key_buffer(lid) for lid in layer_ids], slots)
            values = _gather_layers([self.kv_pool.get_value_buffer(lid) for lid in layer_ids], slots)
            return keys, values

        return read

    # ------------------------------------------------------------------ GPU side (capturable)

    def attend(self, q: torch.Tensor, out: torch.Tensor, layer: RadixAttention) -> torch.Tensor:
        """Write the method's output for the planned rows of `out` (in place) and return it."""
        batch = self.batch
        if batch == 0:
            return out
        dim = layer.qk_head_dim
        heads = layer.tp_q_head_num
        query_rows, table_rows, seq_lens, sink_len, budget = self.ints[:, :batch]
        all_q = q.view(-1, heads, dim)
        queries = all_q if self.all_queries else all_q.index_select(0, query_rows.long())
        q_lookup = queries
        if self.rope is not None:
            cos, sin = (part[:batch].unsqueeze(1) for part in self.rotation)
            q_lookup = self.rope.apply(queries, cos, sin, out_dtype=queries.dtype)
        keys = self.kv_pool.get_key_buffer(layer.layer_id)
        values = self.kv_pool.get_value_buffer(layer.layer_id)
        outputs = out.view(-1, heads, layer.v_head_dim)
        result = multipole_decode(
            queries,
            q_lookup,
            PagedKV(keys, values, self.req_to_token, table_rows, 1),
            self.buffers.batch_index(self.layer_ids.index(layer.layer_id), batch, seq_lens, sink_len),
            budget,
            self.max_exact,
            level_budget_multiplier=self.cfg.level_budget_multiplier,
            sm_scale=layer.scaling,
            out=outputs if self.all_queries else None,
            backend=self.kernel_backend,
        )
        if not self.all_queries:
            outputs.index_copy_(0, query_rows.long(), result.to(outputs.dtype))
        return out


def _gather_layers(buffers: Sequence[torch.Tensor], slots: torch.Tensor) -> torch.Tensor:
    """Rows `slots` of every layer's `[slots, H, d]` buffer as `[layers * H, n, d]` (heads stacked
    layer by layer; a view). Each layer's gather writes straight into its part of one tensor
    rather than into a copy that is then concatenated (H100, a fold's read of 8.4K tokens x 16
    layers: 0.45 -> 0.27 ms)."""
    first = buffers[0]
    out = first.new_empty(len(slots), len(buffers), *first.shape[1:])
    for i, buffer in enumerate(buffers):
        torch.index_select(buffer, 0, slots, out=out[:, i])
    return out.flatten(1, 2).transpose(0, 1)
