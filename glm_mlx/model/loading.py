"""Load a GLM-MoE-DSA checkpoint: HF folders (BF16/FP32/FP8, single-file or sharded) and
MLX-quantized folders (mlx-lm's `config["quantization"]` convention, per-module overrides).

Weights are opened with `mx.load`, which memory-maps safetensors lazily: nothing is read until
evaluated, so a checkpoint larger than RAM is never read whole at once.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from pathlib import Path

from ..errors import CheckpointError
from .checkpoint import Checkpoint
from .config import config_dtype
from .glm_moe_dsa import Model


def read_weights(files: list[Path]) -> dict:
    weights = {}
    for f in files:
        try:
            weights.update(mx.load(str(f)))
        except Exception as e:  # noqa: BLE001 - mx.load raises bare RuntimeError/ValueError on bad files
            raise CheckpointError(f"corrupt shard {f.name}: {str(e).splitlines()[0]}",
                                  "Delete the shard and re-download it.") from None
    return weights


def _quantize_for_checkpoint(model: Model, quantization: dict, weights: dict):
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


def _check_weights(model: Model, weights: dict):
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


def _cpu_needs_float32(model: Model) -> bool:
    """MLX's CPU backend runs unquantized gather_mm (the MoE experts) only in float32."""
    from mlx_lm.models.switch_layers import SwitchLinear

    if mx.default_device().type != mx.DeviceType.cpu:
        return False
    return any(isinstance(m, SwitchLinear) for _, m in model.named_modules())


def _target_dtype(config: dict, dtype):
    if dtype is not None:
        return dtype
    return getattr(mx, config_dtype(config))  # bfloat16, float16 or float32


def load_model(path, *, lazy: bool = False, dtype=None, mtp: bool = True, keep=None, prune=None) -> Model:
    """Load the model (no tokenizer) from a folder, a repo id or a Checkpoint. `dtype` defaults to the
    checkpoint's; `mtp=False` skips the MTP layer.

    `keep` (a predicate on tensor names) and `prune` (a function removing the modules this process
    does not hold) let a pipeline rank read only its own layers' shards (glm_mlx.distributed.pipeline).
    """
    ckpt = Checkpoint.open(path)
    if ckpt.model_type in ("glm5_next", "glm5_next_text") and keep is None:  # GLM-5.3-Flash: its own network
        from .glm5_next_loading import load_glm5_next

        return load_glm5_next(ckpt, lazy=lazy, dtype=dtype, mtp=mtp)
    config, args = ckpt.config, ckpt.args
    weights = read_weights(ckpt.shards(keep))  # lazy: only headers are read here
    names = ckpt.tensor_names() or set(weights)
    mtp_prefix = f"model.layers.{args.num_hidden_layers}."
    has_mtp = mtp and any(k.startswith(mtp_prefix) for k in names)
    model = Model(args, mtp=has_mtp)  # parameters are lazy: unused layers are never materialised
    if keep is not None:
        weights = {k: v for k, v in weights.items() if keep(k)}
        prune(model)
    weights = model.sanitize(weights)
    if args.quantization:
        _quantize_for_checkpoint(model, args.quantization, weights)
    _check_weights(model, weights)
    target = _target_dtype(config, dtype)
    if dtype is None and target != mx.float32 and _cpu_needs_float32(model):
        target = mx.float32
    cast = model.cast_predicate
    weights = {k: (v.astype(target) if cast(k) and mx.issubdtype(v.dtype, mx.floating) else v)
               for k, v in weights.items()}
    model.eval()
    model.load_weights(list(weights.items()), strict=False)  # checked above, with clearer errors
    if not lazy:
        mx.eval(model.parameters())
    return model


def load(path, *, lazy: bool = False, dtype=None, mtp: bool = True):
    """(model, tokenizer): mlx-lm's TokenizerWrapper with the config's eos ids."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    ckpt = Checkpoint.open(path)
    model = load_model(ckpt, lazy=lazy, dtype=dtype, mtp=mtp)
    if not ckpt.has_tokenizer:
        raise CheckpointError(f"{ckpt.path} has no tokenizer files", "Use load_model() for weights-only folders.")
    return model, load_tokenizer(ckpt.path, eos_token_ids=model.args.eos_token_ids or None)
