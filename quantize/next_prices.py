"""GLM-5.3-Flash (`model_type: glm5_next`) in the planner's shared code.

Its config is read once, by the MLX model's `glm_mlx.model.glm5_next_config.Glm5NextArgs`: the keys,
defaults and nesting of transformers' `Glm5NextTextConfig` (models/glm5_next, 5.25), the validation, and
the per-layer cache sizes the planner prices (layer_bytes_per_token, layer_state_bytes; the tests compare
them with the caches' nbytes). This module only tells the planner which args are GLM-5.3-Flash's and adds
the prices that are the planner's own. The cache contract:

  DSA layers ("indexed_attention", and the MTP layer): per token, the normed kv latent
  (kv_lora_rank + qk_rope_head_dim = 512 + 0 values; `--kv-bits` as GLM-5.1's codes), and in layers with
  their own indexer its key and pool gate (2 x index_head_dim) plus one pooled key per index_kpool tokens
  (128 / 16 = 8 values a token), in the model dtype - what glm_mlx/model/glm5_next_cache.py allocates.
  KDA layers ("linear_attention"): nothing per token; per sequence, the short-convolution state
  ((linear_conv_kernel_dim - 1) x 3 x linear_num_heads x linear_head_dim, model dtype) and the
  delta-rule state (linear_num_heads x linear_head_dim x linear_head_dim, float32 as the
  reference keeps it).
"""

from __future__ import annotations

from glm_mlx.model.glm5_next_config import Glm5NextArgs


def is_next(args) -> bool:
    """Whether `args` is a GLM-5.3-Flash config (the planner dispatches on this)."""
    return isinstance(args, Glm5NextArgs)


def state_bytes(args, dtype_bytes: int = 2, mtp: bool = True) -> int:
    """Per-sequence cache bytes independent of the context: GLM-5.3-Flash's KDA states (the MTP layer is a
    DSA layer: none there); 0 for GLM-5.1."""
    return args.kda_state_bytes(dtype_bytes) if is_next(args) else 0


def layer_cache_bytes(args, layer: int, rows: int, dtype_bytes: int = 2) -> int:
    """One decoder layer's cache for `rows` tokens (a pipeline stage's share), GLM-5.1 or GLM-5.3-Flash."""
    if is_next(args):  # DSA layers grow with the context, KDA layers hold a fixed state
        return args.layer_bytes_per_token(layer, dtype_bytes) * rows + args.layer_state_bytes(layer, dtype_bytes)
    return (args.latent_bytes_per_token(dtype_bytes)
            + (args.indexer_bytes_per_token(dtype_bytes) if args.has_indexer(layer) else 0)) * rows


def selected_tokens(args: Glm5NextArgs) -> int:
    """Keys a DSA query attends past index_topk: the top-k pools' tokens plus the unfinished tail pool
    (index_kpool_always_select_tail, the only setting the model accepts)."""
    return args.index_topk + args.index_kpool - 1
