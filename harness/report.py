"""Summaries, markdown tables and plots of runs, all rebuilt from each run's samples.jsonl."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot loads)
from matplotlib.ticker import MaxNLocator  # noqa: E402

from harness import results  # noqa: E402
from harness.judge import judge_stats  # noqa: E402
from harness.tasks import get_task  # noqa: E402

# Scores a summary holds: the official protocol's (the headline), then our labelled additions.
SCORINGS = (
    ("official", "scores", "correct"),
    ("judge", "scores_judge", "correct_judge"),
    ("regex", "scores_regex", "correct_regex"),
    ("judge, regex fallback", "scores_judge_or_regex", "correct_judge_or_regex"),
)


def summarize(run: results.RunDir) -> dict[str, Any]:
    """The official score, each labelled alternative the samples allow, whether the headline is
    comparable with published numbers (and why not), judge statistics, cost."""
    config = run.read_json(results.CONFIG)
    cfg = config["run"]
    utils = get_task(cfg["task"]).utils()
    records = run.samples()
    if not records:
        raise ValueError(f"{run.path}: no finished samples yet")
    scores = {
        name: utils.summarize(records, key)
        for _, name, key in SCORINGS
        if all(r.get(key) is not None for r in records)
    }
    return {
        "run_id": run.path.name,
        "task": cfg["task"],
        "engine": cfg["engine"],
        "model": config.get("served_model") or cfg["model"],
        "attention_backend": cfg["attention_backend"],
        "judge": cfg["judge"],
        "judge_model": config.get("judge_model_served"),
        "data": config["task_metadata"].get("data"),
        "limit": cfg["limit"],
        "samples": len(records),
        "not_comparable": utils.comparability(config),
        "skipped_tasks": config.get("skipped_tasks", {}),
        "multipole_env": config.get("multipole_env", {}),
        **scores,
        "judge_stats": judge_stats(records),
        "completion_tokens": sum(r["completion_tokens"] or 0 for r in records),
        "generation_seconds": round(sum(r["seconds"] for r in records), 1),
    }


def label(summary: dict[str, Any]) -> str:
    flavour = summary["attention_backend"] or summary["engine"]
    return f"{summary['run_id']} ({flavour})"


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:g}" if isinstance(value, float) else str(value)


def comparability_lines(summaries: list[dict[str, Any]]) -> str:
    """Per run: is its "official" row the number the benchmark's authors' code would give?"""
    lines = []
    for s in summaries:
        reasons = s.get("not_comparable", [])
        verdict = "comparable"
        if reasons:
            verdict = "**not comparable** with published numbers: " + "; ".join(reasons)
        judged = f" (judge: {s['judge_model']})" if s.get("judge_model") else " (no judge)"
        lines.append(f"- {label(s)}: official protocol{judged}, {verdict}")
        if s.get("multipole_env"):
            lines.append("  - settings: " + ", ".join(f"{k}={v}" for k, v in s["multipole_env"].items()))
        for name, reason in s.get("skipped_tasks", {}).items():
            lines.append(f"  - skipped {name}: {reason}")
    return "\n".join(lines) + "\n\n"


def markdown_table(summaries: list[dict[str, Any]]) -> str:
    """One table over all runs: per run, the official score first, then each labelled alternative
    (a run without a judge has none: each would be the deterministic parse again)."""
    rows = []
    for s in summaries:
        utils = get_task(s["task"]).utils()
        for scoring, key, _ in SCORINGS:
            if key in s and (key == "scores" or s["judge"] != "none"):
                rows += [{"run": label(s), "scoring": scoring, **row} for row in utils.table_rows(s[key])]
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return comparability_lines(summaries) + "\n".join(lines) + "\n"


def judge_table(summaries: list[dict[str, Any]]) -> str:
    stats = [(label(s), s["judge_stats"]) for s in summaries]
    keys = list(stats[0][1])
    lines = ["| run | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 1)]
    lines += [f"| {name} | " + " | ".join(str(st[k]) for k in keys) + " |" for name, st in stats]
    return "\n".join(lines) + "\n"


def plot(summaries: list[dict[str, Any]], path: Path) -> Path:
    """Accuracy vs. op count (GSM-Infinite) or the breakdown bars (LongBench v2), one colour per run."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / len(summaries)
    for i, s in enumerate(summaries):
        data = get_task(s["task"]).utils().plot_data(s["scores"])
        for name, (xs, ys) in data["series"].items():
            if data["kind"] == "bar":
                ax.bar([j + i * width for j in range(len(xs))], ys, width, label=label(s))
                ax.set_xticks([j + 0.4 - width / 2 for j in range(len(xs))], xs)
            else:
                ax.plot(xs, ys, marker="o", label=f"{label(s)} {name}")
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(data["xlabel"])
        ax.set_ylabel(data["ylabel"])
    ax.set_title(", ".join(sorted({s["task"] for s in summaries})))
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(run: results.RunDir) -> dict[str, Any]:
    """summary.json, table.md and plots/accuracy.png for one run."""
    summary = summarize(run)
    run.write_json(results.SUMMARY, summary)
    run.file(results.TABLE).write_text(render([summary]))
    plot([summary], run.file(results.PLOTS) / "accuracy.png")
    return summary


def render(summaries: list[dict[str, Any]]) -> str:
    """The score table, and the judge's statistics where any run had a judge."""
    if all(s["judge"] == "none" for s in summaries):
        return markdown_table(summaries)
    return (
        markdown_table(summaries)
        + "\nJudge (the judge model's answers vs. the deterministic parser's):\n\n"
        + judge_table(summaries)
    )


def compare(a: results.RunDir, b: results.RunDir, out: Path) -> str:
    """Side-by-side table, headline deltas (B - A) and an overlaid plot, written to `out`."""
    sa, sb = summarize(a), summarize(b)
    if sa["task"] != sb["task"]:
        raise ValueError(f"cannot compare {sa['task']} with {sb['task']}")
    utils = get_task(sa["task"]).utils()
    ha, hb = utils.headline(sa["scores"]), utils.headline(sb["scores"])
    delta = ["| metric | " + label(sa) + " | " + label(sb) + " | B - A |", "|---|---|---|---|"]
    for k in ha:
        va, vb = ha[k], hb.get(k)
        diff = None if va is None or vb is None else round(vb - va, 4)
        delta.append(f"| {k} | {_cell(va)} | {_cell(vb)} | {_cell(diff)} |")
    text = "\n".join(delta) + "\n\n" + render([sa, sb])
    out.mkdir(parents=True, exist_ok=True)
    (out / results.TABLE).write_text(text)
    plot([sa, sb], out / "accuracy.png")
    return text
