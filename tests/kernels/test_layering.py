"""The kernels are the ground floor: every `mp_kernels` module imports with `mp_sglang` blocked."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import mp_kernels

BLOCKED_IMPORT = """
import importlib, sys
class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name == "mp_sglang" or name.startswith("mp_sglang."):
            raise ImportError(f"mp_kernels imported {name}")
        return None
sys.meta_path.insert(0, Blocked())
for name in sys.argv[1:]:
    importlib.import_module(name)
print("imported", len(sys.argv) - 1)
"""


def test_every_kernel_module_imports_without_mp_sglang() -> None:
    modules = [f"mp_kernels.{m.name}" for m in pkgutil.iter_modules(mp_kernels.__path__)]
    assert "mp_kernels.kmeans" in modules and "mp_kernels.kmeans_reference" in modules
    done = subprocess.run(
        [sys.executable, "-c", BLOCKED_IMPORT, *modules], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"imported {len(modules)}"
