"""Recipes: which format each weight gets, and the mlx-lm `config["quantization"]` they imply.

A recipe is a default format plus ordered override rules; the FIRST rule that matches a module
wins. A rule matches by `match` (an fnmatch glob over the module path, e.g.
"model.layers.*.mlp.switch_mlp.down_proj") and/or `component` (see inventory.COMPONENTS; "MTP"
matches every tensor of the MTP layer). JSON:

    {"name": "...", "default": "affine4g64", "method": "iq",
     "rules": [{"component": "routed experts", "match": "*.down_proj", "format": "affine4g128"}]}

`method` (optional, default "rtn") is how the converter rounds: "rtn" is plain `mx.quantize`, "iq"
importance-weighted (quantize/quantizer.py); it does not change any size.

Never quantized whatever the recipe says: norms (incl. the indexer's k_norm LayerNorm), the
router `mlp.gate.weight` (kept in the model dtype) and `e_score_correction_bias` (float32);
the inventory marks these not quantizable. A weight whose last dim is not divisible by its
format's group size stays unquantized; `Resolution.kept` records why. An unquantized format in a
rule ("bf16", "f32") means "not quantized": the weight keeps the model dtype (`convert --dtype`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path

from glm_mlx import atomic
from glm_mlx.model.config import ModelArgs
from glm_mlx.errors import GlmMlxError

from .formats import Format, FormatError, from_mlx, parse_format, unquantized
from .inventory import COMPONENTS, MTP, ROUTER, Tensor, inventory, model_dtype_bytes

# Keys of an mlx-lm quantization dict that are global settings, not module paths.
_GLOBAL_KEYS = {"group_size", "bits", "mode", "quant_method", "global_scale"}
METHODS = ("rtn", "iq")


class RecipeError(GlmMlxError):
    """A recipe file or recipe value that cannot be used."""

    hint = ('A recipe is JSON like {"default": "affine4g64", "rules": [{"component": "routed experts", '
            '"format": "affine3g64"}]}; `glm-mlx fit --solve --out FILE` writes one.')


def _component(name: str) -> str:
    key = str(name).strip().lower().replace("_", " ").replace("-", " ")
    for c in COMPONENTS:
        if c.lower() == key:
            return c
    raise RecipeError(f"unknown component {name!r} (one of: {', '.join(COMPONENTS)})")


@dataclass
class Rule:
    format: Format
    match: str | None = None
    component: str | None = None

    def matches(self, t: Tensor) -> bool:
        if self.match is not None and not fnmatchcase(t.module, self.match):
            return False
        if self.component is not None and not (t.component == self.component or (self.component == MTP and t.mtp)):
            return False
        return True

    def to_dict(self) -> dict:
        d = {k: v for k, v in (("match", self.match), ("component", self.component)) if v is not None}
        return {**d, "format": self.format.name}


@dataclass
class Recipe:
    default: Format
    rules: list[Rule] = field(default_factory=list)
    name: str = ""
    description: str = ""
    # How the converter rounds: "rtn" (mx.quantize) or "iq" (importance-weighted, quantize/quantizer.py).
    method: str = "rtn"

    def format_for(self, t: Tensor) -> Format:
        return self.rule_for(t)[1]

    def rule_for(self, t: Tensor) -> tuple[int | None, Format]:
        """(index of the first matching rule or None for the default, its format)."""
        for i, r in enumerate(self.rules):
            if r.matches(t):
                return i, r.format
        return None, self.default

    @classmethod
    def uniform(cls, fmt: Format | str, name: str = "") -> "Recipe":
        fmt = parse_format(fmt)
        return cls(fmt, [], name or f"uniform {fmt.name}")

    # --- JSON --------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {"name": self.name, "default": self.default.name, "rules": [r.to_dict() for r in self.rules]}
        if self.method != "rtn":
            d["method"] = self.method
        return {**d, "description": self.description} if self.description else d

    @classmethod
    def from_dict(cls, d, source: str = "recipe") -> "Recipe":
        if not isinstance(d, dict) or "default" not in d:
            raise RecipeError(f"{source}: expected a JSON object with a \"default\" format")
        try:
            rules = []
            for i, r in enumerate(d.get("rules", []) or []):
                if not isinstance(r, dict) or "format" not in r or not ({"match", "component"} & r.keys()):
                    raise RecipeError(f"{source}: rule {i} needs \"format\" and \"match\" and/or \"component\"")
                comp = _component(r["component"]) if r.get("component") is not None else None
                rules.append(Rule(parse_format(r["format"]), r.get("match"), comp))
            method = str(d.get("method", "rtn"))
            if method not in METHODS:
                raise RecipeError(f"{source}: method must be one of {', '.join(METHODS)}, not {method!r}")
            return cls(parse_format(d["default"]), rules, str(d.get("name", "")), str(d.get("description", "")), method)
        except FormatError as e:
            raise RecipeError(f"{source}: {e}") from None

    def save(self, path: str | Path) -> None:
        atomic.write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise RecipeError(f"recipe file {path} does not exist") from None
        except (OSError, UnicodeDecodeError) as e:
            raise RecipeError(f"cannot read recipe file {path}: {e}") from None
        except json.JSONDecodeError as e:
            raise RecipeError(f"recipe file {path} is not valid JSON: {e.msg} (line {e.lineno})") from None
        return cls.from_dict(d, source=str(path))


@dataclass
class Resolution:
    """Per-module outcome of a recipe on a config: the format each quantizable module is stored in."""

    formats: dict[str, Format]  # module path -> format (unquantized formats included)
    kept: dict[str, str]  # module path -> why the recipe's quantized format could not be used
    dtype: Format  # the model dtype: unquantizable tensors and kept modules use it
    unused_rules: list[int] = field(default_factory=list)  # rules that select no weight (typos?)

    def tensor_bytes(self, t: Tensor) -> int:
        """Exact bytes one tensor takes under this resolution (see formats.Format.nbytes)."""
        if t.quantizable and t.name.endswith(".weight"):
            return self.formats[t.module].nbytes(t.shape, t.dtype_bytes)
        return t.numel * t.dtype_bytes


def resolve(args: ModelArgs, recipe: Recipe, mtp: bool = True, tensors: list[Tensor] | None = None) -> Resolution:
    tensors = inventory(args, mtp) if tensors is None else tensors
    dtype = unquantized({2: "bf16", 4: "f32"}[model_dtype_bytes(args)])
    formats, kept, used = {}, {}, set()
    for t in tensors:
        if not (t.quantizable and t.name.endswith(".weight")):
            continue
        i, fmt = recipe.rule_for(t)
        used.add(i)
        if not fmt.quantized:  # "bf16"/"f32"/...: not quantized, stored in the model dtype as the converter
            fmt = dtype  # writes it (a bf16 checkpoint upcast to f32 gains no precision; --dtype sets it)
        if not fmt.fits(t.shape):
            kept[t.module] = f"last dim {t.shape[-1]} not divisible by {fmt.name}'s group size {fmt.group_size}"
            fmt = dtype
        formats[t.module] = fmt
    return Resolution(formats, kept, dtype, [i for i in range(len(recipe.rules)) if i not in used])


def quantization_config(args: ModelArgs, recipe: Recipe, mtp: bool = True) -> dict | None:
    """mlx-lm's `config["quantization"]`: global {"group_size","bits","mode"} plus, for every
    module stored differently, its own dict or False (not quantized). None if nothing is quantized.

    The router gates are listed as False explicitly, so a loader that treats them as Linear
    layers does not try to quantize them.
    """
    tensors = inventory(args, mtp)
    res = resolve(args, recipe, mtp, tensors)
    quantized = [f for f in res.formats.values() if f.quantized]
    if not quantized:
        return None
    glob = recipe.default if recipe.default.quantized else max(set(quantized), key=quantized.count)
    out: dict = dict(glob.to_mlx())
    for module, fmt in res.formats.items():
        if fmt != glob:
            out[module] = fmt.to_mlx()
    for t in tensors:
        if t.component == ROUTER and len(t.shape) == 2:
            out[t.module] = False
    return out


def recipe_from_quantization(q: dict, name: str = "from config.json") -> Recipe:
    """Inverse of `quantization_config`: a converted checkpoint's quantization dict as a Recipe."""
    if not isinstance(q, dict):
        raise RecipeError(f"config quantization entry {q!r} is not a dict")
    try:
        default = from_mlx({k: q[k] for k in ("group_size", "bits", "mode") if k in q})
        rules = [Rule(from_mlx(v) or unquantized(), match=k) for k, v in q.items()
                 if k not in _GLOBAL_KEYS and (v is False or isinstance(v, dict))]
    except FormatError as e:
        raise RecipeError(f"config quantization: {e}") from None
    return Recipe(default, rules, name)


def default_recipe() -> Recipe:
    """glm-mlx's default: fits GLM-5.1 (with MTP) in <= 361 GB (the llama.cpp IQ4_XS size that
    runs at full context on a 512 GB Mac) - 360.2 GB by `glm-mlx fit`.

    Why this split: routed experts are ~97% of the parameters but only 8 of 256 run per token,
    so they take the low bits (down_proj, the more sensitive projection, a little more); the
    small always-active parts (attention, indexer, shared experts, dense MLP) and the embeddings
    and lm_head (the largest single source of KL at 4 bits, docs/quantization.md) get 6 bits;
    the MTP layer, which only changes draft acceptance, stays at 4.
    """
    f = parse_format
    return Recipe(f("affine4g64"), [
        Rule(f("affine4g128"), match="*.mlp.switch_mlp.down_proj"),
        Rule(f("affine3g64"), component="routed experts"),
        Rule(f("affine6g64"), component="attention"),
        Rule(f("affine6g64"), component="indexer"),
        Rule(f("affine6g64"), component="shared experts"),
        Rule(f("affine6g64"), component="dense MLP"),
        Rule(f("affine6g64"), component="embeddings/head"),
    ], name="default (experts 3/4-bit, MTP 4-bit, the rest 6-bit)")
