"""GLM-5.3-Flash (`glm5_next`, text path) in MLX.

Layers follow `layer_types`: KDA linear attention (kda.py) or DSA (MLA without RoPE + pooled indexer,
glm5_next_attention.py); the feed-forward is a dense SwiGLU or the routed MoE (GLM-5.1's router and
SwitchGLU experts, imported), both with gate/up clamped at swiglu_limit. The residual is hc_mult
streams (manifold-constrained hyper-connections): before each block a learned, per-token
projection of the streams gives pre (collapse), post (expand) and a Sinkhorn-normalised comb matrix
(mix); after the last layer the streams are averaged (the reference's unweighted HyperHead), then
normed.

MTP: the checkpoint's `model.layers.{num_hidden_layers}` (DeepSeek-V3 NextN convention:
h' = eh_proj([enorm(embed(t+1)); hnorm(h_t)]) -> a DSA + MoE decoder layer -> shared_head.norm -> the
main lm_head). The reference implementation in transformers has no MTP module (it ignores
`layers.45.*`); this block follows mlx-vlm's glm5_next MTP structure, a plain residual layer (no
hyper-connections), and is tested against a direct torch composition of the reference's own
attention and MoE modules. h_t is the main model's final-normed hidden, as for GLM-5.1.

Parameter names are the checkpoint's after `sanitize` (prefix `model.language_model.` -> `model.`,
`hc_attn_fn` -> `attn_hc.fn`, q/k/v_conv1d -> one conv1d, per-expert tensors stacked into
`switch_mlp`, kv_b_proj split per head), so MLX conversions of this model load as they are.
"""

from __future__ import annotations

import warnings
from functools import partial

import mlx.core as mx
import mlx.nn as nn

from .glm5_next_attention import PooledMLAttention
from .glm5_next_cache import KDACache, PooledDSACache
from .glm5_next_config import Glm5NextArgs
from .glm_moe_dsa import Model as GlmModel
from .kda import KimiDeltaAttention
from .moe import MLP, MoE
from .sanitize import sanitize_weights


@partial(mx.compile, shapeless=True)
def clamped_swiglu(gate, up, limit):
    return nn.silu(mx.minimum(gate, limit)) * mx.clip(up, -limit, limit)


class ClampedSwiGLU(nn.Module):
    """SwitchGLU's activation (called as activation(up, gate)) with the swiglu_limit clamp."""

    def __init__(self, limit: float):
        super().__init__()
        self.limit = limit

    def __call__(self, up, gate):
        return clamped_swiglu(gate, up, self.limit)


class ClampedMLP(MLP):
    def __init__(self, hidden: int, intermediate: int, limit: float):
        super().__init__(hidden, intermediate)
        self.limit = limit

    def __call__(self, x):
        return self.down_proj(clamped_swiglu(self.gate_proj(x), self.up_proj(x), self.limit))


class ClampedMoE(MoE):
    """GLM-5.1's MoE (router, stacked experts, shared expert) with the clamped SwiGLU."""

    def __init__(self, args: Glm5NextArgs):
        super().__init__(args)
        self.switch_mlp.activation = ClampedSwiGLU(args.swiglu_limit)
        if args.n_shared_experts:
            self.shared_experts = ClampedMLP(args.hidden_size, args.moe_intermediate_size * args.n_shared_experts,
                                             args.swiglu_limit)


@mx.compile  # not shapeless: the comb reshape depends on the input's shape
def _hc_weights(mix, base, scale, n: int, iters: int, eps):
    """mix [B, L, (2+n)*n] float32 -> pre [B, L, n], post [B, L, n], comb [B, L, n, n] (doubly stochastic)."""
    pre = mx.sigmoid(mix[..., :n] * scale[0] + base[:n]) + eps
    post = 2 * mx.sigmoid(mix[..., n:2 * n] * scale[1] + base[n:2 * n])
    logits = (mix[..., 2 * n:] * scale[2] + base[2 * n:]).reshape(*mix.shape[:-1], n, n)  # [B, L, n*n] -> [.., n, n]
    comb = mx.softmax(logits, axis=-1) + eps
    comb = comb / (comb.sum(axis=-2, keepdims=True) + eps)
    for _ in range(iters - 1):  # Sinkhorn-Knopp: rows, then columns
        comb = comb / (comb.sum(axis=-1, keepdims=True) + eps)
        comb = comb / (comb.sum(axis=-2, keepdims=True) + eps)
    return pre, post, comb


class HyperConnection(nn.Module):
    """fn [(2+n)*n, n*hidden], base [(2+n)*n], scale [3] (pre, post, comb), all used in float32."""

    def __init__(self, args: Glm5NextArgs):
        super().__init__()
        n = args.hc_mult
        self.n, self.iters, self.eps, self.norm_eps = n, args.hc_sinkhorn_iters, args.hc_eps, args.rms_norm_eps
        self.fn = mx.zeros(((2 + n) * n, n * args.hidden_size))
        self.base = mx.zeros(((2 + n) * n,), dtype=mx.float32)
        self.scale = mx.ones((3,), dtype=mx.float32)

    def __call__(self, streams: mx.array):
        """streams [B, L, n, hidden] -> (post [B, L, n], comb [B, L, n, n], collapsed block input [B, L, hidden])."""
        B, L, n, d = streams.shape
        flat = mx.fast.rms_norm(streams.reshape(B, L, n * d).astype(mx.float32), None, self.norm_eps)
        mix = flat @ self.fn.astype(mx.float32).T  # [B, L, (2+n)*n]
        pre, post, comb = _hc_weights(mix, self.base.astype(mx.float32), self.scale.astype(mx.float32),
                                      n, self.iters, mx.array(self.eps, mx.float32))
        collapsed = (pre[..., None] * streams).sum(axis=2).astype(streams.dtype)
        return post, comb, collapsed

    @staticmethod
    def merge(post, comb, out, residual):
        """Block output [B, L, hidden] and input streams [B, L, n, hidden] -> new streams:
        post_i * out + sum_j comb[j, i] * residual_j."""
        dt = residual.dtype
        return post.astype(dt)[..., None] * out[:, :, None, :] + comb.astype(dt).swapaxes(-1, -2) @ residual


def feed_forward(args: Glm5NextArgs, layer: int):
    if layer >= args.num_hidden_layers or args.mlp_layer_types[layer] == "sparse":
        return ClampedMoE(args)
    return ClampedMLP(args.hidden_size, args.intermediate_size, args.swiglu_limit)


class DecoderLayer(nn.Module):
    def __init__(self, args: Glm5NextArgs, layer: int):
        super().__init__()
        self.is_linear = not args.is_indexed(layer)
        self.self_attn = (KimiDeltaAttention(args) if self.is_linear
                          else PooledMLAttention(args, has_indexer=args.has_indexer(layer)))
        self.mlp = feed_forward(args, layer)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.attn_hc = HyperConnection(args)
        self.ffn_hc = HyperConnection(args)

    def __call__(self, h, cache=None, prev_topk=None):
        """h [B, L, n, hidden] streams -> (streams, DSA selection or None)."""
        post, comb, x = self.attn_hc(h)
        x = self.input_layernorm(x)
        if self.is_linear:
            x, topk = self.self_attn(x, cache), None
        else:
            x, topk = self.self_attn(x, cache, prev_topk)
        h = HyperConnection.merge(post, comb, x, h)
        post, comb, x = self.ffn_hc(h)
        h = HyperConnection.merge(post, comb, self.mlp(self.post_attention_layernorm(x)), h)
        return h, topk


class SharedHead(nn.Module):
    def __init__(self, args: Glm5NextArgs):
        super().__init__()
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)


class MTPLayer(nn.Module):
    """NextN block: eh_proj([enorm(embed(t+1)); hnorm(h_t)]) -> x + attn(norm x) -> x + moe(norm x) -> norm."""

    def __init__(self, args: Glm5NextArgs):
        super().__init__()
        d, eps = args.hidden_size, args.rms_norm_eps
        self.enorm, self.hnorm = nn.RMSNorm(d, eps=eps), nn.RMSNorm(d, eps=eps)
        self.eh_proj = nn.Linear(2 * d, d, bias=False)
        self.input_layernorm = nn.RMSNorm(d, eps=eps)
        self.self_attn = PooledMLAttention(args, has_indexer=True)
        self.post_attention_layernorm = nn.RMSNorm(d, eps=eps)
        self.mlp = feed_forward(args, args.num_hidden_layers)
        self.shared_head = SharedHead(args)

    def __call__(self, embeds, hidden, cache=None):
        x = self.eh_proj(mx.concatenate([self.enorm(embeds), self.hnorm(hidden)], axis=-1))
        x = x + self.self_attn(self.input_layernorm(x), cache)[0]
        x = x + self.mlp(self.post_attention_layernorm(x))
        return self.shared_head.norm(x)


class TextModel(nn.Module):
    def __init__(self, args: Glm5NextArgs, mtp: bool):
        super().__init__()
        self.num_hidden_layers, self.hc_mult = args.num_hidden_layers, args.hc_mult
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args, i) for i in range(args.num_hidden_layers)]
        if mtp:
            self.layers.append(MTPLayer(args))
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, tokens, cache=None):
        x = self.embed_tokens(tokens)  # [B, L, hidden]
        h = mx.broadcast_to(x[:, :, None, :], (*x.shape[:2], self.hc_mult, x.shape[-1]))  # [B, L, n, hidden]
        cache = cache if cache is not None else [None] * self.num_hidden_layers
        topk = None
        for layer, c in zip(self.layers[: self.num_hidden_layers], cache):
            h, topk = layer(h, c, topk)  # a shared DSA layer takes the selection of the layer before it
        return self.norm(h.mean(axis=2))  # HyperHead: the streams' unweighted mean


class Model(GlmModel):
    """`logits = model(tokens, cache=model.make_cache())`; GLM-5.1's call, MTP draft and head methods
    (inherited) with this network, caches and checkpoint mapping."""

    def __init__(self, args: Glm5NextArgs, mtp: bool | None = None):
        nn.Module.__init__(self)  # GLM-5.1's __init__ builds its own network
        self.set_kv_cache_bits(args.kv_cache_bits)  # the planner may price one; the caches here do not build it
        self.args = args
        self.model_type = args.model_type
        self.has_mtp = bool(args.num_nextn_predict_layers) if mtp is None else mtp
        self.model = TextModel(args, self.has_mtp)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def make_cache(self, mtp: bool = False) -> list:
        """One cache per decoder layer (KDACache or PooledDSACache); with mtp=True a last one for MTP."""
        a = self.args
        n = a.num_hidden_layers + (1 if mtp and self.has_mtp else 0)
        return [PooledDSACache(a.has_indexer(i), a.index_kpool) if a.is_indexed(i)
                else KDACache(a.linear_conv_kernel_dim) for i in range(n)]

    def set_index_cache_bits(self, bits):
        if bits:
            raise ValueError("GLM-5.3-Flash: an 8-bit indexer cache is not supported yet")

    def set_kv_cache_bits(self, bits):
        if bits:
            raise ValueError("GLM-5.3-Flash: a quantized KV cache is not supported yet")

    def sanitize(self, weights: dict) -> dict:
        return sanitize_glm5_next(self.args, weights, keep_mtp=self.has_mtp)

    @property
    def cast_predicate(self):
        # What the reference keeps in float32 stays as stored (its maths runs in float32 anyway).
        keep = ("e_score_correction_bias", "mlp.gate.weight", "conv1d.weight", "dt_bias", "A_log",
                "_hc.base", "_hc.scale", "index_kpool_compress")
        return lambda k: not any(s in k for s in keep)


HC_RENAMES = {f"hc_{b}_{p}": f"{b}_hc.{p}" for b in ("attn", "ffn") for p in ("fn", "base", "scale")}
VISION_PREFIXES = ("model.visual.", "visual.", "vision_tower.")
CONV_PARTS = ("q_conv1d", "k_conv1d", "v_conv1d")  # the checkpoint's KDA convs, joined into conv1d in this order


def checkpoint_name(k: str) -> str | None:
    """A checkpoint tensor's name before the structural steps (conv join, expert stacking, kv_b_proj split):
    prefix `model.language_model.` (or mlx-vlm's `language_model.`) -> `model.`, `hc_attn_fn` -> `attn_hc.fn`,
    transformers' in-memory `self_attn.forget_gate.` -> `self_attn.`; None for a vision tower tensor.
    The converter (quantize/next_convert.py) maps a checkpoint's names with this same function."""
    if k.startswith(VISION_PREFIXES):
        return None
    if k.startswith("model.language_model."):
        k = "model." + k[len("model.language_model."):]
    elif k.startswith("language_model."):  # mlx-vlm's layout
        k = k[len("language_model."):]
    head, _, last = k.rpartition(".")
    if last in HC_RENAMES:
        k = f"{head}.{HC_RENAMES[last]}"
    return k.replace(".self_attn.forget_gate.", ".self_attn.")


def sanitize_glm5_next(args: Glm5NextArgs, weights: dict, keep_mtp: bool) -> dict:
    """Checkpoint names -> parameter names (checkpoint_name); then GLM-5.1's sanitize (FP8 dequantization,
    expert stacking, kv_b_proj split, MTP filtering). Idempotent on MLX conversions (already renamed)."""
    out, vision = {}, 0
    for k, v in weights.items():
        name = checkpoint_name(k)
        if name is None:
            vision += 1
            continue
        out[name] = v
    if vision:
        warnings.warn(f"skipped {vision} vision tower tensors: glm-mlx runs GLM-5.3-Flash's text path "
                      "(images are not supported yet)", stacklevel=3)
    for k in [k for k in out if k.endswith(".self_attn.q_conv1d.weight")]:
        pre = k[: -len("q_conv1d.weight")]
        parts = [out.pop(f"{pre}{c}.weight") for c in CONV_PARTS]
        out[f"{pre}conv1d.weight"] = mx.concatenate(parts, axis=0)  # 3 x [HD, 1, K] -> [3HD, 1, K]
    for k, v in out.items():
        if k.endswith(".conv1d.weight") and v.ndim == 3 and v.shape[1] == 1 and v.shape[2] != 1:
            out[k] = v.swapaxes(1, 2)  # torch [C, 1, K] -> MLX [C, K, 1]
    return sanitize_weights(args, out, keep_mtp=keep_mtp)
