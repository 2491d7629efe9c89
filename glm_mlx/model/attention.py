"""Multi-head Latent Attention with the DeepSeek Sparse Attention (DSA) indexer.

Shapes: B batch, L new tokens, T cached tokens (including the new ones), H heads, k = index_topk,
C = kv_lora_rank, R = qk_rope_head_dim, N = qk_nope_head_dim, V = v_head_dim, h/D indexer heads/dim.

Three equivalent ways to attend (they agree to float rounding; tests check them against the
reference and each other):
  * dense expanded (context <= index_topk, many new tokens): the latent is expanded into
    per-head keys/values and fed to fused SDPA;
  * dense absorbed (context <= index_topk, few new tokens): kv_b_proj is absorbed into the query
    and scores are taken in the C-dim latent space against the [T, C+R] cache;
  * sparse (context > index_topk, the default there): per query chunk, gather each query's k
    selected latents ([B, Lc, k, C] and rope keys) and attend in the latent space. Working memory
    is O(chunk x k), never O(L x T), and the work O(L x k) instead of O(L x T).
The indexer scores keys chunk by chunk over queries too, so its float32 scores are
[B, Lc, h, T] per chunk, not [B, h, L, T]. Path choice depends only on shapes (no host syncs).

A quantized cache (kv_cache_bits) returns a `QuantizedKV`: the sparse path gathers each query's k
quantized rows and dequantizes just those ([B, Lc, k, C]), then scores latent and rope halves with
two matmuls; the dense paths dequantize the cached rows (T <= index_topk in decode). Dequantizing
the gathered rows beat mx.quantized_matmul on them on the CPU backend (see
benchmarks/bench_kv_quant.py), and it keeps one code path for both backends.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.mla import MultiLinear
from mlx_lm.models.rope_utils import initialize_rope

from .cache import DSACache, QuantizedKV
from .config import ModelArgs
from .dsa_topk import select_top_k

# Below this many new tokens the absorbed (latent-space) path is cheaper than expanding keys.
ABSORBED_MAX_TOKENS = 16
# Per-chunk working-set budgets (elements), sizing the query chunks when none is set:
INDEX_SCORE_BUDGET = 1 << 24  # indexer: Lc * h * T float32 scores (64 MB)
SPARSE_CHUNK_BYTES = 1 << 26  # sparse attention: per chunk, gathered rows + the query-side [H, C+R] tensors
# Query-side [H, C+R] tensors alive per query of a sparse chunk: the absorbed query, its concatenation
# with the rope half, the scaled query, the output rows and their latent slice.
QUERY_TENSORS = 5
DENSE_SCORE_BUDGET = 1 << 26  # largest L * T * H score block the dense fallback may build past k


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


def chunks(n: int, size: int):
    return [(s, min(n, s + size)) for s in range(0, n, max(1, size))]


class Indexer(nn.Module):
    """Scores every cached key for each query and returns the top-k positions ([B, L, k] int32)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.head_dim, self.topk = args.index_n_heads, args.index_head_dim, args.index_topk
        self.wq_b = nn.Linear(args.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)  # LayerNorm with bias, eps 1e-6
        self.weights_proj = nn.Linear(args.hidden_size, self.n_heads, bias=False)
        self.rope = make_rope(args, traditional=args.indexer_rope_interleave)
        self.key_bits = args.index_cache_bits  # None: keys kept in the model dtype; 8: int8 + per-key scale
        self.query_chunk: int | None = None  # None: sized by INDEX_SCORE_BUDGET

    def keys(self, x: mx.array, offset: int) -> mx.array:
        """[B, L, hidden] -> roped, normed indexer keys [B, 1, L, D] (rope on the first R dims)."""
        B, L, _ = x.shape
        k = self.k_norm(self.wk(x)).reshape(B, 1, L, self.head_dim)
        return self.rope(k, offset=offset)

    def stored_keys(self, k: mx.array):
        """What the cache holds: the keys, or (packed uint32, float32 scale, float32 bias), one group per key."""
        if not self.key_bits:
            return k
        return tuple(mx.quantize(k.astype(mx.float32), group_size=self.head_dim, bits=self.key_bits))

    def __call__(self, x, qr, offset: int, cache: DSACache | None):
        B, L, _ = x.shape
        k = self.stored_keys(self.keys(x, offset))
        if cache is not None:
            k = cache.update_index(k)  # [B, 1, T, D] (or its quantized triple)
        T = offset + L
        if T <= self.topk:
            return None  # every causal key is selected: dense attention is exact
        h, D = self.n_heads, self.head_dim
        q = self.wq_b(qr).reshape(B, L, h, D).transpose(0, 2, 1, 3)
        q = self.rope(q, offset=offset).transpose(0, 2, 1, 3).astype(mx.float32)  # [B, L, h, D]
        # float32 scoring, as the reference does: sum_h w_h * ReLU(q_h.k / sqrt(D)) / sqrt(h);
        # both positive scales fold into the per-head weights.
        w = self.weights_proj(x).astype(mx.float32) * (h**-0.5 * D**-0.5)  # [B, L, h]
        size = self.query_chunk or max(1, INDEX_SCORE_BUDGET // (h * T))
        if not isinstance(k, tuple):
            k = k[:, 0].astype(mx.float32)  # [B, T, D]: cast once, not once per query chunk
        out = []
        for s, e in chunks(L, size):
            Tc = T - L + e  # keys visible to the chunk's last query: the rest are never scored
            if Tc <= self.topk:  # every query of the chunk sees at most k keys: take them all
                out.append(mx.broadcast_to(mx.arange(self.topk, dtype=mx.int32), (B, e - s, self.topk)))
                continue
            # Chained on the previous chunk so chunks run one after another; without it MLX may
            # schedule them all side by side. (MLX still allocates the outputs of the few chunks
            # queued ahead of execution: the planner counts working_set.IN_FLIGHT alive at once.)
            qc = mx.depends(q[:, s:e], out[-1]) if out else q[:, s:e]
            score = self._score(qc, w[:, s:e], k, Tc)  # [B, Lc, Tc]
            if e - s > 1:
                score = mx.where(causal_mask(e - s, Tc), score, -mx.inf)
            out.append(select_top_k(score, self.topk))
        return out[0] if len(out) == 1 else mx.concatenate(out, axis=1)

    def batch_topk(self, x, qr, offsets: mx.array, cache, valid: mx.array) -> mx.array | None:
        """Batched decoding (L new tokens per sequence, offsets [B]): write the keys, then each query's
        own top-k over its own sequence's tokens ([B, L, k]; a query that sees fewer than k also gets
        padding picks, which the caller masks), or None while every row is within index_topk (dense is
        exact). valid [B, L, Tcap]: the keys each query sees."""
        B, L = x.shape[:2]
        keys = cache.update_index(self.stored_keys(self.keys(x, offsets)))
        if cache.max_length <= self.topk:
            return None
        h, D = self.n_heads, self.head_dim
        q = self.wq_b(qr).reshape(B, L, h, D).transpose(0, 2, 1, 3)
        q = self.rope(q, offset=offsets).transpose(0, 2, 1, 3).astype(mx.float32)  # [B, L, h, D]
        w = self.weights_proj(x).astype(mx.float32) * (h**-0.5 * D**-0.5)  # [B, L, h]
        out = []
        for s, e, T in cache.buckets(h * D, self.topk):  # rows s..e-1 scored over their first T keys
            k = tuple(a[s:e] for a in keys) if isinstance(keys, tuple) else keys[s:e, 0, :T].astype(mx.float32)
            score = self._score(q[s:e], w[s:e], k, T)  # [Bb, L, T]
            out.append(select_top_k(mx.where(valid[s:e, :, :T], score, -mx.inf), self.topk))
        return out[0] if len(out) == 1 else mx.concatenate(out, axis=0)

    def _score(self, q, w, k, Tc: int) -> mx.array:
        """q [B, Lc, h, D] f32, w [B, Lc, h], keys [B, T, D] f32 (or 8-bit [B, 1, T, .] triple)
        -> index scores [B, Lc, Tc] over the first Tc keys."""
        B, Lc, h, D = q.shape
        q = q.reshape(B, Lc * h, D)
        if isinstance(k, tuple):  # 8-bit keys: dequantisation fused into the matmul
            kq, ks, kb = (a[:, 0, :Tc] for a in k)
            s = mx.quantized_matmul(q, kq, ks, kb, transpose=True, group_size=D, bits=self.key_bits)
        else:
            s = q @ k[:, :Tc].swapaxes(-1, -2)  # [B, Lc*h, Tc]
        s = mx.maximum(s, 0.0).reshape(B, Lc, h, Tc)
        # The weighted head sum as a batched mat-vec: no [B, Lc, h, Tc] product tensor.
        return (w[:, :, None, :] @ s)[:, :, 0]  # [B, Lc, 1, Tc] -> [B, Lc, Tc]


def sparse_mask(topk: mx.array | None, L: int, T: int) -> mx.array:
    """[B or 1, 1, L, T] bool: causal, and restricted to the selected keys when topk is given."""
    mask = causal_mask(L, T)
    if topk is None:
        return mask[None, None]
    selected = mx.put_along_axis(mx.zeros(topk.shape[:-1] + (T,), dtype=mx.bool_), topk, mx.array(True), axis=-1)
    return (selected & mask)[:, None]


def sparse_wins(a: ModelArgs, L: int, T: int, k: int) -> bool:
    """Whether gathering k latents per query beats a masked dense pass over all T keys.

    Multiply-adds per call: sparse L*k*H*(2C+R) (the gather is a copy); dense absorbed L*T*H*(2C+R);
    dense expanded L*T*H*(N+R+V) plus expanding T latents into H keys and values. Dense is
    only considered while its [L, T] score block stays small, so memory is never O(L x T).
    (The planner sizes the working set with the same choice.)
    """
    H, C, R = a.num_attention_heads, a.kv_lora_rank, a.qk_rope_head_dim
    sparse = L * k * H * (2 * C + R)
    if L <= ABSORBED_MAX_TOKENS:
        dense = L * T * H * (2 * C + R)
    else:
        dense = L * T * H * (a.qk_head_dim + a.v_head_dim) + T * H * C * (a.qk_nope_head_dim + a.v_head_dim)
    return sparse <= dense or L * T * H > DENSE_SCORE_BUDGET


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
        self.path = "auto"  # "auto" | "sparse" | "dense": how to attend once top-k indices exist
        self.query_chunk: int | None = None  # sparse path; None: sized by SPARSE_CHUNK_BYTES

    def __call__(self, x: mx.array, cache=None, prev_topk=None):
        """x [B, L, hidden] -> (output [B, L, hidden], top-k indices for a following shared layer).

        `cache` is one DSACache for the batch, or a batch cache (batch/cache.py): independent sequences decoding one
        token each (continuous batching), each at its own offset with its own rows and DSA selection."""
        a = self.args
        B, L, _ = x.shape
        qr = self.q_a_layernorm(self.q_a_proj(x))  # [B, L, q_lora]
        q = self.q_b_proj(qr).reshape(B, L, self.num_heads, a.qk_head_dim).transpose(0, 2, 1, 3)
        q_nope, q_pe = mx.split(q, [a.qk_nope_head_dim], axis=-1)  # [B, H, L, N], [B, H, L, R]
        kv = self.kv_a_proj_with_mqa(x)
        latent, k_pe = mx.split(kv, [a.kv_lora_rank], axis=-1)
        latent = self.kv_a_layernorm(latent)[:, None]  # [B, 1, L, C]
        # A cache says what it holds (`layout`): one sequence (model/cache.py), or rows of sequences decoding
        # together (batch/cache.py), in one padded buffer ("batch") or per range of like lengths ("ragged").
        layout = getattr(cache, "layout", "sequence")
        if layout == "batch":
            out, topk = self._attend_batch(x, qr, q_nope, q_pe, latent, k_pe, cache, prev_topk)
        elif layout == "ragged":  # per range of rows, each in its own buffers
            outs, topk = [], []
            for j, ((s, e), part) in enumerate(zip(cache.ranges, cache.parts)):
                o, t = self._attend_batch(x[s:e], qr[s:e], q_nope[s:e], q_pe[s:e], latent[s:e], k_pe[s:e], part,
                                          prev_topk[j] if prev_topk is not None else None)
                outs.append(o)
                topk.append(t)  # per range: a following shared-indexer layer takes it range by range
            out = mx.concatenate(outs, axis=0)
        else:
            out, topk = self._attend(x, qr, q_nope, q_pe, latent, k_pe, cache, prev_topk)
        out = out.transpose(0, 2, 1, 3).reshape(B, L, -1)  # [B, L, H*V]
        return self.o_proj(out), topk

    def _attend(self, x, qr, q_nope, q_pe, latent, k_pe, cache: DSACache | None, prev_topk):
        """Rope at the cache's offset, cache write, DSA selection, attention -> ([B, H, L, V], top-k)."""
        L = x.shape[1]
        offset = cache.offset if cache is not None else 0
        q_pe = self.rope(q_pe, offset=offset)
        k_pe = self.rope(k_pe[:, None], offset=offset)  # [B, 1, L, R]
        if cache is not None:
            kv = cache.update_kv(latent, k_pe)  # [B, 1, T, C+R]
        else:
            kv = mx.concatenate([latent, k_pe], axis=-1)
        T = kv.length if isinstance(kv, QuantizedKV) else kv.shape[2]

        topk = self.indexer(x, qr, offset, cache) if self.indexer is not None else prev_topk
        if topk is not None and self._use_sparse(L, T, topk.shape[-1]):
            out = self._attend_sparse(q_nope, q_pe, kv, topk)
        else:
            if isinstance(kv, QuantizedKV):
                kv = kv.rows()  # dense: every cached row, dequantized
            mask = sparse_mask(topk, L, T)
            if L <= ABSORBED_MAX_TOKENS:
                out = self._attend_latent(q_nope, q_pe, kv, mask)
            else:
                out = self._attend_expanded(q_nope, q_pe, kv, mask)
        return out, topk

    def _attend_batch(self, x, qr, q_nope, q_pe, latent, k_pe, cache, prev_topk):
        # cache: a batch/cache.py BatchLayerCache (not imported: model/ knows nothing of batching's types)
        """L new tokens per sequence (one per decode step; two when MTP verifies a draft), each sequence at
        its own offset in a shared padded buffer: the same paths as one sequence (dense while every row
        is within index_topk, else sparse), with each row's padding masked out and each query's own DSA
        selection over its own sequence's tokens."""
        L = x.shape[1]
        offsets = cache.offsets  # [B]
        q_pe = self.rope(q_pe, offset=offsets)
        k_pe = self.rope(k_pe[:, None], offset=offsets)  # [B, 1, L, R]
        kv = cache.update_kv(latent, k_pe)  # [B, 1, Tcap, C+R]
        valid = cache.valid(L)  # [B, L, Tcap]
        if self.indexer is not None:
            topk = self.indexer.batch_topk(x, qr, offsets, cache, valid)
        else:
            topk = prev_topk
        if topk is None:  # every row within index_topk: dense over its own tokens
            rows = kv.rows() if isinstance(kv, QuantizedKV) else kv
            return self._attend_latent(q_nope, q_pe, rows, valid[:, None], n_keys=cache.max_length), None
        chosen = mx.take_along_axis(valid, topk, axis=-1)  # [B, L, k]: picks a query does not see are masked
        return self._attend_sparse(q_nope, q_pe, kv, topk, valid=chosen[:, :, None, :]), topk

    def _use_sparse(self, L: int, T: int, k: int) -> bool:
        if self.path != "auto":
            return self.path == "sparse"
        return sparse_wins(self.args, L, T, k)

    def _scale_in_query(self, n_keys: int) -> bool:
        # Apply the softmax scale to whichever is smaller: the [.., C+R] query or the [.., n_keys] scores.
        return n_keys > self.args.kv_lora_rank + self.args.qk_rope_head_dim

    def _latent_query(self, q_nope, q_pe, n_keys: int):
        """Absorb kv_b_proj's key half into the query: q_nope . (W_k c) == (W_k^T q_nope) . c.
        [B, H, L, N], [B, H, L, R] -> [B, H, L, C+R], matching the cache rows [latent | rope key]."""
        q = mx.concatenate([self.embed_q(q_nope), q_pe], axis=-1)
        return q * self.scale if self._scale_in_query(n_keys) else q

    def _latent_softmax(self, scores, dtype, valid=None, n_keys: int | None = None):
        if not self._scale_in_query(n_keys or scores.shape[-1]):
            scores = scores * self.scale
        scores = scores.astype(mx.float32)
        if valid is not None:
            scores = mx.where(valid, scores, -mx.inf)
        return mx.softmax(scores, axis=-1).astype(dtype)

    def _attend_sparse(self, q_nope, q_pe, kv, topk, valid=None):
        """Latent-space attention over each query's own top-k cache rows -> [B, H, L, V].
        valid [B, L, 1, k] (batched decoding): which selected rows hold a token.
        kv: the [B, 1, T, C+R] cache rows, or a QuantizedKV of them."""
        B, H, L, _ = q_nope.shape
        quantized = isinstance(kv, QuantizedKV)
        T, k = (kv.length if quantized else kv.shape[2]), topk.shape[-1]
        C, R = self.args.kv_lora_rank, self.args.qk_rope_head_dim
        CR = C + R
        flat = None if quantized else kv.reshape(B * T, CR)  # [B, 1, T, C+R] -> rows of the cache
        rows = topk if B == 1 else topk + (mx.arange(B, dtype=topk.dtype) * T)[:, None, None]
        per_query = (k + QUERY_TENSORS * H) * CR * kv.dtype.size  # bytes alive per query of a chunk
        size = self.query_chunk or max(1, SPARSE_CHUNK_BYTES // per_query)
        outs = []
        for s, e in chunks(L, size):
            idx = mx.depends(rows[:, s:e], outs[-1]) if outs else rows[:, s:e]  # chunks in order
            q = self._latent_query(q_nope[:, :, s:e], q_pe[:, :, s:e], k).transpose(0, 2, 1, 3)  # [B, Lc, H, C+R]
            if quantized:
                sel = kv.take(idx)  # the k selected rows, still quantized
                lat = sel.latent()  # [B, Lc, k, C]: only these rows are dequantized
                scores = q[..., :C] @ lat.swapaxes(-1, -2) + q[..., C:] @ sel.rope.swapaxes(-1, -2)  # [B, Lc, H, k]
            else:
                sel = mx.take(flat, idx, axis=0)  # [B, Lc, k, C+R]
                scores = q @ sel.swapaxes(-1, -2)  # [B, Lc, H, k]
            keep = valid[:, s:e] if valid is not None else None
            if keep is None and T - L + s + 1 < k:  # a query with fewer than k causal keys also got later ones
                keep = (topk[:, s:e] <= (T - L + mx.arange(s, e))[:, None])[:, :, None]  # [B, Lc, 1, k]
            probs = self._latent_softmax(scores, kv.dtype, keep)
            if quantized:
                o = (probs @ lat).transpose(0, 2, 1, 3)  # [B, Lc, H, C] -> [B, H, Lc, C]
            else:
                # Values are the latent half of each row; multiplying the whole row and dropping the rope
                # columns afterwards avoids copying a strided [B, Lc, k, C] slice.
                o = (probs @ sel)[..., :C].transpose(0, 2, 1, 3)  # [B, Lc, H, C] -> [B, H, Lc, C]
            outs.append(self.unembed_out(o))  # [B, H, Lc, V]
        return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=2)

    def _attend_expanded(self, q_nope, q_pe, kv, mask):
        H, C = self.num_heads, self.args.kv_lora_rank
        latent, k_pe = kv[..., :C], kv[..., C:]
        k_nope = self.embed_q(latent, transpose=False)  # [B, H, T, N]
        values = self.unembed_out(latent)  # [B, H, T, V]
        keys = mx.concatenate([k_nope, mx.broadcast_to(k_pe, k_pe.shape[:1] + (H,) + k_pe.shape[2:])], axis=-1)
        queries = mx.concatenate([q_nope, q_pe], axis=-1)
        return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=self.scale, mask=mask)

    def _attend_latent(self, q_nope, q_pe, kv, mask, n_keys: int | None = None):
        """n_keys: the keys that count (a padded batch buffer holds more rows than any sequence)."""
        T, C = n_keys or kv.shape[2], self.args.kv_lora_rank
        q = self._latent_query(q_nope, q_pe, T)  # [B, H, L, C+R]
        probs = self._latent_softmax(q @ kv.swapaxes(-1, -2), kv.dtype, mask, n_keys=T)  # [B, H, L, T]
        return self.unembed_out((probs @ kv)[..., :C])  # [B, H, L, C] -> [B, H, L, V]
