"""Load a GLM-5.3-Flash (`glm5_next`) checkpoint: HF folders (BF16/FP32, or FP8 with
`weight_scale_inv` block scales, nested `model.language_model.*` or flat `model.*` names) and MLX
conversions (mlx-lm's config["quantization"]). `loading.load_model` dispatches here by model_type;
the weight checks, quantized-layer swap and dtype rules are GLM-5.1's (imported from loading.py).
Vision tower weights are skipped with a warning (the text path only).
"""

from __future__ import annotations

import mlx.core as mx

from .config import config_dtype
from .glm5_next import Model
from .glm5_next_config import Glm5NextArgs

MTP_PREFIXES = ("model.layers.{n}.", "model.language_model.layers.{n}.", "language_model.model.layers.{n}.")


def load_glm5_next(ckpt, *, lazy: bool = False, dtype=None, mtp: bool = True) -> Model:
    """ckpt: a loading.Checkpoint whose model_type is glm5_next. Same contract as loading.load_model."""
    from . import loading as base  # GLM-5.1's helpers; imported here (loading imports this module lazily)

    config = ckpt.config
    args = Glm5NextArgs.from_dict(config)
    weights = base.read_weights(ckpt.shards())  # lazy: only headers are read here
    names = ckpt.tensor_names() or set(weights)
    prefixes = tuple(p.format(n=args.num_hidden_layers) for p in MTP_PREFIXES)
    model = Model(args, mtp=mtp and any(k.startswith(prefixes) for k in names))
    weights = model.sanitize(weights)
    if args.quantization:
        base._quantize_for_checkpoint(model, args.quantization, weights)
    base._check_weights(model, weights)
    text_dtype = {"dtype": config_dtype(config.get("text_config") or config)}
    target = base._target_dtype(text_dtype if "dtype" not in config and "torch_dtype" not in config else config,
                                dtype)
    if dtype is None and target != mx.float32 and base._cpu_needs_float32(model):
        target = mx.float32
    cast = model.cast_predicate
    weights = {k: (v.astype(target) if cast(k) and mx.issubdtype(v.dtype, mx.floating) else v)
               for k, v in weights.items()}
    model.eval()
    model.load_weights(list(weights.items()), strict=False)  # checked above, with clearer errors
    if not lazy:
        mx.eval(model.parameters())
    return model
