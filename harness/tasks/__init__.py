"""The benchmarks `mpeval` runs: lm-eval task YAMLs in this folder, plus how a CLI name maps onto them.

Each task folder's `utils.py` is both lm-eval's hook module (`!function utils.*`) and the scorer the
runner uses (`sample_key`, `chat_messages`, `regex_answer`, `judge_prompt`, `parse_judge_reply`,
`is_correct`, `groups`, `summarize`), so the direct-lm-eval path and `mpeval` share one implementation.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any


def tasks_path() -> Path:
    """The folder to give lm-eval as `--include_path`."""
    return Path(__file__).parent


def _gsm_infinite_tasks(metadata: dict[str, Any]) -> list[str]:
    subsets = metadata["subsets"]
    if not subsets or set(subsets) - {"symbolic", "medium", "hard"}:
        raise ValueError(f"gsm-infinite: subsets must be among symbolic, medium, hard (got {subsets})")
    return [f"gsm_infinite_{s}" for s in subsets]


@dataclass(frozen=True)
class TaskSpec:
    name: str
    utils_module: str
    lm_eval_tasks: Callable[[dict[str, Any]], list[str]]  # metadata -> lm-eval task names to run
    default_metadata: dict[str, Any]
    truncates_prompt: bool = False  # needs `tokenizer` and `max_len` metadata (set from the engine)
    default_max_gen_toks: int | None = None  # the YAML's max_gen_toks, for the truncation budget
    official_max_len: int | None = None  # the official prompt budget, where the window allows it

    def utils(self) -> ModuleType:
        return importlib.import_module(self.utils_module)


TASKS = {
    "gsm-infinite": TaskSpec(
        "gsm-infinite",
        "harness.tasks.gsm_infinite.utils",
        _gsm_infinite_tasks,
        {"subsets": ["symbolic", "medium", "hard"], "lengths": ["0"], "protocol": "official"},
    ),
    "longbench-v2": TaskSpec(
        "longbench-v2",
        "harness.tasks.longbench_v2.utils",
        lambda metadata: ["longbench_v2_cot"],
        {},
        truncates_prompt=True,
        default_max_gen_toks=1024,
        official_max_len=120_000,
    ),
}


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; available: {', '.join(sorted(TASKS))}")
    return TASKS[name]
