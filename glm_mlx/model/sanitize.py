"""All checkpoint-to-model weight remapping, in one step.

- FP8 checkpoints (float8_e4m3 + `weight_scale_inv` 128x128 block scales) are dequantized.
- Per-expert tensors `mlp.experts.E.{gate,up,down}_proj` are stacked into `mlp.switch_mlp.*`.
- `kv_b_proj` is split per head into `embed_q` [H, C, N] (keys, transposed for absorption) and
  `unembed_out` [H, V, C] (values), the forms latent-space decode needs.
- The MTP layer (`model.layers.{num_hidden_layers}`) is kept when the model has one; its
  duplicate copies of the embedding / head (DeepSeek-V3 layout) are dropped.
"""

from __future__ import annotations

import re

import mlx.core as mx

from .config import ModelArgs
from ..errors import CheckpointError

FP8_BLOCK = 128


def dequantize_fp8(weight: mx.array, scale_inv: mx.array, dtype=mx.float32) -> mx.array:
    """[out, in] float8_e4m3 (stored as uint8) times per-128x128-block scales -> dtype."""
    if weight.dtype == mx.uint8:
        weight = mx.from_fp8(weight, dtype=mx.float32)
    weight = weight.astype(mx.float32)
    m, n = weight.shape
    pm, pn = (-m) % FP8_BLOCK, (-n) % FP8_BLOCK
    w = mx.pad(weight, ((0, pm), (0, pn))).reshape((m + pm) // FP8_BLOCK, FP8_BLOCK, (n + pn) // FP8_BLOCK, FP8_BLOCK)
    w = w * scale_inv.astype(mx.float32)[:, None, :, None]  # one scale per block
    return w.reshape(m + pm, n + pn)[:m, :n].astype(dtype)


def _split_kv_b(args: ModelArgs, weights: dict, prefix: str):
    """kv_b_proj [H*(N+V), C] -> embed_q [H, C, N], unembed_out [H, V, C] (re-quantized if it was)."""
    w = weights.pop(f"{prefix}.kv_b_proj.weight")
    scales = weights.pop(f"{prefix}.kv_b_proj.scales", None)
    biases = weights.pop(f"{prefix}.kv_b_proj.biases", None)
    C, N = args.kv_lora_rank, args.qk_nope_head_dim
    if scales is not None:  # an MLX-quantized kv_b_proj (affine): infer bits and group size
        bits = (w.shape[-1] * 32) // C
        group = C // scales.shape[-1]
        w = mx.dequantize(w, scales, biases, group_size=group, bits=bits)
    w = w.reshape(args.num_attention_heads, N + args.v_head_dim, C)  # [H, N+V, C]
    wk = mx.contiguous(w[:, :N, :].swapaxes(-1, -2))  # [H, C, N]
    wv = mx.contiguous(w[:, N:, :])  # [H, V, C]
    for name, t in (("embed_q", wk), ("unembed_out", wv)):
        if scales is not None:
            q, s, b = mx.quantize(t, group_size=group, bits=bits)
            weights[f"{prefix}.{name}.scales"], weights[f"{prefix}.{name}.biases"] = s, b
            t = q
        weights[f"{prefix}.{name}.weight"] = t


def sanitize_weights(args: ModelArgs, weights: dict, keep_mtp: bool) -> dict:
    n_main = args.num_hidden_layers
    layer_re = re.compile(r"^model\.layers\.(\d+)\.")
    out = {}
    for k, v in weights.items():
        m = layer_re.match(k)
        if m and int(m.group(1)) >= n_main:
            if not keep_mtp or int(m.group(1)) > n_main:
                continue
            # DeepSeek-V3-style MTP layers may carry copies of the shared embedding and head.
            if ".embed_tokens." in k or ".shared_head.head." in k:
                continue
        if k.endswith("rotary_emb.inv_freq"):
            continue
        out[k] = v
    weights = out

    # FP8 block-scaled weights -> float (the loader casts to the target dtype afterwards).
    for k in [k for k in weights if k.endswith(".weight_scale_inv")]:
        wk = k[: -len("_scale_inv")]
        weights[wk] = dequantize_fp8(weights[wk], weights.pop(k))
    for k in [k for k in weights if k.endswith(".input_scale")]:  # activation scales: unused
        weights.pop(k)

    layers = range(n_main + (1 if keep_mtp else 0))
    for layer in layers:
        prefix = f"model.layers.{layer}"
        for proj in ("gate_proj", "up_proj", "down_proj"):
            for kind in ("weight", "scales", "biases"):
                first = f"{prefix}.mlp.experts.0.{proj}.{kind}"
                if first in weights:
                    keys = [f"{prefix}.mlp.experts.{e}.{proj}.{kind}" for e in range(args.n_routed_experts)]
                    missing = [k for k in keys if k not in weights]
                    if missing:
                        raise CheckpointError(f"missing tensor {missing[0]} ({len(missing)} expert tensors missing)")
                    weights[f"{prefix}.mlp.switch_mlp.{proj}.{kind}"] = mx.stack([weights.pop(k) for k in keys])
        if f"{prefix}.self_attn.kv_b_proj.weight" in weights:
            _split_kv_b(args, weights, f"{prefix}.self_attn")
    return weights
