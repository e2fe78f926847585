"""sglang backend tests: real sglang pools, ForwardBatch and dense backend on the CPU.

Everything here needs sglang (its own venv, see docs/sglang.md); without it every module skips.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture
def published_server_args() -> Iterator[None]:
    """sglang 0.5.17 reads the published server arguments when it builds a RotaryEmbedding."""
    from sglang.srt.runtime_context import get_context, reset_context
    from sglang.srt.server_args import ServerArgs

    get_context().set_server_args(ServerArgs(model_path="dummy", device="cpu"))
    yield
    reset_context()
