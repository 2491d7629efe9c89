"""The layer split `glm-mlx launch` runs: the planner's (`plan_pipeline`), for the Macs of the pipeline.

`glm-mlx fit --model M --pipeline A,B` prints this plan; `glm-mlx launch --macs A,B -- chat M`
runs it. The Macs come from `--macs` (names, passed to every rank in GLM_MLX_PIPELINE_MACS) or,
without it, each rank detects its own machine and the ranks exchange what they found, so mixed
Macs get shares in proportion to what each can wire, not equal layers.
"""

from __future__ import annotations

import os
from pathlib import Path

from glm_mlx.model.config import ModelArgs, config_dtype
from glm_mlx.model.checkpoint import Checkpoint

from .formats import unquantized
from .macs import Mac, custom_mac, get_mac
from .planner import PipelinePlan, plan_pipeline
from .recipe import Recipe, recipe_from_quantization
from .this_mac import detect_mac

ENV_MACS = "GLM_MLX_PIPELINE_MACS"  # comma-separated catalog names, one per rank
ENV_CONTEXT = "GLM_MLX_PIPELINE_CONTEXT"  # the context the split reserves KV for [default: the model's maximum]


def checkpoint_recipe(config: dict) -> Recipe:
    """What a checkpoint holds: its quantization dict, else every weight unquantized at its stored dtype."""
    if config.get("quantization"):
        return recipe_from_quantization(config["quantization"])
    name = config_dtype(config)
    return Recipe.uniform(unquantized(name), name=f"as stored ({name})")


def parse_macs(text: str) -> list[Mac]:
    return [get_mac(m) for m in text.split(",") if m.strip()]


def launch_plan(path, macs: list[Mac], context: int | None = None, mtp: bool = True) -> PipelinePlan:
    """The planner's pipeline over `macs` for a checkpoint (folder or Checkpoint; its own weights' sizes)."""
    ckpt = Checkpoint.open(path)
    return plan_pipeline(ckpt.args, checkpoint_recipe(ckpt.config), macs, context, mtp)


def layer_ranges(plan: PipelinePlan) -> list[tuple[int, int]]:
    """[start, end) per rank, as glm_mlx.distributed.pipeline takes them (the plan's stages are inclusive)."""
    return [(s.layers[0], s.layers[1] + 1) for s in plan.stages]


def rank_macs(group) -> list[Mac]:
    """The Mac of every rank: named in GLM_MLX_PIPELINE_MACS, else detected by each rank and shared."""
    named = os.environ.get(ENV_MACS)
    if named:
        macs = parse_macs(named)
        if len(macs) != group.size():
            from glm_mlx.distributed.split import DistributedError

            raise DistributedError(f"--macs names {len(macs)} Macs for {group.size()} ranks",
                                   "Name one Mac per rank, in rank order.")
        return macs
    import mlx.core as mx

    mine = detect_mac()
    row = mx.zeros((group.size(), 2), mx.float32)  # (rank, [memory GB, bandwidth GB/s])
    row[group.rank()] = mx.array([mine.memory_gb, mine.bandwidth_gbs], mx.float32)
    table = mx.distributed.all_sum(row, group=group).tolist()  # every rank learns every rank's machine
    # Every rank builds the same list from the same table, so every rank computes the same split.
    return [custom_mac(round(m, 3), bw) for m, bw in table]


def context_from_env() -> int | None:
    value = os.environ.get(ENV_CONTEXT)
    return int(value) if value else None
