"""Launch, health-check and tear down OpenAI-compatible inference servers, or attach to a running one.

A launched server runs in its own process group so teardown reaches every process it spawned
(SGLang forks scheduler and detokenizer workers); on Linux it is also killed when the harness dies,
so even a SIGKILLed harness leaves no server behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

_PR_SET_PDEATHSIG = 1


class ServerError(RuntimeError):
    """The server could not be started or stopped answering."""


def free_port(host: str = "127.0.0.1") -> int:
    """Ask the kernel for a port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def log_tail(path: Path, lines: int = 40) -> str:
    """The last lines of a log, for error messages that say why a server died."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"


def _die_with_parent() -> None:
    """Runs in the child before exec: new session (own process group), SIGKILL when the parent dies.

    SIGKILL, not SIGTERM: with nobody left to wait for it, a server must not linger in a graceful
    shutdown (uvicorn waits for the generation in flight). SGLang's own workers die with their parent.
    """
    os.setsid()
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _probe(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return 200 <= resp.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


@dataclass
class Server:
    """A server that answers on `base_url`; `process` is set only when this harness launched it."""

    base_url: str
    log_path: Path | None = None
    process: subprocess.Popen | None = None
    command: list[str] | None = None

    def alive(self) -> bool:
        return self.process is None or self.process.poll() is None

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM the whole process group, then SIGKILL whatever is left after `grace_s`."""
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        pgid = proc.pid  # the child called setsid, so its pid is its process group id
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        proc.wait()


def wait_healthy(server: Server, health_path: str, timeout_s: float) -> None:
    """Poll the health URL until it answers 2xx; fail fast, quoting the log, if the process exits."""
    url = server.base_url.rstrip("/") + health_path
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not server.alive():
            raise ServerError(
                f"server exited with code {server.process.returncode} before becoming healthy "
                f"({' '.join(server.command or [])}); log tail of {server.log_path}:\n"
                f"{log_tail(server.log_path)}"
            )
        if _probe(url):
            return
        time.sleep(0.5)
    tail = log_tail(server.log_path) if server.log_path else "(attached server: no log)"
    raise ServerError(f"{url} not healthy after {timeout_s:.0f}s; log tail:\n{tail}")


@contextlib.contextmanager
def launched(
    command: list[str], base_url: str, health_path: str, log_path: Path, timeout_s: float = 600.0
) -> Iterator[Server]:
    """Start `command`, stream its output to `log_path`, wait for health, and always tear it down."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"$ {' '.join(command)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )
    server = Server(base_url=base_url, log_path=log_path, process=proc, command=command)
    try:
        wait_healthy(server, health_path, timeout_s)
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def attached(base_url: str, health_path: str, timeout_s: float = 30.0) -> Iterator[Server]:
    """Use a server someone else runs; checked for health, never stopped."""
    server = Server(base_url=base_url.rstrip("/"))
    wait_healthy(server, health_path, timeout_s)
    yield server
