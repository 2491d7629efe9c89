"""Training-only forward pass of glm_mlx.model.glm_moe_dsa.Model, and the HF export.

The inference code (glm_mlx/model/attention.py) never materialises attention probabilities and picks
the DSA top-k without gradients. Training needs both: the indexer is trained the DeepSeek-V3.2
way, by KL divergence from the main attention distribution (summed over heads, renormalised) to
the softmax of its index scores, with its inputs detached so only the indexer learns from it.
Everything here reuses the modules of a glm_mlx Model, so the trained weights are the model's.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import mlx.core as mx
from mlx import nn

from glm_mlx.model.attention import causal_mask
from glm_mlx.model.glm_moe_dsa import Model
from glm_mlx.model.moe import MoE

OPENBLAS = ["/usr/lib/x86_64-linux-gnu/libopenblas.so.0", "/usr/lib/aarch64-linux-gnu/libopenblas.so.0"]


def ensure_fast_blas():
    """Re-exec with OpenBLAS preloaded on Linux.

    The mlx[cpu] wheel links the netlib reference BLAS (~2 GFLOP/s sgemm here); libmlx calls the
    unversioned cblas_sgemm, so preloading OpenBLAS (Debian: libopenblas0-pthread) makes every
    CPU matmul ~30x faster. Set GLM_MINI_NO_PRELOAD=1 to skip.
    """
    if not sys.platform.startswith("linux") or os.environ.get("GLM_MINI_NO_PRELOAD"):
        return
    if "openblas" in os.environ.get("LD_PRELOAD", ""):
        return
    lib = next((p for p in OPENBLAS if Path(p).exists()), None)
    if lib is None:
        print("warning: no OpenBLAS found; MLX's CPU matmuls will be ~30x slower "
              "(apt-get install libopenblas0-pthread)", file=sys.stderr)
        return
    os.environ["LD_PRELOAD"] = ":".join(filter(None, [lib, os.environ.get("LD_PRELOAD")]))
    os.environ["GLM_MINI_NO_PRELOAD"] = "1"  # no exec loop if the preload is ignored
    os.execv(sys.executable, [sys.executable] + sys.argv)


def index_scores(idx, x: mx.array, qr: mx.array) -> mx.array:
    """The indexer's [B, L, L] scores over a whole sequence (same formula as Indexer.__call__)."""
    B, L, _ = x.shape
    k = idx.keys(x, 0)  # [B, 1, L, D]
    q = idx.rope(idx.wq_b(qr).reshape(B, L, idx.n_heads, idx.head_dim).transpose(0, 2, 1, 3), offset=0)
    s = mx.maximum(q @ k.swapaxes(-1, -2), 0.0) * (idx.head_dim**-0.5)  # [B, h, L, L]
    w = idx.weights_proj(x) * (idx.n_heads**-0.5)  # [B, L, h]
    return (w.transpose(0, 2, 1)[..., None] * s).sum(axis=1)


def topk_mask(index: mx.array, k: int) -> mx.array:
    """[B, L, L] causal-masked scores -> bool mask of the k best causal keys per query."""
    L = index.shape[-1]
    top = mx.argpartition(-index, kth=k - 1, axis=-1)[..., :k]
    sel = mx.put_along_axis(mx.zeros(index.shape, dtype=mx.bool_), top, mx.array(True), axis=-1)
    return sel & causal_mask(L, L)


def attention(attn, x: mx.array, sparse: bool, return_probs: bool = False):
    """MLA over a full sequence with explicit probabilities.

    Returns (output, indexer KL loss, extras). Dense: every causal key; sparse: the indexer's
    top-k keys (only matters once L > index_topk). The KL is over the keys attended to.
    """
    a = attn.args
    B, L, _ = x.shape
    qr = attn.q_a_layernorm(attn.q_a_proj(x))
    q = attn.q_b_proj(qr).reshape(B, L, attn.num_heads, a.qk_head_dim).transpose(0, 2, 1, 3)
    q_nope, q_pe = mx.split(q, [a.qk_nope_head_dim], axis=-1)
    q_pe = attn.rope(q_pe, offset=0)
    latent, k_pe = mx.split(attn.kv_a_proj_with_mqa(x), [a.kv_lora_rank], axis=-1)
    latent = attn.kv_a_layernorm(latent)[:, None]  # [B, 1, L, C]
    k_pe = attn.rope(k_pe[:, None], offset=0)
    k_nope = attn.embed_q(latent, transpose=False)  # [B, H, L, N]
    values = attn.unembed_out(latent)  # [B, H, L, V]
    scores = (q_nope @ k_nope.swapaxes(-1, -2) + q_pe @ k_pe.swapaxes(-1, -2)) * attn.scale

    mask = causal_mask(L, L)[None]  # [1, L, L]
    index = None
    if attn.indexer is not None:
        index = index_scores(attn.indexer, mx.stop_gradient(x), mx.stop_gradient(qr))
        index = mx.where(mask, index, -mx.inf)
        if sparse and L > attn.indexer.topk:
            mask = topk_mask(mx.stop_gradient(index), attn.indexer.topk)
    probs = mx.softmax(mx.where(mask[:, None], scores, -mx.inf), axis=-1)  # [B, H, L, L]
    out = (probs @ values).transpose(0, 2, 1, 3).reshape(B, L, -1)

    kl = mx.array(0.0)
    if index is not None:
        target = mx.stop_gradient(probs.sum(axis=1))
        target = target / target.sum(axis=-1, keepdims=True)
        logq = nn.log_softmax(mx.where(mask, index, -mx.inf), axis=-1)
        terms = mx.where(mask, target * (mx.log(target + 1e-12) - logq), 0.0)
        kl = terms.sum(axis=-1).mean()
    extras = {"probs": probs, "index": index} if return_probs else {}
    return attn.o_proj(out), kl, extras


def route(gate, x: mx.array):
    """glm_mlx.model.moe.route for n_group=1, with the expert choice detached (argpartition has no VJP)."""
    a = gate.args
    scores = mx.sigmoid(x @ gate.weight.T)
    choice = mx.stop_gradient(scores) + gate.e_score_correction_bias
    inds = mx.stop_gradient(mx.argpartition(-choice, kth=a.num_experts_per_tok - 1, axis=-1)[..., : a.num_experts_per_tok])
    w = mx.take_along_axis(scores, inds, axis=-1)
    if a.norm_topk_prob:
        w = w / (w.sum(axis=-1, keepdims=True) + 1e-20)
    return inds, w * a.routed_scaling_factor


def moe(block: MoE, x: mx.array):
    """MoE forward that also returns the chosen experts (for the load-balancing bias update)."""
    assert block.gate.args.n_group == 1
    inds, weights = route(block.gate, x)
    y = block.switch_mlp(x, inds)
    y = (y * weights[..., None].astype(y.dtype)).sum(axis=-2)
    if "shared_experts" in block:
        y = y + block.shared_experts(x)
    return y, mx.stop_gradient(inds)


def layer(dec, h: mx.array, sparse: bool):
    r, kl, _ = attention(dec.self_attn, dec.input_layernorm(h), sparse)
    h = h + r
    x = dec.post_attention_layernorm(h)
    if isinstance(dec.mlp, MoE):
        y, inds = moe(dec.mlp, x)
    else:
        y, inds = dec.mlp(x), None
    return h + y, kl, inds


def forward(model: Model, tokens: mx.array, sparse: bool):
    """tokens [B, L] -> (main logits [B, L, V], MTP logits [B, L-1, V], indexer KL, expert choices).

    MTP follows Model.mtp_logits: position i pairs the main model's final-normed hidden h_i with
    token i+1 and predicts token i+2.
    """
    h = model.model.embed_tokens(tokens)
    kls, loads = [], []
    for dec in model.layers:
        h, kl, inds = layer(dec, h, sparse)
        kls.append(kl)
        if inds is not None:
            loads.append(inds)
    h = model.model.norm(h)
    logits = model.lm_head(h)
    mtp = model.mtp_layer
    e = model.model.embed_tokens(tokens[:, 1:])
    hm = mtp.eh_proj(mx.concatenate([mtp.enorm(e), mtp.hnorm(h[:, :-1])], axis=-1))
    hm, kl, inds = layer(mtp, hm, sparse)
    kls.append(kl)
    loads.append(inds)
    mtp_logits = model.lm_head(mtp.shared_head.norm(hm))
    return logits, mtp_logits, mx.stack(kls).sum(), loads


def expert_load(inds: mx.array, n_experts: int) -> mx.array:
    """Fraction of routed slots each expert received."""
    flat = inds.reshape(-1)
    return mx.zeros((n_experts,)).at[flat].add(1.0) / flat.size


def moe_blocks(model: Model) -> list[MoE]:
    return [dec.mlp for dec in list(model.layers) + [model.mtp_layer] if isinstance(dec.mlp, MoE)]


# --- export ------------------------------------------------------------------------------------
def unsanitize(model: Model) -> dict[str, mx.array]:
    """Model parameters -> real HF glm_moe_dsa keys (per-expert tensors, joined kv_b_proj)."""
    from mlx.utils import tree_flatten

    a = model.args
    out = {}
    for k, v in tree_flatten(model.parameters()):
        if ".switch_mlp." in k:  # [E, out, in] -> mlp.experts.E.<proj>.weight
            prefix, rest = k.split(".switch_mlp.")
            for e in range(v.shape[0]):
                out[f"{prefix}.experts.{e}.{rest}"] = v[e]
        elif k.endswith(".embed_q.weight"):
            prefix = k[: -len(".embed_q.weight")]
            wk = v.swapaxes(-1, -2)  # [H, N, C]
            wv = dict(tree_flatten(model.parameters()))[f"{prefix}.unembed_out.weight"]  # [H, V, C]
            out[f"{prefix}.kv_b_proj.weight"] = mx.concatenate([wk, wv], axis=1).reshape(-1, a.kv_lora_rank)
        elif k.endswith(".unembed_out.weight"):
            continue
        else:
            out[k] = v
    return out
