"""lm-eval's own CLI, with `attn_implementation="multipole"` known to transformers.

transformers learns the name only when `mp_sglang.hf` is imported, which the `lm_eval` command never
does. Importing this module does; run as a program, it then hands its command line to lm-eval
unchanged, so `--model hf` runs Multipole through `--model_args`, which lm-eval passes on to
`from_pretrained`:

    python -m mp_sglang.hf.lm_eval --model hf \
        --model_args pretrained=DIR,attn_implementation=multipole,dtype=bfloat16 --tasks ...

Multipole settings come from the MULTIPOLE_* environment (see docs/usage.md).
"""

from __future__ import annotations

import mp_sglang.hf  # noqa: F401  (registers attn_implementation="multipole")


def main() -> None:
    """Run `lm_eval` with the arguments of this process (lm-eval reads `sys.argv` itself)."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
