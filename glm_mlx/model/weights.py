"""What every model's loader does with a checkpoint's weights: read the shards (lazily), swap in quantized
layers where the checkpoint holds quantized tensors, check names and shapes against the model, pick
the dtype, load. GLM-5.1's loader (loading.py) and GLM-5.3-Flash's (glm5_next_loading.py) share it."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import CheckpointError
from .config import config_dtype


def read_weights(files: list[Path]) -> dict:
    weights = {}
    for f in files:
        try:
            weights.update(mx.load(str(f)))
        except Exception as e:  # noqa: BLE001 - mx.load raises bare RuntimeError/ValueError on bad files
            raise CheckpointError(f"corrupt shard {f.name}: {str(e).splitlines()[0]}",
                                  "Delete the shard and re-download it.") from None
    return weights


def quantize_for_checkpoint(model, quantization: dict, weights: dict):
    """Swap in quantized layers where the checkpoint holds quantized tensors (mlx-lm's rule)."""
    from mlx_lm.utils import infer_quant_config

    def predicate(path, module):
        if path in quantization:  # per-module override: a dict of params or False
            return quantization[path]
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
            return False
        return infer_quant_config(path, module, weights)

    nn.quantize(model, group_size=quantization.get("group_size", 64), bits=quantization.get("bits", 4),
                mode=quantization.get("mode", "affine"), class_predicate=predicate)


def check_weights(model, weights: dict):
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing:
        raise CheckpointError(f"missing tensor {missing[0]}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))
    if unexpected:
        raise CheckpointError(f"unexpected tensor {unexpected[0]}" + (f" (+{len(unexpected) - 1} more)" if len(unexpected) > 1 else ""),
                              "The checkpoint does not match its config.json (wrong model or config?).")
    for k, v in weights.items():
        if v.shape != expected[k].shape:
            raise CheckpointError(f"tensor {k} has shape {tuple(v.shape)}, config implies {tuple(expected[k].shape)}",
                                  "The checkpoint does not match its config.json.")


def cpu_needs_float32(model) -> bool:
    """MLX's CPU backend runs unquantized gather_mm (the MoE experts) only in float32."""
    from mlx_lm.models.switch_layers import SwitchLinear

    if mx.default_device().type != mx.DeviceType.cpu:
        return False
    return any(isinstance(m, SwitchLinear) for _, m in model.named_modules())


def target_dtype(config: dict, dtype):
    if dtype is not None:
        return dtype
    return getattr(mx, config_dtype(config))  # bfloat16, float16 or float32


def finish(model, weights: dict, target, *, lazy: bool):
    """Cast what the model casts to `target`, load the checked weights, evaluate unless lazy."""
    cast = model.cast_predicate
    weights = {k: (v.astype(target) if cast(k) and mx.issubdtype(v.dtype, mx.floating) else v)
               for k, v in weights.items()}
    model.eval()
    model.load_weights(list(weights.items()), strict=False)  # checked before, with clearer errors
    if not lazy:
        mx.eval(model.parameters())
    return model
