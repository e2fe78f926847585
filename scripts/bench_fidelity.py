"""Fidelity of Multipole attention vs. dense attention. Prints a table and writes JSON; CPU is enough.

# attention outputs on synthetic clustered keys and real SmolLM2 activations
python scripts/bench_fidelity.py --out results/fidelity.json
# SmolLM2 decoding greedily: token agreement, first divergence, KL of next-token distributions
python scripts/bench_fidelity.py --mode greedy --greedy-steps 1000 --out results/greedy.json
# the same with other method settings (any MultipoleConfig field)
python scripts/bench_fidelity.py --mode greedy --set update_block=512 --out results/greedy_ub512.json
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click
import torch

from mp_sglang.method.config import MultipoleConfig
from mp_sglang.tools.capture import LayerActivations, capture_activations, model_rope
from mp_sglang.tools.demo import sample_text
from mp_sglang.tools.fidelity import average, format_table, layer_fidelity


def synthetic_layer(seq: int, generator: torch.Generator) -> LayerActivations:
    """Keys around 256 centres per head (8 KV heads, GQA 4, d=128); queries aimed near some centres."""
    heads, group, dim, centres = 8, 4, 128, 256
    centre_keys = torch.randn(heads, centres, dim, generator=generator)
    which = torch.randint(0, centres, (heads, seq), generator=generator)
    pick = which.unsqueeze(-1).expand(-1, -1, dim)
    keys = torch.gather(centre_keys, 1, pick) + 0.3 * torch.randn(heads, seq, dim, generator=generator)
    values = torch.randn(heads, seq, dim, generator=generator)
    aims = torch.randint(0, centres, (heads * group, seq), generator=generator)
    aimed = torch.gather(centre_keys.repeat_interleave(group, 0), 1, aims.unsqueeze(-1).expand(-1, -1, dim))
    queries = 2.0 * aimed + torch.randn(heads * group, seq, dim, generator=generator)
    return LayerActivations(queries, keys, values)


@click.command()
@click.option(
    "--mode", type=click.Choice(["activations", "greedy"]), default="activations", show_default=True
)
@click.option("--budgets", default="0.01,0.02,0.05,0.1", show_default=True)
@click.option("--greedy-steps", default=1000, show_default=True, help="Tokens generated in greedy mode.")
@click.option("--decode-steps", default=32, show_default=True, help="Tokens replayed as decode steps.")
@click.option("--synthetic-len", default=16384, show_default=True, help="Context of the synthetic case.")
@click.option("--layer-stride", default=2, show_default=True, help="Evaluate every N-th SmolLM2 layer.")
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="FIELD=VALUE",
    help="Greedy mode: a MultipoleConfig setting for the multipole runs (repeatable).",
)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("results/fidelity.json"))
def main(
    mode: str,
    budgets: str,
    greedy_steps: int,
    decode_steps: int,
    synthetic_len: int,
    layer_stride: int,
    overrides: tuple[str, ...],
    out: Path,
) -> None:
    budget_list = [float(b) for b in budgets.split(",")]
    if mode == "greedy":
        greedy(budget_list, greedy_steps, _settings(overrides), out)
    else:
        activations(budget_list, decode_steps, synthetic_len, layer_stride, out)


def _settings(overrides: tuple[str, ...]) -> dict[str, object]:
    """`--set FIELD=VALUE` pairs as config values (JSON where it parses: numbers, booleans)."""
    settings: dict[str, object] = {}
    for pair in overrides:
        field, sep, raw = pair.partition("=")
        if not sep:
            raise click.BadParameter(f"{pair!r} is not FIELD=VALUE", param_hint="--set")
        try:
            settings[field] = json.loads(raw)
        except json.JSONDecodeError:
            settings[field] = raw
    try:
        MultipoleConfig.from_dict(settings)
    except (TypeError, ValueError) as err:
        raise click.BadParameter(str(err), param_hint="--set") from err
    return settings


def greedy(budgets: list[float], steps: int, overrides: dict[str, object], out: Path) -> None:
    """SmolLM2 on the shipped text plus a question; the index is forced on (dense_below=0) unless
    `overrides` says otherwise."""
    from mp_sglang.tools.agreement import dense_greedy, teacher_forced_agreement
    from mp_sglang.tools.bundled_model import load_smollm2

    started = time.time()
    model, tokenizer = load_smollm2()
    messages = [
        {"role": "user", "content": sample_text() + "\n\nRetell this text in detail, section by section."}
    ]
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    input_ids = ids["input_ids"]
    tokens, dense_logits = dense_greedy(model, input_ids, steps)
    rows = []
    for budget in budgets:
        settings = {"token_budget": budget, "dense_below": 0, **overrides}
        result = teacher_forced_agreement(model, input_ids, tokens, dense_logits, settings)
        rows.append(
            {"budget": budget, "prompt_tokens": input_ids.shape[1], "settings": settings, **result.__dict__}
        )
        click.echo(f"budget={budget}: {result}", err=True)
    _write(out, rows, started)
    table = [
        [
            f"{r['budget']:.0%}",
            r["prompt_tokens"],
            r["steps"],
            r["agreement"],
            r["first_divergence"],
            r["mean_kl"],
        ]
        for r in rows
    ]
    header = ["budget", "prompt", "steps", "token agreement", "first divergence", "mean KL"]
    click.echo(format_table(header, table))


def activations(
    budgets: list[float], decode_steps: int, synthetic_len: int, layer_stride: int, out: Path
) -> None:
    from mp_sglang.tools.bundled_model import load_smollm2

    started = time.time()
    cases = [("synthetic", [synthetic_layer(synthetic_len, torch.Generator().manual_seed(0))], None)]
    model, tokenizer = load_smollm2()
    ids = tokenizer(sample_text(), return_tensors="pt").input_ids
    cases.append(("smollm2", capture_activations(model, ids)[::layer_stride], model_rope(model)))
    rows = []
    for name, layers, rope in cases:
        context = layers[0].keys.shape[1]
        for budget in budgets:
            for levels in (1, 2):
                for windowed in (True, False) if rope is not None else (False,):
                    cfg = MultipoleConfig(token_budget=budget, levels=levels, windowed_rope=windowed)
                    result = average(layer_fidelity(layer, cfg, decode_steps, rope) for layer in layers)
                    rows.append(
                        {
                            "data": name,
                            "context": context,
                            "layers": len(layers),
                            "budget": budget,
                            "budget_tokens": cfg.budget_tokens(context),
                            "levels": levels,
                            "windowed_rope": windowed if rope is not None else None,
                            "rel_l2": result.rel_l2,
                            "top1_exact": result.top1,
                            "mass_exact": result.mass,
                            "queries": result.queries,
                        }
                    )
                    click.echo(f"{name} budget={budget} levels={levels} rope={windowed}: {result}", err=True)
    _write(out, rows, started)
    header = ["data", "context", "budget", "levels", "windowed RoPE", "rel. L2", "top-1 exact", "mass exact"]
    table = [
        [
            r["data"],
            r["context"],
            f"{r['budget']:.0%} ({r['budget_tokens']})",
            r["levels"],
            "n/a" if r["windowed_rope"] is None else ("on" if r["windowed_rope"] else "off"),
            r["rel_l2"],
            r["top1_exact"],
            r["mass_exact"],
        ]
        for r in rows
    ]
    click.echo(format_table(header, table))


def _write(out: Path, rows: list[dict], started: float) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "seconds": time.time() - started}, indent=2))
    click.echo(f"wrote {out} ({time.time() - started:.0f} s)", err=True)


if __name__ == "__main__":
    main()
