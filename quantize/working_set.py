"""The working set: transient bytes of a prefill chunk, as the runtime allocates them.

Checked against MLX's measured peak memory (tests/test_planner_memory.py); the sizes mirror
glm_mlx.model.attention (it shares the chunk budgets and the sparse-or-dense choice), glm_mlx.model.moe
(mlx-lm's SwitchGLU), glm_mlx.model.cache (growth steps) and the engine's prefill.
"""

from __future__ import annotations

from glm_mlx.model import attention
from glm_mlx.model.config import ModelArgs

from .pricing import IN_FLIGHT, SCORE_BYTES, cache_tokens, model_dtype_bytes  # noqa: F401

def working_set(args: ModelArgs, context: int, mtp: bool = True, prefill_chunk: int = 2048) -> dict[str, int]:
    """Transient bytes of the last prefill chunk (the largest: its queries see the whole context).

    "activations" and "cache growth" are alive through a layer; the other entries are the phases
    of a layer (attention, MLP) and of the chunk's end (logits, MTP layer). Phases run one after
    another, but MLX allocates an op's output when the op is queued, ahead of its execution, so a
    phase's first tensors appear while the previous phase's are still alive: each phase entry
    includes that overlap. Peak = through-layer entries + the largest phase (`working_set_bytes`).
    Sizes mirror glm_mlx.model.attention, glm_mlx.model.moe (mlx-lm's SwitchGLU) and the engine (logits for the
    last position): c = tokens per chunk = min(prefill_chunk, context), T = context, k = index_topk,
    a = activation bytes (model dtype).
    """
    if getattr(args, "model_type", "") == "glm5_next":  # GLM-5.3-Flash: its own estimate
        from .next_costs import next_working_set

        return next_working_set(args, context, mtp, prefill_chunk)
    a, c, T = model_dtype_bytes(args), min(prefill_chunk, max(context, 1)), max(context, 1)
    d, H, h, D = args.hidden_size, args.num_attention_heads, args.index_n_heads, args.index_head_dim
    C, R, N, V = args.kv_lora_rank, args.qk_rope_head_dim, args.qk_nope_head_dim, args.v_head_dim
    CR, k, E, I = C + R, args.index_topk, args.n_routed_experts or 0, args.moe_intermediate_size
    ws = {
        # residual and normed input; q latent (before and after its norm); per-head queries and
        # their roped half; kv latent, normed latent + roped key, their cache row; indexer key
        # (projected, normed, roped), queries (projected, roped, float32) and head weights
        "activations": c * (a * (2 * d + 2 * args.q_lora_rank + H * (args.qk_head_dim + R) + 3 * CR + 3 * D
                                 + 2 * h * D + h) + SCORE_BYTES * (h * D + 2 * h)),
        # a layer's cache buffer growing (GROWTH_STEP rows at a time): the old buffer is copied
        # into the new one, so both are alive for a moment
        "cache growth": (args.latent_bytes_per_token(a) + args.indexer_bytes_per_token(a))
                        * max(0, cache_tokens(T) - cache_tokens(c)),
    }
    # Attention. Past k the indexer scores query chunks of Lc rows: float32 per-head scores
    # [Lc, h, T], then their head sum and its masked copy [Lc, T], the causal mask (bool), and the
    # cached keys cast to float32 [T, D] (once per layer; 8-bit keys are read as they are). Chunks are
    # chained, but MLX queues ops (and allocates their outputs) ahead of execution: about
    # IN_FLIGHT chunks are alive at once.
    idx = 0
    if T > k:
        Lc = min(c, max(1, attention.INDEX_SCORE_BUDGET // (h * T)))
        keys = 0 if args.index_cache_bits else T * D * SCORE_BYTES
        idx = min(c, IN_FLIGHT * Lc) * T * (SCORE_BYTES * (h + 2) + 1) + keys
    if T > k and attention.sparse_wins(args, c, T, k):
        # Sparse, per query chunk of Ls rows: the gathered cache rows [Ls, k, C+R] (the first are
        # allocated while the indexer's scores are alive), QUERY_TENSORS query-side [H, C+R] tensors (the
        # budget's estimate), scores in the model dtype, float32 and back; then the per-head
        # outputs of the whole chunk [H, c, V], accumulated and concatenated.
        qt = attention.QUERY_TENSORS
        rows = min(c, IN_FLIGHT * min(c, max(1, attention.SPARSE_CHUNK_BYTES // ((k + qt * H) * CR * a))))
        tail = rows * ((k + qt * H) * CR * a + H * k * (2 * a + 2 * SCORE_BYTES)) + 2 * c * H * V * a
        ws["attention"] = max(idx + rows * k * CR * a, tail)
    elif c <= attention.ABSORBED_MAX_TOKENS:  # dense absorbed: latent query [H, c, C+R], scores [H, c, T]
        ws["attention"] = tail = idx + c * H * (2 * CR * a + T * (2 * a + 2 * SCORE_BYTES)) + c * T
    else:  # dense expanded: keys and values per head [H, T, ...], SDPA scores and probabilities [H, c, T]
        ws["attention"] = tail = (idx + T * H * (N + V + args.qk_head_dim) * a
                                  + c * H * (args.qk_head_dim * a + T * 2 * a) + c * T)
    # MLP. MoE: router input and scores (float32), the chunk's rows sorted by expert [c x k_e, d]
    # and their gate/up projections [c x k_e, I] (the head), then the activation, down projection,
    # un-sorted copy, shared experts. Dense: gate, up (the head), activation. The head is
    # allocated while the attention's last tensors are alive.
    moe_head = c * (SCORE_BYTES * (d + 2 * E) + a * args.num_experts_per_tok * (d + 2 * I))
    moe = moe_head + c * a * (args.num_experts_per_tok * (2 * d + I) + 3 * I * (args.n_shared_experts or 0) + d)
    dense_head = c * a * 2 * args.intermediate_size
    mlp = max(moe if E else 0, dense_head + c * a * (args.intermediate_size + d))
    ws["MLP"] = max(mlp, tail + max(moe_head if E else 0, dense_head))
    # The final-normed hidden of every position of the chunk and the last position's logits (the
    # engine's prefill asks for no more), in the model dtype.
    # Without MTP they follow the last MLP block, whose tensors are still alive when they are
    # allocated; with MTP the MTP layer runs in between (it reads the final hidden).
    mtp = mtp and bool(args.num_nextn_predict_layers)
    ws["logits"] = (c * d + args.vocab_size) * a + (0 if mtp else mlp)
    if mtp:
        # the MTP layer: a decoder layer (the same phases) whose input is the draft embeddings,
        # their enorm/hnorm outputs and concatenation [c, 2 x hidden]
        ws["MTP layer"] = c * 5 * d * a + max(ws["attention"], ws["MLP"])
    return ws


ALWAYS = ("activations", "cache growth")  # working-set entries alive through every phase


def working_set_bytes(ws: dict[str, int]) -> int:
    """Peak transient bytes of a working set: what lives through a layer + the largest phase."""
    return sum(ws.get(n, 0) for n in ALWAYS) + max((v for n, v in ws.items() if n not in ALWAYS), default=0)
