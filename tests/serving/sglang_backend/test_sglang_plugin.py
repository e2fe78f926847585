"""The plugin reaches sglang through its real entry-point machinery and argument parser."""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

pytest.importorskip("sglang.srt", reason="sglang is not installed (see docs/sglang.md)")

from mp_sglang.serving.plugin import BACKEND_NAME, create_backend


def _loaded_through_sglang(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run sglang's own plugin loader, restricted to our plugin, as every sglang process does."""
    import sglang.srt.plugins as plugins

    monkeypatch.setenv("SGLANG_PLUGINS", BACKEND_NAME)
    monkeypatch.setattr(plugins, "_plugins_loaded", False)
    plugins.load_plugins()


def test_entry_point_is_installed() -> None:
    ours = [ep for ep in entry_points(group="sglang.srt.plugins") if ep.name == BACKEND_NAME]
    assert [ep.value for ep in ours] == ["mp_sglang.serving.plugin:register"]
    assert ours[0].dist is not None and ours[0].dist.name == "multipole"


def test_load_plugins_registers_backend_and_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES

    _loaded_through_sglang(monkeypatch)
    assert ATTENTION_BACKENDS[BACKEND_NAME] is create_backend
    assert ATTENTION_BACKEND_CHOICES.count(BACKEND_NAME) == 1
    _loaded_through_sglang(monkeypatch)  # a second load (every process calls it) adds nothing
    assert ATTENTION_BACKEND_CHOICES.count(BACKEND_NAME) == 1


def test_sglang_argument_parser_accepts_multipole(monkeypatch: pytest.MonkeyPatch) -> None:
    from sglang.srt.server_args import ServerArgs

    _loaded_through_sglang(monkeypatch)
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    args = parser.parse_args(
        ["--model-path", "m", "--attention-backend", BACKEND_NAME, "--decode-attention-backend", BACKEND_NAME]
    )
    assert (args.attention_backend, args.decode_attention_backend) == (BACKEND_NAME, BACKEND_NAME)
    with pytest.raises(SystemExit):
        parser.parse_args(["--model-path", "m", "--attention-backend", "multipol"])


def test_fresh_process_gets_backend_from_load_plugins() -> None:
    """A scheduler/TP worker is a fresh process whose only set-up is sglang's load_plugins()."""
    code = (
        "from sglang.srt.plugins import load_plugins; load_plugins();"
        "from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS;"
        "from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES;"
        f"print({BACKEND_NAME!r} in ATTENTION_BACKENDS, {BACKEND_NAME!r} in ATTENTION_BACKEND_CHOICES)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "True True"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A small Llama config (no weights): enough for sglang to resolve server arguments."""
    out = tmp_path_factory.mktemp("model")
    script = Path(__file__).resolve().parents[3] / "scripts" / "make_random_model.py"
    shape = "--hidden 64 --intermediate 128 --layers 2 --heads 4 --kv-heads 2 --max-pos 4096".split()
    command = [sys.executable, str(script), "--out", str(out), "--config-only", *shape]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return str(out)


@pytest.mark.parametrize(
    ("args", "prefill_graphs"),
    [
        ({"attention_backend": BACKEND_NAME}, "disabled"),  # the plain command: turned off, logged
        ({"attention_backend": "triton"}, "breakable"),  # other backends keep sglang's default
        ({"attention_backend": BACKEND_NAME, "cuda_graph_backend_prefill": "disabled"}, "disabled"),
    ],
)
def test_plain_command_serves_without_prefill_graphs(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    model_dir: str,
    args: dict,
    prefill_graphs: str,
) -> None:
    """On CUDA sglang captures prefill graphs by default (breakable); with multipole the plugin
    resolves them off (decode graphs stay as they were), as sglang does for its own backends."""
    import sglang.srt.model_executor.cuda_graph_config as graph_config
    from sglang.srt.arg_groups.overrides import resolved_view
    from sglang.srt.server_args import ServerArgs

    _needs_resolve_once()
    _loaded_through_sglang(monkeypatch)
    monkeypatch.setattr(graph_config, "default_prefill_backend", lambda: graph_config.Backend.BREAKABLE)
    server_args = ServerArgs(model_path=model_dir, device="cpu", **args)
    with caplog.at_level(logging.INFO, logger="mp_sglang.serving.plugin"):
        server_args.resolve_once()
    config = resolved_view(server_args).cuda_graph_config
    assert config.prefill.backend == prefill_graphs and config.decode.backend != "disabled"
    assert ("prefill CUDA graphs off" in caplog.text) == (args == {"attention_backend": BACKEND_NAME})


def test_explicit_prefill_graphs_are_refused_at_start_up_naming_the_flag(
    monkeypatch: pytest.MonkeyPatch, model_dir: str
) -> None:
    from sglang.srt.server_args import ServerArgs

    _needs_resolve_once()
    _loaded_through_sglang(monkeypatch)
    explicit = {"attention_backend": BACKEND_NAME, "cuda_graph_backend_prefill": "breakable"}
    server_args = ServerArgs(model_path=model_dir, device="cpu", **explicit)
    with pytest.raises(ValueError, match="drop --cuda-graph-backend-prefill breakable"):
        server_args.resolve_once()


def _needs_resolve_once() -> None:
    """These tests drive sglang >= 0.5.23's argument resolution (`ServerArgs.resolve_once`); 0.5.17
    resolves in the constructor, through the hook the device's servers exercise (docs/perf.md item 27)."""
    from sglang.srt.server_args import ServerArgs

    if not hasattr(ServerArgs, "resolve_once"):
        pytest.skip("this sglang has no ServerArgs.resolve_once (< 0.5.23)")
