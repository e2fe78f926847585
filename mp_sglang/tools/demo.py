"""`python -m mp_sglang.tools.demo`: Multipole fidelity on a real model, on the CPU, in a few minutes.

Loads the bundled SmolLM2-135M-Instruct, captures its attention inputs over the shipped text,
replays the last tokens as decoding through the reference, and prints error vs. dense attention
at several budgets.
"""

from __future__ import annotations

import time
from importlib import resources

import click
import torch

from mp_sglang.method.config import MultipoleConfig
from mp_sglang.tools.capture import capture_activations, model_rope
from mp_sglang.tools.fidelity import average, format_table, layer_fidelity


def sample_text() -> str:
    return resources.files("mp_sglang.tools").joinpath("data/lighthouse_keepers.txt").read_text()


@click.command()
@click.option("--budgets", default="0.01,0.02,0.05,0.1", show_default=True, help="Token budgets (fractions).")
@click.option("--decode-steps", default=32, show_default=True, help="Tokens replayed as decode steps.")
@click.option("--layer-stride", default=3, show_default=True, help="Evaluate every N-th layer.")
def main(budgets: str, decode_steps: int, layer_stride: int) -> None:
    from mp_sglang.tools.bundled_model import load_smollm2

    torch.manual_seed(0)
    started = time.time()
    model, tokenizer = load_smollm2()
    ids = tokenizer(sample_text(), return_tensors="pt").input_ids
    layers = capture_activations(model, ids)[::layer_stride]
    rope = model_rope(model)
    rows = []
    for budget in (float(b) for b in budgets.split(",")):
        cfg = MultipoleConfig(token_budget=budget)
        result = average(layer_fidelity(layer, cfg, decode_steps, rope) for layer in layers)
        rows.append(
            [f"{budget:.0%}", cfg.budget_tokens(ids.shape[1]), result.rel_l2, result.top1, result.mass]
        )
    click.echo(
        f"SmolLM2-135M-Instruct, {ids.shape[1]} tokens of text, {len(layers)} layers, "
        f"last {decode_steps} tokens decoded through Multipole (reference, CPU)\n"
    )
    click.echo(
        format_table(["budget", "tokens", "rel. L2 error", "top-1 key exact", "attn. mass exact"], rows)
    )
    click.echo(f"\n({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
