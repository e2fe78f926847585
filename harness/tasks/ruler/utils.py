"""RULER (lm-eval's builtin `ruler` tasks), scored as lm-eval scores it: string match, no judge.

lm-eval builds every RULER sample itself, sized with the target model's tokenizer (metadata
`tokenizer`) to each length in `max_seq_lengths`; `mpeval` only picks which of its tasks run. Six
build their haystacks locally; the others fetch data at load time (Paul Graham essays from the
Hugging Face hub plus nltk's `punkt_tab`, or the SQuAD / HotpotQA dev sets) and are skipped offline,
each with its reason. A sample's score is lm-eval's `string_match_all`: the fraction of the gold
values found in the reply; the report gives it in percent per task and length, as RULER's tables do.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

OFFLINE_TASKS = ("niah_single_1", "niah_multikey_2", "niah_multikey_3", "ruler_vt", "ruler_cwe", "ruler_fwe")
_ESSAYS = "needs the Paul Graham essay haystack (hub: baber/paul_graham_essays) and nltk's punkt_tab"
DOWNLOAD_TASKS = {
    "niah_single_2": _ESSAYS,
    "niah_single_3": _ESSAYS,
    "niah_multikey_1": _ESSAYS,
    "niah_multivalue": _ESSAYS,
    "niah_multiquery": _ESSAYS,
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


def lm_eval_tasks(metadata: dict[str, Any]) -> list[str]:
    """The requested tasks that build their data locally; the others are `skipped_tasks`."""
    runnable = [n for n in requested(metadata) if n in OFFLINE_TASKS]
    if not runnable:
        raise ValueError(
            f"ruler: none of the requested tasks builds offline; skipped: {skipped_tasks(metadata)}"
        )
    return runnable


def skipped_tasks(metadata: dict[str, Any]) -> dict[str, str]:
    """Requested tasks that would need a download, each with the reason."""
    return {n: DOWNLOAD_TASKS[n] for n in requested(metadata) if n in DOWNLOAD_TASKS}


def resolve_data(data: str) -> str:
    """RULER builds its data; there is nothing to fetch or point at for the offline tasks."""
    if data not in ("auto", "local"):
        raise ValueError(
            f"ruler builds its samples locally from the model's tokenizer: --data {data!r} is not used "
            "(the tasks that need downloaded data are skipped)"
        )
    return "local"


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
