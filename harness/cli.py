"""`mpeval`: run a benchmark against a served model, report runs, compare two runs."""

from __future__ import annotations

import importlib.util
import json
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import click

from harness import results
from harness.client import EndpointError
from harness.engines import ENGINES
from harness.server import ServerError
from harness.tasks import TASKS, tasks_path

_USER_ERRORS = (ValueError, KeyError, FileNotFoundError, FileExistsError, ServerError, EndpointError)


def parse_gen_kwargs(text: str) -> dict[str, Any]:
    """lm-eval's `--gen_kwargs` syntax: "max_gen_toks=256,temperature=0,do_sample=false"."""
    out: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        if "=" not in item:
            raise click.BadParameter(f"{item!r} is not key=value", param_hint="--gen-kwargs")
        key, raw = (s.strip() for s in item.split("=", 1))
        lowered = raw.lower()
        if lowered in ("true", "false"):
            out[key] = lowered == "true"
            continue
        for cast in (int, float):
            try:
                out[key] = cast(raw)
                break
            except ValueError:
                continue
        else:
            out[key] = raw
    return out


def parse_metadata(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise click.BadParameter(f"not JSON: {err}", param_hint="--metadata") from err
    if not isinstance(value, dict):
        raise click.BadParameter("must be a JSON object", param_hint="--metadata")
    return value


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def auto_engine(attach: bool = False) -> str:
    """sglang where it is installed next to an NVIDIA driver; else the in-process hf engine (SmolLM2).

    Attaching to a `--url` without sglang+GPU picks llamacpp, the CPU server engine: an in-process
    engine has nothing to attach to.
    """
    if importlib.util.find_spec("sglang") is not None and shutil.which("nvidia-smi"):
        return "sglang"
    return "llamacpp" if attach else "hf"


def default_judge(task: str, engine: str, attach: bool) -> str:
    """none for tasks scored by string match; else a launched judge for sglang, the target itself
    otherwise (hf asks its in-process model, an attached server answers its own outputs)."""
    if not TASKS[task].judged:
        return "none"
    return "launch" if engine == "sglang" and not attach else "self"


@click.group()
def main() -> None:
    """Evaluate Multipole Attention (or any served model) on long-context reasoning benchmarks."""


@main.command("tasks-path")
def tasks_path_cmd() -> None:
    """Print the folder to pass to `lm_eval --include_path`."""
    click.echo(str(tasks_path()))


@main.command()
@click.argument("task", type=click.Choice(sorted(TASKS)))
@click.option(
    "--engine",
    type=click.Choice(["auto", *sorted(ENGINES)]),
    default="auto",
    show_default=True,
    help="auto: sglang if installed with an NVIDIA driver, else hf (in-process, CPU; llamacpp with --url).",
)
@click.option(
    "--model",
    help="hub id / directory (sglang, hf), .gguf file (llamacpp, hf); default for hf and llamacpp: SmolLM2.",
)
@click.option(
    "--attention-backend",
    help="sglang --attention-backend, e.g. multipole (default: dense); hf: sdpa (default) or multipole.",
)
@click.option("--url", help="Attach to a running OpenAI-compatible server instead of launching one.")
@click.option(
    "--max-model-len", type=int, help="Context window to serve (and to truncate LongBench prompts to)."
)
@click.option("--server-args", default="", help="Extra server flags, one shell-quoted string.")
@click.option(
    "--server-timeout", type=float, default=900.0, show_default=True, help="Seconds to wait for /health."
)
@click.option(
    "--data",
    default="auto",
    show_default=True,
    help="auto | hub | sample | PATH (jsonl/json/parquet); ruler: a folder of prebuilt <task>.jsonl.",
)
@click.option(
    "--metadata", "metadata_json", help='Task metadata as JSON, e.g. {"subsets":["medium"],"lengths":["8k"]}.'
)
@click.option(
    "--gen-kwargs",
    "--gen_kwargs",
    "gen_kwargs",
    default="",
    help="lm-eval style: max_gen_toks=256,temperature=0. multipole=0.05 (a token budget) or "
    "multipole=dense: that setting for every request, on an sglang multipole server (docs/usage.md).",
)
@click.option("--limit", type=click.IntRange(min=1), help="At most this many samples per lm-eval task.")
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed sent with every request.")
@click.option(
    "--judge",
    default=None,
    help="self | none | launch | URL (default: none for ruler; launch for sglang, else self).",
)
@click.option("--judge-model", help="Judge model to launch, or the model name at the judge URL.")
@click.option("--judge-attention-backend", help="Backend of a launched judge (default: dense).")
@click.option("--judge-server-args", default="", help="Extra flags for a launched judge server.")
@click.option(
    "--judge-max-tokens",
    type=int,
    default=None,
    help="Tokens per judge reply (default: each task's official setting; another value is not comparable).",
)
@click.option(
    "--judge-cache",
    type=click.Path(file_okay=False),
    help="Judge reply cache (default: RESULTS/.judge_cache).",
)
@click.option("--results-dir", type=click.Path(file_okay=False), default="results", show_default=True)
@click.option("--run-id", help="Folder name under --results-dir (default: TASK-ENGINE-UTC time).")
@click.option(
    "--resume", is_flag=True, help="Continue the run --run-id: finished samples are kept, not redone."
)
def run(
    task: str,
    engine: str,
    metadata_json: str | None,
    gen_kwargs: str,
    judge: str | None,
    server_args: str,
    judge_server_args: str,
    results_dir: str,
    run_id: str | None,
    resume: bool,
    server_timeout: float,
    **options: Any,
) -> None:
    """Run TASK end to end and write results/<run-id>/ (config, logs, samples, summary, table, plots)."""
    from harness.report import render, write_report
    from harness.runner import RunConfig, execute

    if resume and not run_id:
        raise click.UsageError("--resume needs --run-id (the run folder to continue)")
    engine = auto_engine(attach=bool(options["url"])) if engine == "auto" else engine
    cfg = RunConfig(
        task=task,
        engine=engine,
        metadata=parse_metadata(metadata_json),
        gen_kwargs=parse_gen_kwargs(gen_kwargs),
        judge=judge or default_judge(task, engine, attach=bool(options["url"])),
        server_args=shlex.split(server_args),
        judge_server_args=shlex.split(judge_server_args),
        server_timeout_s=server_timeout,
        **options,
    )
    run_id = run_id or f"{task}-{engine}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    run_dir = results.RunDir(Path(results_dir) / run_id)
    resume_hint = f"continue with: mpeval run {task} --run-id {run_id} --resume (and the same options)"
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` tears servers down like Ctrl-C does
    try:
        added = execute(cfg, run_dir, resume=resume)
    except KeyboardInterrupt:
        click.echo(
            f"\ninterrupted: {len(run_dir.samples())} samples are saved in {run_dir.path}; {resume_hint}",
            err=True,
        )
        sys.exit(130)
    except _USER_ERRORS as err:
        saved = len(run_dir.samples()) if run_dir.path.is_dir() else 0
        hint = f"\n{saved} samples are saved in {run_dir.path}; {resume_hint}" if saved else ""
        raise click.ClickException(f"{err}{hint}") from err
    summary = write_report(run_dir)
    click.echo(render([summary]))
    click.echo(f"{added} new samples; results in {run_dir.path}")


@main.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
def report(runs: tuple[str, ...]) -> None:
    """Rebuild summary, table and plots of each RUN folder and print one table over them all."""
    from harness.report import render, write_report

    try:
        summaries = [write_report(results.RunDir(Path(r))) for r in runs]
    except _USER_ERRORS as err:
        raise click.ClickException(str(err)) from err
    click.echo(render(summaries))


@main.command()
@click.argument("run_a", type=click.Path(exists=True, file_okay=False))
@click.argument("run_b", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    help="Where to write table.md and accuracy.png (default: RESULTS/compare-A-vs-B).",
)
def compare(run_a: str, run_b: str, out: str | None) -> None:
    """Compare two runs of one task (e.g. dense vs. multipole): headline deltas, tables, overlaid plot."""
    from harness.report import compare as compare_runs

    a, b = results.RunDir(Path(run_a)), results.RunDir(Path(run_b))
    target = Path(out) if out else a.path.parent / f"compare-{a.path.name}-vs-{b.path.name}"
    try:
        click.echo(compare_runs(a, b, target))
    except _USER_ERRORS as err:
        raise click.ClickException(str(err)) from err
    click.echo(f"written to {target}")
