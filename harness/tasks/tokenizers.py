"""A tokenizer that `AutoTokenizer.from_pretrained(name)` can load, for tasks that size their data.

lm-eval's RULER loads its tokenizer by name alone, which a .gguf file is not (transformers needs
the folder and `gguf_file=`). A GGUF's tokenizer is therefore written once as an ordinary
tokenizer folder under the user's cache, and that folder is what the task gets.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mpeval" / "tokenizers"


def loadable_tokenizer(spec: str) -> str:
    """`spec` itself (hub id or model folder), or for a .gguf file the folder its tokenizer was
    exported to (keyed by the file's path and size, so a replaced file is exported again)."""
    path = Path(spec)
    if path.suffix != ".gguf":
        return spec
    if not path.is_file():
        raise FileNotFoundError(f"GGUF model {spec!r} not found")
    key = hashlib.sha256(f"{path.resolve()}:{path.stat().st_size}".encode()).hexdigest()[:16]
    out = cache_root() / f"{path.stem}-{key}"
    if not (out / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(out)
        except OSError:  # another run exported it meanwhile
            shutil.rmtree(tmp)
    return str(out)
