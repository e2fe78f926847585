"""`mpeval run` end to end against a real llama.cpp server, then `report`, `compare`, and plain lm-eval."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from harness_testlib import FAST_GEN, OFFLINE_ENV, mpeval

from harness.tasks import tasks_path

pytestmark = pytest.mark.slow


def _samples(run_dir):
    return [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]


def _cmdline_alive(fragment: str) -> bool:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if fragment.encode() in f.read().replace(b"\0", b" "):
                    return True
        except OSError:
            continue
    return False


def _gsm_run(results, run_id, url):
    return mpeval(
        "run",
        "gsm-infinite",
        "--url",
        url,
        "--data",
        "sample",
        "--limit",
        "1",
        "--gen-kwargs",
        FAST_GEN,
        "--judge",
        "self",
        "--judge-max-tokens",
        "16",
        "--results-dir",
        str(results),
        "--run-id",
        run_id,
    )


def test_gsm_infinite_run_writes_the_full_results_folder(llama_server, tmp_path):
    proc = _gsm_run(tmp_path, "gsm", llama_server.base_url)
    run = tmp_path / "gsm"
    for name in ("config.json", "samples.jsonl", "summary.json", "table.md", "plots/accuracy.png"):
        assert (run / name).is_file(), name
    assert (run / "plots/accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    samples = _samples(run)
    assert sorted(s["groups"]["subset"] for s in samples) == ["hard", "medium", "symbolic"]
    assert len({s["key"] for s in samples}) == 3
    for s in samples:
        assert len(s["prompt_hash"]) == 64 and s["output"] and s["judge_reply"] is not None
        assert s["answer_source"] in ("judge", "regex") and isinstance(s["correct"], bool)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["samples"] == 3 and summary["scores"]["acc"] == round(
        sum(s["correct"] for s in samples) / 3, 4
    )
    assert set(summary["scores"]["curves"]) == {"symbolic/0", "medium/0", "hard/0"}
    assert summary["judge_stats"]["judged"] == 3
    table = (run / "table.md").read_text()
    assert "| gsm (llamacpp) | judge | hard | 0 | 1 |" in table and "| regex |" in table
    assert table.splitlines()[0] in proc.stdout
    config = json.loads((run / "config.json").read_text())
    assert config["task_metadata"]["data"] == "sample" and config["run"]["gen_kwargs"]["max_gen_toks"] == 24

    # The same run again: identical outputs (temperature 0, fixed seed), every judge reply from the cache.
    _gsm_run(tmp_path, "gsm-again", llama_server.base_url)
    again = _samples(tmp_path / "gsm-again")
    assert [s["output"] for s in again] == [s["output"] for s in samples]
    assert all(s["judge_cached"] for s in again)

    rebuilt = mpeval("report", str(run), str(tmp_path / "gsm-again"))
    assert "gsm-again (llamacpp)" in rebuilt.stdout
    diff = mpeval("compare", str(run), str(tmp_path / "gsm-again"), "--out", str(tmp_path / "cmp"))
    assert "| acc |" in diff.stdout and (tmp_path / "cmp" / "accuracy.png").is_file()
    assert "| 0 |" in diff.stdout.split("| acc |")[1].splitlines()[0]  # identical runs: delta 0


def test_longbench_v2_launches_its_own_server_truncates_and_tears_down(tmp_path):
    proc = mpeval(
        "run",
        "longbench-v2",
        "--engine",
        "llamacpp",
        "--max-model-len",
        "1024",
        "--limit",
        "2",
        "--data",
        "sample",
        "--gen-kwargs",
        FAST_GEN,
        "--judge-max-tokens",
        "16",
        "--results-dir",
        str(tmp_path),
        "--run-id",
        "lb",
    )
    run = tmp_path / "lb"
    config = json.loads((run / "config.json").read_text())
    assert config["task_metadata"]["max_len"] == 1024 - 24 - 64
    assert config["task_metadata"]["tokenizer"].endswith(".gguf")
    samples = _samples(run)
    assert len(samples) == 2 and all(s["prompt_tokens"] <= 1024 for s in samples)
    # The first sample row is ~3,000 tokens long: it must arrive cut to the budget, not whole or empty.
    assert samples[0]["groups"]["length"] == "long" and 800 < samples[0]["prompt_tokens"] <= 1024
    assert all(s["judge_prompt_hash"] for s in samples)
    assert "Overall" in proc.stdout and "Easy" in proc.stdout
    assert "llama_cpp.server" in (run / "server.log").read_text()
    port = config["server_command"][config["server_command"].index("--port") + 1]
    assert not _cmdline_alive(f"--port {port} ")


def test_plain_lm_eval_runs_the_shipped_tasks(llama_server):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lm_eval",
            "--include_path",
            str(tasks_path()),
            "--tasks",
            "gsm_infinite_medium",
            "--model",
            "local-chat-completions",
            "--model_args",
            f"model=smollm2,base_url={llama_server.base_url}/v1/chat/completions,num_concurrent=1,max_retries=1",
            "--apply_chat_template",
            "--limit",
            "1",
            "--metadata",
            '{"data": "sample"}',
            "--gen_kwargs",
            "max_gen_toks=16",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, **OFFLINE_ENV},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "gsm_infinite_medium" in proc.stdout and "|auc" in proc.stdout.replace(" ", "")


def test_bad_input_gives_clear_errors(tmp_path):
    assert "no such option" in mpeval("run", "gsm-infinite", "--bogus", check=False).stderr.lower()
    bad_task = mpeval("run", "nope", check=False)
    assert bad_task.returncode == 2 and "gsm-infinite" in bad_task.stderr
    resume = mpeval("run", "gsm-infinite", "--resume", check=False)
    assert resume.returncode == 2 and "--resume needs --run-id" in resume.stderr
    meta = mpeval("run", "gsm-infinite", "--metadata", "[1]", check=False)
    assert meta.returncode == 2 and "JSON object" in meta.stderr
    start = time.monotonic()
    dead = mpeval(
        "run",
        "gsm-infinite",
        "--url",
        "http://127.0.0.1:9",
        "--server-timeout",
        "3",
        "--data",
        "sample",
        "--limit",
        "1",
        "--results-dir",
        str(tmp_path),
        check=False,
    )
    assert dead.returncode == 1 and "not healthy after 3s" in dead.stderr and time.monotonic() - start < 60
    missing = mpeval(
        "run",
        "gsm-infinite",
        "--data",
        str(tmp_path / "nowhere"),
        "--results-dir",
        str(tmp_path),
        check=False,
    )
    assert missing.returncode == 1 and "does not exist" in missing.stderr
