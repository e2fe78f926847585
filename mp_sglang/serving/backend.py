"""The sglang attention backend "multipole": dense prefill, Multipole Attention decode.

Every forward first runs a dense backend sglang already has (flashinfer or triton on a GPU, torch_native
elsewhere): it writes the new keys and values into the paged pool and computes exact attention,
which is right for prefill (compute-bound, not what the method speeds up) and for short contexts.
Then every query that attends as a decode step — a DECODE row, or an EXTEND/MIXED row with a
single new token — over a context of at least `dense_below` tokens gets the method's output
instead: its cluster index (`mp_sglang.serving.index`) is built or brought up to date from the keys and
values in the pool, and the exact part, the centroid part and their LSE merge are computed
(`_attend_method_rows`): on CUDA by the mp_kernels kernels for all rows at once
(`mp_sglang.serving.kernel_path`), elsewhere by the plain-torch reference, request by request. A DECODE
batch whose rows are all the method's skips the dense kernel and only writes its K/V.

Because the index is always made from what the pool holds, radix-cache prefix hits and chunked
prefills need no special case: the index of a request is built at its first decode-like step
over the tokens before it, and folded blockwise (`update_index`) whenever its recent window is
due (`IndexTable.ensure`); tokens past it are attended exactly.

A DECODE batch without any index (every context below `dense_below`) is the dense backend's
whole (`unindexed_decode`): its decode kernel reads short contexts faster than our exact kernels.

Decode CUDA graphs are captured on the kernel path (host work in `init_forward_metadata_out_graph`,
kernels over fixed buffers in the graph), each with a dense twin for batches without an index
(`dense_graphs`); prefill graphs and speculative decoding are refused.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend

from mp_sglang.method.config import MultipoleConfig, budget_tokens
from mp_sglang.method.reference import decode_attention, decode_view
from mp_sglang.method.rope import Rope
from mp_sglang.serving import crossover
from mp_sglang.serving.index import IndexTable
from mp_sglang.serving.kernel_path import KernelDecoder, MethodRow
from mp_sglang.serving.plugin import decode_graph_hooks_applied
from mp_sglang.serving.request_settings import ROW_SETTINGS, RequestSetting

if TYPE_CHECKING:
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch
    from sglang.srt.model_executor.model_runner import ModelRunner

logger = logging.getLogger(__name__)

_KV_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_NO_CUDA_GRAPHS = (
    "multipole captures decode CUDA graphs only on the kernel path (MULTIPOLE_DECODE_PATH=kernels or "
    "auto on CUDA); launch with --cuda-graph-backend-decode disabled --cuda-graph-backend-prefill disabled"
)
_NO_PREFILL_GRAPHS = (
    "multipole does not capture prefill CUDA graphs; launch with --cuda-graph-backend-prefill disabled "
    "(decode graphs stay on)"
)
# Positions compared when checking that a rebuilt RoPE matches the model's cos/sin cache.
_ROPE_CHECK_POSITIONS = 4096


class MultipoleAttnBackend(AttentionBackend):
    """Multipole Attention for MHA/GQA models on sglang's paged KV pool."""

    def __init__(self, runner: ModelRunner) -> None:
        super().__init__()
        reason = _unsupported(runner)
        if reason:
            raise ValueError(f"--attention-backend multipole: {reason}")
        self.cfg = _config_from_env()
        self.dense_name = _dense_name(self.cfg.dense_backend, str(runner.device))
        self.dense: AttentionBackend = ATTENTION_BACKENDS[self.dense_name](runner)
        self.req_to_token_pool = runner.req_to_token_pool
        self.kv_pool = runner.token_to_kv_pool
        self.rope: Rope | None = None
        if self.cfg.windowed_rope:
            self.rope, why_not = model_rope(getattr(runner, "model", None), self.kv_pool.head_dim)
            if self.rope is None:
                logger.warning("multipole: windowed_rope disabled, keys clustered as stored: %s", why_not)
                self.cfg = replace(self.cfg, windowed_rope=False)
        # Measured per-batch crossover (`crossover`): indexes start at its lowest context, and a
        # decode batch below its own batch size's crossover takes the dense path. Its settings are
        # compared as requested (a server that measured it made the same adjustments above).
        self.crossover: crossover.Crossover | None = None
        if self.cfg.decodes_with_kernels(runner.device) and self.cfg.unindexed_decode == "dense":
            self.crossover = _measured_crossover(runner, _config_from_env())
            if self.crossover is not None:
                self.cfg = replace(self.cfg, dense_below=self.crossover.lowest())
        self.table = IndexTable(self.req_to_token_pool.req_to_token.shape[0])
        ROW_SETTINGS.listen()
        self._rows: list[MethodRow] = []
        self._all_rows_method = False
        self._last_decode: tuple[tuple[int, int], list[int], list[int]] | None = None
        # Request row -> its req_generation when a pass last listed it (see `_plan_rows`).
        self._seen_generation: dict[int, int] = {}
        self.kernels: KernelDecoder | None = None
        # This pass (eager, captured or replayed) is a DECODE batch the dense backend answers whole.
        self.dense_pass = False
        # Decode graphs have dense twins (`dense_graphs`); set with the graphs' state. While one is
        # captured, `capturing_dense` is set by the capture hook.
        self.dense_graphs = False
        self.capturing_dense = False
        index_note = ""
        if self.cfg.decodes_with_kernels(runner.device):
            start = getattr(self.kv_pool, "start_layer", 0) or 0
            self.kernels = KernelDecoder(
                self.cfg,
                self.req_to_token_pool.req_to_token,
                self.kv_pool,
                range(start, start + self.kv_pool.layer_num),
                pool_tokens=self.kv_pool.size,
                context_len=self.req_to_token_pool.req_to_token.shape[1],
                table=self.table,
                rope=self.rope,
            )
            cap = self.kernels.capacity
            index_note = (
                f", preallocated index {self.kernels.index_bytes / 2**30:.2f} GiB "
                f"({cap.cluster_rows} clusters / {cap.member_rows} tokens per layer, "
                f"<= {cap.max_clusters} clusters per request)"
            )
        logger.info(
            "multipole: dense path %s, decode through %s, index table of %d request rows%s, settings %s",
            self.dense_name,
            "mp_kernels" if self.kernels else "the torch reference",
            self.table.num_rows,
            index_note,
            self.cfg.to_dict(),
        )
        if self.kernels:
            warning = _prefix_sharing_warning(self.cfg, getattr(runner, "server_args", None))
            if warning:
                logger.warning(warning)

    # ------------------------------------------------------------------ metadata

    def init_forward_metadata(self, forward_batch: ForwardBatch) -> None:
        """Eager passes: the method's rows (`_plan_rows`), and the dense backend unless the kernels
        answer every row of a DECODE batch."""
        self._plan_rows(forward_batch)
        if not (self.kernels and forward_batch.forward_mode.is_decode()) or self.dense_pass:
            self.dense.init_forward_metadata(forward_batch)

    def _plan_rows(self, forward_batch: ForwardBatch, dense_available: bool = True) -> None:
        """Retire stale indexes and pick the rows the method answers, or the dense path
        (`dense_pass`) for a DECODE batch without any index, where it is available.

        Reference path: DECODE rows and one-token EXTEND/MIXED rows whose context reaches
        `dense_below`, unless their request asked for dense attention; each with its request's
        budget (`request_settings.ROW_SETTINGS`). Kernel path: the same, plus every other DECODE
        row as a fully exact row (no index), so a DECODE batch never needs the dense kernel; but a
        DECODE batch with no indexed row at all is the dense backend's whole (`unindexed_decode`),
        where `dense_available` (eager passes; graphs with a dense twin). Rows
        of length <= 1 are CUDA graph padding: exact, no index, and their (dummy) request row is
        left alone. A row that changed hands since a pass last listed it is not indexed in this
        pass (`_settled`).
        """
        pool = self.req_to_token_pool
        self.table.sync(pool.req_generation, pool.free_slots)
        mode = forward_batch.forward_mode
        self._rows = []
        self._all_rows_method = False
        self.dense_pass = False
        if mode.is_idle():
            if self.kernels:
                self.kernels.plan([], 0)
            return
        seq_lens = _cpu_list(forward_batch.seq_lens_cpu, forward_batch.seq_lens)
        reqs = self._decode_rows_unchanged(seq_lens) if mode.is_decode() else None
        if reqs is None:
            reqs = forward_batch.req_pool_indices.tolist()  # a device sync
        if mode.is_decode():
            self._last_decode = (self._pool_fingerprint(), reqs, seq_lens)
            new_tokens = [1] * len(reqs)
        else:
            self._last_decode = None
            new_tokens = _cpu_list(forward_batch.extend_seq_lens_cpu, forward_batch.extend_seq_lens)
            # A prefilled row holds new contents: its index is rebuilt from the pool when it next
            # decodes. (In a MIXED batch a one-token row is a running decode and keeps its index.)
            self.table.drop(
                req for req, n in zip(reqs, new_tokens, strict=True) if n > 1 or not mode.is_mixed()
            )
        exact_rows = self.kernels is not None and mode.is_decode()
        end = 0
        rows = []
        generations = pool.req_generation[reqs].tolist()  # one read of the host tensor per pass
        for req, seq_len, n, generation in zip(reqs, seq_lens, new_tokens, generations, strict=True):
            end += n
            setting = ROW_SETTINGS.get(req)
            indexed = (
                seq_len > 1
                and self._settled(req, generation)
                and seq_len >= self.cfg.dense_below
                and not (setting and setting.dense)
            )
            if n == 1 and (indexed or exact_rows):
                budget = self._budget(setting, seq_len) if indexed else 0
                generation_kept = generation if indexed else -1
                rows.append(MethodRow(end - 1, req, seq_len, generation_kept, budget, indexed=indexed))
        self.dense_pass = (
            dense_available
            and exact_rows
            and self.cfg.unindexed_decode == "dense"
            and (not any(row.indexed for row in rows) or self._dense_is_faster(seq_lens))
        )
        if not self.dense_pass:
            self._rows = rows
            self._all_rows_method = mode.is_decode() and len(rows) == len(reqs)
        if self.kernels:
            self.kernels.plan(self._rows, end)

    def _dense_is_faster(self, seq_lens: list[int]) -> bool:
        """Whether the measured crossover says a DECODE batch of these contexts decodes faster
        densely: its mean context (padding rows of a CUDA graph left out) is below the crossover
        of its batch size."""
        if self.crossover is None:
            return False
        real = [n for n in seq_lens if n > 1]
        return bool(real) and sum(real) < len(real) * self.crossover.context_for(len(real))

    def _budget(self, setting: RequestSetting | None, seq_len: int) -> int:
        """A row's exact-token budget: its request's own, else the server's."""
        if setting and setting.token_budget is not None:
            return budget_tokens(setting.token_budget, seq_len)
        return self.cfg.budget_tokens(seq_len)

    def _settled(self, req: int, generation: int) -> bool:
        """Whether `req`'s row, now at `generation`, held the same request when a pass last listed it.

        With the overlap scheduler a pass can run after its request finished and its row went to
        a new request: it lists the old request's row and length, but the pool already shows the
        new generation, and an index built then would be filed under the newcomer and reused by
        its first one-token step. A row whose generation changed since it was last listed is
        therefore attended exactly in that pass (no index built or used); the next pass trusts it.
        Every request's first pass is normally a prefill, which settles it, so an unsettled row of
        a DECODE pass is a finished request's, whose output is thrown away (the kernel path
        attends it over its whole context for that one step).
        """
        settled = self._seen_generation.get(req) == generation
        self._seen_generation[req] = generation
        return settled

    def _pool_fingerprint(self) -> tuple[int, int]:
        """Changes whenever a request row is allocated (its generation is bumped) or freed."""
        pool = self.req_to_token_pool
        return int(pool.req_generation.sum()), len(pool.free_slots)

    def _decode_rows_unchanged(self, seq_lens: list[int]) -> list[int] | None:
        """The previous DECODE pass's request rows, when this pass must have the same ones.

        Reading `req_pool_indices` waits for the GPU, which would stop sglang from preparing the
        next step while this one runs. It is skipped when no request row was allocated or freed
        since the previous DECODE pass and every length grew by exactly one (padding rows of a
        CUDA graph stay at 1): sglang keeps a decode batch's order, so the rows are the same.
        """
        if self._last_decode is None:
            return None
        fingerprint, reqs, previous = self._last_decode
        grown = [n + 1 if n > 1 else 1 for n in previous]
        if fingerprint != self._pool_fingerprint() or seq_lens != grown:
            return None
        return reqs

    # ------------------------------------------------------------------ CUDA graphs (decode)

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int) -> None:
        """Decode graphs run the kernel path over its fixed buffers and, in their dense twins, the
        dense backend's decode over its own graph state (`dense_graphs`)."""
        if self.kernels is None:
            raise NotImplementedError(_NO_CUDA_GRAPHS)
        if max_bs > self.kernels.capacity.rows:
            raise ValueError(
                f"multipole: CUDA graphs up to batch {max_bs}; the index holds {self.kernels.capacity.rows}"
            )
        if self.cfg.unindexed_decode != "dense":
            return
        why_not = None if decode_graph_hooks_applied() else "sglang's decode graph runner lacks our hooks"
        if why_not is None:
            try:
                self.dense.init_cuda_graph_state(max_bs, max_num_tokens)
            except NotImplementedError:
                why_not = f"the {self.dense_name} backend has no CUDA graphs"
        if why_not:
            logger.info("multipole: %s; in decode graphs, rows without an index use our kernels", why_not)
            return
        self.dense_graphs = True
        logger.info("multipole: decode graphs with a %s twin for batches without an index", self.dense_name)

    def init_forward_metadata_out_graph(self, forward_batch: ForwardBatch, in_capture: bool = False) -> None:
        """Before capturing or replaying a decode graph: index upkeep and metadata, on the host.
        The dense backend is prepared when its twin is captured, and before a replay of it (a
        batch without an index)."""
        if not forward_batch.forward_mode.is_decode():
            raise NotImplementedError(_NO_PREFILL_GRAPHS)
        self._plan_rows(forward_batch, self.capturing_dense if in_capture else self.dense_graphs)
        if self.dense_pass:
            self.dense.init_forward_metadata_out_graph(forward_batch, in_capture=in_capture)

    def get_cuda_graph_seq_len_fill_value(self) -> int:
        return 1

    def init_forward_metadata_for_breakable_cuda_graph_capture(self, forward_batch: ForwardBatch) -> None:
        raise NotImplementedError(_NO_PREFILL_GRAPHS)

    def support_triton(self) -> bool:
        return self.dense.support_triton()

    # ------------------------------------------------------------------ forward

    def forward_decode(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: RadixAttention,
        forward_batch: ForwardBatch,
        save_kv_cache: bool = True,
        **kwargs,
    ) -> torch.Tensor:
        _check_layer(layer)
        if self.dense_pass:
            return self.dense.forward_decode(
                q, k, v, layer, forward_batch, save_kv_cache=save_kv_cache, **kwargs
            )
        if self._all_rows_method:
            # Every row is the method's: the dense kernel would be thrown away, only its KV write is kept.
            if save_kv_cache and k is not None:
                self.kv_pool.set_kv_buffer(
                    layer, forward_batch.out_cache_loc, k, v, layer.k_scale, layer.v_scale
                )
            out = q.new_empty(q.shape[0], layer.tp_q_head_num * layer.v_head_dim)
        else:
            out = self.dense.forward_decode(
                q, k, v, layer, forward_batch, save_kv_cache=save_kv_cache, **kwargs
            )
        return self._attend_method_rows(q, out, layer)

    def forward_extend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: RadixAttention,
        forward_batch: ForwardBatch,
        save_kv_cache: bool = True,
        **kwargs,
    ) -> torch.Tensor:
        _check_layer(layer)
        out = self.dense.forward_extend(q, k, v, layer, forward_batch, save_kv_cache=save_kv_cache, **kwargs)
        return self._attend_method_rows(q, out, layer)

    def _attend_method_rows(self, q: torch.Tensor, out: torch.Tensor, layer: RadixAttention) -> torch.Tensor:
        """Overwrite the dense output of the method's rows with Multipole Attention, in place.

        Runs after the dense backend, so the pool already holds each row's own key and value.
        """
        if not self._rows:
            return out
        if self.kernels:
            return self.kernels.attend(q, out, layer)
        dim = layer.qk_head_dim
        queries = q.reshape(-1, layer.tp_q_head_num, dim)
        outputs = out.view(-1, layer.tp_q_head_num, layer.v_head_dim)
        key_buffer = self.kv_pool.get_key_buffer(layer.layer_id)
        value_buffer = self.kv_pool.get_value_buffer(layer.layer_id)
        # The reference assumes softmax(q.k / sqrt(d)); fold the layer's own scaling into q.
        q_scale = layer.scaling * math.sqrt(dim)
        for row in self._rows:
            slots = self.req_to_token_pool.req_to_token[row.req, : row.seq_len].long()
            keys = key_buffer[slots].transpose(0, 1)
            values = value_buffer[slots].transpose(0, 1)
            reader = _slices_of(keys, values)
            index = self.table.ensure(
                row.req, row.generation, layer.layer_id, row.seq_len, reader, self.cfg, self.rope
            )
            query = queries[row.query].float() * q_scale
            view = decode_view(index, row.seq_len)
            cfg = _with_budget(self.cfg, row.budget)
            outputs[row.query] = decode_attention(query, keys, values, view, cfg).to(outputs)
        return out


# ---------------------------------------------------------------------- start-up checks


def _config_from_env() -> MultipoleConfig:
    try:
        return MultipoleConfig.from_env()
    except ValueError as err:
        raise ValueError(
            f"--attention-backend multipole: invalid MULTIPOLE_* settings: {err} (see docs/usage.md)"
        ) from err


def _measured_crossover(runner: ModelRunner, cfg: MultipoleConfig) -> crossover.Crossover | None:
    """This GPU's and attention shape's measured crossover table, unless dense_below was set or
    the table was measured with other settings; the log says which table was found, or why none
    is used."""
    if crossover.explicit_dense_below():
        logger.info("multipole: MULTIPOLE_DENSE_BELOW set: indexes from that context for every batch size")
        return None
    pool = runner.token_to_kv_pool
    device = str(runner.device)
    name = torch.cuda.get_device_name(torch.cuda.current_device()) if device.startswith("cuda") else device
    tp_size = getattr(runner, "tp_size", 1) or 1
    shape = crossover.AttentionShape(
        q_heads=runner.model_config.num_attention_heads // tp_size,
        kv_heads=pool.head_num,
        head_dim=pool.head_dim,
        dtype=str(pool.dtype),
    )
    table, path = crossover.load(shape, name)
    if table is None:
        logger.info(
            "multipole: no measured crossover at %s; indexes from dense_below for every batch size "
            "(docs/sglang.md: measuring the crossover)",
            path,
        )
        return None
    differences = table.differences(cfg)
    if differences:
        logger.warning(
            "multipole: the crossover at %s was measured with other settings (%s); indexes from "
            "dense_below for every batch size until it is measured again (docs/sglang.md)",
            path,
            ", ".join(differences),
        )
        return None
    points = ", ".join(f"batch {batch}: {context}" for batch, context in table.points)
    logger.info("multipole: measured crossover %s (%s): method from these contexts", path, points)
    return table


def _dense_name(setting: str, device: str) -> str:
    """The dense backend to build: the setting, or for "auto" the fastest one that is present."""
    if setting != "auto":
        if setting not in ATTENTION_BACKENDS or setting == "multipole":
            raise ValueError(
                f"--attention-backend multipole: MULTIPOLE_DENSE_BACKEND={setting!r} is not a dense backend"
            )
        return setting
    if not device.startswith("cuda"):
        return "torch_native"
    return "flashinfer" if importlib.util.find_spec("flashinfer") is not None else "triton"


@functools.lru_cache(maxsize=64)
def _with_budget(cfg: MultipoleConfig, budget: int) -> MultipoleConfig:
    """`cfg` with a row's budget in tokens (the reference path reads the budget from its config)."""
    return replace(cfg, token_budget=budget)


def _slices_of(keys: torch.Tensor, values: torch.Tensor):
    """A `KVReader` over keys/values already read from the pool."""
    return lambda start, end: (keys[:, start:end], values[:, start:end])


def _prefix_sharing_warning(cfg: MultipoleConfig, server_args: object | None) -> str | None:
    """What to say at start-up when requests may share prefixes through the radix cache: each of
    them indexes the shared tokens, so a batch's indexes can outgrow buffers sized from the pool,
    and the requests that do not fit then decode exactly (at dense cost) until there is room."""
    if server_args is None or getattr(server_args, "disable_radix_cache", True) or cfg.index_capacity > 1:
        return None
    return (
        "multipole: the radix cache is on and MULTIPOLE_INDEX_CAPACITY is "
        f"{cfg.index_capacity:g}: requests sharing long prefixes each index them, and when a decode "
        "batch's indexes hold more tokens than the KV pool, the requests that do not fit are attended "
        "exactly (at dense cost). Raise MULTIPOLE_INDEX_CAPACITY (each +1 costs ~7 % of the KV "
        "cache's memory at head size 128) or pass --disable-radix-cache."
    )


def _unsupported(runner: ModelRunner) -> str | None:
    """Why the method cannot serve this model runner (naming a backend to use instead), or None."""
    model_config = runner.model_config
    pool = runner.token_to_kv_pool
    if runner.use_mla_backend:
        return "MLA models are not covered by Multipole Attention; use --attention-backend flashinfer or fa3"
    if getattr(runner, "sliding_window_size", None) is not None or getattr(
        model_config, "is_hybrid_swa", False
    ):
        return "sliding-window attention is not covered; use --attention-backend triton or fa3"
    if getattr(model_config, "is_encoder_decoder", False):
        return "encoder-decoder models (cross-attention) are not covered; use --attention-backend flashinfer"
    if not runner.spec_algorithm.is_none():
        return "speculative decoding is not supported yet; use --attention-backend triton or flashinfer"
    if pool.dtype not in _KV_DTYPES:
        return f"KV cache dtype {pool.dtype} is not supported; use --kv-cache-dtype auto"
    if getattr(pool, "kv_cache_layout", "nhd") != "nhd":
        return f"KV cache layout {pool.kv_cache_layout!r} is not supported; unset SGLANG_USE_HND_KVCACHE"
    return None


def _check_layer(layer: RadixAttention) -> None:
    """Layer features the method does not model, refused at the layer's first forward."""
    problems = []
    if layer.is_cross_attention:
        problems.append("cross-attention (use --attention-backend flashinfer)")
    if layer.sliding_window_size is not None and layer.sliding_window_size > -1:
        problems.append("sliding-window attention (use --attention-backend triton)")
    if layer.logit_cap and layer.logit_cap > 0:
        problems.append("attention logit soft-capping (use --attention-backend triton)")
    if layer.qk_head_dim != layer.v_head_dim:
        problems.append("different key and value head sizes (use --attention-backend triton)")
    if problems:
        raise NotImplementedError(f"multipole: layer {layer.layer_id} uses {', '.join(problems)}")


def model_rope(model: torch.nn.Module | None, head_dim: int) -> tuple[Rope | None, str]:
    """The rotary embedding the model applied to its cached keys, as a `Rope`, or why there is none.

    Takes the model's first sglang `RotaryEmbedding`, rebuilds its inverse frequencies with
    `_compute_inv_freq(base)`, and accepts them only if they reproduce the module's own cos/sin
    cache: a variant whose cache is not cos/sin(position x inv_freq) (linear scaling, YaRN's
    attention factor, M-RoPE) is refused rather than guessed.
    """
    from sglang.srt.layers.rotary_embedding import RotaryEmbedding

    if model is None:
        return None, "the model is not reachable from the model runner"
    rotary = next((m for m in model.modules() if isinstance(m, RotaryEmbedding)), None)
    if rotary is None:
        return None, "the model has no sglang RotaryEmbedding"
    name = type(rotary).__name__
    if rotary.rotary_dim != head_dim:
        return None, f"{name} rotates {rotary.rotary_dim} of {head_dim} dimensions (partial RoPE)"
    try:
        inv_freq = rotary._compute_inv_freq(rotary.base).float().cpu()
    except Exception as err:  # a variant with another signature: refuse, do not guess
        return None, f"{name}: cannot rebuild its inverse frequencies ({err})"
    cache = rotary.cos_sin_cache.cpu()
    positions = torch.arange(min(cache.shape[0], _ROPE_CHECK_POSITIONS), dtype=torch.float64)
    angles = positions.unsqueeze(-1) * inv_freq.double()
    if cache.shape[-1] != 2 * angles.shape[-1]:
        return None, f"{name}: cos/sin cache of width {cache.shape[-1]} for {angles.shape[-1]} frequencies"
    expected = torch.cat([angles.cos(), angles.sin()], dim=-1)
    error = (cache[: len(positions)].double() - expected).abs().max().item()
    tolerance = 2e-3 if cache.dtype == torch.float32 else 2e-2
    if error > tolerance:
        return None, f"{name}: its cos/sin cache is not cos/sin(position x inv_freq) (max error {error:.2g})"
    return Rope(inv_freq=inv_freq, neox=bool(rotary.is_neox_style)), ""


def _cpu_list(cpu_values: list[int] | torch.Tensor | None, values: torch.Tensor) -> list[int]:
    """ForwardBatch's host copy of a per-request tensor when it has one, else the tensor's values."""
    chosen = values if cpu_values is None else cpu_values
    return chosen.tolist() if isinstance(chosen, torch.Tensor) else list(chosen)
