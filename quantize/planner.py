"""Memory planner: will a config fit a Mac under a recipe, at what context, and how fast.

Everything is priced from a config alone: weights exactly (formats.py via recipe.resolve), the
KV cache from `ModelArgs.cache_bytes_per_token` (the contract with the model's caches) over the
rows the cache allocates, and the working set (a prefill chunk's transient tensors) from
`working_set.py`. Speeds are a bandwidth roofline (decode) and a compute roofline (prefill) with
efficiencies calibrated on the published M3 Ultra runs (`calibration`). Hooks for later checks:
`Weights.tensor_bytes` (per tensor, for a converted checkpoint to match to the byte) and
`Plan.total_bytes` (tests/test_planner_memory.py checks it against MLX's measured peak memory).
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field
from importlib.resources import files

from glm_mlx.model.config import ModelArgs
from glm_mlx.errors import GlmMlxError
from glm_mlx.distributed.split import split_layers

from .allocate import LADDER, BudgetError, allocate, error_of
from .inventory import ROUTED, inventory, model_dtype_bytes
from .macs import GiB, Mac, get_mac, sysctl_command
from .next_prices import is_next, layer_cache_bytes, state_bytes
from .next_costs import next_assumptions
from .recipe import Recipe, default_recipe, resolve
from .working_set import cache_tokens, working_set, working_set_bytes

HEADROOM = 2 * GiB  # asked for above the plan when raising the wired limit (allocator slack)
# Published GLM-5.1 MLX runs on an M3 Ultra 512 GB, 1024-token prompt, 512 generated
# (reference notes): (bits per weight, prefill tok/s, decode tok/s).
PUBLISHED_M3_ULTRA = ((4.5, 193.6, 17.26), (3.6, 190.5, 17.87), (2.9, 194.2, 19.53))


class PlanError(GlmMlxError):
    """The planner cannot produce what was asked (nothing fits, bad context)."""

    hint = "Try a smaller context, a lower-bit recipe (--solve), or a pipeline over several Macs."


def glm51_args() -> ModelArgs:
    """The embedded GLM-5.1 config (the checkpoint's config.json)."""
    return ModelArgs.from_file(files("glm_mlx") / "data" / "glm-5.1-config.json")


@dataclass
class Weights:
    total: int
    by_component: dict[str, int]
    params: int
    tensor_bytes: dict[str, int]  # tensor name -> exact bytes (all arrays it becomes)
    read_per_token: dict[str, float]  # tensor name -> bytes a decoded token reads of it
    kept: dict[str, str]  # modules left unquantized, and why
    unused_rules: list[dict]  # recipe rules that select no weight of this config
    decode_bytes: int  # weights read per decoded token (see `price`)
    decode_params: int  # matching parameter count (prefill flops = 2 x this)


def price(args: ModelArgs, recipe: Recipe, mtp: bool = True) -> Weights:
    """Exact weight bytes. Per decoded token the model reads every weight once except: one row
    of embed_tokens, num_experts_per_tok / n_routed of each routed expert tensor, and nothing of
    the MTP layer (speculative decoding's gain is not modelled)."""
    tensors = inventory(args, mtp)
    res = resolve(args, recipe, mtp, tensors)
    by, tb, read, dec_p = {}, {}, {}, 0.0
    for t in tensors:
        b = tb[t.name] = res.tensor_bytes(t)
        by[t.group] = by.get(t.group, 0) + b
        frac = 0.0 if t.mtp else (1 / t.shape[0] if t.module == "model.embed_tokens"
                                  else args.num_experts_per_tok / args.n_routed_experts if t.component == ROUTED else 1.0)
        read[t.name] = b * frac
        dec_p += t.numel * frac * (t.module != "model.embed_tokens")  # a lookup is not a matmul
    unused = [recipe.rules[i].to_dict() for i in res.unused_rules]
    return Weights(sum(tb.values()), by, sum(t.numel for t in tensors), tb, read, res.kept, unused,
                   int(sum(read.values())), int(dec_p))


def kv_read_bytes(args: ModelArgs, position: int, dtype_bytes: int = 2) -> int:
    """Cache bytes one decode step reads at `position`: min(position, index_topk) latent rows per
    layer, plus every indexer key of the context in layers with their own indexer (past top-k)."""
    if is_next(args):  # GLM-5.3-Flash: DSA rows, pooled keys and the KDA states (next_costs.py)
        from .next_costs import next_kv_read_bytes

        return next_kv_read_bytes(args, position, dtype_bytes)
    rows = min(position, args.index_topk) * args.latent_bytes_per_token(dtype_bytes) * args.num_hidden_layers
    own = sum(args.has_indexer(l) for l in range(args.num_hidden_layers))
    return rows + (own * position * args.indexer_bytes_per_token(dtype_bytes) if position > args.index_topk else 0)


def attention_flops(args: ModelArgs, n: int) -> float:
    """Sum over prompt positions 1..n of attention + indexer flops (closed forms, no loop)."""
    if is_next(args):
        from .next_costs import next_attention_flops

        return next_attention_flops(args, n)
    T = args.index_topk
    keys = n * (n + 1) / 2 if n <= T else T * (T + 1) / 2 + (n - T) * T  # sum of min(p, T)
    past = (n * (n + 1) - T * (T + 1)) / 2 if n > T else 0  # sum of p over p > T
    own = sum(args.has_indexer(l) for l in range(args.num_hidden_layers))
    H = args.num_attention_heads
    return (2 * H * (args.qk_head_dim + args.v_head_dim) * keys * args.num_hidden_layers
            + 2 * args.index_n_heads * args.index_head_dim * past * own)


def _decode_s(mac: Mac, bytes_per_token: float, eff: float) -> float:
    return bytes_per_token / (eff * mac.bandwidth_gbs * 1e9)


def _prefill_s(args, w: Weights, mac: Mac, n: int, chunk: int, eff_p: float, eff_d: float) -> float:
    """Seconds to prefill n tokens: compute-bound (2 flops per active weight + attention), but
    never faster than reading every weight once per chunk."""
    compute = (2 * w.decode_params * n + attention_flops(args, n)) / (eff_p * mac.gpu_flops)
    memory = math.ceil(n / chunk) * w.total / (eff_d * mac.bandwidth_gbs * 1e9)
    return max(compute, memory)


@functools.cache
def calibration(points: tuple[tuple[float, float, float], ...] = PUBLISHED_M3_ULTRA,
                held_out: tuple[tuple[float, float, float], ...] = ()) -> dict:
    """Decode and prefill efficiencies fitted (least squares) to `points` (bpw, prefill, decode tok/s),
    by default all of PUBLISHED_M3_ULTRA, and the model's speeds for `points` and `held_out` runs
    (the tests fit on two published runs and predict the third).

    The published quants are modelled as mlx-lm builds them (no MTP layer): every non-expert
    weight at affine 4-bit g64, routed experts at whatever bits make the total come to the
    published bits per weight. Decode at position 1280 (1024 prompt + half the 512 generated).
    Result (see tests): decode efficiency ~0.45 of the 819 GB/s, prefill ~0.5 of fp16 peak,
    reproducing each published decode figure within 10% and prefill within 2%; fitted on any two
    runs, the held-out third is predicted within 10% (decode) and 3% (prefill).
    """
    args, mac = glm51_args(), get_mac("m3-ultra-512")
    w4 = price(args, Recipe.uniform("affine4g64"), mtp=False)
    experts4 = sum(b for n, b in w4.tensor_bytes.items() if ".switch_mlp." in n)

    def decode_read(bpw: float) -> float:  # bytes read per decoded token at this published bpw
        experts = w4.params * bpw / 8 - (w4.total - experts4)
        return w4.decode_bytes + (experts - experts4) * args.num_experts_per_tok / args.n_routed_experts \
            + kv_read_bytes(args, 1280)

    rows = [(bpw, prefill, decode, decode_read(bpw)) for bpw, prefill, decode in points]
    sum_tb = sum(r / d for _, _, d, r in rows)
    sum_bb = sum(r * r for _, _, _, r in rows)
    eff_d = sum_bb / (sum_tb * mac.bandwidth_gbs * 1e9)  # min sum (t_i - B_i / (e BW))^2 over 1/e
    flops = 2 * w4.decode_params * 1024 + attention_flops(args, 1024)
    mean_t = sum(1024 / p for _, p, _, _ in rows) / len(rows)
    eff_p = flops / (mean_t * mac.gpu_flops)

    def table(runs):
        return [{"bpw": b, "decode": d, "decode_model": 1 / _decode_s(mac, decode_read(b), eff_d), "prefill": p,
                 "prefill_model": 1024 / _prefill_s(args, w4, mac, 1024, 2048, eff_p, eff_d)} for b, p, d in runs]

    return {"decode_efficiency": eff_d, "prefill_efficiency": eff_p, "points": table(points),
            "held_out": table(held_out)}


@dataclass
class Plan:
    model: str
    mac: Mac
    context: int
    mtp: bool
    recipe: Recipe
    cache_dtype_bytes: int
    prefill_chunk: int
    params: int
    weights_bytes: int
    weights_by_component: dict[str, int]
    kept_unquantized: dict[str, str]
    unused_rules: list[dict]
    kv_bytes_per_token: int
    kv_bytes: int
    working_set: dict[str, int]
    working_set_bytes: int
    total_bytes: int
    os_allowance_bytes: int
    wired_limit_bytes: int
    max_wired_limit_bytes: int
    fits: str
    sysctl: str | None
    max_context: int
    max_context_default_limit: int
    decode_bytes_per_token: int
    decode_tok_s: float
    prefill_tok_s: float
    decode_tok_s_1k: float
    prefill_tok_s_1k: float
    assumptions: list[str] = field(default_factory=list)
    kv_bits: int | None = None  # the latent KV cache's quantization (ModelArgs.kv_cache_bits); None: model dtype
    state_bytes: int = 0  # per-sequence cache that does not grow with the context (GLM-5.3-Flash's KDA), in kv_bytes

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mac"] = {"name": self.mac.name, "memory_gb": self.mac.memory_gb, "bandwidth_gbs": self.mac.bandwidth_gbs,
                    "gpu_cores": self.mac.gpu_cores}
        d["recipe"] = self.recipe.to_dict()
        return d


def plan(args: ModelArgs, recipe: Recipe, mac: Mac, context: int | None = None, mtp: bool = True,
         cache_dtype_bytes: int = 2, prefill_chunk: int = 2048, model: str = "") -> Plan:
    context = args.max_position_embeddings if context is None else int(context)
    if not 1 <= context <= args.max_position_embeddings:
        raise PlanError(f"context {context:,} is outside 1..{args.max_position_embeddings:,} (max_position_embeddings)",
                        "Pass a --context the model supports.")
    mtp = mtp and bool(args.num_nextn_predict_layers)
    w = price(args, recipe, mtp)
    kvpt, state = args.cache_bytes_per_token(cache_dtype_bytes, mtp), state_bytes(args, cache_dtype_bytes, mtp)

    def total_at(n: int) -> int:
        return w.total + kvpt * cache_tokens(n) + state + working_set_bytes(working_set(args, n, mtp, prefill_chunk))

    ws = working_set(args, context, mtp, prefill_chunk)
    total = total_at(context)
    default, top = mac.wired_limit, mac.max_wired_limit  # the limit in force: raised on this Mac, else macOS's
    fits = "yes" if total <= default else "raise-wired-limit" if total <= top else "no"
    sysctl = None
    if fits == "raise-wired-limit":
        sysctl = sysctl_command(min(top, -(-(total + HEADROOM) // GiB) * GiB))
    cal = calibration()
    eff_d, eff_p = cal["decode_efficiency"], cal["prefill_efficiency"]

    def decode(n):
        return 1 / _decode_s(mac, w.decode_bytes + kv_read_bytes(args, n, cache_dtype_bytes), eff_d)

    def prefill(n):
        return n / _prefill_s(args, w, mac, n, min(prefill_chunk, n), eff_p, eff_d)

    return Plan(
        model=model, mac=mac, context=context, mtp=mtp, recipe=recipe, cache_dtype_bytes=cache_dtype_bytes,
        prefill_chunk=prefill_chunk, params=w.params, weights_bytes=w.total, weights_by_component=w.by_component,
        kept_unquantized=w.kept, unused_rules=w.unused_rules, kv_bytes_per_token=kvpt,
        kv_bytes=kvpt * cache_tokens(context) + state, working_set=ws,
        working_set_bytes=working_set_bytes(ws), total_bytes=total, os_allowance_bytes=mac.memory_bytes - top,
        wired_limit_bytes=default, max_wired_limit_bytes=top, fits=fits, sysctl=sysctl,
        max_context=max_context(total_at, top, args),
        max_context_default_limit=max_context(total_at, default, args),
        decode_bytes_per_token=w.decode_bytes + kv_read_bytes(args, context, cache_dtype_bytes),
        decode_tok_s=decode(context), prefill_tok_s=prefill(context),
        decode_tok_s_1k=decode(1024), prefill_tok_s_1k=prefill(1024),
        assumptions=assumptions(mac, cal, mtp, prefill_chunk) + kv_cache_assumptions(args) + next_assumptions(args, mtp),
        kv_bits=args.kv_cache_bits, state_bytes=state,
    )


def max_context(total_at, limit: int, args: ModelArgs) -> int:
    """Largest context n whose total fits `limit` while n + 1 does not (or max_position_embeddings
    if that fits); 0 if none. Bisection: the cache grows in steps and the indexer's query chunks
    are rounded, so the total is not linear in n."""
    cap = args.max_position_embeddings
    if total_at(1) > limit:
        return 0
    if total_at(cap) <= limit:
        return cap
    lo, hi = 1, cap  # total_at(lo) fits, total_at(hi) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if total_at(mid) <= limit else (lo, mid)
    return lo


def assumptions(mac: Mac, cal: dict, mtp: bool, chunk: int) -> list[str]:
    return [
        f"Default GPU wired limit {mac.default_wired_limit / GiB:.1f} GiB (macOS's recommendedMaxWorkingSetSize by RAM "
        f"size); raising it leaves {mac.os_reserve / GiB:.0f} GiB to macOS and other apps."
        + (f" This Mac's limit is raised to {mac.wired_limit / GiB:.1f} GiB (iogpu.wired_limit_mb={mac.wired_limit_mb})."
           if mac.wired_limit_mb else ""),
        "Weights priced exactly as MLX stores them; routed experts read at num_experts_per_tok / n_routed per token.",
        f"Prefill in {chunk}-token chunks (logits for the last position only); DSA attends min(context, index_topk) keys "
        "per query; the indexer scores the whole context for a few queries at a time.",
        f"Decode = {cal['decode_efficiency']:.2f} x bandwidth / bytes read per token; prefill = "
        f"{cal['prefill_efficiency']:.2f} x fp16 GPU peak / flops per token; both fitted to published M3 Ultra runs.",
        "MTP layer " + ("held in memory; speculative-decoding speed-up (+24-31% reported) not included."
                        if mtp else "excluded (--no-mtp)."),
        "Sizes in GB are 10^9 bytes; Mac memory labels are GiB as Apple sells them.",
    ]


def kv_cache_assumptions(args: ModelArgs) -> list[str]:
    if not args.kv_cache_bits:
        return []
    return [f"KV cache latents stored as {args.kv_cache_bits}-bit codes with a scale and bias per "
            f"{args.kv_cache_group_size} values (--kv-bits {args.kv_cache_bits}); rope and indexer keys as without it."]


# --- solve: the best recipe for a Mac ------------------------------------------------------------
def weights_budget(args: ModelArgs, mac: Mac, context: int, mtp: bool = True, cache_dtype_bytes: int = 2,
                   prefill_chunk: int = 2048, within_default_limit: bool = False) -> int:
    """Bytes left for weights once the KV cache and working set at `context` are wired."""
    mtp = mtp and bool(args.num_nextn_predict_layers)
    limit = mac.wired_limit if within_default_limit else mac.max_wired_limit
    ws = working_set_bytes(working_set(args, context, mtp, prefill_chunk))
    return (limit - args.cache_bytes_per_token(cache_dtype_bytes, mtp) * cache_tokens(context) - ws
            - state_bytes(args, cache_dtype_bytes, mtp))


def best_recipe_for(args: ModelArgs, mac: Mac, context: int | None = None, mtp: bool = True,
                    cache_dtype_bytes: int = 2, prefill_chunk: int = 2048, within_default_limit: bool = False) -> Recipe:
    """The recipe with the least estimated error (allocate.error_of) that fits `mac` at `context`:
    the better of the largest uniform format on the ladder and the greedy mixed allocation."""
    context = args.max_position_embeddings if context is None else context
    mtp = mtp and bool(args.num_nextn_predict_layers)
    budget = weights_budget(args, mac, context, mtp, cache_dtype_bytes, prefill_chunk, within_default_limit)
    where = f"{mac.name} at {context:,} tokens"
    candidates = [Recipe.uniform(f, f"uniform {f.name} for {where}") for f in LADDER]
    first = next((r for r in candidates if price(args, r, mtp).total <= budget), None)  # priced until one fits
    candidates = [first] if first else []
    try:
        candidates.append(allocate(args, budget, mtp, name=f"mixed for {where}"))
    except BudgetError:
        pass
    if not candidates:
        n = pipeline_size(args, mac, context, mtp)
        raise PlanError(f"no recipe down to {LADDER[-1].name} fits {where} ({max(budget, 0) / 1e9:.0f} GB left for weights)",
                        f"Try a smaller --context, or the default recipe over {n} x {mac.name} (--pipeline)." if n else None)
    best = min(candidates, key=lambda r: error_of(args, r, mtp))
    best.description = f"weights budget {budget / 1e9:.1f} GB; priced {price(args, best, mtp).total / 1e9:.1f} GB"
    return best


# --- multi-Mac pipeline ----------------------------------------------------------------------------
@dataclass
class Stage:
    mac: Mac
    layers: tuple[int, int]  # [first, last] decoder layers (the MTP layer rides with the last stage)
    weights_bytes: int
    kv_bytes: int
    working_set_bytes: int
    total_bytes: int
    fits: str
    decode_bytes_per_token: int


@dataclass
class PipelinePlan:
    stages: list[Stage]
    context: int
    link_bytes_per_token: int  # activations crossing all boundaries per token (decode and prefill alike)
    fits: str
    decode_tok_s: float


def plan_pipeline(args: ModelArgs, recipe: Recipe, macs: list[Mac], context: int | None = None, mtp: bool = True,
                  cache_dtype_bytes: int = 2, prefill_chunk: int = 2048) -> PipelinePlan:
    """Contiguous layer ranges over N Macs, sized in proportion to what each Mac can wire.
    Rank 0 holds the embeddings, the last rank the final norm, lm_head and the MTP layer. Each
    boundary passes one hidden vector (hidden_size x model-dtype bytes) per token."""
    context = args.max_position_embeddings if context is None else context
    mtp = mtp and bool(args.num_nextn_predict_layers)
    n = len(macs)
    if not 1 <= n <= args.num_hidden_layers:
        raise PlanError(f"a pipeline needs 1..{args.num_hidden_layers} Macs (got {n})")
    w = price(args, recipe, mtp)
    L = args.num_hidden_layers
    layer_w, layer_read, side_w, side_read = [0] * L, [0.0] * L, [0, 0], [0.0, 0.0]
    for t in inventory(args, mtp):
        b, r = w.tensor_bytes[t.name], w.read_per_token[t.name]
        if t.layer is not None and not t.mtp:
            layer_w[t.layer] += b
            layer_read[t.layer] += r
        else:  # embeddings to rank 0; final norm, lm_head, MTP layer to the last rank
            side = 0 if t.module == "model.embed_tokens" else 1
            side_w[side] += b
            side_read[side] += r
    rows = cache_tokens(context)
    layer_kv = [layer_cache_bytes(args, l, rows, cache_dtype_bytes) for l in range(L)]
    mtp_kv = args.cache_bytes_per_token(cache_dtype_bytes, mtp) * rows + state_bytes(args, cache_dtype_bytes, mtp) - sum(layer_kv)
    ws_all = working_set(args, context, mtp, prefill_chunk)
    ws_last = working_set_bytes(ws_all)
    ws_mid = working_set_bytes({k: v for k, v in ws_all.items() if k not in ("logits", "MTP layer")})  # last rank only
    # With MTP the last rank also keeps a copy of the embedding (the MTP layer embeds draft tokens).
    embed_copy = side_w[0] if mtp and n > 1 else 0
    fixed = [(side_w[0] if i == 0 else 0) + (side_w[1] + embed_copy + mtp_kv + ws_last if i == n - 1 else ws_mid)
             for i in range(n)]
    caps = [max(m.max_wired_limit - f, 1) for m, f in zip(macs, fixed)]  # room left for decoder layers
    sizes = [layer_w[l] + layer_kv[l] for l in range(L)]
    # The same split the runtime uses (glm_mlx.distributed.pipeline): cuts only before full-indexer layers.
    bounds = [(a, b - 1) for a, b in split_layers(args, n, sizes, caps)]
    stages = []
    for i, (mac, (a, b)) in enumerate(zip(macs, bounds)):
        first, last = i == 0, i == n - 1
        wb = sum(layer_w[a:b + 1]) + (side_w[0] if first else 0) + (side_w[1] + embed_copy if last else 0)
        kv = sum(layer_kv[a:b + 1]) + (mtp_kv if last else 0)
        ws = ws_last if last else ws_mid
        tot = wb + kv + ws
        fits = "yes" if tot <= mac.default_wired_limit else "raise-wired-limit" if tot <= mac.max_wired_limit else "no"
        read = sum(layer_read[a:b + 1]) + (side_read[0] if first else 0) + (side_read[1] if last else 0)
        read += kv_read_bytes(args, context, cache_dtype_bytes) * (b - a + 1) / L
        stages.append(Stage(mac, (a, b), wb, kv, ws, tot, fits, int(read)))
    eff = calibration()["decode_efficiency"]
    seconds = sum(_decode_s(s.mac, s.decode_bytes_per_token, eff) for s in stages)
    worst = max((s.fits for s in stages), key=("yes", "raise-wired-limit", "no").index)
    streams = getattr(args, "hc_mult", 1)  # GLM-5.3-Flash passes its hc_mult residual streams
    return PipelinePlan(stages, context, (n - 1) * streams * args.hidden_size * model_dtype_bytes(args), worst, 1 / seconds)


def pipeline_size(args: ModelArgs, mac: Mac, context: int, mtp: bool = True, recipe: Recipe | None = None,
                  max_macs: int = 8) -> int:
    """Fewest copies of `mac` a pipeline needs under `recipe` (default: the default recipe), 0 if > max_macs."""
    recipe = recipe or default_recipe()
    for n in range(2, max_macs + 1):
        if plan_pipeline(args, recipe, [mac] * n, context, mtp).fits != "no":
            return n
    return 0
