"""Where a task's rows come from: the hub id when reachable, else a local jsonl/json/parquet path.

`data` (task metadata, `mpeval run --data`) is one of:
  * ``hub``    - the official hub dataset; fails if the hub cannot be reached;
  * ``sample`` - the small hand-made sample shipped in the package (tests, CPU demos);
  * a path     - a local .jsonl/.json/.parquet file, or a directory holding files named like the hub ids;
  * ``auto``   - the hub when reachable, else the shipped sample (logged and recorded as such).
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import datasets

log = logging.getLogger(__name__)

_LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """False when offline mode is set or the hub host does not accept a TCP connection."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def resolve_source(data: str) -> str:
    """Turn ``auto`` into ``hub`` or ``sample``; check that a path exists."""
    if data == "auto":
        if hub_reachable():
            return "hub"
        log.warning("hub unreachable: using the shipped sample data (pass --data PATH for a local copy)")
        return "sample"
    if data in ("hub", "sample"):
        return data
    if not Path(data).exists():
        raise FileNotFoundError(f"data path {data!r} does not exist (expected hub, sample, auto or a path)")
    return data


def local_file(path: Path, stem: str) -> Path:
    """`path` itself if it is a file, else the file named `stem`.<suffix> inside the directory."""
    if path.is_file():
        return path
    for suffix in _LOCAL_SUFFIXES:
        candidate = path / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no {stem}{{{','.join(_LOCAL_SUFFIXES)}}} in {path}")


def read_local(path: Path) -> datasets.Dataset:
    """Rows of one local file, in file order."""
    if path.suffix == ".parquet":
        return datasets.Dataset.from_parquet(str(path))
    if path.suffix in (".jsonl", ".json"):
        return datasets.Dataset.from_json(str(path))
    raise ValueError(f"unsupported data file {path} (use {', '.join(_LOCAL_SUFFIXES)})")
