"""One evaluation run: lm-eval tasks in, one judged sample per line out, resumable at any point.

lm-eval supplies the tasks (our YAMLs: data loading, prompt rendering, generation defaults); the
runner owns the request loop instead of `lm_eval.simple_evaluate`, because lm-eval only writes
samples once a whole task is done, while a resumable run must persist each sample as it finishes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from harness import results
from harness.client import ChatClient, openai_params
from harness.engines import EngineOptions, get_engine, open_endpoint, resolve_model
from harness.judge import Judge, digest, parse_output
from harness.tasks import get_task, tasks_path
from harness.tasks.tokenizers import loadable_tokenizer

log = logging.getLogger(__name__)

# Fields that must match for --resume to continue a run (anything else, e.g. --limit, may change).
RESUME_KEYS = (
    "task",
    "engine",
    "model",
    "attention_backend",
    "data",
    "metadata",
    "gen_kwargs",
    "seed",
    "judge",
    "judge_model",
    "judge_max_tokens",
)
CHAT_TEMPLATE_HEADROOM = 64  # tokens the server's chat template may add around the truncated prompt


@dataclass
class RunConfig:
    task: str
    engine: str = "llamacpp"
    model: str | None = None
    attention_backend: str | None = None
    url: str | None = None
    max_model_len: int | None = None
    server_args: list[str] = field(default_factory=list)
    data: str = "auto"
    metadata: dict[str, Any] = field(default_factory=dict)
    gen_kwargs: dict[str, Any] = field(default_factory=dict)
    limit: int | None = None
    seed: int = 0
    judge: str = "self"  # self | none | launch | an OpenAI-compatible URL
    judge_model: str | None = None
    judge_attention_backend: str | None = None
    judge_server_args: list[str] = field(default_factory=list)
    judge_max_tokens: int | None = None  # None: each task's official length
    judge_cache: str | None = None
    server_timeout_s: float = 900.0


def engine_options(cfg: RunConfig) -> EngineOptions:
    return EngineOptions(
        model=cfg.model,
        attention_backend=cfg.attention_backend,
        max_model_len=cfg.max_model_len,
        seed=cfg.seed,
        server_args=list(cfg.server_args),
    )


def model_window(cfg: RunConfig, engine) -> int | None:
    """The served context window: the engine's for a launched one; an attached server's only when
    --max-model-len gives it."""
    return cfg.max_model_len if cfg.url else engine.context_length(engine_options(cfg))


def check_lengths(lengths: Any, window: int | None) -> None:
    """lm-eval's `max_seq_lengths` (the token lengths synthetic tasks size samples to): positive
    integers that fit the served window, where it is known."""
    if not isinstance(lengths, list) or not lengths:
        raise ValueError(f"max_seq_lengths must be a non-empty list of token counts; got {lengths!r}")
    bad = [n for n in lengths if isinstance(n, bool) or not isinstance(n, int) or n <= 0]
    if bad:
        raise ValueError(f"max_seq_lengths must be positive integers; got {bad}")
    too_long = [n for n in lengths if window is not None and n > window]
    if too_long:
        raise ValueError(f"max_seq_lengths {too_long} exceed the model's window of {window} tokens")


def task_metadata(cfg: RunConfig) -> dict[str, Any]:
    """lm-eval task metadata: task defaults, then --metadata, then --data, then the settings that
    depend on the model (truncation budget, tokenizer)."""
    spec = get_task(cfg.task)
    # Resolved once here, so the config records what was used ("auto" becomes "hub" or "sample").
    metadata = {**spec.default_metadata, **cfg.metadata, "data": spec.resolve_data(cfg.data)}
    engine = get_engine(cfg.engine)
    if spec.truncates_prompt and "max_len" not in metadata:
        window = model_window(cfg, engine)
        if window is None:
            raise ValueError(f"{cfg.task} truncates prompts to the model's window: give --max-model-len")
        max_gen = int(cfg.gen_kwargs.get("max_gen_toks", spec.default_max_gen_toks))
        room = window - max_gen - CHAT_TEMPLATE_HEADROOM
        metadata["max_len"] = min(room, spec.official_max_len) if spec.official_max_len else room
        metadata.setdefault("tokenizer", engine.tokenizer(resolve_model(engine, engine_options(cfg))))
    if spec.sized_by_tokenizer:
        check_lengths(metadata.get("max_seq_lengths"), model_window(cfg, engine))
        if "tokenizer" not in metadata:
            model = resolve_model(engine, engine_options(cfg))
            metadata["tokenizer"] = loadable_tokenizer(engine.tokenizer(model))
    if metadata.get("max_len") is not None and metadata["max_len"] <= 0:
        raise ValueError(
            f"prompt budget max_len={metadata['max_len']} <= 0: raise --max-model-len or lower max_gen_toks"
        )
    return metadata


def load_tasks(cfg: RunConfig, metadata: dict[str, Any]) -> dict[str, Any]:
    """lm-eval Task objects for this run, by lm-eval task name, in the benchmark's order."""
    import lm_eval.tasks as lm_eval_tasks
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    spec = get_task(cfg.task)
    names = spec.lm_eval_tasks(metadata)
    builtin = [str(Path(lm_eval_tasks.__file__).parent / folder) for folder in spec.builtin_folders]
    manager = TaskManager(
        include_path=[str(tasks_path()), *builtin], include_defaults=False, metadata=metadata
    )
    overrides = spec.task_overrides(metadata)
    # A task with overrides is loaded as its own YAML's config with them on top (lm-eval's inline form).
    specs = [
        {**load_yaml(manager.task_index[n].yaml_path), **overrides[n]} if n in overrides else n for n in names
    ]
    if spec.sized_by_tokenizer:
        # lm-eval's RULER builders draw needles, keys and positions from Python's global `random`:
        # seeded, every run (and every --resume) of one seed sees the same documents, so dense and
        # multipole runs are paired sample by sample.
        random.seed(cfg.seed)
    loaded = manager.load(specs)["tasks"]
    return {name: loaded[name] for name in names}


def with_answer_prefix(messages: list[dict[str, str]], task, doc: dict[str, Any]) -> list[dict[str, str]]:
    """The task's `gen_prefix` as the assistant's started reply, which the engine continues (lm-eval
    renders it so in chat mode); the output, and so the score, is the continuation alone."""
    prefix = task.doc_to_prefix(doc)
    return [*messages, {"role": "assistant", "content": prefix}] if prefix else messages


def multipole_env() -> dict[str, str]:
    """Multipole's settings (budget, dense_below, ...): it reads them from the environment, in this
    process (hf) or in the server it launches."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("MULTIPOLE_")}


def check_resumable(saved: dict[str, Any], cfg: RunConfig) -> None:
    current = asdict(cfg)
    changed = [
        f"{k}: {saved['run'].get(k)!r} -> {current.get(k)!r}"
        for k in RESUME_KEYS
        if saved["run"].get(k) != current.get(k)
    ]
    saved_env = saved.get("multipole_env", {})  # runs from before it was recorded: none assumed
    if saved_env != multipole_env():
        changed.append(f"MULTIPOLE_* environment: {saved_env} -> {multipole_env()}")
    if changed:
        raise ValueError(
            f"--resume needs the same settings as the original run; changed: {', '.join(changed)}"
        )


@contextlib.contextmanager
def _judge(cfg: RunConfig, target: ChatClient, run: results.RunDir, info: dict[str, Any]):
    """The judge endpoint this run asks: none, the target itself, a second launched server, or a URL."""
    if cfg.judge == "none":
        yield None
        return
    cache = Path(cfg.judge_cache) if cfg.judge_cache else run.path.parent / ".judge_cache"
    base = {"seed": cfg.seed}
    if cfg.judge == "self":
        yield Judge(target, cache, base, cfg.judge_max_tokens)
        return
    if cfg.judge == "launch":
        opts = EngineOptions(
            model=cfg.judge_model or cfg.model,
            attention_backend=cfg.judge_attention_backend,
            max_model_len=cfg.max_model_len,
            seed=cfg.seed,
            server_args=list(cfg.judge_server_args),
        )
        with open_endpoint(
            cfg.engine,
            opts,
            run.file(results.JUDGE_LOG),
            timeout_s=cfg.server_timeout_s,
            on_launch=lambda cmd: info.__setitem__("judge_command", cmd),
        ) as client:
            yield Judge(client, cache, base, cfg.judge_max_tokens)
        return
    client = ChatClient(cfg.judge, model=cfg.judge_model)
    yield Judge(client, cache, base, cfg.judge_max_tokens)


def _record(
    task_name: str,
    index: int,
    key: str,
    messages: list,
    completion,
    seconds: float,
    parsed: dict[str, Any],
    utils,
    doc: dict[str, Any],
) -> dict[str, Any]:
    return {
        "key": key,
        "task": task_name,
        "doc_index": index,
        "prompt_hash": digest(messages),
        "output": completion.text,
        "finish_reason": completion.finish_reason,
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": completion.completion_tokens,
        "seconds": round(seconds, 3),
        "gold": utils.gold(doc),
        "groups": utils.groups(doc),
        **parsed,
    }


def execute(cfg: RunConfig, run: results.RunDir, resume: bool = False, progress: bool = True) -> int:
    """Run (or continue) the evaluation; returns how many samples this call added."""
    spec = get_task(cfg.task)
    utils = spec.utils()
    if not spec.judged and cfg.judge != "none":
        raise ValueError(f"{cfg.task} is scored by string match and has no judge step: drop --judge")
    if run.exists() and not resume:
        raise FileExistsError(
            f"{run.path} already holds a run: pass --resume to continue it, or a new --run-id"
        )
    if resume:
        if not run.exists():
            raise FileNotFoundError(f"--resume: no run at {run.path}")
        check_resumable(run.read_json(results.CONFIG), cfg)
    run.path.mkdir(parents=True, exist_ok=True)
    metadata = task_metadata(cfg)
    skipped = spec.skipped_tasks(metadata)
    for name, reason in skipped.items():
        log.warning("skipped %s: %s", name, reason)
    tasks = load_tasks(cfg, metadata)
    done = {r["key"] for r in run.samples()}
    info: dict[str, Any] = {
        "run": asdict(cfg),
        "task_metadata": metadata,
        "lm_eval_tasks": list(tasks),
        "skipped_tasks": skipped,
        "multipole_env": multipole_env(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if resume:
        info = {**run.read_json(results.CONFIG), "resumed": info["started"], "run": asdict(cfg)}
    work = []
    for name, task in tasks.items():
        docs = list(task.eval_docs)
        for index, doc in enumerate(docs[: cfg.limit] if cfg.limit else docs):
            key = f"{name}:{utils.sample_key(doc)}"
            if key not in done:
                work.append((name, task, index, key, doc))
    total = len(work) + len(done)
    run.write_json(results.CONFIG, info)
    added = 0
    opts = engine_options(cfg)
    with (
        open_endpoint(
            cfg.engine,
            opts,
            run.file(results.SERVER_LOG),
            url=cfg.url,
            timeout_s=cfg.server_timeout_s,
            on_launch=lambda cmd: info.__setitem__("server_command", cmd),
        ) as target,
        _judge(cfg, target, run, info) as judge,
    ):
        info["served_model"] = target.model
        info["judge_model_served"] = judge.client.model if judge else None
        run.write_json(results.CONFIG, info)
        bar = tqdm(total=total, initial=len(done), desc=cfg.task, unit="sample", disable=not progress)
        for name, task, index, key, doc in work:
            params = openai_params({**task.config.generation_kwargs, **cfg.gen_kwargs, "seed": cfg.seed})
            messages = with_answer_prefix(utils.chat_messages(doc, task.doc_to_text(doc)), task, doc)
            start = time.monotonic()
            completion = target.chat(messages, **params)
            parsed = parse_output(utils, doc, completion.text, judge)
            run.append_sample(
                _record(name, index, key, messages, completion, time.monotonic() - start, parsed, utils, doc)
            )
            added += 1
            bar.update(1)
        bar.close()
    return added
