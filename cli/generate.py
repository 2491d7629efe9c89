"""`glm-mlx generate`: one-shot generation; text to stdout, stats to stderr (or one JSON object)."""

from __future__ import annotations

import json
import sys
from typing import Optional

import typer
from rich.console import Console
from typing_extensions import Annotated

from .options import Json, MaxTokens, MinP, ModelArg, NoMtp, NumDraft, Seed, Stop, Temp, TopK, TopP, load_for_generation


def generate(
    model: ModelArg = None,
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="Prompt text; '-' or omitted reads stdin.")] = None,
    system: Annotated[Optional[str], typer.Option("--system", help="System message.")] = None,
    raw: Annotated[bool, typer.Option("--raw", help="Do not apply the chat template.")] = False,
    think: Annotated[bool, typer.Option("--think/--no-think", help="Thinking mode (the template's enable_thinking).")] = False,
    max_tokens: MaxTokens = 256, temp: Temp = 0.0, top_p: TopP = 1.0, min_p: MinP = 0.0, top_k: TopK = 0,
    seed: Seed = None, stop: Stop = None, no_mtp: NoMtp = False, num_draft: NumDraft = 1, as_json: Json = False,
):
    """Generate a response to one prompt.

    Example: glm-mlx generate ./GLM-5.1-mlx --prompt "Write a haiku about unified memory"
    """
    from glm_mlx.generate import stream_generate

    if prompt is None or prompt == "-":
        prompt = sys.stdin.read()
    m, tokenizer, _ = load_for_generation(model, mtp=not no_mtp)
    messages = prompt if raw else ([{"role": "system", "content": system}] if system else []) + \
        [{"role": "user", "content": prompt}]
    text, last = [], None
    for r in stream_generate(m, tokenizer, messages, max_tokens=max_tokens, temp=temp, top_p=top_p, min_p=min_p,
                             top_k=top_k, seed=seed, stop=stop, mtp=not no_mtp, num_draft=num_draft,
                             enable_thinking=think):
        text.append(r.text)
        if not as_json:
            sys.stdout.write(r.text)
            sys.stdout.flush()
        last = r
    stats = stats_dict(last)
    if as_json:
        typer.echo(json.dumps({"text": "".join(text), **stats}))
    else:
        sys.stdout.write("\n")
        Console(stderr=True, highlight=False).print(format_stats(stats), soft_wrap=True)


def stats_dict(r) -> dict:
    if r is None:
        return {}
    return {"finish_reason": r.finish_reason, "prompt_tokens": r.prompt_tokens, "reused_tokens": r.reused_tokens,
            "generation_tokens": r.generation_tokens, "prompt_tps": round(r.prompt_tps, 2),
            "generation_tps": round(r.generation_tps, 2), "peak_memory_gb": round(r.peak_memory, 3),
            "mtp_acceptance": round(r.acceptance_rate, 3), "tokens_per_pass": round(r.tokens_per_pass, 3)}


def format_stats(s: dict) -> str:
    if not s:
        return ""
    line = (f"prompt {s['prompt_tokens']} tok @ {s['prompt_tps']:.1f} tok/s | generated {s['generation_tokens']} tok"
            f" @ {s['generation_tps']:.1f} tok/s | peak {s['peak_memory_gb']:.2f} GB")
    if s["tokens_per_pass"]:
        line += f" | MTP acceptance {s['mtp_acceptance']:.0%}, {s['tokens_per_pass']:.2f} tok/pass"
    return f"[dim]{line}[/]"
