"""sglang plugin: makes `--attention-backend multipole` exist in every sglang process.

sglang (>= 0.5.17) calls every function of the entry-point group `sglang.srt.plugins` through
`sglang.srt.plugins.load_plugins()`, which runs before argument parsing in `launch_server`,
`sglang serve` and `Engine`, and again in each scheduler (TP/DP worker) process. Installing this
package is therefore the whole set-up. The backend module itself is imported only when a model
runner builds the backend, so processes that never attend (tokenizer, detokenizer) stay light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sglang.srt.model_executor.model_runner import ModelRunner

    from mp_sglang.serving.backend import MultipoleAttnBackend

BACKEND_NAME = "multipole"


def register() -> None:
    """Entry point: register the backend factory and the CLI choice (idempotent)."""
    from sglang.srt.layers.attention.attention_registry import register_attention_backend
    from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices

    register_attention_backend(BACKEND_NAME)(create_backend)
    if BACKEND_NAME not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([BACKEND_NAME])


def create_backend(runner: ModelRunner) -> MultipoleAttnBackend:
    """Factory sglang calls with the model runner; reads and validates MultipoleConfig here.

    A bad `MULTIPOLE_*` setting raises `ValueError` at model-runner start-up, before any request.
    """
    from mp_sglang.serving.backend import MultipoleAttnBackend

    return MultipoleAttnBackend(runner)
