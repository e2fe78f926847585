"""LongBench v2, generative with chain of thought, following the official protocol (THUDM/LongBench, v2).

Protocol, as the official `pred.py --cot` and `result.py` define it (docs/harness.md maps each rule
to the code and its test):
  1. The prompt is the official 0-shot CoT template filled with the context, question and choices.
  2. The whole prompt is truncated in the middle to `max_len` tokens of the target model's tokenizer,
     counted as `encode()` counts them (special tokens included): the first max_len//2 tokens and the
     last max_len - max_len//2, decoded without special tokens. Officially max_len is 120,000 for
     128K-context models (config/model2maxlen.json); `mpeval` uses that, or less when the served
     window leaves less room.
  3. The model writes its reasoning (official: temperature 0.1, 1024 new tokens).
  4. The answer step sends the official answer template with that reasoning ($COT$) and no context
     (temperature 0.1, 128 new tokens); its reply is parsed with the official pattern "The correct
     answer is (X)", and when that does not parse the item is wrong. In `mpeval` this step is the
     judge's job (by default the target model itself, which is exactly the official set-up).
  5. Accuracy overall, by difficulty (easy/hard) and by length (short/medium/long), in percent; an
     unparsed answer counts as wrong (the official `compensated=False`), and an item whose reasoning
     or answer came back empty is left out, as the official script skips it.
Run directly by lm-eval (one generation, no answer step), the pattern is applied to the reasoning
itself: those scores are labelled as not comparable (the task's README says so).
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import Any

import datasets

from harness.tasks import data as data_sources

HUB_ID = "THUDM/LongBench-v2"
HUB_SPLIT = "train"
SAMPLE = Path(__file__).parent / "samples" / "longbench_v2.jsonl"
FIELDS = (
    "_id",
    "domain",
    "sub_domain",
    "difficulty",
    "length",
    "question",
    "choice_A",
    "choice_B",
    "choice_C",
    "choice_D",
    "answer",
)

# The official templates, verbatim (prompts/0shot_cot.txt and prompts/0shot_cot_ans.txt).
_QUESTION = (
    "What is the correct answer to this question: $Q$\nChoices:\n"
    "(A) $C_A$\n(B) $C_B$\n(C) $C_C$\n(D) $C_D$\n\n"
)
COT_TEMPLATE = (
    "Please read the following text and answer the questions below.\n\n<text>\n$DOC$\n</text>\n\n"
    + _QUESTION
    + "Let\u2019s think step by step:"
)
ANSWER_TEMPLATE = (
    "Please read the following text and answer the questions below.\n\n"
    "The text is too long and omitted here.\n\n" + _QUESTION + "Let\u2019s think step by step: $COT$\n\n"
    "Based on the above, what is the single, most likely answer choice? Format your response as follows: "
    '"The correct answer is (insert answer here)".'
)
_ANSWER_PATTERNS = (
    re.compile(r"The correct answer is \(([A-D])\)"),
    re.compile(r"The correct answer is ([A-D])"),
)
BREAKDOWN = {
    "easy": ("difficulty", "easy"),
    "hard": ("difficulty", "hard"),
    "short": ("length", "short"),
    "medium": ("length", "medium"),
    "long": ("length", "long"),
}


def fill(template: str, doc: dict[str, Any], context: str = "", cot: str = "") -> str:
    """Fill an official template the way the official script does (fields stripped, $COT$ as given)."""
    out = template.replace("$DOC$", context.strip()).replace("$Q$", doc["question"].strip())
    for letter in "ABCD":
        out = out.replace(f"$C_{letter}$", doc[f"choice_{letter}"].strip())
    return out.replace("$COT$", cot)


@cache
def load_tokenizer(spec: str):
    """A Hugging Face tokenizer from a hub id / directory, or from a .gguf file."""
    from transformers import AutoTokenizer

    path = Path(spec)
    if path.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return AutoTokenizer.from_pretrained(spec, trust_remote_code=True)


OFFICIAL_MAX_LEN = 120_000  # config/model2maxlen.json, every 128K-context model
ANSWER_STEP = {"max_gen_toks": 128, "temperature": 0.1, "do_sample": True}  # pred.py, the second call


def truncate_middle(text: str, tokenizer, max_len: int) -> str:
    """Keep the first and last halves of `max_len` tokens, counted with special tokens as the
    official script's `tokenizer.encode(prompt)` counts them."""
    ids = tokenizer.encode(text)
    if len(ids) <= max_len:
        return text
    head = max_len // 2
    return tokenizer.decode(ids[:head] + ids[len(ids) - (max_len - head) :], skip_special_tokens=True)


def _rows(source: str) -> datasets.Dataset:
    if source == "hub":
        return datasets.load_dataset(HUB_ID, split=HUB_SPLIT)
    path = SAMPLE if source == "sample" else data_sources.local_file(Path(source), "longbench_v2")
    return data_sources.read_local(path)


def load(data: str = "auto", tokenizer: str | None = None, max_len: int | None = None, **_: Any) -> dict:
    """lm-eval `custom_dataset`: rows with the finished, truncated CoT prompt in `prompt`.

    Metadata keys: `data` (see harness.tasks.data), `tokenizer` (hub id, directory or .gguf of the
    target model) and `max_len` (prompt budget in tokens). Without both, prompts are not truncated.
    """
    if (tokenizer is None) != (max_len is None):
        raise ValueError("longbench_v2: give both `tokenizer` and `max_len` metadata, or neither")
    tok = load_tokenizer(tokenizer) if tokenizer else None
    rows = []
    for doc in _rows(data_sources.resolve_source(data)):
        prompt = fill(COT_TEMPLATE, doc, context=doc["context"])
        if tok is not None:
            prompt = truncate_middle(prompt, tok, int(max_len))
        rows.append({**{k: doc[k] for k in FIELDS}, "prompt": prompt})
    return {"test": datasets.Dataset.from_list(rows)}


def chat_messages(doc: dict[str, Any], text: str) -> list[dict[str, str]]:
    """The official script sends the prompt as one user turn."""
    return [{"role": "user", "content": text}]


def extract_choice(text: str) -> str | None:
    """The official answer pattern, asterisks removed first (markdown bold)."""
    text = text.replace("*", "")
    for pattern in _ANSWER_PATTERNS:
        match = pattern.search(text)
        if match:
            return match.group(1)
    return None


def sample_key(doc: dict[str, Any]) -> str:
    return doc["_id"]


def gold(doc: dict[str, Any]) -> str:
    return doc["answer"]


def regex_answer(doc: dict[str, Any], output: str) -> str | None:
    """Our labelled extra (and the only parse without an answer step): the official pattern applied
    to the reasoning itself."""
    return extract_choice(output.strip())


def judge_prompt(doc: dict[str, Any], output: str) -> str:
    """The official answer step: the reasoning, no context, asked for 'The correct answer is (X)'."""
    return fill(ANSWER_TEMPLATE, doc, cot=output.strip())


def parse_judge_reply(doc: dict[str, Any], reply: str) -> str | None:
    return extract_choice(reply.strip())


def official_parser(doc: dict[str, Any]) -> str:
    """The official score reads the answer step's reply (the judge's here), with no fallback."""
    return "judge"


def judge_params(doc: dict[str, Any]) -> dict[str, Any]:
    return dict(ANSWER_STEP)


def comparability(config: dict[str, Any]) -> list[str]:
    """Why a run's headline is not the official protocol's number (empty: it is)."""
    run, metadata = config["run"], config["task_metadata"]
    reasons = []
    if run.get("judge") == "none":
        reasons.append("no answer step: the pattern is applied to the reasoning itself")
    elif config.get("judge_model_served") != config.get("served_model"):
        reasons.append(f"answer step by {config.get('judge_model_served')}, not the target model")
    if run.get("judge_max_tokens") not in (None, ANSWER_STEP["max_gen_toks"]):
        reasons.append(f"answer step limited to {run['judge_max_tokens']} tokens, not 128")
    if run.get("limit"):
        reasons.append(f"--limit {run['limit']}: part of the data set")
    if run.get("gen_kwargs"):
        reasons.append(f"generation settings changed: {run['gen_kwargs']}")
    if metadata.get("max_len") not in (None, OFFICIAL_MAX_LEN):
        reasons.append(f"prompts truncated to {metadata['max_len']} tokens, not {OFFICIAL_MAX_LEN}")
    return reasons


def is_correct(doc: dict[str, Any], answer: str | None) -> bool:
    return answer is not None and answer == doc["answer"]


def groups(doc: dict[str, Any]) -> dict[str, str]:
    """Fields the report breaks accuracy down by."""
    return {"difficulty": doc["difficulty"], "length": doc["length"]}


def summarize(records: list[dict[str, Any]], key: str = "correct") -> dict[str, Any]:
    """Official breakdown, in percent rounded to 0.1 as result.py prints it; n per bucket alongside.
    Items whose reasoning or answer step came back empty are left out (the official script skips
    them); `n_empty` counts them."""
    kept = [r for r in records if r["output"] != "" and r.get("judge_reply") != ""]
    out: dict[str, Any] = {
        "n": len(kept),
        "n_empty": len(records) - len(kept),
        "overall": _pct([r[key] for r in kept]),
    }
    records = kept
    for name, (field, value) in BREAKDOWN.items():
        bucket = [r[key] for r in records if r["groups"][field] == value]
        out[name] = _pct(bucket)
        out[f"n_{name}"] = len(bucket)
    return out


def _pct(flags: list[bool]) -> float | None:
    return round(100.0 * sum(flags) / len(flags), 1) if flags else None


# ---- lm-eval hooks (direct `lm_eval --include_path` use: one generation, regex on the reasoning) ----


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, Any]:
    correct = is_correct(doc, regex_answer(doc, results[0]))
    out: dict[str, Any] = {"acc": float(correct)}
    for name, (field, value) in BREAKDOWN.items():
        out[f"acc_{name}"] = (doc[field] == value, correct)
    return out


def bucket_mean(items: list[tuple[bool, bool]]) -> float:
    """Mean correctness over the docs that fall in the bucket (first element True)."""
    picked = [correct for inside, correct in items if inside]
    return sum(picked) / len(picked) if picked else float("nan")


# ---- presentation (used by harness.report) ----

_COLUMNS = (
    ("Overall", "overall"),
    ("Easy", "easy"),
    ("Hard", "hard"),
    ("Short", "short"),
    ("Medium", "medium"),
    ("Long", "long"),
)


def table_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One row: n and the official breakdown in percent."""
    return [{"n": summary["n"], **{title: summary[key] for title, key in _COLUMNS}}]


def headline(summary: dict[str, Any]) -> dict[str, float | None]:
    return {"overall": summary["overall"]}


def plot_data(summary: dict[str, Any]) -> dict[str, Any]:
    titles = [title for title, _ in _COLUMNS]
    values = [summary[key] if summary[key] is not None else float("nan") for _, key in _COLUMNS]
    return {"kind": "bar", "xlabel": "", "ylabel": "accuracy (%)", "series": {"accuracy": (titles, values)}}
