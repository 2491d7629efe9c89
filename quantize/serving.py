"""Serving plan: beside the weights, how many sequences decode together (`glm-mlx serve --max-batch`)
and how many tokens of prefix cache fit in RAM (`--cache-memory`), from a memory plan alone."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .planner import Plan
from .working_set import cache_tokens

# Default batch ceiling: past ~8 sequences a decode step stops being bound by reading the weights
# (each sequence adds its own experts and attention), so more sequences buy little throughput and
# the memory is worth more as prefix cache.
DEFAULT_MAX_BATCH = 8


@dataclass
class ServingPlan:
    limit_bytes: int  # the wired limit planned against (the raised one when the model needs it)
    max_batch: int  # sequences whose full-context caches fit beside the weights
    batch_kv_bytes: int
    prefix_cache_bytes: int  # what is left for the prefix cache's RAM tier
    prefix_cache_tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


def split_room(room: int, per_sequence: int, max_batch: int | None = None) -> tuple[int, int]:
    """Room beside the weights (bytes or tokens) -> (sequences decoding together, room left for the
    prefix cache): max_batch, or as many full-context caches as fit (at least 1, at most
    DEFAULT_MAX_BATCH). `glm-mlx fit` prices it from the config, `glm-mlx serve` from the machine."""
    fit = max(0, room // per_sequence) if per_sequence else 0
    batch = max(1, min(fit, DEFAULT_MAX_BATCH)) if max_batch is None else max_batch
    return batch, max(0, room - batch * per_sequence)


def serving_plan(p: Plan, max_batch: int | None = None) -> ServingPlan:
    """Sequences of p.context tokens each hold their own KV cache; the working set is one prefill chunk
    at a time (the server prefills one chunk per step). The prefix cache stores the same bytes per
    token as the KV cache (latent KV, indexer keys, MTP rows). max_batch None: as many as fit, at
    most DEFAULT_MAX_BATCH."""
    limit = p.wired_limit_bytes if p.fits == "yes" else p.max_wired_limit_bytes
    per_seq = p.kv_bytes_per_token * cache_tokens(p.context) + p.state_bytes  # + GLM-5.3-Flash's KDA state
    batch, left = split_room(limit - p.weights_bytes - p.working_set_bytes, per_seq, max_batch)
    return ServingPlan(limit, batch, batch * per_seq, left, left // p.kv_bytes_per_token if p.kv_bytes_per_token else 0)


# --- projections for the serving benchmark (the planner's speed model, extended to batches) ------
SSD_READ_GBS = 6.0  # Mac Studio internal SSD, sequential read (Apple quotes up to ~7 GB/s)


def batch_decode_tok_s(args, recipe, mac, batch: int, context: int, mtp: bool = True,
                       acceptance: float | None = None) -> float:
    """Aggregate tok/s of `batch` sequences decoding together at `context` tokens each.

    A step reads the shared weights once, each routed expert that any token of the step picked
    (expected fraction 1 - (1 - k/n)^tokens of the experts, routing taken as independent), one embedding
    row per token and the KV rows per sequence; and it cannot beat the compute bound (2 flops per active
    weight per token). Efficiencies are the planner's fitted ones.
    acceptance: with MTP in the batch, each pass verifies a draft per sequence (2 tokens each, the MTP
    layer drafting the next) and yields 1 + acceptance tokens per sequence; None: plain passes."""
    from .inventory import ROUTED, inventory
    from .planner import calibration, kv_read_bytes, price

    w = price(args, recipe, mtp)
    tokens = batch * (1 if acceptance is None else 2)
    touched = 1 - (1 - args.num_experts_per_tok / args.n_routed_experts) ** tokens
    read = 0.0
    for t in inventory(args, mtp):
        if t.mtp and acceptance is None:
            continue
        b = w.tensor_bytes[t.name]
        read += b * tokens / t.shape[0] if t.module == "model.embed_tokens" else b * touched if t.component == ROUTED else b
    read += batch * kv_read_bytes(args, context)
    cal = calibration()
    memory_s = read / (cal["decode_efficiency"] * mac.bandwidth_gbs * 1e9)
    compute_s = 2 * w.decode_params * tokens / (cal["prefill_efficiency"] * mac.gpu_flops)
    return batch * (1 if acceptance is None else 1 + acceptance) / max(memory_s, compute_s)


def prefill_seconds(args, recipe, mac, tokens: int, context: int, mtp: bool = True, chunk: int = 2048) -> float:
    """Seconds to prefill `tokens` new tokens at the end of a `context`-token prompt (attention over the
    cached part included: the difference of the planner's prefill times at context and context - tokens)."""
    from .planner import _prefill_s, calibration, price

    w = price(args, recipe, mtp)
    cal = calibration()

    def full(n):
        return _prefill_s(args, w, mac, n, min(chunk, max(n, 1)), cal["prefill_efficiency"], cal["decode_efficiency"]) if n else 0.0

    if tokens >= context:
        return full(context)
    # the new tokens' share: weights per chunk of new tokens, attention growing with the context
    return max(full(context) - full(context - tokens), full(tokens))
