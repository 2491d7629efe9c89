"""The GLMs `glm-mlx fit` knows by name (embedded configs), config loading by model_type, and which
smaller GLM fits a Mac that cannot hold the one asked for.

    glm-5.1        glm_mlx/data/glm-5.1-config.json        (glm_moe_dsa, the checkpoint's config.json)
    glm-5.3-flash  glm_mlx/data/glm-5.3-flash-config.json  (glm5_next; docs/glm5_next.md says where
                                                            each value comes from)
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from glm_mlx.errors import ConfigError, GlmMlxError
from glm_mlx.model.checkpoint import config_args
from glm_mlx.model.config import read_config_json

from .macs import Mac

# name -> (label, config file in glm_mlx/data)
EMBEDDED = {"glm-5.1": ("GLM-5.1", "glm-5.1-config.json"),
            "glm-5.3-flash": ("GLM-5.3-Flash", "glm-5.3-flash-config.json")}
ALIASES = {"glm5.1": "glm-5.1", "glm-5-1": "glm-5.1", "glm5.3-flash": "glm-5.3-flash", "glm-5.3flash": "glm-5.3-flash",
           "glm-5-3-flash": "glm-5.3-flash", "flash": "glm-5.3-flash", "glm5_next": "glm-5.3-flash", "glm_moe_dsa": "glm-5.1"}


def embedded_name(text: str | None) -> str | None:
    """The embedded model a name means ("GLM-5.3-Flash", "glm-5.3-flash", "glm5_next"...), else None."""
    if not text:
        return None
    key = text.strip().lower().replace(" ", "-")
    return key if key in EMBEDDED else ALIASES.get(key)


def args_from_dict(config: dict):
    """ModelArgs for glm_moe_dsa, Glm5NextArgs for glm5_next (a flat or a text_config-nested config.json):
    the model's own reading (glm_mlx.model.checkpoint.config_args)."""
    return config_args(config)


def args_from_file(path: str | Path):
    return config_args(read_config_json(path))


def embedded_args(name: str):
    """(args, label) of an embedded model by name."""
    key = embedded_name(name)
    if key is None:
        raise ConfigError(f"no embedded model named {name!r}", f"Known: {', '.join(EMBEDDED)}.")
    label, file = EMBEDDED[key]
    return args_from_file(files("glm_mlx") / "data" / file), label


def parse_models(text: str) -> list[str]:
    """"all" or a comma list of embedded names -> their keys, in EMBEDDED order for "all"."""
    if text.strip().lower() == "all":
        return list(EMBEDDED)
    keys = [embedded_name(t) for t in text.split(",") if t.strip()]
    if not keys or None in keys:
        raise ConfigError(f"cannot read models {text!r}", f"Use 'all' or a comma list of: {', '.join(EMBEDDED)}.")
    return keys


@dataclass
class Alternative:
    name: str  # embedded key, for --model
    label: str
    plan: object  # planner.Plan under the recipe found for this Mac
    solved: bool = False  # the default recipe does not fit: the plan is --solve's

    @property
    def command(self) -> str:
        return (f"glm-mlx fit --model {self.name} --mac {self.plan.mac.name} --context {self.plan.context}"
                + (" --solve" if self.solved else ""))

    def to_dict(self) -> dict:
        p = self.plan
        return {"model": self.name, "label": self.label, "recipe": p.recipe.name, "weights_bytes": p.weights_bytes,
                "bits_per_weight": 8 * p.weights_bytes / p.params, "context": p.context, "fits": p.fits,
                "max_context": p.max_context, "decode_tok_s": p.decode_tok_s, "command": self.command}


def smaller_that_fits(args, mac: Mac, context: int | None, mtp: bool = True) -> Alternative | None:
    """The largest embedded GLM with fewer parameters than `args` that fits `mac` at `context` (capped at
    its maximum): under the default recipe if that fits, else the best recipe for the Mac (--solve)."""
    from .inventory import inventory, param_count
    from .planner import best_recipe_for, plan
    from .recipe import default_recipe

    own = param_count(inventory(args, mtp))
    others = [(k, *embedded_args(k)) for k in EMBEDDED]
    others = sorted(((param_count(inventory(a, mtp)), k, a, lab) for k, a, lab in others), key=lambda t: -t[0])
    for n, key, a, label in others:
        if n >= own:
            continue
        ctx = min(context or a.max_position_embeddings, a.max_position_embeddings)
        p, solved = plan(a, default_recipe(), mac, ctx, mtp=mtp, model=label), False
        if p.fits == "no":
            try:
                p, solved = plan(a, best_recipe_for(a, mac, ctx, mtp), mac, ctx, mtp=mtp, model=label), True
            except GlmMlxError:  # PlanError: nothing on the ladder fits
                continue
        if p.fits != "no":
            return Alternative(key, label, p, solved)
    return None


__all__ = ["EMBEDDED", "Alternative", "args_from_dict", "args_from_file", "embedded_args", "embedded_name",
           "parse_models", "smaller_that_fits"]
