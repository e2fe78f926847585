"""sglang plugin: makes `--attention-backend multipole` exist in every sglang process.

sglang (>= 0.5.17) calls every function of the entry-point group `sglang.srt.plugins` through
`sglang.srt.plugins.load_plugins()`, which runs before argument parsing in `launch_server`,
`sglang serve` and `Engine`, and again in each scheduler (TP/DP worker) process. Installing this
package is therefore the whole set-up. The backend module itself is imported only when a model
runner builds the backend, so processes that never attend (tokenizer, detokenizer) stay light.

sglang captures prefill CUDA graphs by default on CUDA; this backend does not (its per-pass index
upkeep is host work, and prefill is its dense backend's anyway). So the plugin also joins sglang's
server-argument resolution, where sglang turns graphs off for its own backends that cannot take
them: for a multipole prefill it turns prefill graphs off, with one log line, and refuses an
explicit `--cuda-graph-backend-prefill` other than `disabled` at start-up. Decode graphs stay on.

Per-request settings (`request_settings`) take two hooks through sglang's hook registry: after
`SamplingParams.verify` (a bad setting is a ValueError there, which sglang answers with HTTP 400),
and after `ForwardBatch.init_new` (which notes each request row's setting for the backend). Their
targets are resolved at registration, and the backend refuses to start unless both were applied.

Two more hooks join sglang's decode CUDA-graph runner (`dense_graphs`): a dense twin of each
captured decode graph, replayed for batches without any index. They are optional: on an sglang
without their targets the backend attends those batches with its own kernels, and says so.
"""

from __future__ import annotations

import logging
import pkgutil
from typing import TYPE_CHECKING

from mp_sglang.serving import dense_graphs
from mp_sglang.serving.request_settings import ROW_SETTINGS, check_request

if TYPE_CHECKING:
    from sglang.srt.model_executor.model_runner import ModelRunner

    from mp_sglang.serving.backend import MultipoleAttnBackend

logger = logging.getLogger(__name__)

BACKEND_NAME = "multipole"
_DISABLED = "disabled"  # sglang's cuda_graph_config.Backend.DISABLED
_RESOLUTION_STEP = "handle_attention_backend_compatibility"  # where sglang disables graphs per backend
_VERIFY_TARGET = "sglang.srt.sampling.sampling_params.SamplingParams.verify"
_BATCH_TARGET = "sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new"
_hooked = False


def register() -> None:
    """Entry point: register the backend factory, the CLI choice, the prefill-graph default and
    the per-request settings (idempotent)."""
    from sglang.srt.layers.attention.attention_registry import register_attention_backend
    from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices

    _join_hooks()
    register_attention_backend(BACKEND_NAME)(create_backend)
    if BACKEND_NAME not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([BACKEND_NAME])


def prefill_graphs_off(prefill_attention: str, prefill_graphs: str, explicit: bool) -> bool:
    """Whether to turn a server's prefill CUDA graphs off: yes for a multipole prefill that would
    capture them by default. An explicit request for them is refused, naming the flag."""
    if prefill_attention != BACKEND_NAME or prefill_graphs == _DISABLED:
        return False
    if explicit:
        raise ValueError(
            f"--attention-backend {BACKEND_NAME} does not capture prefill CUDA graphs; drop "
            f"--cuda-graph-backend-prefill {prefill_graphs} (decode CUDA graphs stay on)"
        )
    logger.info("%s: prefill CUDA graphs off (prefill runs a dense backend); decode graphs on", BACKEND_NAME)
    return True


def _join_hooks() -> None:
    """Register the plugin's hooks into sglang, once per process."""
    global _hooked
    if _hooked:
        return
    _hooked = True  # a failure below is not retried: it would register the hooks before it twice
    _join_request_path()
    _join_argument_resolution()
    _join_decode_graphs()


def _join_request_path() -> None:
    """Check each request's setting where sglang verifies sampling parameters, and note each
    request row's setting where a forward batch is made. A target this sglang lacks stops the
    registration here (so the backend is not offered), naming it."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    for target in (_VERIFY_TARGET, _BATCH_TARGET):
        try:
            pkgutil.resolve_name(target)
        except (ImportError, AttributeError) as err:
            raise RuntimeError(f"{BACKEND_NAME}: this sglang has no {target} to hook into ({err})") from err
    HookRegistry.register(_VERIFY_TARGET, _after_verify, HookType.AFTER)
    HookRegistry.register(_BATCH_TARGET, _after_forward_batch, HookType.AFTER)


def _after_verify(result, sampling_params, *args, **kwargs):
    """After `SamplingParams.verify`: refuse a malformed per-request setting (HTTP 400)."""
    check_request(sampling_params.custom_params)
    return result


def _after_forward_batch(result, cls, batch, *args, **kwargs):
    """After `ForwardBatch.init_new`: note the setting of every request row of the batch."""
    ROW_SETTINGS.record((_request_row(req), req.sampling_params.custom_params) for req in batch.reqs)
    return result


def _request_row(req) -> int:
    """A request's req_to_token row: `req.req_pool_idx` (sglang 0.5.17, whose `req.kv` holds other
    things), else `req.kv.req_pool_idx` (0.5.23)."""
    if hasattr(req, "req_pool_idx"):
        return req.req_pool_idx
    return req.kv.req_pool_idx


def require_request_hooks() -> None:
    """Refuse to start unless sglang applied both per-request hooks (it logs, not raises, when a
    hook fails to apply)."""
    from sglang.srt.plugins.hook_registry import HookRegistry

    missing = [t for t in (_VERIFY_TARGET, _BATCH_TARGET) if t not in HookRegistry._patched]
    if missing:
        raise ValueError(
            f"--attention-backend {BACKEND_NAME}: sglang did not apply the plugin's hooks on {missing} "
            "(per-request settings need them); is the plugin loaded through sglang.srt.plugins.load_plugins?"
        )


def _join_decode_graphs() -> None:
    """Hook the dense twins of decode graphs into sglang's graph runner, where it has the targets."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    for target in (dense_graphs.CAPTURE_TARGET, dense_graphs.VARIANT_TARGET):
        try:
            pkgutil.resolve_name(target)
        except (ImportError, AttributeError):
            logger.debug("%s: no %s in this sglang; no dense decode graphs", BACKEND_NAME, target)
            return
    HookRegistry.register(dense_graphs.CAPTURE_TARGET, dense_graphs.around_capture_one_shape, HookType.AROUND)
    HookRegistry.register(dense_graphs.VARIANT_TARGET, dense_graphs.after_resolve_variant, HookType.AFTER)


def decode_graph_hooks_applied() -> bool:
    """Whether sglang applied both dense-graph hooks in this process."""
    from sglang.srt.plugins.hook_registry import HookRegistry

    return all(t in HookRegistry._patched for t in (dense_graphs.CAPTURE_TARGET, dense_graphs.VARIANT_TARGET))


def _join_argument_resolution() -> None:
    """Hook `prefill_graphs_off` into sglang's server-argument resolution: a named resolution step
    (sglang >= 0.5.23), or the ServerArgs method of the same name through sglang's hook registry
    (0.5.17)."""
    try:
        from sglang.srt.arg_groups.resolution_hooks import register_resolution_hook
    except ImportError:
        from sglang.srt.plugins.hook_registry import HookRegistry, HookType

        target = f"sglang.srt.server_args.ServerArgs._{_RESOLUTION_STEP}"
        HookRegistry.register(target, _after_attention_compatibility, HookType.AFTER)
        return
    register_resolution_hook(_RESOLUTION_STEP)(_resolve_attention_compatibility)


def _resolve_attention_compatibility(server_args, previous) -> None:
    """sglang >= 0.5.23: after its own step, declare the prefill graphs off where they must be."""
    from sglang.srt.arg_groups.overrides import (
        attention_backends_of,
        declare_resolution,
        resolved_view,
        resolving_view,
    )
    from sglang.srt.model_executor.cuda_graph_config import Phase, with_phase

    previous(server_args)
    config = resolving_view(server_args).cuda_graph_config
    explicit = (Phase.PREFILL, "backend") in getattr(server_args, "_cuda_graph_config_locked", set())
    prefill_attention = attention_backends_of(resolved_view(server_args))[0]
    if prefill_graphs_off(prefill_attention, config.prefill.backend, explicit):
        declare_resolution(
            server_args, BACKEND_NAME, cuda_graph_config=with_phase(config, Phase.PREFILL, backend=_DISABLED)
        )


def _after_attention_compatibility(result, server_args):
    """sglang 0.5.17: the same decision, after `ServerArgs._handle_attention_backend_compatibility`."""
    config = server_args.cuda_graph_config
    explicit = ("prefill", "backend") in getattr(server_args, "_cuda_graph_config_locked", set())
    if prefill_graphs_off(server_args._resolved_attention_backends()[0], config.prefill.backend, explicit):
        config.prefill.backend = _DISABLED
    return result


def create_backend(runner: ModelRunner) -> MultipoleAttnBackend:
    """Factory sglang calls with the model runner; reads and validates MultipoleConfig here.

    A bad `MULTIPOLE_*` setting raises `ValueError` at model-runner start-up, before any request.
    """
    from mp_sglang.serving.backend import MultipoleAttnBackend

    require_request_hooks()
    return MultipoleAttnBackend(runner)
