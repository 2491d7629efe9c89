"""`glm-mlx fit --compare`: per Mac, the best recipe that fits, its size, context and speed, as rows.

Per Mac and context the recipe is `planner.best_recipe_for` (the least estimated error that fits
RAM minus the OS reserve, i.e. after raising the wired limit), priced by `planner.plan`. A solve
depends on the Mac only through its weights budget, so Macs of the same memory size share one
solve (memoized by budget), and a Mac whose budget is below the smallest weights the ladder can
make (every quantizable tensor at its smallest format) is answered "no" without solving. That
keeps the whole catalog at a few contexts within seconds (`glm-mlx fit --compare` on GLM-5.1:
~1 s of solving; see the tests).

The default list: every catalog Mac under its plain name (the largest GPU bin of each memory
size) with at least MIN_MEMORY_GB of RAM, plus smaller ones where something fits.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from glm_mlx.model.config import ModelArgs
from glm_mlx.errors import GlmMlxError

from .allocate import LADDER
from .inventory import inventory, model_dtype_bytes
from .macs import Mac, catalog, get_mac, products
from .planner import Plan, best_recipe_for, plan, weights_budget
from .recipe import Recipe
from .working_set import cache_tokens, working_set, working_set_bytes

DEFAULT_CONTEXT = 32_768  # what --compare solves at without --context: a long agent session, not the maximum
MIN_MEMORY_GB = 64


class CompareError(GlmMlxError):
    hint = "Write contexts like 8K,32K,128K,max (K = 1024 tokens) and Macs as in `glm-mlx fit --mac list`."


@dataclass
class Solved:
    """The best recipe for one Mac at one context, priced (recipe None: nothing on the ladder fits)."""

    label: str  # the context as asked, e.g. "32K"
    context: int
    fits: str  # "yes" (default wired limit), "raise-wired-limit", "no"
    recipe: Recipe | None = None
    plan: Plan | None = None

    @property
    def kind(self) -> str | None:
        """"mixed" or "uniform affine4g64" (what best_recipe_for chose)."""
        return self.recipe.name.split(" for ")[0] if self.recipe else None

    @property
    def bits_per_weight(self) -> float | None:
        return 8 * self.plan.weights_bytes / self.plan.params if self.plan else None

    def to_dict(self) -> dict:
        p = self.plan
        d = {"label": self.label, "context": self.context, "fits": self.fits, "recipe_name": self.kind}
        keys = ("weights_bytes", "total_bytes", "max_context", "max_context_default_limit", "decode_tok_s",
                "prefill_tok_s", "decode_tok_s_1k", "prefill_tok_s_1k", "sysctl")
        d.update({k: getattr(p, k) if p else None for k in keys})
        d["bits_per_weight"] = self.bits_per_weight
        return d


@dataclass
class Row:
    mac: Mac
    weights_budget_bytes: int  # at the comparison's context
    best: Solved  # at the comparison's context
    contexts: list[Solved] = field(default_factory=list)  # one per asked context

    @property
    def fits_somewhere(self) -> bool:
        return any(s.fits != "no" for s in [self.best, *self.contexts])

    def to_dict(self) -> dict:
        m = self.mac
        return {"mac": {"name": m.name, "memory_gb": m.memory_gb, "bandwidth_gbs": m.bandwidth_gbs,
                        "gpu_cores": m.gpu_cores, "chip": m.chip, "products": list(products(m.chip))},
                "weights_budget_bytes": self.weights_budget_bytes, **self.best.to_dict(),
                "recipe": self.best.recipe.to_dict() if self.best.recipe else None,
                "contexts": [s.to_dict() for s in self.contexts]}


def parse_context(text: str, max_context: int) -> tuple[str, int]:
    """("8K", 8192): K = 1024 and M = 1024^2 tokens, "max" = the model's maximum; a context past the
    maximum is planned at the maximum ("200K" on GLM-5.1 is 202,752 tokens)."""
    t = text.strip()
    if t.lower() == "max":
        return "max", max_context
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kKmM]?)", t.replace(",", "").replace("_", ""))
    if not m:
        raise CompareError(f"cannot read context {text!r}")
    n = int(float(m[1]) * {"": 1, "k": 1024, "m": 1024 ** 2}[m[2].lower()])
    if n < 1:
        raise CompareError(f"context {text!r} is not a positive number of tokens")
    return t.upper() if m[2] else f"{n:,}", min(n, max_context)


def parse_contexts(text: str | None, max_context: int) -> list[tuple[str, int]]:
    return [parse_context(c, max_context) for c in (text or "").split(",") if c.strip()]


def smallest_weights(args: ModelArgs, mtp: bool = True) -> int:
    """The fewest weight bytes any recipe on the ladder makes (allocate's floor): each quantizable
    weight at its smallest format that fits its shape, everything else as stored."""
    db, total = model_dtype_bytes(args), 0
    for t in inventory(args, mtp):
        if t.quantizable and t.name.endswith(".weight"):
            total += min(f.nbytes(t.shape, t.dtype_bytes) if f.fits(t.shape) else t.numel * db for f in LADDER)
        else:
            total += t.numel * t.dtype_bytes
    return total


def default_macs(args: ModelArgs, context: int, mtp: bool = True, min_memory_gb: float = MIN_MEMORY_GB) -> list[Mac]:
    """Plain-named catalog Macs with at least `min_memory_gb`, or where something fits at `context`;
    the most memory first, then the most bandwidth."""
    floor = smallest_weights(args, mtp)
    macs = [m for n, m in catalog().items() if n == m.name and not re.search(r"-\d+c$", n)]
    keep = [m for m in macs if m.memory_gb >= min_memory_gb or weights_budget(args, m, context, mtp) >= floor]
    return sorted(keep, key=lambda m: (-m.memory_gb, -m.bandwidth_gbs, m.name))


def parse_mac_list(text: str) -> list[Mac]:
    macs = [get_mac(n) for n in text.split(",") if n.strip()]
    if not macs:
        raise CompareError(f"no Macs in {text!r}")
    return macs


class Comparison:
    """Solves and prices recipes for one model, memoizing solves by weights budget."""

    def __init__(self, args: ModelArgs, mtp: bool = True, model: str = ""):
        self.args, self.model = args, model
        self.mtp = mtp and bool(args.num_nextn_predict_layers)
        self.floor = smallest_weights(args, self.mtp)
        self._solves: dict[int, Recipe] = {}

    def solve(self, mac: Mac, label: str, context: int) -> Solved:
        budget = weights_budget(self.args, mac, context, self.mtp)
        if budget < self.floor:
            return Solved(label, context, "no")
        if budget not in self._solves:
            self._solves[budget] = best_recipe_for(self.args, mac, context, self.mtp)
        r = self._solves[budget]
        recipe = dataclasses.replace(r, name=f"{r.name.split(' for ')[0]} for {mac.name} at {context:,} tokens")
        p = plan(self.args, recipe, mac, context, mtp=self.mtp, model=self.model)
        return Solved(label, context, p.fits, recipe, p)

    def row(self, mac: Mac, context: int, contexts: list[tuple[str, int]]) -> Row:
        label = f"{context:,}"
        best = self.solve(mac, label, context)
        return Row(mac, weights_budget(self.args, mac, context, self.mtp), best,
                   [dataclasses.replace(best, label=lab) if c == context else self.solve(mac, lab, c)
                    for lab, c in contexts])


def compare(args: ModelArgs, macs: list[Mac] | None = None, context: int | None = None,
            contexts: list[tuple[str, int]] = (), mtp: bool = True, model: str = "") -> list[Row]:
    """One row per Mac (default: `default_macs`): the best recipe at `context` (default DEFAULT_CONTEXT,
    capped at the model's maximum) and at each of `contexts` ((label, tokens) pairs)."""
    context = min(DEFAULT_CONTEXT if context is None else context, args.max_position_embeddings)
    if context < 1:
        raise CompareError(f"context {context} is not a positive number of tokens")
    if macs is None:
        macs = default_macs(args, min([context, *(c for _, c in contexts)]), mtp)
    cmp = Comparison(args, mtp, model)
    return [cmp.row(m, context, list(contexts)) for m in macs]


def compare_models(models: list[tuple[str, ModelArgs, str]], macs: list[Mac] | None = None, context: int | None = None,
                   contexts: dict[str, list[tuple[str, int]]] | None = None, mtp: bool = True) -> dict[str, dict[str, Row]]:
    """Mac name -> {model key -> Row} for (key, args, label) models (`fit --compare --model all`). The
    default Macs: every Mac any of the models would list, the most memory first."""
    if macs is None:
        seen = {}
        for _, a, _ in models:
            ctx = min(DEFAULT_CONTEXT if context is None else context, a.max_position_embeddings)
            seen.update({m.name: m for m in default_macs(a, ctx, mtp)})
        macs = sorted(seen.values(), key=lambda m: (-m.memory_gb, -m.bandwidth_gbs, m.name))
    out: dict[str, dict[str, Row]] = {m.name: {} for m in macs}
    for key, a, label in models:
        for m, r in zip(macs, compare(a, macs, context, (contexts or {}).get(key, ()), mtp, label)):
            out[m.name][key] = r
    return out


def memory_curve(args: ModelArgs, recipe: Recipe, mac: Mac, mtp: bool = True, points: int = 96,
                 prefill_chunk: int = 2048, label: str | None = None) -> dict:
    """Memory against context for one Mac and recipe (the plot's data): bytes of weights, KV cache and
    working set at `points` contexts from 1 to the model's maximum, and the Mac's wired limits."""
    top = args.max_position_embeddings
    mtp = mtp and bool(args.num_nextn_predict_layers)
    p = plan(args, recipe, mac, top, mtp=mtp, prefill_chunk=prefill_chunk)
    xs = sorted({max(1, round(top * i / (points - 1))) for i in range(points)} | {p.max_context or 1})
    return {"mac": mac, "recipe": label or recipe.name, "bits_per_weight": 8 * p.weights_bytes / p.params,
            "context": xs, "weights": [p.weights_bytes] * len(xs),
            "kv_cache": [p.kv_bytes_per_token * cache_tokens(n) + p.state_bytes for n in xs],
            "working_set": [working_set_bytes(working_set(args, n, mtp, prefill_chunk)) for n in xs],
            "default_limit": mac.default_wired_limit, "max_limit": mac.max_wired_limit,
            "wired_limit": mac.wired_limit, "max_context": p.max_context}


def plot_curves(args: ModelArgs, rows: list[Row], mtp: bool = True, unfit: bool = False, most: int = 12) -> list[dict]:
    """memory_curve per row, under the row's best recipe (or the first asked context's that fits). Rows
    where nothing fits are drawn under the smallest uniform recipe when `unfit` (the Macs were named),
    or when no row fits at all (the first three)."""
    smallest = Recipe.uniform(LADDER[-1])
    curves = []
    for r in rows:
        s = next((s for s in [r.best, *r.contexts] if s.recipe), None)
        if s or unfit:
            label = f"{s.kind} (best at {s.label} tokens)" if s else smallest.name
            curves.append(memory_curve(args, s.recipe if s else smallest, r.mac, mtp, label=label))
    if not curves:
        curves = [memory_curve(args, smallest, r.mac, mtp) for r in rows[:3]]
    return curves[:most]
