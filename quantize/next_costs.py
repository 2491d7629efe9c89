"""GLM-5.3-Flash (glm5_next) costs beside the weights: a prefill chunk's working set, the cache bytes a
decode step reads, and attention flops. The planner dispatches here for glm5_next configs.

The working set is an estimate, not a measurement (GLM-5.1's is checked against MLX's peak memory;
GLM-5.3-Flash has no MLX runtime in this repo to measure yet): it prices the reference's tensors
(transformers' glm5_next) with GLM-5.1's runtime conventions - the same query-chunk budgets
(glm_mlx.model.attention), IN_FLIGHT queued chunks and the same MoE (SwitchGLU) and logits terms.
At the default 2,048-token chunk it is ~1-2 GB, small beside the weights.
"""

from __future__ import annotations

from glm_mlx.model import attention
from glm_mlx.model.glm5_next_config import Glm5NextArgs

from .next_prices import is_next, selected_tokens
from .pricing import IN_FLIGHT, SCORE_BYTES, cache_tokens, model_dtype_bytes

FLA_CHUNK = 64  # KDA's chunked form works on blocks of 64 tokens (FLA's chunk size, as the reference)


def _pools(args: Glm5NextArgs, T: int) -> int:
    return -(-T // args.index_kpool)


def next_working_set(args: Glm5NextArgs, context: int, mtp: bool = True, prefill_chunk: int = 2048) -> dict[str, int]:
    """Transient bytes of the last prefill chunk, with the keys of working_set.working_set.
    c = tokens per chunk, T = context, P = indexer pools (T / index_kpool), k = keys a query selects."""
    a, c, T = model_dtype_bytes(args), min(prefill_chunk, max(context, 1)), max(context, 1)
    d, n, E, I = args.hidden_size, args.hc_mult, args.n_routed_experts, args.moe_intermediate_size
    H, C, R, N, V = args.num_attention_heads, args.kv_lora_rank, args.qk_rope_head_dim, args.qk_nope_head_dim, args.v_head_dim
    h, D, P, k = args.index_n_heads, args.index_head_dim, _pools(args, T), selected_tokens(args)
    Q, Hk, K = args.linear_dim, args.linear_num_heads, args.linear_head_dim
    CR, f = C + R, SCORE_BYTES
    dsa_row = max(args.layer_bytes_per_token(l, a) for l in args.layers(mtp))
    ws = {
        # hc_mult residual streams into and out of a sub-block and its collapsed, normed input (model
        # dtype); the float32 flattened streams, normed, that the hyper-connection projects, and its weights
        "activations": c * (a * (2 * n * d + 2 * d) + f * (2 * n * d + 2 * (2 + n) * n)),
        "cache growth": dsa_row * max(0, cache_tokens(T) - cache_tokens(c)),  # old and new buffer at a step
    }
    # KDA: q/k/v projections and their convolution [c, 3Q], the output gate [c, Q] and the gated, normed
    # output [c, Q] (model dtype); the kernel's float32 q, k, v, forget gate and beta; its intra-block
    # matrices [Hk, c / 64, 64, 64] (two of them) and the state carried between blocks [Hk, K, K] (in, out).
    kda = (c * (a * 8 * Q + f * (4 * Q + Hk) + f * 2 * Hk * FLA_CHUNK) + 2 * Hk * K * K * f)
    # DSA: q latent (and normed), per-head queries, kv latent (projected, normed, cache row), indexer key
    # and gate scores, its queries (projected, float32) and head weights.
    q_side = c * (a * (2 * args.q_lora_rank + H * args.qk_head_dim + 3 * CR + 2 * D + h * D + h) + f * (h * D + 2 * h))
    if T > k:
        # indexer over pools, per query chunk of Lc rows: float32 [Lc, h, P] scores, their head sum and
        # masked copy [Lc, P], the visibility mask; the pooled keys as float32 [P, D]. Then the sparse
        # pass gathers k latent rows per query (GLM-5.1's sparse formula at k = top-k pools + tail).
        Lc = min(c, max(1, attention.INDEX_SCORE_BUDGET // (h * P)))
        idx = min(c, IN_FLIGHT * Lc) * P * (f * (h + 2) + 1) + P * D * f
        qt = attention.QUERY_TENSORS
        rows = min(c, IN_FLIGHT * min(c, max(1, attention.SPARSE_CHUNK_BYTES // ((k + qt * H) * CR * a))))
        tail = rows * ((k + qt * H) * CR * a + H * k * (2 * a + 2 * f)) + 2 * c * H * V * a
        dsa = q_side + max(idx + rows * k * CR * a, tail)
    else:  # every key is selected: dense over the expanded keys and values
        dsa = tail = q_side + T * H * (N + V + args.qk_head_dim) * a + c * H * (args.qk_head_dim * a + T * 2 * a) + c * T
    ws["attention"] = max(kda, dsa)
    # MLP: as working_set.working_set (SwitchGLU's sorted rows and projections, shared experts, dense).
    moe_head = c * (f * (d + 2 * E) + a * args.num_experts_per_tok * (d + 2 * I))
    moe = moe_head + c * a * (args.num_experts_per_tok * (2 * d + I) + 3 * I * args.n_shared_experts + d)
    dense_head = c * a * 2 * args.intermediate_size
    mlp = max(moe, dense_head + c * a * (args.intermediate_size + d))
    ws["MLP"] = max(mlp, max(tail, kda) + max(moe_head, dense_head))
    mtp = mtp and bool(args.num_nextn_predict_layers)
    # the streams' mean (hc_head) and final norm for the chunk, the last position's logits
    ws["logits"] = (2 * c * d + args.vocab_size) * a + (0 if mtp else mlp)
    if mtp:  # the MTP block: draft embeddings, enorm/hnorm, their concatenation; then a DSA + MoE layer
        ws["MTP layer"] = c * 5 * d * a + max(dsa, mlp)
    return ws


def next_kv_read_bytes(args: Glm5NextArgs, position: int, dtype_bytes: int = 2) -> int:
    """Cache bytes one decode step reads at `position` (decoder layers, not the MTP block): per DSA layer
    min(position, k) latent rows and, once there are more pools than the top-k, every pooled key; per
    KDA layer its state, read and written back."""
    L = range(args.num_hidden_layers)
    dsa = sum(args.is_indexed(l) for l in L)
    rows = min(position, selected_tokens(args)) * args.latent_bytes_per_token(dtype_bytes) * dsa
    pooled = 0
    if position > args.index_topk:
        own = sum(args.has_indexer(l) for l in L)
        pooled = own * _pools(args, position) * args.index_head_dim * dtype_bytes
    kda = 2 * args.kda_state_bytes(dtype_bytes)
    return rows + pooled + kda


def next_attention_flops(args: Glm5NextArgs, n: int) -> float:
    """Sum over prompt positions 1..n of attention flops (closed forms): DSA attends min(p, k) keys and
    its indexer scores p / index_kpool pools past index_topk; KDA costs a constant per token (the delta
    rule's state update and read, ~8 x heads x K^2)."""
    S, T, kp = selected_tokens(args), args.index_topk, args.index_kpool
    keys = n * (n + 1) / 2 if n <= S else S * (S + 1) / 2 + (n - S) * S
    past = (n * (n + 1) - T * (T + 1)) / 2 / kp if n > T else 0
    L = range(args.num_hidden_layers)
    dsa, own = sum(args.is_indexed(l) for l in L), sum(args.has_indexer(l) for l in L)
    H, K = args.num_attention_heads, args.linear_head_dim
    return (2 * H * (args.qk_head_dim + args.v_head_dim) * keys * dsa
            + 2 * args.index_n_heads * args.index_head_dim * past * own
            + 8 * args.linear_num_heads * K * K * n * (args.num_hidden_layers - dsa))


def next_assumptions(args, mtp: bool) -> list[str]:
    if not is_next(args):
        return []
    return [f"GLM-5.3-Flash: KV cache in the {sum(args.is_indexed(l) for l in args.layers(mtp))} DSA layers only (latent + "
            f"indexer keys); the {sum(not args.is_indexed(l) for l in args.layers(mtp))} KDA layers hold "
            f"{args.kda_state_bytes(2) / 1e6:.0f} MB per sequence whatever the context. Working set estimated "
            "(no MLX runtime measured yet). Speeds use GLM-5.1's fitted efficiencies: read decode as an upper bound "
            "(the one published GLM-5.3-Flash run, ds4's Q4_K on an M3 Ultra, decodes 21.1 tok/s where this model "
            "says ~38 at 4.5 bits/weight)."]
