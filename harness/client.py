"""A small OpenAI-compatible chat client (stdlib only): the harness needs one call and clear errors."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any


class EndpointError(RuntimeError):
    """The endpoint refused or failed a request."""


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None


# lm-eval's generation-argument names -> OpenAI request fields.
_GEN_TO_OPENAI = {
    "max_gen_toks": "max_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "until": "stop",
    "seed": "seed",
}


# Our own generation argument: a per-request Multipole setting, sent as sglang's custom_params.
MULTIPOLE_KWARG = "multipole"


def openai_params(gen_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Translate lm-eval generation kwargs into OpenAI chat parameters; reject names we cannot honour.

    `do_sample=False` means greedy, so it forces temperature 0 whatever `temperature` says.
    `multipole=0.05` (a token budget) or `multipole=dense` becomes the request's custom_params.
    """
    unknown = set(gen_kwargs) - set(_GEN_TO_OPENAI) - {"do_sample", MULTIPOLE_KWARG}
    if unknown:
        known = ", ".join(["do_sample", MULTIPOLE_KWARG, *_GEN_TO_OPENAI])
        raise ValueError(f"unsupported generation argument {sorted(unknown)[0]!r}; known: {known}")
    params = {_GEN_TO_OPENAI[k]: v for k, v in gen_kwargs.items() if k in _GEN_TO_OPENAI}
    if MULTIPOLE_KWARG in gen_kwargs:
        params["custom_params"] = {MULTIPOLE_KWARG: _multipole_setting(gen_kwargs[MULTIPOLE_KWARG])}
    if "stop" in params:
        stop = [params["stop"]] if isinstance(params["stop"], str) else list(params["stop"])
        if stop:
            params["stop"] = stop
        else:
            del params["stop"]
    if gen_kwargs.get("do_sample") is False:
        params["temperature"] = 0.0
    return params


def _multipole_setting(value: Any) -> str | dict[str, float]:
    """The per-request setting an sglang multipole server reads (mp_sglang.serving.request_settings);
    the server checks the budget's range and answers a bad one with HTTP 400."""
    if value == "dense":
        return "dense"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"multipole= takes a token budget (a fraction, e.g. 0.05) or dense; got {value!r}")
    return {"token_budget": float(value)}


def continues_reply(messages: list[dict[str, str]]) -> bool:
    """A final assistant message is a started reply (a task's answer prefix) to continue, not a
    finished turn."""
    return bool(messages) and messages[-1]["role"] == "assistant"


class ChatClient:
    """Chat completions against `base_url` (the server root, without /v1)."""

    def __init__(self, base_url: str, model: str | None = None, timeout_s: float = 3600.0):
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.model = model or self._first_model()

    def _request(self, path: str, payload: dict | None = None) -> dict:
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(
            self.base_url + path, data=data, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as err:
            body = err.read().decode(errors="replace")[:2000]
            raise EndpointError(f"{self.base_url}{path} answered HTTP {err.code}: {body}") from err
        except (urllib.error.URLError, OSError) as err:
            raise EndpointError(f"{self.base_url}{path} unreachable: {err}") from err

    def _first_model(self) -> str:
        models = self._request("/v1/models").get("data") or []
        if not models:
            raise EndpointError(f"{self.base_url}/v1/models lists no model")
        return models[0]["id"]

    def chat(self, messages: list[dict[str, str]], **params: Any) -> Completion:
        """One chat completion; `params` are OpenAI fields (see `openai_params`)."""
        request = {"model": self.model, "messages": messages, **params}
        if continues_reply(messages):  # SGLang would turn the prefix into a user turn; vLLM needs both
            request.update(continue_final_message=True, add_generation_prompt=False)
        body = self._request("/v1/chat/completions", request)
        try:
            choice = body["choices"][0]
            usage = body.get("usage") or {}
            return Completion(
                text=choice["message"].get("content") or "",
                finish_reason=choice.get("finish_reason"),
                prompt_tokens=usage.get("prompt_tokens"),
                completion_tokens=usage.get("completion_tokens"),
            )
        except (KeyError, IndexError, TypeError) as err:
            raise EndpointError(f"malformed chat completion from {self.base_url}: {str(body)[:500]}") from err
