"""Shared test fixtures, and Triton's CPU interpreter when there is no GPU.

TRITON_INTERPRET must be set before any kernel is defined (Triton reads it at decoration time),
hence here, before any test module imports `mp_kernels` (directly or through the backends).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _interpreter_numpy_compat() -> None:
    """Triton 3.6's interpreter turns scalars into 1-element arrays, which numpy >= 2.4 refuses
    to convert with int(); loop bounds taken from loaded values then fail. Index via item()."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpreter_numpy_compat()


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(1234)
