"""The official protocols' scores on frozen, hand-labelled outputs: each expected number is worked
out by hand from the authors' rules (docs/harness.md lists the rules and where they live)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.judge import Judge, parse_output
from harness.runner import RunConfig, task_metadata
from harness.tasks.gsm_infinite import utils as gsm
from harness.tasks.longbench_v2 import utils as lb


@dataclass
class _Reply:
    text: str


class _CannedJudge:
    """A chat client that answers each judge prompt with the reply filed under a word it contains."""

    model = "canned"

    def __init__(self, replies: dict[str, str]):
        self.replies = replies
        self.params: list[dict] = []

    def chat(self, messages, **params):
        self.params.append(params)
        prompt = messages[-1]["content"]
        return _Reply(next(reply for marker, reply in self.replies.items() if marker in prompt))


def _score(utils, cases, replies, tmp_path: Path):
    """(headline correctness, every parsed record) of `cases` [(doc, output)] under a canned judge."""
    judge = Judge(_CannedJudge(replies), tmp_path / "cache", {"seed": 0})
    records = []
    for doc, output in cases:
        parsed = parse_output(utils, doc, output, judge)
        records.append({"output": output, "groups": utils.groups(doc), **parsed})
    return records, judge


def _medium(gold: int, op: int = 2) -> dict:
    return {"subset": "medium", "ctx_length": "0", "op": op, "solution": f"so a = {gold}. Answer: {gold}."}


MEDIUM_CASES = [  # (doc, output, correct by eval_realistic.py's criteriaoutput)
    (_medium(3), "Answer: 3. Later I think answer: 5.", True),  # first "answer: " wins
    (_medium(5), "Answer: 3. Later I think answer: 5.", False),
    (_medium(7), "So \\boxed{4} ... no, \\boxed{7}", True),  # the last "oxed{"
    (_medium(12), "The total is 12.7 apples.", True),  # "is " up to ".": int("12")
    (_medium(-4), "answer: -4.", True),  # negatives parse
    (_medium(1234), "answer: 1,234. The result is 1234.", True),  # "1,234" fails: the next keyword
    (_medium(9), "I could not finish.", False),  # nothing parses: wrong, still counted
    (_medium(9), "", False),  # empty output: wrong, still counted
]


def test_gsm_medium_headline_is_the_keyword_parser_whatever_the_judge_says(tmp_path):
    cases = [(doc, out) for doc, out, _ in MEDIUM_CASES]
    records, judge = _score(gsm, cases, {"Solution": "42"}, tmp_path)  # the judge always says 42
    assert [r["correct"] for r in records] == [c for *_, c in MEDIUM_CASES]
    assert all(r["answer_source"] == "regex" for r in records)
    assert not any(r["correct_judge"] for r in records)  # scored beside it, labelled
    summary = gsm.summarize(records)
    assert summary["n"] == 8 and summary["acc"] == 5 / 8
    assert judge.client.params[0] == {"max_tokens": 128, "temperature": 0.0, "seed": 0}


def _symbolic(answers: list[str], op: int = 3) -> dict:
    return {"subset": "symbolic", "ctx_length": "0", "op": op, "answer_q": 4, "answer_list": answers}


def test_gsm_symbolic_headline_is_the_extraction_set_with_no_fallback(tmp_path):
    cases = [
        (_symbolic(["V1", "V3"]), "reply-a: the answer is V1 and V3"),  # extracted in another order
        (_symbolic(["V1", "V3"]), "reply-b: the answer is V1"),  # a subset: wrong
        (_symbolic(["V2"]), "reply-c: answer: V2"),  # extraction says None: wrong
        (_symbolic(["V2"]), "reply-d: answer: V2"),  # extraction unparsable: wrong, no heuristic
        (_symbolic(["V5"]), "<think>V9</think>reply-e: answer: V5"),  # only text after </think>
    ]
    replies = {"reply-a": "V3, V1", "reply-b": "V1", "reply-c": "None", "reply-d": "I cannot tell."}
    replies["reply-e"] = "V5"
    records, judge = _score(gsm, cases, replies, tmp_path)
    assert [r["correct"] for r in records] == [True, False, False, False, True]
    assert [r["correct_regex"] for r in records] == [True, False, True, True, True]  # the labelled extra
    assert "V9" not in gsm.judge_prompt(*cases[4])
    assert judge.client.params[0] == {"max_tokens": 2048, "temperature": 0.0, "seed": 0}


def _lb(answer: str, difficulty: str = "easy", length: str = "short") -> dict:
    return {"answer": answer, "difficulty": difficulty, "length": length, "question": "Q?"} | {
        f"choice_{c}": c.lower() for c in "ABCD"
    }


def test_longbench_headline_is_the_answer_step_and_empty_items_are_left_out(tmp_path):
    cases = [
        (_lb("B"), "cot-1 The correct answer is (B)"),  # answer step says (B): right
        (_lb("B", "hard"), "cot-2 The correct answer is (B)"),  # answer step unparsed: wrong, no fallback
        (_lb("C", "hard", "long"), "cot-3"),  # bold answer: asterisks removed, right
        (_lb("A"), "cot-4"),  # wrong letter
        (_lb("D", "hard", "medium"), ""),  # empty reasoning: left out
        (_lb("D"), "cot-6"),  # empty answer step: left out
    ]
    replies = {
        "cot-1": "The correct answer is (B)",
        "cot-2": "The correct answer is: B",
        "cot-3": "**The correct answer is (C)**",
        "cot-4": "The correct answer is (D)",
        "Let\u2019s think step by step: \n": "The correct answer is (D)",
        "cot-6": "",
    }
    records, judge = _score(lb, cases, replies, tmp_path)
    assert [r["correct"] for r in records] == [True, False, True, False, True, False]
    summary = lb.summarize(records)
    assert summary["n"] == 4 and summary["n_empty"] == 2
    scores = (summary["overall"], summary["easy"], summary["hard"], summary["long"])
    assert scores == (50.0, 50.0, 50.0, 100.0)
    assert lb.summarize(records, "correct_judge_or_regex")["overall"] == 75.0  # ours: regex fallback
    assert judge.client.params[0] == {"max_tokens": 128, "temperature": 0.1, "seed": 0}


def test_without_a_judge_the_regex_scores_and_the_run_is_not_comparable():
    parsed = parse_output(lb, _lb("B"), "The correct answer is (B)", None)
    assert parsed["answer_source"] == "regex" and parsed["correct"]
    config = {"run": {"judge": "none"}, "task_metadata": {"max_len": 120_000}}
    assert lb.comparability(config) == ["no answer step: the pattern is applied to the reasoning itself"]


def test_comparability_names_every_departure_from_the_official_protocol():
    official = {
        "run": {"judge": "launch", "judge_max_tokens": None, "limit": None, "gen_kwargs": {}},
        "task_metadata": {"subsets": ["symbolic", "medium"], "lengths": ["0", "8k"], "protocol": "official"},
        "judge_model_served": "/models/Qwen2.5-7B-Instruct",
    }
    assert gsm.comparability(official) == []
    other = {
        "run": {"judge": "self", "judge_max_tokens": 128, "limit": 5, "gen_kwargs": {"temperature": 0}},
        "task_metadata": {"subsets": ["symbolic"], "lengths": ["64k"], "protocol": "all"},
        "judge_model_served": "SmolLM2-135M-Instruct",
    }
    reasons = " | ".join(gsm.comparability(other))
    for words in ("official selection", "--limit 5", "generation settings", "64k", "SmolLM2", "128 tokens"):
        assert words in reasons
    lb_run = {"run": {"judge": "launch"}, "task_metadata": {"max_len": 30_000}, "served_model": "m"}
    assert len(lb.comparability({**lb_run, "judge_model_served": "m"})) == 1  # only the truncation
    assert len(lb.comparability({**lb_run, "judge_model_served": "other"})) == 2


def test_official_selection_of_ops_rows_and_templates():
    def rows(op, template, mode, n):
        return [{"op": op, "template": template, "mode": mode, "id": i} for i in range(n)]

    split = rows(5, "crazy_zootopia", "normalforward", 100) + rows(5, "crazy_zootopia", "forwardreverse", 100)
    split += rows(5, "teachers_in_school", "normalforward", 30)
    split += rows(31, "crazy_zootopia", "normalforward", 9)
    chosen = gsm.official_selection("medium", "0", split)
    assert {r["op"] for r in chosen} == {5}  # medium runs ops 2-30
    by_template = [(r["template"], r["mode"]) for r in chosen]
    # min(200, 230) rows: 40 % + 40 % of crazy_zootopia (80 of each), 5 % (10) of teachers_in_school
    assert by_template.count(("crazy_zootopia", "normalforward")) == 80
    assert by_template.count(("crazy_zootopia", "forwardreverse")) == 80
    assert by_template.count(("teachers_in_school", "normalforward")) == 10
    symbolic = [{"op": op, "id": i} for op in (10, 11, 40) for i in range(150)]
    kept = gsm.official_selection("symbolic", "32k", symbolic)  # 1-10 at 32k, first 100 rows
    assert len(kept) == 100 and {r["op"] for r in kept} == {10} and kept[-1]["id"] == 99
    assert len(gsm.official_selection("symbolic", "64k", symbolic)) == 300  # no official ops: every op
    with pytest.raises(ValueError, match="unknown protocol"):
        gsm.load("medium", data="sample", protocol="mine")


@pytest.mark.parametrize(("window", "expected"), [(131_072, 120_000), (32_768, 32_768 - 1024 - 64)])
def test_longbench_prompt_budget_is_the_official_one_where_the_window_allows(window, expected):
    cfg = RunConfig(task="longbench-v2", engine="llamacpp", url="http://127.0.0.1:9", max_model_len=window)
    assert task_metadata(cfg)["max_len"] == expected
