"""Inference engines the harness can evaluate, one small module each.

A server engine module defines `HEALTH_PATH`, `default_model()`, `command(opts, port)` and
`tokenizer(model)`; the harness launches (or attaches to) its OpenAI-compatible server. An in-process
engine (`hf`) instead defines `open(opts, log_path)`, a context manager yielding
an object with `model` and `chat(messages, **params)` like `harness.client.ChatClient`.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from harness.client import ChatClient
from harness.server import attached, free_port, launched

ENGINES = {
    "sglang": "harness.engines.sglang",
    "llamacpp": "harness.engines.llamacpp",
    "hf": "harness.engines.hf",
}


@dataclass
class EngineOptions:
    """What to serve and how; engine modules translate this into their own flags."""

    model: str | None = None
    attention_backend: str | None = None
    max_model_len: int | None = None
    seed: int = 0
    server_args: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"


def get_engine(name: str) -> ModuleType:
    if name not in ENGINES:
        raise KeyError(f"unknown engine {name!r}; available: {', '.join(sorted(ENGINES))}")
    return importlib.import_module(ENGINES[name])


def resolve_model(engine: ModuleType, opts: EngineOptions) -> str:
    return opts.model or engine.default_model()


@contextlib.contextmanager
def open_endpoint(
    engine_name: str,
    opts: EngineOptions,
    log_path: Path,
    url: str | None = None,
    timeout_s: float = 600.0,
    on_launch=None,
) -> Iterator[ChatClient]:
    """Attach to `url`, or launch the engine's server; yields a chat client, tears the server down after.

    `on_launch(command)` is told the exact server command line (for the run's config).
    """
    engine = get_engine(engine_name)
    if url is None and hasattr(engine, "open"):
        with engine.open(opts, log_path) as client:
            yield client
        return
    if url is not None:
        if not hasattr(engine, "HEALTH_PATH"):
            raise ValueError(f"the {engine_name} engine runs in-process: it cannot attach to --url")
        with attached(url, engine.HEALTH_PATH, timeout_s=min(timeout_s, 30.0)) as server:
            yield ChatClient(server.base_url)
        return
    port = free_port(opts.host)
    command = engine.command(opts, port)
    if on_launch is not None:
        on_launch(command)
    with launched(command, f"http://{opts.host}:{port}", engine.HEALTH_PATH, log_path, timeout_s) as server:
        yield ChatClient(server.base_url)
