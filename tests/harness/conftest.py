"""Fixtures for the harness tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory):
    """One real llama.cpp server (SmolLM2-135M) shared by the tests that only need something to talk to."""
    from harness_testlib import start_llama_server  # skips the caller where the eval extra is missing

    with start_llama_server(tmp_path_factory.mktemp("server") / "server.log") as server:
        yield server
