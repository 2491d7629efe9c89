"""GLM-MoE-DSA (GLM-5.x) in MLX.

Parameter names equal the checkpoint keys after `sanitize` (mlx-lm's names for the split
kv_b_proj and the stacked experts, so MLX conversions made by mlx-lm load as they are). The
multi-token-prediction (MTP) layer sits at `model.layers.{num_hidden_layers}` exactly as in the
checkpoint; the main forward pass runs only the layers before it.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .attention import MLAttention
from .cache import DSACache
from .config import ModelArgs
from .moe import MLP, MoE
from .sanitize import sanitize_weights


def set_kv_cache_bits(args: ModelArgs, bits: int | None):
    """args.kv_cache_bits = bits, validated (left unchanged when refused)."""
    old, args.kv_cache_bits = args.kv_cache_bits, bits or None
    try:
        args._validate()
    except Exception:
        args.kv_cache_bits = old
        raise


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.self_attn = MLAttention(args, has_indexer=args.has_indexer(layer))
        sparse = layer >= args.num_hidden_layers or args.mlp_layer_types[layer] == "sparse"
        self.mlp = MoE(args) if sparse else MLP(args.hidden_size, args.intermediate_size)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x, cache=None, prev_topk=None):
        r, topk = self.self_attn(self.input_layernorm(x), cache, prev_topk)
        h = x + r
        return h + self.mlp(self.post_attention_layernorm(h)), topk


class SharedHead(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)


class MTPLayer(DecoderLayer):
    """DeepSeek-V3 "NextN" layer: h' = eh_proj([enorm(embed(t+1)); hnorm(h_t)]) -> decoder layer.

    Its output goes through `shared_head.norm` and the main lm_head. The normalised output is
    also what the next draft step takes as its hidden state (GLM normalises at every step).
    """

    def __init__(self, args: ModelArgs):
        super().__init__(args, args.num_hidden_layers)
        self.enorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.hnorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * args.hidden_size, args.hidden_size, bias=False)
        self.shared_head = SharedHead(args)

    def __call__(self, embeds, hidden, cache=None):
        h = self.eh_proj(mx.concatenate([self.enorm(embeds), self.hnorm(hidden)], axis=-1))
        h, _ = super().__call__(h, cache)
        return self.shared_head.norm(h)


class GlmModel(nn.Module):
    def __init__(self, args: ModelArgs, mtp: bool):
        super().__init__()
        self.num_hidden_layers = args.num_hidden_layers
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args, i) for i in range(args.num_hidden_layers)]
        if mtp:
            self.layers.append(MTPLayer(args))
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, tokens, cache=None):
        h = self.embed_tokens(tokens)
        cache = cache if cache is not None else [None] * self.num_hidden_layers
        topk = None
        for layer, c in zip(self.layers[: self.num_hidden_layers], cache):
            h, topk = layer(h, c, topk)
        return self.norm(h)


class Model(nn.Module):
    """`logits = model(tokens, cache=model.make_cache())`; `model.mtp_logits(...)` drafts."""

    def __init__(self, args: ModelArgs, mtp: bool | None = None):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.has_mtp = bool(args.num_nextn_predict_layers) if mtp is None else mtp
        self.model = GlmModel(args, self.has_mtp)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, inputs: mx.array, cache=None, return_hidden: bool = False, last_only: bool = False):
        """inputs [B, L] token ids -> logits [B, L, vocab] ([B, 1, vocab] for the last position only
        with last_only, as prefill needs: no [L, vocab] block) and the final-normed hidden [B, L, hidden]."""
        h = self.model(inputs, cache)
        logits = self.lm_head(h[:, -1:] if last_only else h)
        return (logits, h) if return_hidden else logits

    def mtp_logits(self, hidden: mx.array, next_tokens: mx.array, cache: DSACache | None = None):
        """MTP draft step.

        hidden [B, L, hidden]: the main model's final-normed hidden at positions p..p+L-1 (or the
        previous draft step's output); next_tokens [B, L]: the tokens at p+1..p+L. Returns
        (logits [B, L, vocab] for positions p+2..p+L+1, hidden for the next draft step).
        """
        h = self.mtp_hidden(hidden, next_tokens, cache)
        return self.lm_head(h), h

    def mtp_hidden(self, hidden: mx.array, next_tokens: mx.array, cache: DSACache | None = None) -> mx.array:
        """mtp_logits without the head: the MTP layer's normed output [B, L, hidden]."""
        if not self.has_mtp:
            raise RuntimeError("this checkpoint has no MTP layer")
        return self.mtp_layer(self.model.embed_tokens(next_tokens), hidden, cache)

    def mtp_draft(self, hidden: mx.array, next_tokens: mx.array, cache: DSACache | None = None,
                  row: mx.array | None = None):
        """One draft step: as mtp_logits, but the head runs on one position only, the one that
        drafts (the last, or `row`, a [1] device index); the others just fill the MTP cache.
        Returns (logits [B, vocab], h [B, 1, hidden])."""
        h = self.mtp_hidden(hidden, next_tokens, cache)
        h = h[:, -1:] if row is None else mx.take(h, row, axis=1)
        return self.lm_head(h[:, 0]), h

    @property
    def mtp_layer(self) -> MTPLayer:
        return self.model.layers[self.args.num_hidden_layers]

    @property
    def layers(self):
        return self.model.layers[: self.args.num_hidden_layers]

    def make_cache(self, mtp: bool = False) -> list[DSACache]:
        """One cache per decoder layer; with mtp=True a last entry for the MTP layer."""
        n = self.args.num_hidden_layers + (1 if mtp and self.has_mtp else 0)
        a = self.args
        return [DSACache(a.has_indexer(i), a.index_cache_bits, a.kv_cache_bits, a.kv_cache_group_size) for i in range(n)]

    def set_index_cache_bits(self, bits: int | None):
        """Switch the indexer key cache between the model dtype (None) and 8-bit; caches made
        afterwards follow (existing caches keep their format)."""
        old, self.args.index_cache_bits = self.args.index_cache_bits, bits
        try:
            self.args._validate()
        except Exception:
            self.args.index_cache_bits = old
            raise
        for layer in self.model.layers:
            if layer.self_attn.indexer is not None:
                layer.self_attn.indexer.key_bits = bits

    def set_kv_cache_bits(self, bits: int | None):
        """Switch the latent KV cache between the model dtype (None) and 8- or 4-bit codes; caches
        made afterwards follow (existing caches keep their format)."""
        set_kv_cache_bits(self.args, bits)

    def cache_bytes_per_token(self, mtp: bool = False) -> int:
        """Analytic cache bytes per token in the model's activation dtype (checked against nbytes)."""
        return self.args.cache_bytes_per_token(self.model.norm.weight.dtype.size, mtp=mtp and self.has_mtp)

    def sanitize(self, weights: dict) -> dict:
        return sanitize_weights(self.args, weights, keep_mtp=self.has_mtp)

    @property
    def cast_predicate(self):
        # mlx-lm's convention: which parameters may be cast to the model dtype.
        return lambda k: "e_score_correction_bias" not in k
