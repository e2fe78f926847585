"""The plugin reaches sglang through its real entry-point machinery and argument parser."""

from __future__ import annotations

import argparse
import subprocess
import sys
from importlib.metadata import entry_points

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
