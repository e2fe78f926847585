"""Build a small random-weight Llama (or Qwen2/Qwen3) model directory, tokenizer included, with no download.

Serving tests on an offline machine need a real model directory (config, safetensors weights,
tokenizer with a chat template) that sglang loads like any Hugging Face checkpoint. The weights are
random, so the text it generates is noise; what matters is that every part of the serving stack runs.
The tokenizer is a byte-level BPE trained here on a small built-in corpus, so any text encodes.

    python3 scripts/make_random_model.py --out /tmp/rand-llama [--arch qwen3 --hidden 512 --layers 4 ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
# --arch: the transformers config and model classes, and the architecture name sglang dispatches on.
ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
}
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Multipole attention clusters the keys of a long context and attends exactly to the important ones.",
    "What is the capital of France? The capital of France is Paris.",
    "Solve 12 + 30 = 42, then 7 * 6 = 42, so the answer is 42.",
    "def add(a, b):\n    return a + b\n",
    "Hello, world! How are you today? I am fine, thank you.",
    "SGLang serves large language models with a radix cache and continuous batching.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000; symbols: ()[]{}<>+-*/=_.,;:!?'\"#@$%^&|~`",
]


def build_tokenizer(vocab_size: int):
    """Train a byte-level BPE on the built-in corpus and wrap it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, PAD, *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, chat_template=CHAT_TEMPLATE
    )


def build_config(args: argparse.Namespace, tokenizer):
    """The config of the requested architecture and shape."""
    import transformers

    if args.hidden % args.heads or args.heads % args.kv_heads:
        raise ValueError("hidden must divide by heads, and heads by kv-heads")
    vocab = -(-len(tokenizer) // 64) * 64  # padded like real checkpoints; extra rows are never produced
    config_class, model_class = ARCHITECTURES[args.arch]
    return getattr(transformers, config_class)(
        architectures=[model_class],
        vocab_size=vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate or 4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        max_position_embeddings=args.max_pos,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype=args.dtype,
    )


def build_model(args: argparse.Namespace, tokenizer):
    """A causal LM of the requested architecture and shape, the library's own random initialisation."""
    import torch
    import transformers

    torch.manual_seed(args.seed)
    config = build_config(args, tokenizer)
    model = getattr(transformers, ARCHITECTURES[args.arch][1])(config).to(getattr(torch, args.dtype))
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="model directory to write")
    ap.add_argument("--arch", choices=sorted(ARCHITECTURES), default="llama")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=0, help="MLP width (default 4 x hidden)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2, help="fewer than --heads gives GQA")
    ap.add_argument("--vocab", type=int, default=1024, help="BPE vocabulary size to train")
    ap.add_argument("--max-pos", type=int, default=8192, help="max_position_embeddings")
    ap.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--config-only",
        action="store_true",
        help="write config and tokenizer but no weights (serve with sglang's --load-format dummy)",
    )
    args = ap.parse_args(argv)
    if min(args.hidden, args.layers, args.heads, args.kv_heads, args.vocab, args.max_pos) <= 0:
        ap.error("sizes must be positive")

    tokenizer = build_tokenizer(args.vocab)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        if args.config_only:
            config = build_config(args, tokenizer)
            config.save_pretrained(args.out)
        else:
            model = build_model(args, tokenizer)
            config = model.config
            model.save_pretrained(args.out, safe_serialization=True)
    except ValueError as e:
        ap.error(str(e))
    tokenizer.save_pretrained(args.out)

    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hello!"}], add_generation_prompt=True)
    if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding here
        ids = ids["input_ids"]
    print(
        json.dumps(
            {
                "out": str(args.out),
                "weights": not args.config_only,
                "vocab": config.vocab_size,
                "tokenizer_len": len(tokenizer),
                "chat_prompt_tokens": len(ids),
                "files": sorted(p.name for p in args.out.iterdir()),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
