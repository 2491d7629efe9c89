"""Load a GLM-5.3-Flash (`glm5_next`) checkpoint: HF folders (BF16/FP32, or FP8 with
`weight_scale_inv` block scales, nested `model.language_model.*` or flat `model.*` names) and MLX
conversions (mlx-lm's config["quantization"]). `loading.load_model` dispatches here by model_type;
the weight checks, quantized-layer swap and dtype rules are every loader's (weights.py).
Vision tower weights are skipped with a warning (the text path only).
"""

from __future__ import annotations

import mlx.core as mx

from .config import config_dtype
from .glm5_next import Model
from .glm5_next_config import Glm5NextArgs
from .weights import check_weights, cpu_needs_float32, finish, quantize_for_checkpoint, read_weights, target_dtype

MTP_PREFIXES = ("model.layers.{n}.", "model.language_model.layers.{n}.", "language_model.model.layers.{n}.")


def load_glm5_next(ckpt, *, lazy: bool = False, dtype=None, mtp: bool = True) -> Model:
    """ckpt: a loading.Checkpoint whose model_type is glm5_next. Same contract as loading.load_model."""
    config = ckpt.config
    args = Glm5NextArgs.from_dict(config)
    weights = read_weights(ckpt.shards())  # lazy: only headers are read here
    names = ckpt.tensor_names() or set(weights)
    prefixes = tuple(p.format(n=args.num_hidden_layers) for p in MTP_PREFIXES)
    model = Model(args, mtp=mtp and any(k.startswith(prefixes) for k in names))
    weights = model.sanitize(weights)
    if args.quantization:
        quantize_for_checkpoint(model, args.quantization, weights)
    check_weights(model, weights)
    text_dtype = {"dtype": config_dtype(config.get("text_config") or config)}
    target = target_dtype(text_dtype if "dtype" not in config and "torch_dtype" not in config else config,
                                dtype)
    if dtype is None and target != mx.float32 and cpu_needs_float32(model):
        target = mx.float32
    return finish(model, weights, target, lazy=lazy)
