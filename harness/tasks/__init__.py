"""The benchmarks `mpeval` runs: lm-eval task YAMLs in this folder (or lm-eval's own, for RULER),
plus how a CLI name maps onto them.

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


def _hub_or_sample(data: str) -> str:
    from harness.tasks import data as data_sources  # imports `datasets`: only when a run starts

    return data_sources.resolve_source(data)


def _nothing_skipped(metadata: dict[str, Any]) -> dict[str, str]:
    return {}


def _no_overrides(metadata: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {}


def _ruler_utils() -> ModuleType:
    return importlib.import_module("harness.tasks.ruler.utils")


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
    # lm-eval's own task folders (under lm_eval/tasks/) indexed beside ours, for builtin tasks.
    builtin_folders: tuple[str, ...] = ()
    # The tasks build their samples from the target model's tokenizer (`tokenizer` metadata).
    sized_by_tokenizer: bool = False
    judged: bool = True  # False: scored by string match alone; a judge would only cost time
    resolve_data: Callable[[str], str] = _hub_or_sample  # --data -> what the run records and uses
    skipped_tasks: Callable[[dict[str, Any]], dict[str, str]] = _nothing_skipped  # name -> reason
    # lm-eval config overrides per task name (e.g. samples read from --data), from the metadata.
    task_overrides: Callable[[dict[str, Any]], dict[str, dict[str, Any]]] = _no_overrides

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
    "ruler": TaskSpec(
        "ruler",
        "harness.tasks.ruler.utils",
        lambda metadata: _ruler_utils().lm_eval_tasks(metadata),
        {"max_seq_lengths": [4096]},
        builtin_folders=("ruler",),
        sized_by_tokenizer=True,
        judged=False,
        resolve_data=lambda data: _ruler_utils().resolve_data(data),
        skipped_tasks=lambda metadata: _ruler_utils().skipped_tasks(metadata),
        task_overrides=lambda metadata: _ruler_utils().task_overrides(metadata),
    ),
}


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; available: {', '.join(sorted(TASKS))}")
    return TASKS[name]
