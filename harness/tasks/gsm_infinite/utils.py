"""GSM-Infinite (symbolic / medium / hard), following the authors' protocol (Infini-AI-Lab/gsm_infinite).

Protocol (their config.sh, pred/ and eval_*.py; docs/harness.md maps each rule to the code and test):
  * Data: hub ids ``InfiniAILab/gsm_infinite_{subset}_{length}`` with length in 0, 8k, 16k, 32k, 64k, 128k
    and one split ``ops_{N}`` per operation count. The prompt is the row's ``messages`` (the authors
    ship the finished chat prompt in the data), sent as is.
  * Selection (metadata ``protocol: official``, the default): symbolic ops 1-50 at 0 context, 1-30 at
    8k, 1-20 at 16k, 1-10 at 32k, the first 100 rows of each; medium and hard ops 2-30, of each op
    min(200, rows) split over the template mix (crazy_zootopia 40 % + 40 %, the two others 5 % + 5 %,
    forward and reverse), the first rows of each. ``protocol: all`` takes every split and row.
  * Generation: symbolic sampled at temperature 1.0, medium and hard greedy; 4,096 new tokens.
  * Medium / hard: the gold answer is the integer after "Answer: " in ``solution``; the official score
    is the authors' ordered keyword search ("answer: ", "solution: ", "oxed{", ... "is ") over the
    lower-cased reply, which must give an integer equal to the gold one. A judge model's reading is
    scored beside it, labelled, never as the headline.
  * Symbolic: an extraction model (officially Qwen/Qwen2.5-7B-Instruct, greedy, 2,048 tokens) lists,
    with the authors' prompt, the variables the reply (after ``</think>``) says equal the queried
    value; correct when the set of ``V<digits>`` names in its reply equals ``answer_list``. Here that model
    is the judge; a run extracted by another model is marked not comparable. A deterministic parser
    of the reply's conclusion is kept as a labelled extra (and the only one without a judge).
  * Scores: accuracy per operation count, every sample in the denominator, and the summary score of
    the authors' leaderboard (app.py): the area under the accuracy-vs-op curve (trapezoid rule over
    the ops run) times 100, per subset and length. Also reported, as in their tables: the first op
    with accuracy below 50% and below 10%, and mean accuracy for op <= 30.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import datasets

from harness.tasks import data as data_sources

SUBSETS = ("symbolic", "medium", "hard")
LENGTHS = ("0", "8k", "16k", "32k", "64k", "128k")
SAMPLES = Path(__file__).parent / "samples"

_VAR = re.compile(r"\bV\d+\b")
_NONE = re.compile(r"\bnone\b", re.IGNORECASE)
# The authors' keyword order for medium/hard: (keyword, end marker or None for "digits only", search last?)
_KEYWORDS = (
    ("answer: ", ".", False),
    ("solution: ", ".", False),
    ("oxed{", "}", True),
    ("**answer:** ", ".", False),
    ("**answer: ", "**", False),
    ("final answer: answer: ", ".", False),
    ("\nanswer: ", ".", False),
    ("\\text{answer: } ", None, False),
    ("is ", ".", True),
    ("answer: ", "\n", False),
)


# config.sh: the ops run per subset and context length, rows per op, and medium/hard's template mix.
OFFICIAL_OPS = {
    "symbolic": {"0": range(1, 51), "8k": range(1, 31), "16k": range(1, 21), "32k": range(1, 11)},
    **{sub: {length: range(2, 31) for length in ("0", "8k", "16k", "32k")} for sub in ("medium", "hard")},
}
OFFICIAL_ROWS_PER_OP = {"symbolic": 100, "medium": 200, "hard": 200}
TEMPLATE_MIX = (
    ("crazy_zootopia", "normalforward", 0.4),
    ("movie_festival_awards", "normalforward", 0.05),
    ("teachers_in_school", "normalforward", 0.05),
    ("crazy_zootopia", "forwardreverse", 0.4),
    ("movie_festival_awards", "forwardreverse", 0.05),
    ("teachers_in_school", "forwardreverse", 0.05),
)
OFFICIAL_EXTRACTOR = "Qwen2.5-7B-Instruct"  # eval_symbolic.py, at temperature 0 with 2,048 tokens
PROTOCOLS = ("official", "all")


def hub_id(subset: str, length: str) -> str:
    return f"InfiniAILab/gsm_infinite_{subset}_{length}"


def _op_of_split(name: str) -> int | None:
    match = re.fullmatch(r"ops_(\d+)", name)
    return int(match.group(1)) if match else None


def _rows(subset: str, length: str, source: str, ops: set[int] | None) -> list[dict[str, Any]]:
    if source == "hub":
        splits = [s for s in datasets.get_dataset_split_names(hub_id(subset, length)) if _op_of_split(s)]
        wanted = [s for s in splits if ops is None or _op_of_split(s) in ops]
        rows = [row for s in wanted for row in datasets.load_dataset(hub_id(subset, length), split=s)]
    else:
        folder = SAMPLES if source == "sample" else Path(source)
        table = data_sources.read_local(data_sources.local_file(folder, f"gsm_infinite_{subset}_{length}"))
        rows = [row for row in table if ops is None or row["op"] in ops]
    if not rows:
        raise ValueError(f"gsm_infinite_{subset}_{length}: no rows for ops {sorted(ops) if ops else 'any'}")
    return rows


def official_selection(subset: str, length: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows the authors' scripts run (module doc): per op, the first rows (symbolic), or the
    first rows of each template and mode in the mix's shares (medium, hard), of the op's split.
    Lengths without an official op range (64k, 128k) keep every op."""
    by_op: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_op[int(row["op"])].append(row)
    allowed = OFFICIAL_OPS[subset].get(length)
    chosen = []
    for op, split in sorted(by_op.items()):
        if allowed is not None and op not in allowed:
            continue
        total = min(OFFICIAL_ROWS_PER_OP[subset], len(split))
        if subset == "symbolic":
            chosen += split[:total]
            continue
        for template, mode, share in TEMPLATE_MIX:
            matching = [r for r in split if r.get("template") == template and r.get("mode") == mode]
            chosen += matching[: int(total * share)]
    return chosen


def load(
    subset: str,
    data: str = "auto",
    lengths: list[str] | str = ("0",),
    ops: list[int] | None = None,
    protocol: str = "official",
    **_: Any,
) -> dict:
    """lm-eval `custom_dataset`. Metadata keys: `data`, `lengths` (list of 0/8k/...), `ops` (list of
    ints, within the protocol's selection), `protocol` (official | all: see the module doc).

    Rows are interleaved round-robin over (length, op) so that `--limit N` covers every op and length.
    """
    lengths = [lengths] if isinstance(lengths, str) else list(lengths)
    for length in lengths:
        if str(length) not in LENGTHS:
            raise ValueError(f"gsm_infinite: unknown length {length!r}; choose from {', '.join(LENGTHS)}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"gsm_infinite: unknown protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}")
    source = data_sources.resolve_source(data)
    keyed = []
    for li, length in enumerate(lengths):
        seen: dict[int, int] = defaultdict(int)
        rows = _rows(subset, str(length), source, set(ops) if ops else None)
        if protocol == "official":
            rows = official_selection(subset, str(length), rows)
        for row in rows:
            rank = seen[row["op"]]
            seen[row["op"]] += 1
            keyed.append(((rank, li, row["op"]), {**row, "subset": subset, "ctx_length": str(length)}))
    keyed.sort(key=lambda item: item[0])
    rows = [row for _, row in keyed]
    for row in rows:
        row.setdefault("template", "-")
        row.setdefault("mode", "-")
    return {"test": datasets.Dataset.from_list(rows)}


def doc_to_text(doc: dict[str, Any]) -> str:
    """For plain lm-eval (one user turn): the message contents joined; `mpeval` sends `messages` as is."""
    return "\n\n".join(m["content"] for m in doc["messages"])


def chat_messages(doc: dict[str, Any], text: str) -> list[dict[str, str]]:
    return [{"role": m["role"], "content": m["content"]} for m in doc["messages"]]


def sample_key(doc: dict[str, Any]) -> str:
    return f"{doc['subset']}/{doc['ctx_length']}/op{doc['op']}/{doc['template']}/{doc['mode']}/{doc['id']}"


def solution_answer(solution: str) -> int:
    """The gold integer: what follows "Answer: " in the solution, up to the next period."""
    start = solution.find("Answer: ")
    if start < 0:
        raise ValueError(f"solution has no 'Answer: ': {solution[-200:]!r}")
    start += len("Answer: ")
    end = solution.find(".", start)
    return int(solution[start:] if end < 0 else solution[start:end])


def gold(doc: dict[str, Any]) -> str:
    if doc["subset"] == "symbolic":
        return ", ".join(sorted(doc["answer_list"]))
    return str(solution_answer(doc["solution"]))


def _final_part(reply: str) -> str:
    return reply.split("</think>")[-1].strip()


def keyword_integer(reply: str) -> int | None:
    """The authors' medium/hard parser: first keyword (in their order) followed by an integer."""
    text = re.sub(".\x08", "b", reply).lower()
    for keyword, end, last in _KEYWORDS:
        begin = text.rfind(keyword) if last else text.find(keyword)
        if begin < 0:
            continue
        start = begin + len(keyword)
        if end is None:
            stop = start
            while stop < len(text) and text[stop].isdigit():
                stop += 1
        else:
            stop = text.find(end, start)
            stop = len(text) if stop < 0 else stop
        try:
            return int(text[start:stop])
        except ValueError:
            continue
    return None


def symbolic_variables(reply: str) -> str | None:
    """Deterministic fallback for symbolic: the variables named in the reply's conclusion.

    The conclusion is the text after the last "answer" (case-insensitive), else the last non-empty
    line. Returns the sorted variables joined by ", ", "" when it says none, None when it says nothing.
    """
    text = _final_part(reply)
    cut = text.lower().rfind("answer")
    if cut >= 0:
        tail = text[cut:]
    else:
        lines = [line for line in text.splitlines() if line.strip()]
        tail = lines[-1] if lines else ""
    found = sorted(set(_VAR.findall(tail)))
    if found:
        return ", ".join(found)
    return "" if _NONE.search(tail) else None


def regex_answer(doc: dict[str, Any], output: str) -> str | None:
    if doc["subset"] == "symbolic":
        return symbolic_variables(output)
    value = keyword_integer(output)
    return None if value is None else str(value)


def _symbolic_judge_prompt(value: Any, reply: str) -> str:
    # The authors' extraction prompt (pred/eval_symbolic.py), whitespace included.
    lines = [
        "",
        f"    Carefully read the input text below and extract the variable names that are mentioned as being "
        f"equal to {value}. If multiple variables are listed, separate them with commas.",
        "    ",
        f"    If value {value} is not mentioned, you can safely assume that they are all equal to {value}. "
        "If there are no such variables, just output None.",
        "",
        "    Only output the variable names, not the values or any other text.",
        "    ",
        "    Examples:",
        '    1. input: "V0, V3, V4", output: "V0, V3, V4"',
        f'    2. input: "Variable V2 is equal to {value} in the assignment statement '
        '\'assign V2 = V1 - 1.\'.", output: "V2"',
        '    3. input: "The answer is: V1, V2.", output: "V1, V2"',
        f'    4. input: "There are no variables equal to {value}.", output: "None"',
        "",
        "    Input:",
        f"    {reply}",
        "",
        "    Output:",
        "    ",
    ]
    return "\n".join(lines)


_REALISTIC_JUDGE = (
    "Below is a model's step-by-step solution to a math word problem. What final answer does the solution "
    "give to the question? Reply with the integer only, or None if the solution gives no final answer.\n\n"
    "Solution:\n{reply}\n\nFinal answer:"
)


def judge_prompt(doc: dict[str, Any], output: str) -> str:
    if doc["subset"] == "symbolic":
        return _symbolic_judge_prompt(doc["answer_q"], _final_part(output))
    return _REALISTIC_JUDGE.format(reply=_final_part(output))


def parse_judge_reply(doc: dict[str, Any], reply: str) -> str | None:
    """Symbolic: the set of V-names (official: regex over the extraction); others: the first integer."""
    if doc["subset"] == "symbolic":
        found = sorted(set(_VAR.findall(reply)))
        if found:
            return ", ".join(found)
        return "" if _NONE.search(reply) else None
    match = re.search(r"-?\d+", reply.replace(",", ""))
    return match.group(0) if match else None


def official_parser(doc: dict[str, Any]) -> str:
    """What the official score reads: the extraction model's reply (symbolic), the keyword search."""
    return "judge" if doc["subset"] == "symbolic" else "regex"


def judge_params(doc: dict[str, Any]) -> dict[str, Any]:
    """The judge call's settings: the official extraction's for symbolic; ours for the labelled
    judge column of medium and hard."""
    return {"max_gen_toks": 2048 if doc["subset"] == "symbolic" else 128, "do_sample": False}


def comparability(config: dict[str, Any]) -> list[str]:
    """Why a run's headline is not the official protocol's number (empty: it is)."""
    run, metadata = config["run"], config["task_metadata"]
    reasons = []
    if metadata.get("protocol", "official") != "official" or metadata.get("ops"):
        reasons.append("ops or rows differ from the official selection")
    if run.get("limit"):
        reasons.append(f"--limit {run['limit']}: part of the official rows")
    if run.get("gen_kwargs"):
        reasons.append(f"generation settings changed: {run['gen_kwargs']}")
    unofficial = [str(n) for n in metadata.get("lengths", []) if str(n) not in OFFICIAL_OPS["medium"]]
    if unofficial:
        reasons.append(f"lengths without an official op range: {', '.join(unofficial)}")
    if "symbolic" in metadata.get("subsets", ["symbolic"]):
        extractor = config.get("judge_model_served")
        if run.get("judge") == "none" or extractor is None:
            reasons.append("symbolic: no extraction model (scored by our deterministic parser)")
        elif Path(str(extractor)).name != OFFICIAL_EXTRACTOR:
            reasons.append(f"symbolic: extracted by {extractor}, not {OFFICIAL_EXTRACTOR}")
        if run.get("judge_max_tokens") not in (None, 2048):
            reasons.append(f"symbolic: extraction limited to {run['judge_max_tokens']} tokens, not 2048")
    return reasons


def is_correct(doc: dict[str, Any], answer: str | None) -> bool:
    if answer is None:
        return False
    if doc["subset"] == "symbolic":
        return set(filter(None, answer.split(", "))) == set(doc["answer_list"])
    return int(answer) == solution_answer(doc["solution"])


def groups(doc: dict[str, Any]) -> dict[str, Any]:
    return {"subset": doc["subset"], "length": doc["ctx_length"], "op": int(doc["op"])}


def curve_scores(acc_by_op: dict[int, float]) -> dict[str, Any]:
    """The authors' summary numbers for one accuracy-vs-op curve."""
    ops = sorted(acc_by_op)
    accs = [acc_by_op[op] for op in ops]
    auc = sum((ops[i + 1] - ops[i]) * (accs[i] + accs[i + 1]) / 2 for i in range(len(ops) - 1)) * 100
    upto30 = [acc_by_op[op] for op in ops if op <= 30]
    return {
        "auc": round(auc, 2),
        "first_op_below_50": next((op for op in ops if acc_by_op[op] < 0.5), None),
        "first_op_below_10": next((op for op in ops if acc_by_op[op] < 0.1), None),
        "avg_acc_op_le_30": round(sum(upto30) / len(upto30), 4) if upto30 else None,
    }


def summarize(records: list[dict[str, Any]], key: str = "correct") -> dict[str, Any]:
    """Per (subset, length): n, accuracy, accuracy per op and the curve scores; AUC averaged per length."""
    by_curve: dict[tuple[str, str], dict[int, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        g = r["groups"]
        by_curve[(g["subset"], g["length"])][int(g["op"])].append(bool(r[key]))
    curves = {}
    for (subset, length), per_op in sorted(by_curve.items()):
        acc_by_op = {op: sum(v) / len(v) for op, v in sorted(per_op.items())}
        flat = [c for v in per_op.values() for c in v]
        curves[f"{subset}/{length}"] = {
            "subset": subset,
            "length": length,
            "n": len(flat),
            "acc": round(sum(flat) / len(flat), 4),
            "acc_by_op": {str(op): round(a, 4) for op, a in acc_by_op.items()},
            "n_by_op": {str(op): len(v) for op, v in sorted(per_op.items())},
            **curve_scores(acc_by_op),
        }
    lengths = sorted({c["length"] for c in curves.values()}, key=LENGTHS.index)
    average = {
        length: round(
            sum(c["auc"] for c in curves.values() if c["length"] == length)
            / sum(1 for c in curves.values() if c["length"] == length),
            2,
        )
        for length in lengths
    }
    flat = [bool(r[key]) for r in records]
    return {
        "n": len(flat),
        "acc": round(sum(flat) / len(flat), 4) if flat else None,
        "curves": curves,
        "average_auc_by_length": average,
    }


# ---- lm-eval hooks (direct `lm_eval --include_path` use: deterministic parser, no judge) ----


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, Any]:
    correct = is_correct(doc, regex_answer(doc, results[0]))
    return {"acc": float(correct), "auc": (doc["ctx_length"], int(doc["op"]), correct)}


def auc_metric(items: list[tuple[str, int, bool]]) -> float:
    """Area under accuracy-vs-op (x100), averaged over the context lengths evaluated."""
    by_length: dict[str, dict[int, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for length, op, correct in items:
        by_length[length][op].append(correct)
    aucs = [
        curve_scores({op: sum(v) / len(v) for op, v in per_op.items()})["auc"]
        for per_op in by_length.values()
    ]
    return sum(aucs) / len(aucs)


# ---- presentation (used by harness.report) ----


def table_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (subset, length) curve: accuracy, the authors' curve scores, accuracy per op."""
    rows = []
    for curve in summary["curves"].values():
        rows.append(
            {
                "subset": curve["subset"],
                "length": curve["length"],
                "n": curve["n"],
                "acc": curve["acc"],
                "AUC": curve["auc"],
                "1st op <50%": curve["first_op_below_50"],
                "1st op <10%": curve["first_op_below_10"],
                "avg acc op<=30": curve["avg_acc_op_le_30"],
                **{f"op{op}": acc for op, acc in curve["acc_by_op"].items()},
            }
        )
    return rows


def headline(summary: dict[str, Any]) -> dict[str, float | None]:
    return {"acc": summary["acc"], **{f"AUC@{k}": v for k, v in summary["average_auc_by_length"].items()}}


def plot_data(summary: dict[str, Any]) -> dict[str, Any]:
    series = {
        name: ([int(op) for op in c["acc_by_op"]], list(c["acc_by_op"].values()))
        for name, c in summary["curves"].items()
    }
    return {"kind": "line", "xlabel": "operations (op)", "ylabel": "accuracy", "series": series}
