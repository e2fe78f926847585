"""Small pieces with sharp edges: argument parsing, request translation, the append-only sample log."""

from __future__ import annotations

import importlib.util
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import click
import pytest

from harness.cli import auto_engine, parse_gen_kwargs, parse_metadata
from harness.client import ChatClient, openai_params
from harness.results import RunDir


def test_gen_kwargs_use_lm_eval_syntax_and_types():
    assert parse_gen_kwargs("max_gen_toks=256, temperature=0.1,do_sample=false,until=END") == {
        "max_gen_toks": 256,
        "temperature": 0.1,
        "do_sample": False,
        "until": "END",
    }
    assert parse_gen_kwargs("") == {}
    with pytest.raises(click.BadParameter):
        parse_gen_kwargs("max_gen_toks")


def test_metadata_must_be_a_json_object():
    assert parse_metadata('{"subsets": ["medium"]}') == {"subsets": ["medium"]}
    for bad in ("[1]", "{subsets"):
        with pytest.raises(click.BadParameter):
            parse_metadata(bad)


def test_openai_params_translate_lm_eval_names():
    assert openai_params(
        {"max_gen_toks": 64, "until": [], "do_sample": False, "temperature": 0.7, "seed": 3}
    ) == {"max_tokens": 64, "temperature": 0.0, "seed": 3}
    assert openai_params({"until": "\n\n", "top_p": 0.9}) == {"stop": ["\n\n"], "top_p": 0.9}
    with pytest.raises(ValueError, match="unsupported generation argument 'num_beams'"):
        openai_params({"num_beams": 4})


def test_multipole_gen_kwarg_becomes_the_requests_custom_params():
    """One server evaluates several budgets: `--gen-kwargs multipole=0.05` per run."""
    assert openai_params(parse_gen_kwargs("max_gen_toks=8,multipole=0.05")) == {
        "max_tokens": 8,
        "custom_params": {"multipole": {"token_budget": 0.05}},
    }
    assert openai_params(parse_gen_kwargs("multipole=dense")) == {"custom_params": {"multipole": "dense"}}
    with pytest.raises(ValueError, match="multipole= takes a token budget"):
        openai_params(parse_gen_kwargs("multipole=sparse"))


def test_chat_client_sends_custom_params_at_the_top_of_the_body():
    """Where sglang's OpenAI request models read it (the openai client's extra_body lands there too)."""
    bodies = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            reply = json.dumps({"choices": [{"message": {"content": "ok"}, "finish_reason": "stop"}]})
            self.send_response(200)
            self.end_headers()
            self.wfile.write(reply.encode())

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        client = ChatClient(f"http://127.0.0.1:{server.server_port}", model="m")
        params = openai_params(parse_gen_kwargs("multipole=0.05"))
        assert client.chat([{"role": "user", "content": "hi"}], **params).text == "ok"
    finally:
        server.shutdown()
    assert bodies[0]["custom_params"] == {"multipole": {"token_budget": 0.05}}


def test_sample_log_is_append_only_and_survives_a_torn_line(tmp_path):
    run = RunDir(tmp_path)
    run.append_sample({"key": "a", "n": 1})
    run.append_sample({"key": "b", "n": 2})
    with open(tmp_path / "samples.jsonl", "a") as f:
        f.write('{"key": "c", "n"')  # killed mid-write
    assert [r["key"] for r in run.samples()] == ["a", "b"]
    run.append_sample({"key": "c", "n": 3})
    lines = (tmp_path / "samples.jsonl").read_text().splitlines()
    assert [json.loads(line)["key"] for line in lines] == ["a", "b", "c"]


def test_auto_engine_is_in_process_hf_unless_sglang_has_a_gpu(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    assert auto_engine() == "hf"  # no NVIDIA driver
    assert auto_engine(attach=True) == "llamacpp"  # a --url needs a server engine
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\n")
    smi.chmod(0o755)
    if importlib.util.find_spec("sglang") is None:
        assert auto_engine() == "hf"  # a driver but no sglang
    (tmp_path / "site" / "sglang").mkdir(parents=True)
    (tmp_path / "site" / "sglang" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert auto_engine() == auto_engine(attach=True) == "sglang"
