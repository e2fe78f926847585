"""Kernel tests: Triton runs on the CPU under its interpreter unless a GPU is present (set up in
tests/conftest.py, before any test module imports `mp_kernels`)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every torch.empty during a kernel test comes back NaN/sentinel-filled, so an output element
    that a kernel forgets to write fails the comparison instead of passing on lucky memory."""
    from _inputs import poisoned_empty

    monkeypatch.setattr(torch, "empty", poisoned_empty(torch.empty))
