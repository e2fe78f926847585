"""sglang backend tests: real sglang pools, ForwardBatch and dense backend on the CPU.

Everything here needs sglang (its own venv, see docs/sglang.md); without it every module skips.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True, scope="session")
def plugin_loaded() -> None:
    """Every sglang process loads the plugin through sglang's loader, which applies its hooks;
    the backend refuses to start without them."""
    pytest.importorskip("sglang.srt", reason="sglang is not installed (see docs/sglang.md)")
    from sglang.srt.plugins import load_plugins

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SGLANG_PLUGINS", "multipole")
        load_plugins()


@pytest.fixture(autouse=True)
def own_crossover_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Backends look for measured crossover tables in an empty cache of the test's own, never in
    the user's (a test that wants one writes it there)."""
    monkeypatch.setenv("MULTIPOLE_CACHE_DIR", str(tmp_path_factory.mktemp("multipole-cache")))


@pytest.fixture
def published_server_args() -> Iterator[None]:
    """sglang 0.5.17 reads the published server arguments when it builds a RotaryEmbedding."""
    from sglang.srt.runtime_context import get_context, reset_context
    from sglang.srt.server_args import ServerArgs

    get_context().set_server_args(ServerArgs(model_path="dummy", device="cpu"))
    yield
    reset_context()
