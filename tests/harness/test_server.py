"""Server launch, health, attach and teardown with real processes."""

from __future__ import annotations

import os
import sys
import time

import pytest

from harness.client import ChatClient
from harness.server import ServerError, attached, free_port, launched


def _gone(pid: int, within_s: float = 10.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def test_a_server_that_dies_is_reported_with_its_log(tmp_path):
    cmd = [sys.executable, "-c", "print('error: model file is corrupt'); raise SystemExit(3)"]
    with pytest.raises(ServerError, match=r"(?s)exited with code 3.*model file is corrupt"):
        with launched(cmd, "http://127.0.0.1:9", "/health", tmp_path / "s.log", timeout_s=30):
            pass


def test_health_timeout_names_the_url_and_stops_the_process(tmp_path):
    pid_file = tmp_path / "pid"
    cmd = [
        sys.executable,
        "-c",
        f"import os,time; open({str(pid_file)!r},'w').write(str(os.getpid())); "
        "print('loading...', flush=True); time.sleep(600)",
    ]
    with pytest.raises(ServerError, match=r"(?s)/health not healthy after 2s.*loading"):
        with launched(cmd, "http://127.0.0.1:9", "/health", tmp_path / "s.log", timeout_s=2):
            pass
    assert _gone(int(pid_file.read_text()))


def test_teardown_reaches_the_servers_own_children(tmp_path):
    port, child_pid = free_port(), tmp_path / "child"
    script = (
        "import http.server, subprocess, sys\n"
        "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        f"open({str(child_pid)!r}, 'w').write(str(c.pid))\n"
        "handler = http.server.SimpleHTTPRequestHandler\n"
        f"http.server.HTTPServer(('127.0.0.1', {port}), handler).serve_forever()\n"
    )
    with launched(
        [sys.executable, "-c", script], f"http://127.0.0.1:{port}", "/", tmp_path / "s.log", timeout_s=30
    ) as server:
        with attached(server.base_url, "/", timeout_s=5):
            pass  # attaching checks health and never stops the server
        assert server.alive()
        server_pid = server.process.pid
    assert _gone(server_pid) and _gone(int(child_pid.read_text()))


@pytest.mark.slow
def test_chat_with_the_real_small_model(llama_server):
    client = ChatClient(llama_server.base_url)
    assert client.model.endswith(".gguf")
    out = client.chat([{"role": "user", "content": "Say hello."}], max_tokens=8, temperature=0.0, seed=0)
    assert out.text.strip() and out.completion_tokens and out.completion_tokens <= 8
