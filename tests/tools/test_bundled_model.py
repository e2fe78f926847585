"""The bundled SmolLM2 exported as a plain checkpoint directory loads and computes like the GGUF model."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gguf")

from mp_sglang.tools.bundled_model import export_smollm2, load_smollm2  # noqa: E402

PROMPT = [{"role": "user", "content": "Tom has 3 apples and buys 4 more. How many apples does he have?"}]


@pytest.fixture(scope="module")
def gguf_model():
    try:
        return load_smollm2()
    except FileNotFoundError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def exported(gguf_model, tmp_path_factory):
    return export_smollm2(tmp_path_factory.mktemp("smollm2"), dtype=torch.float32)


def test_export_is_a_plain_llama_checkpoint(exported):
    from safetensors import safe_open

    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"]
    assert "quantization_config" not in config and "_model_name_or_path" not in config
    assert (exported / "generation_config.json").is_file()
    with safe_open(exported / "model.safetensors", "pt") as weights:
        names = set(weights.keys())
    assert "model.embed_tokens.weight" in names and "model.layers.0.self_attn.q_proj.weight" in names
    assert "lm_head.weight" not in names  # tied to the embedding, as in HF Llama checkpoints


def test_export_loads_without_gguf_and_matches(gguf_model, exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = gguf_model
    loaded = AutoModelForCausalLM.from_pretrained(exported).eval()
    loaded_tokenizer = AutoTokenizer.from_pretrained(exported)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight

    assert loaded_tokenizer.chat_template
    text = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
    assert loaded_tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False) == text
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    assert torch.equal(loaded_tokenizer(text, return_tensors="pt")["input_ids"], ids)

    with torch.no_grad():
        want = model(ids).logits[0, -1]
        got = loaded(ids).logits[0, -1]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
