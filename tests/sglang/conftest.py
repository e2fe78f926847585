"""sglang backend tests: real sglang pools, ForwardBatch and dense backend on the CPU.

Everything here needs sglang (its own venv, see docs/sglang.md); without it the directory skips.
"""

from __future__ import annotations

import pytest

pytest.importorskip("sglang", reason="sglang is not installed (see docs/sglang.md)")
