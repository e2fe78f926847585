"""The shipped lm-eval tasks: loading through lm-eval, the official prompts, and the scoring arithmetic."""

from __future__ import annotations

import pytest
from harness_testlib import needs_llama_cpp

from harness.engines import get_engine
from harness.tasks import data as data_sources
from harness.tasks import get_task, tasks_path
from harness.tasks.gsm_infinite import utils as gsm
from harness.tasks.longbench_v2 import utils as lb


@pytest.fixture(scope="module")
def lm_eval_tasks():
    from lm_eval.tasks import TaskManager

    manager = TaskManager(
        include_path=str(tasks_path()), include_defaults=False, metadata={"data": "sample", "lengths": ["0"]}
    )
    names = ["gsm_infinite_symbolic", "gsm_infinite_medium", "gsm_infinite_hard", "longbench_v2_cot"]
    return manager.load(names)["tasks"]


def test_lm_eval_loads_every_shipped_task(lm_eval_tasks):
    sizes = {name: len(list(task.eval_docs)) for name, task in lm_eval_tasks.items()}
    # The official selection: medium/hard take 40 % of each op's rows from the one template the
    # shipped sample has (2 of 5), symbolic every row of ops 2-5.
    assert sizes == {
        "gsm_infinite_symbolic": 20,
        "gsm_infinite_medium": 8,
        "gsm_infinite_hard": 8,
        "longbench_v2_cot": 6,
    }
    lb_task = lm_eval_tasks["longbench_v2_cot"]
    assert lb_task.config.generation_kwargs["max_gen_toks"] == get_task("longbench-v2").default_max_gen_toks


def test_longbench_prompt_is_the_official_template(lm_eval_tasks):
    doc = next(iter(lm_eval_tasks["longbench_v2_cot"].eval_docs))
    text = lm_eval_tasks["longbench_v2_cot"].doc_to_text(doc)
    assert text.startswith("Please read the following text and answer the questions below.\n\n<text>\n")
    assert (
        f"What is the correct answer to this question: {doc['question']}\nChoices:\n(A) {doc['choice_A']}"
        in text
    )
    assert text.endswith(f"(D) {doc['choice_D']}\n\nLet\u2019s think step by step:")
    answer_step = lb.judge_prompt(doc, "  some reasoning  ")
    assert "The text is too long and omitted here." in answer_step and "<text>" not in answer_step
    assert "step by step: some reasoning\n\nBased on the above" in answer_step


def test_gsm_prompt_is_the_row_messages_and_ops_interleave(lm_eval_tasks):
    docs = list(lm_eval_tasks["gsm_infinite_medium"].eval_docs)
    assert [d["op"] for d in docs[:8]] == [2, 3, 4, 5, 2, 3, 4, 5]  # --limit N covers every op
    assert gsm.chat_messages(docs[0], "") == docs[0]["messages"]
    assert docs[0]["messages"][-1]["content"].startswith("Problem: ")


def test_lm_eval_process_results_scores_with_the_official_parser(lm_eval_tasks):
    doc = next(iter(lm_eval_tasks["gsm_infinite_medium"].eval_docs))
    right = f"Answer: {gsm.solution_answer(doc['solution'])}."
    assert lm_eval_tasks["gsm_infinite_medium"].process_results(doc, [right])["acc"] == 1.0
    assert lm_eval_tasks["gsm_infinite_medium"].process_results(doc, ["no idea"])["acc"] == 0.0


def test_curve_scores_by_hand():
    # trapezoids: (3-2)*(1+0.5)/2 + (4-3)*(0.5+0)/2 = 1.0 -> x100
    scores = gsm.curve_scores({2: 1.0, 3: 0.5, 4: 0.0})
    assert scores == {"auc": 100.0, "first_op_below_50": 4, "first_op_below_10": 4, "avg_acc_op_le_30": 0.5}
    assert gsm.auc_metric([("0", 2, True), ("0", 3, True), ("0", 3, False), ("0", 4, False)]) == 100.0


def test_gsm_summary_by_hand():
    def rec(subset, op, correct):
        return {"groups": {"subset": subset, "length": "0", "op": op}, "correct": correct}

    records = [
        rec("medium", 2, True),
        rec("medium", 2, False),
        rec("medium", 3, True),
        rec("hard", 2, False),
        rec("hard", 3, False),
    ]
    s = gsm.summarize(records)
    assert s["n"] == 5 and s["acc"] == 0.4
    assert s["curves"]["medium/0"]["acc_by_op"] == {"2": 0.5, "3": 1.0}
    assert s["curves"]["medium/0"]["auc"] == 75.0 and s["curves"]["hard/0"]["auc"] == 0.0
    assert s["average_auc_by_length"] == {"0": 37.5}


def test_longbench_summary_by_hand():
    def rec(difficulty, length, correct):
        return {"groups": {"difficulty": difficulty, "length": length}, "correct": correct, "output": "..."}

    s = lb.summarize(
        [
            rec("easy", "short", True),
            rec("hard", "short", False),
            rec("hard", "long", True),
            rec("easy", "medium", False),
        ]
    )
    assert (s["overall"], s["easy"], s["hard"], s["short"], s["medium"], s["long"]) == (
        50.0,
        50.0,
        50.0,
        50.0,
        0.0,
        100.0,
    )
    assert s["n_long"] == 1


def test_data_sources(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert data_sources.resolve_source("auto") == "sample"  # offline: no network probe, shipped sample
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data_sources.resolve_source(str(tmp_path / "missing.jsonl"))
    local = tmp_path / "gsm_infinite_medium_0.jsonl"
    local.write_text((gsm.SAMPLES / "gsm_infinite_medium_0.jsonl").read_text().splitlines()[0] + "\n")
    rows = gsm.load("medium", data=str(tmp_path), protocol="all")["test"]
    assert len(rows) == 1 and rows[0]["subset"] == "medium"
    with pytest.raises(ValueError, match="unknown length"):
        gsm.load("medium", data="sample", lengths=["3k"])


@pytest.mark.slow
def test_middle_truncation_keeps_head_and_tail_within_budget():
    needs_llama_cpp()
    tokenizer = lb.load_tokenizer(get_engine("llamacpp").default_model())
    text = "BEGIN " + " ".join(f"filler{i}" for i in range(3000)) + " END"
    cut = lb.truncate_middle(text, tokenizer, 200)
    assert cut.startswith("BEGIN filler0") and cut.endswith("filler2999 END")
    assert "filler1500" not in cut
    assert len(tokenizer.encode(cut, add_special_tokens=False)) <= 202  # re-encoding may merge at the seam
    assert lb.truncate_middle("short text", tokenizer, 200) == "short text"
