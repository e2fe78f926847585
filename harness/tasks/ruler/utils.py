"""RULER (lm-eval's builtin `ruler` tasks), scored as lm-eval scores it: string match, no judge.

lm-eval builds every RULER sample itself, sized with the target model's tokenizer (metadata
`tokenizer`) to each length in `max_seq_lengths`; `mpeval` only picks which of its tasks run. Six
build their haystacks locally; the others fetch data at load time (Paul Graham essays from the
Hugging Face hub plus nltk's `punkt_tab`, or the SQuAD / HotpotQA dev sets) and are skipped offline,
each with its reason. An essay task runs from a local copy of its samples, as lm-eval builds them
(with the same tokenizer), given as `--data FOLDER` holding `<task>.jsonl`. A sample's score is
lm-eval's `string_match_all`: the fraction of the gold values found in the reply; the report gives
it in percent per task and length, as RULER's tables do.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from pathlib import Path
from typing import Any

from harness.tasks import data as data_sources

OFFLINE_TASKS = ("niah_single_1", "niah_multikey_2", "niah_multikey_3", "ruler_vt", "ruler_cwe", "ruler_fwe")
ESSAY_TASKS = ("niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multivalue", "niah_multiquery")
_ESSAYS = (
    "needs the Paul Graham essay haystack (hub: baber/paul_graham_essays) and nltk's punkt_tab; "
    "--data FOLDER with prebuilt <task>.jsonl runs it"
)
DOWNLOAD_TASKS = {
    **dict.fromkeys(ESSAY_TASKS, _ESSAYS),
    "ruler_qa_squad": "downloads the SQuAD v2 dev set (rajpurkar.github.io)",
    "ruler_qa_hotpot": "downloads the HotpotQA dev set (huggingface.co)",
}


def requested(metadata: dict[str, Any]) -> list[str]:
    """The task names asked for (metadata `tasks`, default: the offline ones), checked against RULER's."""
    names = list(metadata.get("tasks") or OFFLINE_TASKS)
    unknown = [n for n in names if n not in OFFLINE_TASKS and n not in DOWNLOAD_TASKS]
    if unknown:
        known = ", ".join([*OFFLINE_TASKS, *DOWNLOAD_TASKS])
        raise ValueError(f"ruler: unknown task(s) {', '.join(unknown)}; RULER's tasks are {known}")
    return names


def local_file(metadata: dict[str, Any], task: str) -> Path | None:
    """The prebuilt samples of an essay task in the --data folder, if the folder has them."""
    if metadata.get("data", "local") == "local" or task not in ESSAY_TASKS:
        return None
    try:
        return data_sources.local_file(Path(metadata["data"]), task)
    except FileNotFoundError:
        return None


def lm_eval_tasks(metadata: dict[str, Any]) -> list[str]:
    """The requested tasks that build their data here or find it in --data; the others are
    `skipped_tasks`."""
    runnable = [n for n in requested(metadata) if n in OFFLINE_TASKS or local_file(metadata, n)]
    if not runnable:
        raise ValueError(
            f"ruler: none of the requested tasks builds offline; skipped: {skipped_tasks(metadata)}"
        )
    return runnable


def skipped_tasks(metadata: dict[str, Any]) -> dict[str, str]:
    """Requested tasks that would need a download (and have no local copy), each with the reason."""
    return {
        n: DOWNLOAD_TASKS[n]
        for n in requested(metadata)
        if n in DOWNLOAD_TASKS and local_file(metadata, n) is None
    }


def task_overrides(metadata: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """lm-eval config overrides: tasks found in --data read their samples from there."""
    return {
        n: {"custom_dataset": functools.partial(load_local, local_file(metadata, n))}
        for n in requested(metadata)
        if local_file(metadata, n)
    }


def load_local(path: Path, max_seq_lengths: list[int] | None = None, **_: Any) -> dict:
    """lm-eval `custom_dataset` over prebuilt samples (lm-eval's own RULER rows: input, outputs,
    max_length, gen_prefix, index), keeping the rows of the requested lengths."""
    rows = data_sources.read_local(path)
    missing = {"input", "outputs", "max_length", "gen_prefix", "index"} - set(rows.column_names)
    if missing:
        raise ValueError(f"{path}: not RULER samples as lm-eval builds them; missing {sorted(missing)}")
    wanted = set(max_seq_lengths or [])
    rows = rows.filter(lambda row: row["max_length"] in wanted)
    if not len(rows):
        raise ValueError(f"{path}: no samples of max_length in {sorted(wanted)}")
    return {"test": rows}


def resolve_data(data: str) -> str:
    """`local` (build the offline tasks here; the default), or a folder of prebuilt essay-task samples."""
    if data in ("auto", "local"):
        return "local"
    if not Path(data).is_dir():
        raise ValueError(
            f"ruler: --data must be a folder holding prebuilt samples (<task>.jsonl); got {data!r}"
        )
    return data


def chat_messages(doc: dict[str, Any], text: str) -> list[dict[str, str]]:
    """One user turn, as lm-eval sends it; the runner appends the task's `gen_prefix` as the
    assistant's started reply."""
    return [{"role": "user", "content": text}]


def sample_key(doc: dict[str, Any]) -> str:
    return f"{doc['max_length']}/{doc['index']}"


def gold(doc: dict[str, Any]) -> list[str]:
    return list(doc["outputs"])


def regex_answer(doc: dict[str, Any], output: str) -> str:
    """lm-eval's cleaned prediction (whitespace and control characters stripped)."""
    from lm_eval.tasks.ruler.common_utils import postprocess_pred

    return postprocess_pred([output])[0]


def is_correct(doc: dict[str, Any], answer: str | None) -> float:
    """lm-eval's score of the offline tasks (their `process_results`, `string_match_all`): the share
    of the gold values found in the answer, in [0, 1]."""
    from lm_eval.tasks.ruler.common_utils import string_match_all

    return string_match_all([answer or ""], [list(doc["outputs"])])


def official_parser(doc: dict[str, Any]) -> str:
    return "regex"


def comparability(config: dict[str, Any]) -> list[str]:
    """Why a run's scores are not RULER's as lm-eval reports them (empty: they are)."""
    run = config["run"]
    reasons = []
    if run.get("limit"):
        reasons.append(f"--limit {run['limit']}: part of the 500 samples per task and length")
    if run.get("gen_kwargs"):
        reasons.append(f"generation settings changed: {run['gen_kwargs']}")
    return reasons


def groups(doc: dict[str, Any]) -> dict[str, Any]:
    return {"length": int(doc["max_length"])}


def summarize(records: list[dict[str, Any]], key: str = "correct") -> dict[str, Any]:
    """Score in percent per (task, length), and the mean over all samples."""
    cells: dict[tuple[str, int], list[float]] = defaultdict(list)
    for r in records:
        cells[(r["task"], int(r["groups"]["length"]))].append(float(r[key]))
    flat = [float(r[key]) for r in records]
    return {
        "n": len(flat),
        "score": _pct(flat),
        "cells": {
            f"{task}@{length}": {"task": task, "length": length, "n": len(v), "score": _pct(v)}
            for (task, length), v in sorted(cells.items())
        },
    }


def _pct(values: list[float]) -> float | None:
    return round(100.0 * sum(values) / len(values), 1) if values else None


# ---- presentation (used by harness.report) ----


def table_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"task": c["task"], "length": c["length"], "n": c["n"], "score": c["score"]}
        for c in summary["cells"].values()
    ]


def headline(summary: dict[str, Any]) -> dict[str, float | None]:
    return {name: c["score"] for name, c in summary["cells"].items()}


def plot_data(summary: dict[str, Any]) -> dict[str, Any]:
    names = list(summary["cells"])
    values = [summary["cells"][n]["score"] for n in names]
    return {
        "kind": "bar",
        "xlabel": "task@length",
        "ylabel": "score (%)",
        "series": {"score": (names, values)},
    }
