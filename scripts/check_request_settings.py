"""Per-request settings through a running multipole server, from outside (docs/usage.md).

Sends at once (so that they share decode batches) greedy requests over one long prompt: with the
server's settings, with their own budget and with dense attention, through `/generate` and
`/v1/chat/completions`. Then malformed settings, each of which must be answered with HTTP 400 naming
the problem, and one more good request (the server stayed up). Prints a table; exits non-zero if
any check failed.

    python scripts/check_request_settings.py --url http://127.0.0.1:30000 --prompt-tokens 8192
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

SETTINGS = {"server": None, "budget 0.05": {"token_budget": 0.05}, "dense": "dense"}
BAD = {
    "unknown word": "sparse",
    "unknown key": {"budget": 0.05},
    "budget 0": {"token_budget": 0},
    "budget 2": {"token_budget": 2},
    "over the limit": {"token_budget": 1.0},
}


def post(url: str, body: dict, timeout: float) -> tuple[int, dict]:
    """(HTTP status, JSON body) of a POST; an error status is returned, not raised."""
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def generate_body(setting: object, prompt: str, max_tokens: int) -> dict:
    """A /generate body. The prompt is text, so its token ids are the model's own (a random
    test model's vocabulary can be a few hundred tokens)."""
    params = {"max_new_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    if setting is not None:
        params["custom_params"] = {"multipole": setting}
    return {"text": prompt, "sampling_params": params}


def chat_body(setting: object, prompt: str, max_tokens: int) -> dict:
    body = {
        "model": "default",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }
    if setting is not None:
        body["custom_params"] = {"multipole": setting}
    return body


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:30000")
    parser.add_argument(
        "--prompt-tokens", type=int, default=8192, help="about this many tokens; above MULTIPOLE_DENSE_BELOW"
    )
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args()
    prompt = "The lighthouse keeper counted the ships. " * (args.prompt_tokens // 9)
    short = "The lighthouse keeper counted the ships. " * 8
    calls = {
        f"/generate {name}": (f"{args.url}/generate", generate_body(s, prompt, args.max_tokens))
        for name, s in SETTINGS.items()
    }
    calls |= {
        f"/v1/chat {name}": (f"{args.url}/v1/chat/completions", chat_body(s, prompt, args.max_tokens))
        for name, s in SETTINGS.items()
    }
    rows, failed = [], False
    with ThreadPoolExecutor(len(calls)) as pool:
        replies = dict(zip(calls, pool.map(lambda c: post(*c, args.timeout), calls.values()), strict=True))
    for name, (status, body) in replies.items():
        text = body.get("text") or (body.get("choices") or [{}])[0].get("message", {}).get("content", "")
        rows.append((name, status, repr((text or "")[:48])))
        failed |= status != 200
    for name, setting in BAD.items():
        status, body = post(f"{args.url}/generate", generate_body(setting, short, 4), args.timeout)
        message = json.dumps(body.get("error") or body.get("message") or body)[:100]
        rows.append((f"bad: {name}", status, message))
        failed |= status != 400 or "custom_params" not in message
    status, _ = post(f"{args.url}/generate", generate_body("dense", short, 4), args.timeout)
    rows.append(("still up", status, ""))
    failed |= status != 200
    for name, status, detail in rows:
        print(f"{name:<26} {status:>4}  {detail}")
    dense, server = (replies[f"/generate {k}"][1].get("text") for k in ("dense", "server"))
    print(f"greedy outputs of dense and server-budget requests {'differ' if dense != server else 'agree'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
