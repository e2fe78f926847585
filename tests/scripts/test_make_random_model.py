"""The random-weight model builder the GPU serving runs use (no download)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import make_random_model  # noqa: E402


@pytest.mark.parametrize("arch,name", [("llama", "LlamaForCausalLM"), ("qwen3", "Qwen3ForCausalLM")])
def test_config_names_the_architecture_sglang_dispatches_on(tmp_path, arch, name):
    out = tmp_path / arch
    argv = ["--out", str(out), "--arch", arch, "--config-only", "--hidden", "64", "--heads", "4"]
    assert make_random_model.main([*argv, "--kv-heads", "2", "--vocab", "300"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [name] and config["num_key_value_heads"] == 2
    assert config["head_dim"] == 16 and (out / "tokenizer.json").exists()
