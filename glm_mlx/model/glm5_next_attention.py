"""GLM-5.3-Flash's DSA layers: MLA without RoPE, and an indexer that scores pooled key groups.

Shapes: B batch, L new tokens, T cached tokens (including the new ones), H heads, C = kv_lora_rank,
N = V = 256 (nope / value head dims), h / D indexer heads / dim, p = index_kpool, P = T // p complete
pools, K = index_topk // p pools selected.

Selection (the reference's `Glm5NextTextIndexer`): each token has an indexer key k = LayerNorm(wk x)
and a gate score x @ index_kpool_compress_gate^T; a complete pool's key is the per-channel
softmax(gate + index_kpool_compress_ape)-weighted sum of its p keys. A query at position t scores
the pools that end at or before t (sum_h w_h * ReLU(q_h . pool / sqrt(D)) / sqrt(h), no RoPE), keeps
the K best, expands them to their p tokens each, and always adds its own incomplete pool's tokens
(index_kpool_always_select_tail). While P <= K every query sees every causal token, so attention is
dense and exact (no selection is made), as for GLM-5.1 below index_topk.

Shared with GLM-5.1 (imported): the attention maths (`MLAttention`'s latent-space sparse gather, the
absorbed and expanded dense paths, the sparse-vs-dense cost rule), the indexer's float32 scoring
(`Indexer._score`) and its exact top-k (`dsa_topk.select_top_k`, ties to the lowest pool). New: the
pooling, the pool-to-token expansion with the tail, and the no-RoPE projections.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.mla import MultiLinear

from .attention import INDEX_SCORE_BUDGET, ABSORBED_MAX_TOKENS, Indexer, MLAttention, causal_mask, chunks
from .dsa_topk import select_top_k


class PooledIndexer(Indexer):
    """Returns (token positions [B, L, K*p + p-1] int32, valid [B, L, K*p + p-1] bool), or None while
    every query sees at most K complete pools (dense attention is then exact)."""

    def __init__(self, args):
        nn.Module.__init__(self)  # Indexer's own __init__ builds RoPE, which this indexer has none of
        self.n_heads, self.head_dim, self.topk = args.index_n_heads, args.index_head_dim, args.index_topk
        self.kpool = args.index_kpool
        self.wq_b = nn.Linear(args.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(args.hidden_size, self.n_heads, bias=False)
        self.index_kpool_compress_ape = mx.zeros((self.kpool, self.head_dim), dtype=mx.float32)
        self.index_kpool_compress_gate = mx.zeros((self.head_dim, args.hidden_size), dtype=mx.float32)
        self.key_bits = None  # Indexer._score reads it: keys stay in the model dtype
        self.query_chunk: int | None = None

    def rows(self, x: mx.array) -> mx.array:
        """[B, L, hidden] -> per-token [B, 1, L, 2D] rows: normed indexer key | pool gate score."""
        B, L, _ = x.shape
        k = self.k_norm(self.wk(x))
        gate = x @ self.index_kpool_compress_gate.astype(x.dtype).T  # [B, L, D]
        return mx.concatenate([k, gate.astype(k.dtype)], axis=-1)[:, None]

    def pool(self, rows: mx.array) -> mx.array:
        """[B, n*p, 2D] rows of complete pools -> pooled keys [B, n, D]."""
        B, M, _ = rows.shape
        D, p = self.head_dim, self.kpool
        r = rows.reshape(B, M // p, p, 2 * D)  # [B, n*p, 2D] -> [B, n, p, 2D]
        logits = r[..., D:].astype(mx.float32) + self.index_kpool_compress_ape.astype(mx.float32)
        probs = mx.softmax(logits, axis=2).astype(r.dtype)  # over the p tokens, per channel
        return (probs * r[..., :D]).sum(axis=2)

    def __call__(self, x, qr, offset: int, cache=None):
        B, L, _ = x.shape
        p, K = self.kpool, self.topk // self.kpool
        rows = self.rows(x)
        T = offset + L
        P = T // p
        if cache is not None:
            pools = cache.update_pooled(rows, self.pool)
        else:  # no cache: offset is 0 and rows are every token
            pools = self.pool(rows[:, 0, : P * p]) if P else None
        if P <= K:
            return None  # every query's pools (all of them) plus its tail: every causal token
        h, D = self.n_heads, self.head_dim
        q = self.wq_b(qr).reshape(B, L, h, D).astype(mx.float32)  # [B, L, h, D]
        w = self.weights_proj(x).astype(mx.float32) * (h**-0.5 * D**-0.5)  # both scales fold into w
        pools = pools.astype(mx.float32)
        size = self.query_chunk or max(1, INDEX_SCORE_BUDGET // (h * P))
        idx, valid = [], []
        for s, e in chunks(L, size):
            pos = T - L + mx.arange(s, e)  # absolute positions of the chunk's queries
            seen = (pos + 1) // p  # complete pools each query sees
            score = self._score(q[:, s:e], w[:, s:e], pools, P)  # [B, Lc, P]
            score = mx.where(mx.arange(P) < seen[:, None], score, -mx.inf)
            chosen = select_top_k(score, K)  # [B, Lc, K] pool ids
            ok = chosen < seen[:, None]  # picks past a query's pools fill its row when it sees < K
            toks = (chosen[..., None] * p + mx.arange(p)).reshape(B, e - s, K * p)  # [B, Lc, K, p] -> [B, Lc, K*p]
            ok = mx.repeat(ok, p, axis=-1)
            tail = seen * p  # the query's own incomplete pool: tokens tail .. pos
            tail_toks = tail[:, None] + mx.arange(p - 1)  # [Lc, p-1]
            tail_ok = tail_toks <= pos[:, None]
            idx.append(mx.concatenate([toks, mx.broadcast_to(tail_toks, (B,) + tail_toks.shape)], axis=-1))
            valid.append(mx.concatenate([ok, mx.broadcast_to(tail_ok, (B,) + tail_ok.shape)], axis=-1))
        idx = mx.concatenate(idx, axis=1) if len(idx) > 1 else idx[0]
        valid = mx.concatenate(valid, axis=1) if len(valid) > 1 else valid[0]
        return mx.where(valid, idx, 0).astype(mx.int32), valid


    def batch_select(self, x, qr, cache, valid):
        """Batched decoding (batch/state_cache.py's BatchPooledCache: rows at their own lengths, L new
        tokens each): write the rows, pool each row's groups they complete, and select per query over
        its own row's pools as __call__ does for one sequence. None while no row sees more than K pools."""
        B, L, _ = x.shape
        p, K = self.kpool, self.topk // self.kpool
        pools = cache.update_pooled(self.rows(x), self.pool)  # [B, Pmax, D]
        Pmax = max(cache.n_pooled)
        if Pmax <= K:
            return None  # every row's queries see all their causal tokens
        h, D = self.n_heads, self.head_dim
        q = self.wq_b(qr).reshape(B, L, h, D).astype(mx.float32)
        w = self.weights_proj(x).astype(mx.float32) * (h**-0.5 * D**-0.5)
        pos = mx.array(cache.lengths)[:, None] - L + mx.arange(L)  # [B, L] absolute positions
        seen = (pos + 1) // p  # [B, L]
        score = self._score(q, w, pools.astype(mx.float32), Pmax)  # [B, L, Pmax]
        score = mx.where(mx.arange(Pmax) < seen[..., None], score, -mx.inf)
        chosen = select_top_k(score, K)  # [B, L, K]
        ok = mx.repeat(chosen < seen[..., None], p, axis=-1)
        toks = (chosen[..., None] * p + mx.arange(p)).reshape(B, L, K * p)
        tail = (seen * p)[..., None] + mx.arange(p - 1)  # [B, L, p-1]: the query's own incomplete pool
        idx = mx.concatenate([toks, tail], axis=-1)
        valid = mx.concatenate([ok, tail <= pos[..., None]], axis=-1)
        return mx.where(valid, idx, 0).astype(mx.int32), valid


class PooledMLAttention(MLAttention):
    """MLA with qk_rope_head_dim = 0: the cache rows are the C-dim latents alone ([B, 1, T, C]); the
    rope halves are zero-width, so GLM-5.1's attention paths run unchanged."""

    def __init__(self, args, has_indexer: bool):
        nn.Module.__init__(self)  # MLAttention's __init__ builds RoPE and GLM-5.1's indexer
        self.args = args
        H, C, eps = args.num_attention_heads, args.kv_lora_rank, args.rms_norm_eps
        self.num_heads = H
        self.q_a_proj = nn.Linear(args.hidden_size, args.q_lora_rank, bias=args.attention_bias)
        self.q_a_layernorm = nn.RMSNorm(args.q_lora_rank, eps=eps)
        self.q_b_proj = nn.Linear(args.q_lora_rank, H * args.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(args.hidden_size, C, bias=args.attention_bias)
        self.kv_a_layernorm = nn.RMSNorm(C, eps=eps)
        # kv_b_proj split per head (GLM-5.1's sanitize does it): keys [H, C, N], values [H, V, C].
        self.embed_q = MultiLinear(args.qk_nope_head_dim, C, H)
        self.unembed_out = MultiLinear(C, args.v_head_dim, H)
        self.o_proj = nn.Linear(H * args.v_head_dim, args.hidden_size, bias=args.attention_bias)
        self.indexer = PooledIndexer(args) if has_indexer else None
        self.scale = args.qk_head_dim**-0.5
        self.path = "auto"  # "auto" | "sparse" | "dense", as GLM-5.1's
        self.query_chunk: int | None = None

    def __call__(self, x: mx.array, cache=None, prev_topk=None):
        """x [B, L, hidden] -> (output [B, L, hidden], the selection for a following shared layer)."""
        layout = getattr(cache, "layout", "sequence")  # as MLAttention reads it (batch/cache.py)
        if layout == "ragged":  # per range of rows, each in its own buffers
            outs, sels = [], []
            for j, ((s, e), part) in enumerate(zip(cache.ranges, cache.parts)):
                o, sel = self(x[s:e], part, prev_topk[j] if prev_topk is not None else None)
                outs.append(o)
                sels.append(sel)
            return mx.concatenate(outs, axis=0), sels
        if layout == "batch":
            return self._call_batch(x, cache, prev_topk)
        B, L, _ = x.shape
        H, C = self.num_heads, self.args.kv_lora_rank
        qr = self.q_a_layernorm(self.q_a_proj(x))  # [B, L, q_lora]
        q_nope = self.q_b_proj(qr).reshape(B, L, H, -1).transpose(0, 2, 1, 3)  # [B, H, L, N]
        q_pe = q_nope[..., :0]  # no RoPE: zero-width rope halves
        latent = self.kv_a_layernorm(self.kv_a_proj_with_mqa(x))[:, None]  # [B, 1, L, C]
        offset = cache.offset if cache is not None else 0
        kv = cache.update_kv(latent, latent[..., :0]) if cache is not None else latent  # [B, 1, T, C]
        T = kv.shape[2]
        sel = self.indexer(x, qr, offset, cache) if self.indexer is not None else prev_topk
        if sel is not None and self._use_sparse(L, T, sel[0].shape[-1]):
            out = self._attend_sparse(q_nope, q_pe, kv, sel[0], valid=sel[1][:, :, None, :])
        else:
            mask = causal_mask(L, T)[None, None] if sel is None else selection_mask(*sel, T)
            attend = self._attend_latent if L <= ABSORBED_MAX_TOKENS else self._attend_expanded
            out = attend(q_nope, q_pe, kv, mask)  # [B, H, L, V]
        out = out.transpose(0, 2, 1, 3).reshape(B, L, -1)  # [B, L, H*V]
        return self.o_proj(out), sel

    def _call_batch(self, x, cache, prev_topk):
        """Sequences decoding together (a batch cache: each row at its own length, padded buffers): dense
        over each row's own tokens while no row selects, else each query's own pooled selection."""
        B, L, _ = x.shape
        qr = self.q_a_layernorm(self.q_a_proj(x))
        q_nope = self.q_b_proj(qr).reshape(B, L, self.num_heads, -1).transpose(0, 2, 1, 3)  # [B, H, L, N]
        q_pe = q_nope[..., :0]
        latent = self.kv_a_layernorm(self.kv_a_proj_with_mqa(x))[:, None]  # [B, 1, L, C]
        kv = cache.update_kv(latent, latent[..., :0])  # [B, 1, Tcap, C]
        valid = cache.valid(L)  # [B, L, Tcap]
        sel = self.indexer.batch_select(x, qr, cache, valid) if self.indexer is not None else prev_topk
        if sel is None:
            out = self._attend_latent(q_nope, q_pe, kv, valid[:, None], n_keys=cache.max_length)
        else:
            out = self._attend_sparse(q_nope, q_pe, kv, sel[0], valid=sel[1][:, :, None, :])
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1)), sel


def selection_mask(idx: mx.array, valid: mx.array, T: int) -> mx.array:
    """Selected positions [B, L, n] (valid [B, L, n]) -> [B, 1, L, T] bool (invalid picks go to a spare
    column T, dropped)."""
    target = mx.where(valid, idx, T)
    mask = mx.put_along_axis(mx.zeros(idx.shape[:-1] + (T + 1,), dtype=mx.bool_), target, mx.array(True), axis=-1)
    return mask[..., :T][:, None]
