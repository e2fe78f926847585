"""Answer parsing against hand-labelled outputs: the deterministic parsers exactly, the judge for real."""

from __future__ import annotations

import json

import pytest
from harness_testlib import DATA

from harness.client import ChatClient
from harness.judge import Judge, judge_stats, parse_output
from harness.tasks import get_task

LABELLED = [json.loads(line) for line in (DATA / "labelled_outputs.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("row", LABELLED, ids=[f"{r['task']}-{i}" for i, r in enumerate(LABELLED)])
def test_regex_parser_reads_what_a_person_reads(row):
    utils = get_task(row["task"]).utils()
    assert utils.regex_answer(row["doc"], row["output"]) == row["label"]


def test_correctness_follows_the_gold_answer():
    lb, gsm = get_task("longbench-v2").utils(), get_task("gsm-infinite").utils()
    doc_lb = {"answer": "B"}
    assert lb.is_correct(doc_lb, "B") and not lb.is_correct(doc_lb, "A") and not lb.is_correct(doc_lb, None)
    med = {"subset": "medium", "solution": "Define x as a; so a = 12. Answer: 12."}
    assert gsm.is_correct(med, "12") and not gsm.is_correct(med, "13")
    sym = {"subset": "symbolic", "answer_list": ["V2", "V1"]}
    assert gsm.is_correct(sym, "V1, V2") and not gsm.is_correct(sym, "V1") and not gsm.is_correct(sym, "")


@pytest.mark.slow
def test_judge_keeps_raw_replies_and_caches(llama_server, tmp_path):
    client = ChatClient(llama_server.base_url)
    params = {"max_tokens": 16, "temperature": 0.0, "seed": 0}
    judge = Judge(client, tmp_path / "cache", params)
    first = []
    for row in LABELLED:
        utils = get_task(row["task"]).utils()
        parsed = parse_output(utils, row["doc"], row["output"], judge)
        first.append(parsed)
        assert parsed["judge_reply"] is not None and parsed["judge_cached"] is False
        assert parsed["judge_answer"] == utils.parse_judge_reply(row["doc"], parsed["judge_reply"])
        official = utils.official_parser(row["doc"])  # the headline is the official parser's, no fallback
        assert parsed["answer_source"] == official
        assert parsed["answer"] == parsed["judge_answer" if official == "judge" else "regex_answer"]
        assert parsed["regex_answer"] == row["label"]
        assert parsed["correct_regex"] == utils.is_correct(row["doc"], row["label"])
    assert judge.calls == len(LABELLED)

    # Re-scoring is free: a judge whose server does not exist answers everything from the cache.
    offline = Judge(ChatClient("http://127.0.0.1:9", model=client.model), tmp_path / "cache", params)
    again = [parse_output(get_task(r["task"]).utils(), r["doc"], r["output"], offline) for r in LABELLED]
    assert offline.calls == 0
    assert [a["judge_reply"] for a in again] == [f["judge_reply"] for f in first]
    assert all(a["judge_cached"] for a in again)

    records = [{**p} for p in first]
    stats = judge_stats(records)
    assert stats["judged"] == len(LABELLED)
    assert stats["disagree_with_regex"] == sum(p["judge_answer"] != p["regex_answer"] for p in first)
    agree = sum(p["judge_answer"] == r["label"] for p, r in zip(first, LABELLED, strict=True))
    print(f"SmolLM2-135M judge agrees with the hand labels on {agree}/{len(LABELLED)} outputs")
