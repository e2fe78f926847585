"""Final-answer parsing: a judge model reads the (possibly very long) output and states the answer.

Each task supplies the judge prompt (`judge_prompt`) and how to read the judge's reply
(`parse_judge_reply`); see docs/harness.md for the prompts. The raw reply is always kept. A
deterministic parser (`regex_answer`) runs on every output too: it is the fallback when the judge's
reply cannot be parsed, and it is scored on its own so the two can be compared (disagreements are
counted in the summary). Judge replies are cached on disk, keyed by (judge model, judge settings,
prompt, output), so re-scoring a run costs no model calls.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from types import ModuleType
from typing import Any

from harness.client import ChatClient


def digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class Judge:
    """A chat model asked one question per output, with an on-disk reply cache."""

    def __init__(self, client: ChatClient, cache_dir: Path, params: dict[str, Any]):
        self.client = client
        self.cache_dir = cache_dir
        self.params = params
        self.calls = 0  # replies that had to be asked of the model (not served from the cache)

    def _path(self, prompt: str, output: str) -> Path:
        key = digest(self.client.model, self.params, prompt, output)
        return self.cache_dir / key[:2] / f"{key}.json"

    def reply(self, prompt: str, output: str) -> tuple[str, bool]:
        """The judge's reply to `prompt` (which embeds `output`), and whether it came from the cache."""
        path = self._path(prompt, output)
        if path.is_file():
            return json.loads(path.read_text())["reply"], True
        reply = self.client.chat([{"role": "user", "content": prompt}], **self.params).text
        self.calls += 1
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(
            json.dumps(
                {
                    "model": self.client.model,
                    "params": self.params,
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
    """Judge answer (if a judge is set), regex answer, the answer used, and correctness of each."""
    regex = utils.regex_answer(doc, output)
    result: dict[str, Any] = {
        "regex_answer": regex,
        "correct_regex": utils.is_correct(doc, regex),
        "judge_prompt_hash": None,
        "judge_reply": None,
        "judge_answer": None,
        "judge_cached": None,
    }
    if judge is not None:
        prompt = utils.judge_prompt(doc, output)
        reply, cached = judge.reply(prompt, output)
        result.update(
            judge_prompt_hash=digest(prompt),
            judge_reply=reply,
            judge_cached=cached,
            judge_answer=utils.parse_judge_reply(doc, reply),
        )
    if result["judge_answer"] is not None:
        answer, source = result["judge_answer"], "judge"
    elif regex is not None:
        answer, source = regex, "regex"
    else:
        answer, source = None, "none"
    result.update(answer=answer, answer_source=source, correct=utils.is_correct(doc, answer))
    return result


def judge_stats(records: list[dict[str, Any]]) -> dict[str, int]:
    """How often the judge answered, fell back to the regex, disagreed with it, or nothing parsed."""
    judged = [r for r in records if r["judge_reply"] is not None]
    return {
        "judged": len(judged),
        "judge_parsed": sum(r["judge_answer"] is not None for r in judged),
        "fallback_to_regex": sum(r["answer_source"] == "regex" for r in judged),
        "unparsed": sum(r["answer_source"] == "none" for r in records),
        "disagree_with_regex": sum(r["judge_answer"] != r["regex_answer"] for r in judged),
        "disagree_on_correctness": sum(r["correct"] != r["correct_regex"] for r in judged),
        "from_cache": sum(bool(r["judge_cached"]) for r in judged),
    }
