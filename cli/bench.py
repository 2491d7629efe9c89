"""`glm-mlx bench`: prompt and decode tok/s and peak memory, as the engine measures them."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table
from typing_extensions import Annotated

from .options import (Json, KvBits, ModelArg, ModelOpt, NoMtp, NumDraft, PrefillStep, load_for_generation,
                      pick_model)


def bench(
    model: ModelArg = None, model_opt: ModelOpt = None,
    # No -p: across glm-mlx, -p is generate's --prompt (mlx_lm.benchmark's -p is this option).
    prompt_tokens: Annotated[int, typer.Option("--prompt-tokens", help="Prompt length.")] = 512,
    gen_tokens: Annotated[int, typer.Option("--generation-tokens", "--gen-tokens", "-g",
                                            help="Tokens to generate.")] = 128,
    no_mtp: NoMtp = False, num_draft: NumDraft = 1, prefill_step: PrefillStep = 2048, kv_bits: KvBits = None,
    as_json: Json = False,
):
    """Measure prefill and decode speed on a synthetic prompt (greedy).

    Example: glm-mlx bench ./GLM-5.1-mlx --prompt-tokens 1024 --gen-tokens 512
    """
    import mlx.core as mx

    from glm_mlx.generation.engine import Engine, StepStats

    m, _, path = load_for_generation(pick_model(model, model_opt), context=prompt_tokens + gen_tokens,
                                     mtp=not no_mtp, kv_bits=kv_bits)
    vocab = m.args.vocab_size
    prompt = [int(t) for t in mx.random.randint(0, vocab, (prompt_tokens,), key=mx.random.key(0)).tolist()]
    eos = set(m.args.eos_token_ids)
    prompt = [t if t not in eos else (t + 1) % vocab for t in prompt]
    stats = StepStats()
    mx.reset_peak_memory()
    engine = Engine(m, mtp=not no_mtp, num_draft=num_draft, prefill_step=prefill_step)
    for _ in engine.generate(prompt, max_tokens=gen_tokens, stats=stats):
        pass  # bench ignores eos: it measures a fixed number of tokens
    result = {"model": str(path), "prompt_tokens": prompt_tokens, "gen_tokens": stats.generated,
              "prompt_tps": round(prompt_tokens / stats.prompt_time, 2),
              "generation_tps": round((stats.generated - 1) / stats.gen_time, 2) if stats.gen_time else 0.0,
              "peak_memory_gb": round(mx.get_peak_memory() / 1e9, 3), "mtp": not no_mtp and m.has_mtp, "kv_bits": kv_bits,
              "mtp_acceptance": round(stats.acceptance_rate, 3), "tokens_per_pass": round(stats.tokens_per_pass, 3)}
    if as_json:
        typer.echo(json.dumps(result))
        return
    table = Table(title=f"glm-mlx bench: {path.name}")
    for k in ("prompt_tokens", "prompt_tps", "gen_tokens", "generation_tps", "peak_memory_gb", "mtp", "kv_bits",
              "mtp_acceptance", "tokens_per_pass"):
        table.add_row(k, str(result[k]))
    Console().print(table)
