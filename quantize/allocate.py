"""Budget allocation: the mixed-precision recipe with the least estimated error under a size cap.

A simple greedy over tensor groups, meant to be extended by the quantizer (issue #5) with
measured importance. Every group starts at the top of a format ladder; while the total is over
budget, step down the group whose move adds the least error per byte saved (a move may skip
rungs, so each group walks the lower convex hull of its (bytes, error) points); then spend the
slack on the upgrades that remove the most error per byte.

Error of a group at a format = sensitivity * params * noise(format).
Sensitivity per parameter = usage * role weight:
  usage: the chance a weight takes part in a token - num_experts_per_tok / n_routed_experts for
    routed experts (8/256 on GLM-5.1), 1 for everything else;
  role weight (documented guesses until #5 measures them): lm_head 2 (every logit goes through
    it), routed down_proj 1.5 (more sensitive than gate/up in llama.cpp's experience),
    MTP layer 0.25 (it only moves draft acceptance, never the output), everything else 1.
Ties (identical expert layers) step down middle layers first: the first and last layers are
commonly the most sensitive, so they keep the extra bits.

With calibration data (an imatrix, quantize/imatrix.py) each group's default sensitivity is
re-weighted by measurement: x (the group's importance-weighted weight energy per parameter,
sum_j imp_j |W[:, j]|^2 / params, routed experts weighted by the tokens each received) / (the mean
of that energy over the groups of the same role). A layer whose inputs carry more energy into its
weights than its peers' gets more bits; roles keep their documented weights. (On glm-mini, with two
MoE layers, this did not beat the defaults: docs/quantization.md.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from glm_mlx.model.config import ModelArgs
from glm_mlx.errors import GlmMlxError

from .formats import Format, parse_format
from .inventory import MTP, ROUTED, Tensor, inventory, model_dtype_bytes
from .recipe import Recipe, Rule, resolve

# Affine formats from most to fewest bytes (MLX's fp modes are left to explicit recipes).
LADDER = tuple(parse_format(f) for f in (
    "affine8g64", "affine6g64", "affine5g64", "affine4g32", "affine4g64", "affine4g128",
    "affine3g32", "affine3g64", "affine3g128", "affine2g32", "affine2g64"))
ROLE_WEIGHT = {"lm_head": 2.0, "routed down": 1.5, MTP: 0.25}


class BudgetError(GlmMlxError):
    """No recipe on the ladder fits the budget."""

    hint = "Use a larger --target-size, a bigger Mac, or a pipeline over several Macs."


def noise(fmt: Format) -> float:
    """Relative round-to-nearest MSE: (group range / (2^bits - 1))^2, the range of a group of g
    Gaussian weights growing like sqrt(2 ln g) (smaller groups are a little more precise)."""
    return 0.0 if not fmt.quantized else 2 * math.log(fmt.group_size) / (2 ** fmt.bits - 1) ** 2


@dataclass
class Group:
    key: str  # role: "embed", "lm_head", "routed down", "routed gate/up", MTP, or a component
    rules: list[Rule]  # format-less rules selecting exactly this group's modules
    layer: int | None = None
    tensors: list[Tensor] = field(default_factory=list)

    @property
    def params(self) -> int:
        return sum(t.numel for t in self.tensors)


def sensitivity(args: ModelArgs, g: Group, measured: dict[int, float] | None = None) -> float:
    usage = args.num_experts_per_tok / args.n_routed_experts if g.key.startswith("routed") else 1.0
    return usage * ROLE_WEIGHT.get(g.key, 1.0) * (measured or {}).get(id(g), 1.0)


def measured_factors(gs: list[Group], importance) -> dict[int, float]:
    """id(group) -> its weight energy per parameter relative to the mean of its role (see above).
    Groups without measurements (or with none to compare to) keep factor 1."""
    if importance is None:
        return {}
    energy = {}
    for g in gs:
        e = [importance.wimp.get(t.module) for t in g.tensors]
        if all(v is not None for v in e) and g.params:
            energy[id(g)] = sum(e) / g.params
    out = {}
    for key in {g.key for g in gs}:
        members = [g for g in gs if g.key == key and id(g) in energy]
        mean = sum(energy[id(g)] for g in members) / max(len(members), 1)
        for g in members:
            out[id(g)] = energy[id(g)] / mean if mean > 0 else 1.0
    return out


def groups(args: ModelArgs, mtp: bool = True) -> list[Group]:
    """Quantizable weights in groups: one per component, the routed experts per layer."""
    out: dict[str, Group] = {}
    for t in inventory(args, mtp):
        if not (t.quantizable and t.name.endswith(".weight")):
            continue
        if t.mtp:
            name, g = "mtp", Group(MTP, [Rule(None, component=MTP)])
        elif t.module in ("model.embed_tokens", "lm_head"):
            name = t.module
            g = Group("embed" if name == "model.embed_tokens" else "lm_head", [Rule(None, match=name)])
        elif t.component == ROUTED:
            p, proj = t.module.rsplit(".", 1)
            down = proj == "down_proj"
            name = f"{p}.{'down' if down else 'gate_up'}"
            mods = [t.module] if down else [f"{p}.gate_proj", f"{p}.up_proj"]
            g = Group("routed down" if down else "routed gate/up", [Rule(None, match=m) for m in mods], t.layer)
        else:
            name, g = t.component, Group(t.component, [Rule(None, component=t.component)])
        out.setdefault(name, g).tensors.append(t)
    return list(out.values())


def allocate(args: ModelArgs, budget_bytes: float, mtp: bool = True, ladder=LADDER, name: str = "",
             importance=None) -> Recipe:
    """The recipe whose weights (every tensor, priced exactly) fit `budget_bytes` with least error;
    `importance` (an imatrix) replaces the default sensitivities by measured ones."""
    db = model_dtype_bytes(args)
    gs = groups(args, mtp)
    measured = measured_factors(gs, importance)
    fixed = sum(t.numel * t.dtype_bytes for t in inventory(args, mtp) if not (t.quantizable and t.name.endswith(".weight")))
    cost = [[sum(f.nbytes(t.shape, t.dtype_bytes) if f.fits(t.shape) else t.numel * db for t in g.tensors)
             for f in ladder] for g in gs]
    err = [[sensitivity(args, g, measured) * g.params * noise(f) for f in ladder] for g in gs]
    last = args.num_hidden_layers - 1
    edge = [min(g.layer, last - g.layer) if g.layer is not None else 0 for g in gs]  # distance from the ends
    level = [0] * len(gs)
    total = fixed + sum(c[0] for c in cost)

    def down(i):  # (added error per byte saved, -edge distance, target level) of group i's best move
        a = level[i]
        return min((((err[i][j] - err[i][a]) / (cost[i][a] - cost[i][j]), -edge[i], j)
                    for j in range(a + 1, len(ladder)) if cost[i][j] < cost[i][a]), default=None)

    moves = [down(i) for i in range(len(gs))]  # a group's best move changes only when the group moves
    while total > budget_bytes:
        best = min(((m, i) for i, m in enumerate(moves) if m), default=None)
        if best is None:
            raise BudgetError(f"the weights need at least {total / 1e9:.1f} GB even at {ladder[-1].name}; "
                              f"the budget is {budget_bytes / 1e9:.1f} GB")
        (_, _, j), i = best
        total -= cost[i][level[i]] - cost[i][j]
        level[i] = j
        moves[i] = down(i)
    while True:  # spend the slack: most error removed per byte spent, edge layers first
        ups = [((err[i][level[i]] - err[i][j]) / max(cost[i][j] - cost[i][level[i]], 1), -edge[i], -j, i)
               for i in range(len(gs)) for j in range(level[i])
               if total + cost[i][j] - cost[i][level[i]] <= budget_bytes]
        if not ups:
            break
        _, _, neg_j, i = max(ups)  # -j: on a tie, the smaller step up
        total += cost[i][-neg_j] - cost[i][level[i]]
        level[i] = -neg_j
    return _to_recipe(gs, [ladder[lv] for lv in level], name or f"budget {budget_bytes / 1e9:.1f} GB")


def _to_recipe(gs: list[Group], fmts: list[Format], name: str) -> Recipe:
    """Default = the format holding the most parameters; rules for every group off it."""
    weight: dict[Format, int] = {}
    for g, f in zip(gs, fmts):
        weight[f] = weight.get(f, 0) + g.params
    default = max(weight, key=lambda f: (weight[f], f.bits))
    rules, per_role, rest = [], {}, []
    for g, f in zip(gs, fmts):
        if g.key == MTP:  # first: MTP tensors also match the component and wildcard rules below
            rules.append(Rule(f, component=MTP))
        elif g.key.startswith("routed"):
            per_role.setdefault(g.key, []).append((g, f))
        elif f != default:
            rest += [Rule(f, r.match, r.component) for r in g.rules]
    for key, items in per_role.items():
        counts: dict[Format, int] = {}
        for _, f in items:
            counts[f] = counts.get(f, 0) + 1
        common = max(counts, key=lambda f: (counts[f], f.bits))
        rules += [Rule(f, r.match) for g, f in items if f != common for r in g.rules]
        if common != default:  # one wildcard rule for the layers at the common format
            projs = ("down_proj",) if key == "routed down" else ("gate_proj", "up_proj")
            rules += [Rule(common, match=f"*.mlp.switch_mlp.{p}") for p in projs]
    return Recipe(default, rules + rest, name)


def error_of(args: ModelArgs, recipe: Recipe, mtp: bool = True, importance=None) -> float:
    """The same error proxy for any recipe, to compare a mixed recipe with a uniform one."""
    res = resolve(args, recipe, mtp)
    gs = groups(args, mtp)
    measured = measured_factors(gs, importance)
    return sum(sensitivity(args, g, measured) * t.numel * noise(res.formats[t.module]) for g in gs for t in g.tensors)
