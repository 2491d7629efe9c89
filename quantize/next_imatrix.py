"""The importance matrix of a GLM-5.3-Flash (`glm5_next`) checkpoint, one decoder layer in memory at a time.

The same statistics as imatrix.calibrate (its recorders, defaults and weight energies: imatrix.py's
docstring), run through the glm5_next MLX model's own blocks (glm_mlx/model/glm5_next.py) exactly as its
TextModel runs them: the embedding broadcast to hc_mult residual streams, each DecoderLayer (KDA or DSA,
then the MLP, both behind hyper-connections) taking the DSA selection of the layer before it, the streams'
mean normed for the head, and the MTP block on the final hidden as for GLM-5.1. A layer's weights are
read from the checkpoint and put through the model's sanitize (names, q/k/v conv join, expert stacking,
kv_b_proj split, FP8 dequantization), so the keys are the inventory's module paths. `imatrix.collect`
on a loaded glm5_next model gives the same result (tests/test_convert_glm5_next.py).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from glm_mlx.model.glm5_next import DecoderLayer, MTPLayer, sanitize_glm5_next
from glm_mlx.model.glm5_next_config import Glm5NextArgs

from .imatrix import Importance, _energy, _finish, _Sums, head_and_mtp, recording
from .next_convert import NextNames


def _layer_weights(source, names: NextNames, args: Glm5NextArgs, layer: int, dtype) -> list[tuple[str, mx.array]]:
    prefix = f"model.layers.{layer}."
    keys = [k for k in source.weight_map if (names.canonical(k) or "").startswith(prefix) and not k.endswith("_scale_inv")]
    w = sanitize_glm5_next(args, {k: source.read(k) for k in keys}, keep_mtp=layer >= args.num_hidden_layers)
    return [(k[len(prefix):], v.astype(dtype) if "e_score_correction_bias" not in k else v) for k, v in w.items()]


def calibrate_next(source, token_chunks: list[list[int]], *, mtp: bool = True, dtype=mx.float32, progress=None) -> Importance:
    """Importance of every quantizable module of the glm5_next checkpoint `source` (a quantize.source.Source)
    over the token chunks (each its own sequence)."""
    args = Glm5NextArgs.from_dict(source.config)
    names = NextNames(source.weight_map)
    n = args.num_hidden_layers
    mtp = mtp and bool(args.num_nextn_predict_layers) and f"model.layers.{n}.eh_proj.weight" in names.by_model
    result, sums = Importance(tokens=sum(len(c) for c in token_chunks)), _Sums()
    embed = source.read(names.source("model.embed_tokens.weight")).astype(dtype)
    x = [embed[mx.array(c)][None] for c in token_chunks]
    h = [mx.broadcast_to(e[:, :, None, :], (*e.shape[:2], args.hc_mult, e.shape[-1])) for e in x]
    nxt = [embed[mx.array(c[1:])][None] for c in token_chunks] if mtp else None
    result.imp["model.embed_tokens"] = mx.ones((args.hidden_size,))
    result.defaults["model.embed_tokens"] = "uniform: embedding rows are looked up, not multiplied"
    del embed, x
    topk = [None] * len(h)
    for layer in range(n):
        block = DecoderLayer(args, layer)
        block.load_weights(_layer_weights(source, names, args, layer, dtype))
        prefix = f"model.layers.{layer}."
        result.resid[str(layer)] = _energy([s.mean(axis=2) for s in h])
        with recording(block, prefix, sums, args):
            for i in range(len(h)):
                h[i], topk[i] = block(h[i], None, topk[i])
                mx.eval(h[i], sums.sum, sums.n, *([topk[i]] if topk[i] is not None else []))
        _finish(result, sums, block, prefix, args)
        del block
        if progress:
            progress(layer + 1)
    norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
    norm.load_weights([("weight", source.read(names.source("model.norm.weight")).astype(dtype))])
    h = [norm(s.mean(axis=2)) for s in h]  # the HyperHead: the streams' unweighted mean

    def mtp_block():
        block = MTPLayer(args)
        block.load_weights(_layer_weights(source, names, args, n, dtype))
        return block

    return head_and_mtp(result, sums, h, nxt, args, source.read(names.source("lm_head.weight")).astype(dtype),
                        mtp_block if mtp else None)
