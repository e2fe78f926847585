"""SGLang's server (`python -m sglang.launch_server`), dense or with `--attention-backend multipole`."""

from __future__ import annotations

import sys

from harness.engines import EngineOptions

HEALTH_PATH = "/health"


def default_model() -> str:
    raise ValueError("the sglang engine needs --model (a hub id or a local model directory)")


def command(opts: EngineOptions, port: int) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "sglang.launch_server",
        "--model-path",
        opts.model or default_model(),
        "--host",
        opts.host,
        "--port",
        str(port),
        "--random-seed",
        str(opts.seed),
    ]
    if opts.attention_backend:
        cmd += ["--attention-backend", opts.attention_backend]
    if opts.max_model_len:
        cmd += ["--context-length", str(opts.max_model_len)]
    return cmd + list(opts.server_args)


def tokenizer(model: str) -> str:
    return model


def context_length(opts: EngineOptions) -> int | None:
    """None: the model's own window (then LongBench truncation needs --max-model-len)."""
    return opts.max_model_len
