"""Kernel tests: Triton runs on the CPU under its interpreter unless a GPU is present.

TRITON_INTERPRET must be set before any kernel is defined (Triton reads it at decoration time),
hence here, before the test modules import `mp_kernels`.
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
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every torch.empty during a kernel test comes back NaN/sentinel-filled, so an output element
    that a kernel forgets to write fails the comparison instead of passing on lucky memory."""
    from _inputs import poisoned_empty

    monkeypatch.setattr(torch, "empty", poisoned_empty(torch.empty))
