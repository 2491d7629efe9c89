"""Option types shared by the commands (huggingface_hub CLI style), and model resolution."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from typing_extensions import Annotated

from glm_mlx.errors import GlmMlxError

ModelArg = Annotated[Optional[str], typer.Argument(
    help="Checkpoint folder or downloaded repo id. [default: the built-in reference model]", show_default=False)]
MaxTokens = Annotated[int, typer.Option("--max-tokens", "-m", help="Most tokens to generate.")]
Temp = Annotated[float, typer.Option("--temp", help="Sampling temperature; 0 = greedy.")]
TopP = Annotated[float, typer.Option("--top-p", help="Nucleus sampling threshold.")]
MinP = Annotated[float, typer.Option("--min-p", help="Minimum probability relative to the top token.")]
TopK = Annotated[int, typer.Option("--top-k", help="Sample among the k most likely tokens (0 = all).")]
Seed = Annotated[Optional[int], typer.Option("--seed", help="Random seed for reproducible sampling.")]
NoMtp = Annotated[bool, typer.Option("--no-mtp", help="Decode without the MTP draft layer.")]
NumDraft = Annotated[int, typer.Option("--num-draft", help="Tokens drafted by the MTP layer per step.")]
Stop = Annotated[Optional[List[str]], typer.Option("--stop", help="Stop string (repeatable).")]
Json = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout.")]


class NoModelError(GlmMlxError):
    hint = "Pass a checkpoint folder, e.g. glm-mlx chat ./GLM-5.1-mlx-4bit (glm-mlx download / convert make one)."


def resolve_model(model: str | None) -> str:
    """The model argument, or the built-in reference model when none is given."""
    if model:
        return model
    try:
        from glm_mlx.reference_model import DEFAULT_MODEL
    except ImportError:
        DEFAULT_MODEL = None
    if DEFAULT_MODEL is None or not Path(DEFAULT_MODEL).exists():
        raise NoModelError("no MODEL given and the built-in reference model is not installed")
    return str(DEFAULT_MODEL)


def distributed_group():
    """The mx.distributed group when started by mlx.launch with more than one rank, else None."""
    import os

    if "MLX_RANK" not in os.environ:
        return None
    import mlx.core as mx

    group = mx.distributed.init()
    return group if group.size() > 1 else None


def load_for_generation(model: str | None, context: int = 8192, mtp: bool = True):
    """(model, tokenizer, path): resolve, check memory before loading, load, wire memory.

    Under `glm-mlx launch` each rank loads only its layers; ranks other than 0 then follow rank 0's
    requests silently and exit when it does, so only rank 0 talks to the user.
    """
    import atexit

    from rich.console import Console

    from glm_mlx import load
    from glm_mlx.config import ModelArgs
    from glm_mlx.loading import read_config, resolve_path
    from glm_mlx.memory import check_memory, set_wired_limit

    path = resolve_path(resolve_model(model))
    group = distributed_group()
    if group is not None:
        from mlx_lm.tokenizer_utils import load as load_tokenizer

        from glm_mlx.distributed import follow, pipeline_load

        ranges, stage = _planned_split(path, group, mtp)
        pm, path = pipeline_load(path, group, ranges=ranges, mtp=mtp)
        # Each rank says what it holds beside what the plan priced, so the two can be checked.
        Console(stderr=True, highlight=False).print(
            f"pipeline rank {group.rank()}/{group.size()} on {stage.mac.label}: layers {stage.layers[0]}-{stage.layers[1]}, "
            f"weights {pm.resident_bytes} bytes (planned {stage.weights_bytes})", soft_wrap=True)
        if group.rank() != 0:
            follow(pm)
            raise typer.Exit(0)
        atexit.register(pm.close)
        return pm, load_tokenizer(path, eos_token_ids=pm.args.eos_token_ids or None), path
    check = check_memory(path, ModelArgs.from_dict(read_config(path)), context, mtp=mtp)
    if not check.fits:
        Console(stderr=True).print(f"[yellow]Warning:[/] {check.message}", soft_wrap=True)
    m, tok = load(path, mtp=mtp)
    if mtp and not m.has_mtp:
        Console(stderr=True).print("[dim]MTP off: this checkpoint has no MTP layer.[/]")
    set_wired_limit(check)
    return m, tok, path


def _planned_split(path, group, mtp: bool):
    """([start, end) per rank, this rank's planned stage): the planner's split for this pipeline's Macs,
    i.e. what `glm-mlx fit --model M --pipeline A,B` prints."""
    from glm_mlx.quantize.pipeline_plan import context_from_env, launch_plan, layer_ranges, rank_macs

    plan = launch_plan(path, rank_macs(group), context_from_env(), mtp)
    return layer_ranges(plan), plan.stages[group.rank()]
