"""`glm-mlx generate`: one-shot generation; text to stdout, stats to stderr (or one JSON object)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from typing_extensions import Annotated

from .options import (ExtraEos, FlagError, Json, KvBits, MaxTokens, MinP, ModelArg, ModelOpt, NoMtp, NumDraft,
                      PrefillStep, PromptCacheFile, Seed, Stop, SystemPrompt, Temp, TemplateArgs, TopK, TopP,
                      add_extra_eos, load_for_generation, parse_template_args, pick_model)

# --think/--no-think given or not (None): not given, enable_thinking of --chat-template-args decides, else off.
Think = Annotated[Optional[bool], typer.Option(
    "--think/--no-think", help="Thinking mode (the template's enable_thinking). [default: off, or enable_thinking "
    "of --chat-template-args]", show_default=False)]


def generate(
    model: ModelArg = None, model_opt: ModelOpt = None,
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="Prompt text; '-' or omitted reads stdin.")] = None,
    system: SystemPrompt = None,
    raw: Annotated[bool, typer.Option("--raw", "--ignore-chat-template", help="Do not apply the chat template.")] = False,
    think: Think = None, chat_template_args: TemplateArgs = None,
    max_tokens: MaxTokens = 256, temp: Temp = 0.0, top_p: TopP = 1.0, min_p: MinP = 0.0, top_k: TopK = 0,
    seed: Seed = None, stop: Stop = None, extra_eos_token: ExtraEos = None, no_mtp: NoMtp = False,
    num_draft: NumDraft = 1, prefill_step: PrefillStep = 2048, prompt_cache_file: PromptCacheFile = None,
    kv_bits: KvBits = None, as_json: Json = False,
):
    """Generate a response to one prompt.

    Example: glm-mlx generate ./GLM-5.1-mlx --prompt "Write a haiku about unified memory"
    """
    from glm_mlx.generation.text import render_chat, stream_generate

    template_args = parse_template_args(chat_template_args)  # before loading: a typo fails at once
    asked = template_args.pop("enable_thinking", None)
    thinking = think if think is not None else bool(asked)
    if prompt is None or prompt == "-":
        prompt = sys.stdin.read()
    m, tokenizer, path = load_for_generation(pick_model(model, model_opt), mtp=not no_mtp, kv_bits=kv_bits)
    add_extra_eos(tokenizer, extra_eos_token)
    cache = open_prompt_cache(prompt_cache_file, m, path, mtp=not no_mtp) if prompt_cache_file else None
    if raw:
        ids = prompt
    else:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        rendered = render_chat(tokenizer, messages, **template_args, enable_thinking=thinking)
        ids = list(tokenizer.encode(rendered, add_special_tokens=False))
    text, last = [], None
    for r in stream_generate(m, tokenizer, ids, max_tokens=max_tokens, temp=temp, top_p=top_p, min_p=min_p,
                             top_k=top_k, seed=seed, stop=stop, mtp=not no_mtp, num_draft=num_draft,
                             prefill_step=prefill_step, prompt_cache=cache):
        text.append(r.text)
        if not as_json:
            sys.stdout.write(r.text)
            sys.stdout.flush()
        last = r
    if cache is not None:
        save_prompt_cache(cache, prompt_cache_file, path)
    stats = stats_dict(last)
    if as_json:
        typer.echo(json.dumps({"text": "".join(text), **stats}))
    else:
        sys.stdout.write("\n")
        Console(stderr=True, highlight=False).print(format_stats(stats), soft_wrap=True)


def open_prompt_cache(file: str, model, path, mtp: bool):
    """--prompt-cache-file: the saved cache when the file exists (a new one otherwise). The engine reuses its
    tokens where the prompt starts the same (mlx-lm's cache_prompt + generate, in one flag)."""
    from glm_mlx.generation.prompt_cache import PromptCache, PromptCacheError

    if hasattr(model, "broadcast_request"):  # a pipeline: the other ranks hold their layers' caches
        raise FlagError("--prompt-cache-file is not supported in a multi-Mac pipeline yet",
                        "Leave it out under glm-mlx launch.")
    f = Path(file).expanduser()
    if not f.exists():
        return PromptCache.fresh(model, mtp=mtp)
    cache = PromptCache.load(f, model, mtp=mtp)
    made_by = cache.extra.get("model")
    if made_by and Path(made_by).resolve() != Path(path).resolve():
        raise PromptCacheError(f"prompt cache {f} was made with the model {made_by}, not {path}")
    return cache


def save_prompt_cache(cache, file: str, path, **extra) -> Path:
    f = Path(file).expanduser()
    cache.save(f, extra={**extra, "model": str(Path(path).resolve())})
    return f


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
    reused = f" (+{s['reused_tokens']} reused)" if s.get("reused_tokens") else ""
    line = (f"prompt {s['prompt_tokens']} tok{reused} @ {s['prompt_tps']:.1f} tok/s | generated {s['generation_tokens']} tok"
            f" @ {s['generation_tps']:.1f} tok/s | peak {s['peak_memory_gb']:.2f} GB")
    if s["tokens_per_pass"]:
        line += f" | MTP acceptance {s['mtp_acceptance']:.0%}, {s['tokens_per_pass']:.2f} tok/pass"
    return f"[dim]{line}[/]"
