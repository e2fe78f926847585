"""Final-answer parsing: the official protocol's parser is the headline, our additions are labelled.

Each task says which parser its official protocol scores with (`official_parser`): a deterministic
one (`regex_answer`, e.g. GSM-Infinite's keyword search), or a model step (`judge_prompt` /
`parse_judge_reply`, e.g. LongBench v2's answer call, GSM-Infinite symbolic's extraction) with the
task's official generation settings (`judge_params`). Both always run when a judge is set, and a
third, our own rule (the judge, falling back to the regex when its reply does not parse), is
scored beside them; the report labels each and never mixes them into the headline. Judge replies
are cached on disk, keyed by (judge model, call parameters, prompt, output), so re-scoring a run
costs no model calls.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from types import ModuleType
from typing import Any

from harness.client import ChatClient, openai_params


def digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class Judge:
    """A chat model asked one question per output, with an on-disk reply cache."""

    def __init__(
        self, client: ChatClient, cache_dir: Path, base: dict[str, Any], max_tokens: int | None = None
    ):
        self.client = client
        self.cache_dir = cache_dir
        self.base = base  # OpenAI parameters every call carries (the run's seed)
        self.max_tokens = max_tokens  # --judge-max-tokens: replaces each task's official length
        self.calls = 0  # replies that had to be asked of the model (not served from the cache)

    def params(self, gen_kwargs: dict[str, Any]) -> dict[str, Any]:
        """OpenAI parameters of one call from the task's settings (lm-eval names)."""
        if self.max_tokens is not None:
            gen_kwargs = {**gen_kwargs, "max_gen_toks": self.max_tokens}
        return {**openai_params(gen_kwargs), **self.base}

    def reply(self, prompt: str, output: str, gen_kwargs: dict[str, Any]) -> tuple[str, bool]:
        """The judge's reply to `prompt` (which embeds `output`), and whether it came from the cache."""
        params = self.params(gen_kwargs)
        key = digest(self.client.model, params, prompt, output)
        path = self.cache_dir / key[:2] / f"{key}.json"
        if path.is_file():
            return json.loads(path.read_text())["reply"], True
        reply = self.client.chat([{"role": "user", "content": prompt}], **params).text
        self.calls += 1
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(
            json.dumps(
                {
                    "model": self.client.model,
                    "params": params,
                    "prompt": prompt,
                    "output": output,
                    "reply": reply,
                },
                ensure_ascii=False,
            )
        )
        tmp.replace(path)
        return reply, False


def parse_output(utils: ModuleType, doc: dict[str, Any], output: str, judge: Judge | None) -> dict[str, Any]:
    """Every parser's answer and correctness, and the headline: the official parser's answer.

    Without a judge, a task whose official parser is the judge is scored by the regex instead
    (`answer_source` says so, and the report marks the run not comparable).
    """
    regex = utils.regex_answer(doc, output)
    result: dict[str, Any] = {
        "regex_answer": regex,
        "correct_regex": utils.is_correct(doc, regex),
        "judge_prompt_hash": None,
        "judge_reply": None,
        "judge_answer": None,
        "judge_cached": None,
        "correct_judge": None,
    }
    if judge is not None:
        prompt = utils.judge_prompt(doc, output)
        reply, cached = judge.reply(prompt, output, utils.judge_params(doc))
        answer = utils.parse_judge_reply(doc, reply)
        result.update(
            judge_prompt_hash=digest(prompt),
            judge_reply=reply,
            judge_cached=cached,
            judge_answer=answer,
            correct_judge=utils.is_correct(doc, answer),
        )
    fallback = result["judge_answer"] if result["judge_answer"] is not None else regex
    result["correct_judge_or_regex"] = utils.is_correct(doc, fallback)
    source = utils.official_parser(doc) if judge is not None else "regex"
    answer = result["judge_answer"] if source == "judge" else regex
    result.update(answer=answer, answer_source=source, correct=utils.is_correct(doc, answer))
    return result


def judge_stats(records: list[dict[str, Any]]) -> dict[str, int]:
    """How often the judge answered, disagreed with the regex, or no headline answer parsed."""
    judged = [r for r in records if r["judge_reply"] is not None]
    both = [r for r in judged if "correct_judge" in r]  # runs written before the official scoring lack it
    return {
        "judged": len(judged),
        "judge_parsed": sum(r["judge_answer"] is not None for r in judged),
        "headline_unparsed": sum(r["answer"] is None for r in records),
        "disagree_with_regex": sum(r["judge_answer"] != r["regex_answer"] for r in judged),
        "disagree_on_correctness": sum(r["correct_judge"] != r["correct_regex"] for r in both),
        "from_cache": sum(bool(r["judge_cached"]) for r in judged),
    }
