"""The on-disk layout of one run, `results/<run-id>/`, and its append-only sample log.

samples.jsonl gets one line per finished sample, flushed and fsynced before the next sample starts,
so a crash, Ctrl-C or SIGKILL loses at most the sample in flight; a torn last line is cut off on
resume. Everything else (summary, table, plots) is derived from samples.jsonl and can be rebuilt.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

CONFIG = "config.json"
SAMPLES = "samples.jsonl"
SUMMARY = "summary.json"
TABLE = "table.md"
SERVER_LOG = "server.log"
JUDGE_LOG = "judge_server.log"
PLOTS = "plots"


class RunDir:
    """Paths and I/O of one run folder."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def file(self, name: str) -> Path:
        return self.path / name

    def exists(self) -> bool:
        return self.file(CONFIG).is_file()

    def write_json(self, name: str, data: Any) -> None:
        tmp = self.file(name + ".tmp")
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")
        tmp.replace(self.file(name))

    def read_json(self, name: str) -> Any:
        path = self.file(name)
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: is {self.path} a run folder?")
        return json.loads(path.read_text())

    def samples(self) -> list[dict[str, Any]]:
        """Finished samples; a torn final line (killed mid-write) is dropped from the file."""
        path = self.file(SAMPLES)
        if not path.is_file():
            return []
        raw = path.read_bytes()
        good_end = raw.rfind(b"\n") + 1
        if good_end < len(raw):
            with open(path, "r+b") as f:
                f.truncate(good_end)
        return [json.loads(line) for line in raw[:good_end].splitlines() if line.strip()]

    def append_sample(self, record: dict[str, Any]) -> None:
        with open(self.file(SAMPLES), "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
