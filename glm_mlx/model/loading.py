"""Load a GLM-MoE-DSA checkpoint: HF folders (BF16/FP32/FP8, single-file or sharded) and
MLX-quantized folders (mlx-lm's `config["quantization"]` convention, per-module overrides).

Weights are opened with `mx.load`, which memory-maps safetensors lazily: nothing is read until
evaluated, so a checkpoint larger than RAM is never read whole at once.
"""

from __future__ import annotations

import mlx.core as mx

from ..errors import CheckpointError
from .checkpoint import Checkpoint
from .glm5_next_config import is_glm5_next
from .glm5_next_loading import load_glm5_next
from .glm_moe_dsa import Model
from .weights import check_weights, cpu_needs_float32, finish, quantize_for_checkpoint, read_weights, target_dtype


def load_model(path, *, lazy: bool = False, dtype=None, mtp: bool = True, keep=None, prune=None) -> Model:
    """Load the model (no tokenizer) from a folder, a repo id or a Checkpoint. `dtype` defaults to the
    checkpoint's; `mtp=False` skips the MTP layer.

    `keep` (a predicate on tensor names) and `prune` (a function removing the modules this process
    does not hold) let a pipeline rank read only its own layers' shards (glm_mlx.distributed.pipeline).
    """
    ckpt = Checkpoint.open(path)
    if is_glm5_next(ckpt.config) and keep is None:  # GLM-5.3-Flash: its own network
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
        quantize_for_checkpoint(model, args.quantization, weights)
    check_weights(model, weights)
    target = target_dtype(config, dtype)
    if dtype is None and target != mx.float32 and cpu_needs_float32(model):
        target = mx.float32
    return finish(model, weights, target, lazy=lazy)


def load(path, *, lazy: bool = False, dtype=None, mtp: bool = True):
    """(model, tokenizer): mlx-lm's TokenizerWrapper with the config's eos ids."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    ckpt = Checkpoint.open(path)
    model = load_model(ckpt, lazy=lazy, dtype=dtype, mtp=mtp)
    if not ckpt.has_tokenizer:
        raise CheckpointError(f"{ckpt.path} has no tokenizer files", "Use load_model() for weights-only folders.")
    return model, load_tokenizer(ckpt.path, eos_token_ids=model.args.eos_token_ids or None)
