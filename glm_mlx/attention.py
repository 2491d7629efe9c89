"""Multi-head Latent Attention with the DeepSeek Sparse Attention (DSA) indexer.

Shapes: B batch, L new tokens, T cached tokens (including the new ones), H heads,
C = kv_lora_rank, R = qk_rope_head_dim, N = qk_nope_head_dim, V = v_head_dim.

Two equivalent ways to attend (they agree to float rounding; tests check both against the
reference): prefill expands the latent into per-head keys/values (cheap when L is large),
decode absorbs kv_b_proj into the query and attends in the C-dim latent space, so each
step reads only the [T, C+R] cache instead of H expanded heads.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.mla import MultiLinear
from mlx_lm.models.rope_utils import initialize_rope

from .cache import DSACache
from .config import ModelArgs

# Below this many new tokens the absorbed (latent-space) path is cheaper than expanding keys.
ABSORBED_MAX_TOKENS = 16


def make_rope(args: ModelArgs, traditional: bool):
    # traditional=True is the interleaved layout (pairs (x0,x1),(x2,x3)); GLM uses it for both
    # the main attention and the indexer. The reference de-interleaves its output, which only
    # permutes dims identically on q and k, so q.k is unchanged.
    return initialize_rope(
        dims=args.qk_rope_head_dim,
        base=args.rope_theta,
        traditional=traditional,
        scaling_config=args.rope_parameters if args.rope_parameters["rope_type"] != "default" else None,
        max_position_embeddings=args.max_position_embeddings,
    )


def causal_mask(L: int, T: int) -> mx.array:
    """[L, T] bool: new query i (absolute position T-L+i) sees keys 0..T-L+i."""
    return mx.arange(T)[None, :] <= (T - L + mx.arange(L))[:, None]


class Indexer(nn.Module):
    """Scores every cached key for each query and returns the top-k positions ([B, L, k] int)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.head_dim, self.topk = args.index_n_heads, args.index_head_dim, args.index_topk
        self.wq_b = nn.Linear(args.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)  # LayerNorm with bias, eps 1e-6
        self.weights_proj = nn.Linear(args.hidden_size, self.n_heads, bias=False)
        self.rope = make_rope(args, traditional=args.indexer_rope_interleave)

    def keys(self, x: mx.array, offset: int) -> mx.array:
        """[B, L, hidden] -> roped, normed indexer keys [B, 1, L, D] (rope on the first R dims)."""
        B, L, _ = x.shape
        k = self.k_norm(self.wk(x)).reshape(B, 1, L, self.head_dim)
        return self.rope(k, offset=offset)

    def __call__(self, x, qr, offset: int, cache: DSACache | None):
        B, L, _ = x.shape
        k = self.keys(x, offset)
        if cache is not None:
            k = cache.update_index(k)  # [B, 1, T, D]
        T = k.shape[2]
        if T <= self.topk:
            return None  # every causal key is selected: dense attention is exact
        q = self.wq_b(qr).reshape(B, L, self.n_heads, self.head_dim).transpose(0, 2, 1, 3)
        q = self.rope(q, offset=offset)  # [B, h, L, D]
        # float32 scoring, as the reference does: ReLU(q.k / sqrt(D)) weighted per head.
        scores = mx.maximum(q.astype(mx.float32) @ k.astype(mx.float32).swapaxes(-1, -2), 0.0)
        scores = scores * (self.head_dim**-0.5)  # [B, h, L, T]
        w = self.weights_proj(x).astype(mx.float32) * (self.n_heads**-0.5)  # [B, L, h]
        index = (w.transpose(0, 2, 1)[..., None] * scores).sum(axis=1)  # [B, L, T]
        index = mx.where(causal_mask(L, T), index, -mx.inf)
        return mx.argpartition(-index, kth=self.topk - 1, axis=-1)[..., : self.topk]


def sparse_mask(topk: mx.array | None, L: int, T: int) -> mx.array:
    """[B or 1, 1, L, T] bool: causal, and restricted to the selected keys when topk is given."""
    mask = causal_mask(L, T)
    if topk is None:
        return mask[None, None]
    selected = mx.put_along_axis(mx.zeros(topk.shape[:-1] + (T,), dtype=mx.bool_), topk, mx.array(True), axis=-1)
    return (selected & mask)[:, None]


class MLAttention(nn.Module):
    def __init__(self, args: ModelArgs, has_indexer: bool):
        super().__init__()
        self.args = args
        H, C, R = args.num_attention_heads, args.kv_lora_rank, args.qk_rope_head_dim
        self.num_heads = H
        self.q_a_proj = nn.Linear(args.hidden_size, args.q_lora_rank, bias=args.attention_bias)
        self.q_a_layernorm = nn.RMSNorm(args.q_lora_rank, eps=1e-6)
        self.q_b_proj = nn.Linear(args.q_lora_rank, H * args.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(args.hidden_size, C + R, bias=args.attention_bias)
        self.kv_a_layernorm = nn.RMSNorm(C, eps=1e-6)
        # kv_b_proj split per head (sanitize does it): keys [H, C, N] and values [H, V, C].
        self.embed_q = MultiLinear(args.qk_nope_head_dim, C, H)
        self.unembed_out = MultiLinear(C, args.v_head_dim, H)
        self.o_proj = nn.Linear(H * args.v_head_dim, args.hidden_size, bias=args.attention_bias)
        self.indexer = Indexer(args) if has_indexer else None
        self.rope = make_rope(args, traditional=args.rope_interleave)
        self.scale = args.qk_head_dim**-0.5
        rp = args.rope_parameters
        if rp.get("rope_type", "default") != "default" and rp.get("mscale_all_dim"):
            factor = rp.get("factor", 1.0)
            if factor > 1:  # YaRN attention temperature, as the reference applies it
                m = 0.1 * rp["mscale_all_dim"] * math.log(factor) + 1.0
                self.scale *= m * m

    def __call__(self, x: mx.array, cache: DSACache | None = None, prev_topk: mx.array | None = None):
        """x [B, L, hidden] -> (output [B, L, hidden], top-k indices for a following shared layer)."""
        a = self.args
        B, L, _ = x.shape
        offset = cache.offset if cache is not None else 0

        qr = self.q_a_layernorm(self.q_a_proj(x))  # [B, L, q_lora]
        q = self.q_b_proj(qr).reshape(B, L, self.num_heads, a.qk_head_dim).transpose(0, 2, 1, 3)
        q_nope, q_pe = mx.split(q, [a.qk_nope_head_dim], axis=-1)  # [B, H, L, N], [B, H, L, R]
        q_pe = self.rope(q_pe, offset=offset)

        kv = self.kv_a_proj_with_mqa(x)
        latent, k_pe = mx.split(kv, [a.kv_lora_rank], axis=-1)
        latent = self.kv_a_layernorm(latent)[:, None]  # [B, 1, L, C]
        k_pe = self.rope(k_pe[:, None], offset=offset)  # [B, 1, L, R]
        if cache is not None:
            latent, k_pe = cache.update_latent(latent, k_pe)  # [B, 1, T, *]
        T = latent.shape[2]

        topk = self.indexer(x, qr, offset, cache) if self.indexer is not None else prev_topk
        mask = sparse_mask(topk, L, T)

        if L <= ABSORBED_MAX_TOKENS:
            out = self._attend_latent(q_nope, q_pe, latent, k_pe, mask)
        else:
            out = self._attend_expanded(q_nope, q_pe, latent, k_pe, mask)
        out = out.transpose(0, 2, 1, 3).reshape(B, L, -1)  # [B, L, H*V]
        return self.o_proj(out), topk

    def _attend_expanded(self, q_nope, q_pe, latent, k_pe, mask):
        H = self.num_heads
        k_nope = self.embed_q(latent, transpose=False)  # [B, H, T, N]
        values = self.unembed_out(latent)  # [B, H, T, V]
        keys = mx.concatenate([k_nope, mx.broadcast_to(k_pe, k_pe.shape[:1] + (H,) + k_pe.shape[2:])], axis=-1)
        queries = mx.concatenate([q_nope, q_pe], axis=-1)
        return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=self.scale, mask=mask)

    def _attend_latent(self, q_nope, q_pe, latent, k_pe, mask):
        # Absorb kv_b_proj's key half into the query: q_nope . (W_k c) == (W_k^T q_nope) . c
        q_lat = self.embed_q(q_nope)  # [B, H, L, C]
        scores = (q_lat @ latent.swapaxes(-1, -2) + q_pe @ k_pe.swapaxes(-1, -2)) * self.scale  # [B, H, L, T]
        scores = mx.where(mask, scores.astype(mx.float32), -mx.inf)
        probs = mx.softmax(scores, axis=-1).astype(latent.dtype)
        return self.unembed_out(probs @ latent)  # [B, H, L, C] -> [B, H, L, V]
