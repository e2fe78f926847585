"""Killed runs resume with nothing lost or duplicated, and no server outlives the harness."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
from harness_testlib import mpeval, mpeval_popen, needs_llama_cpp, start_llama_server

pytestmark = pytest.mark.slow

GEN = "max_gen_toks=16,temperature=0"


def _lines(path):
    return path.read_text().splitlines() if path.exists() else []


def _wait_for(predicate, timeout_s=300.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("timed out waiting")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def _server_pids(port: str) -> list[int]:
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
        except OSError:
            continue
        if b"llama_cpp.server" in cmd and port.encode() in cmd:
            pids.append(int(pid))
    return pids


def _assert_complete(samples_path, n, prefix):
    lines = _lines(samples_path)
    keys = [json.loads(line)["key"] for line in lines]
    assert len(keys) == n and len(set(keys)) == n, keys
    assert lines[: len(prefix)] == prefix  # samples finished before the kill are kept untouched


def test_server_killed_mid_run_then_resume(tmp_path):
    args = [
        "run",
        "gsm-infinite",
        "--metadata",
        '{"subsets": ["medium"]}',
        "--data",
        "sample",
        "--limit",
        "4",
        "--gen-kwargs",
        GEN,
        "--judge",
        "none",
        "--results-dir",
        str(tmp_path),
        "--run-id",
        "r",
    ]
    samples = tmp_path / "r" / "samples.jsonl"
    with start_llama_server(tmp_path / "first.log") as server:
        proc = mpeval_popen(*args, "--url", server.base_url)
        _wait_for(lambda: len(_lines(samples)) >= 1)
        server.stop()
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert "unreachable" in err and "--resume" in err
    before = _lines(samples)
    assert 1 <= len(before) < 4

    with start_llama_server(tmp_path / "second.log") as server:
        done = mpeval(*args, "--url", server.base_url, "--resume")
    assert f"{4 - len(before)} new samples" in done.stdout
    _assert_complete(samples, 4, before)


def test_ctrl_c_and_kill_leave_no_server_and_resume_completes(tmp_path):
    needs_llama_cpp()
    args = [
        "run",
        "gsm-infinite",
        "--engine",
        "llamacpp",
        "--metadata",
        '{"subsets": ["hard"]}',
        "--data",
        "sample",
        "--limit",
        "3",
        "--gen-kwargs",
        GEN,
        "--judge",
        "none",
        "--results-dir",
        str(tmp_path),
        "--run-id",
        "c",
    ]
    run, samples = tmp_path / "c", tmp_path / "c" / "samples.jsonl"

    def server_port():
        command = json.loads((run / "config.json").read_text()).get("server_command")
        return command[command.index("--port") + 1] if command else None

    # Ctrl-C after the first sample: exit 130, the launched server is torn down.
    proc = mpeval_popen(*args)
    _wait_for(lambda: len(_lines(samples)) >= 1)
    port = server_port()
    assert _server_pids(port)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err and "--resume" in err
    _wait_for(lambda: not _server_pids(port), timeout_s=30)
    before = _lines(samples)

    # SIGKILL (no cleanup code runs at all): the server still dies with its parent.
    proc = mpeval_popen(*args, "--resume")
    _wait_for(lambda: (server_port() != port) and bool(_server_pids(server_port())))
    second_port = server_port()
    proc.kill()
    proc.communicate(timeout=60)
    _wait_for(lambda: not _server_pids(second_port), timeout_s=30)

    mpeval(*args, "--resume")
    _assert_complete(samples, 3, before)
    assert not any(_pid_alive(p) for p in _server_pids(second_port))
