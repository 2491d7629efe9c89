"""Tiny GLM-5.3-Flash (glm5_next) HF checkpoints for the converter tests, written by the reference
implementation (transformers' save_pretrained: nested `model.language_model.*` names, per-expert tensors,
q/k/v_conv1d, hc_attn_fn...), with an MTP block (layer num_hidden_layers: NextN extras, a DSA attention
and a MoE block), in BF16 (what the reference keeps in float32 stays F32) or FP8 (float8_e4m3 +
128x128 `weight_scale_inv` on the layers' 2-D weights), split over shards with an index, the vision tower
alone in the last shard, and a tokenizer."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import torch
from convert_fixtures import fp8_block_quantize
from glm5_next_reference import _spread_weights, tiny_config
from reference import write_tokenizer
from safetensors.torch import load_file, save_file
from transformers import Glm5NextForConditionalGeneration

from glm_mlx.model.glm5_next import checkpoint_name

# Widths the common group sizes (32, 64) divide; the dense MLP spans two FP8 blocks.
DIMS = dict(hidden_size=128, intermediate_size=256, moe_intermediate_size=64, q_lora_rank=64, kv_lora_rank=64,
            linear_head_dim=32)
# A tame model: rounding errors do not grow chaotically through 4 random layers (every expert active, so no
# routing choice flips; weights a tenth of the parity fixtures'), so logit errors measure the formats.
TAME = dict(n_routed_experts=4, num_experts_per_tok=4)


def _mtp_block(state: dict, n: int, seed: int) -> dict:
    """An MTP block for layer n: layer n-1's DSA attention and MoE (perturbed), no hyper-connections,
    plus enorm, hnorm, eh_proj and shared_head.norm."""
    g = torch.Generator().manual_seed(seed)
    src, dst = f"model.language_model.layers.{n - 1}.", f"model.language_model.layers.{n}."
    out = {}
    for k, v in state.items():
        if k.startswith(src) and ".hc_" not in k:
            out[dst + k[len(src):]] = (v * (1 + 0.1 * torch.randn(v.shape, generator=g))).contiguous()
    d = state["model.language_model.norm.weight"].shape[0]
    for name in ("enorm", "hnorm", "shared_head.norm"):
        out[f"{dst}{name}.weight"] = 1 + 0.1 * torch.randn(d, generator=g)
    out[f"{dst}eh_proj.weight"] = torch.randn(d, 2 * d, generator=g) * (1 / (2 * d)) ** 0.5
    return out


def make_next_source(path: Path, *, fp8: bool = False, shards: int = 3, seed: int = 0, mtp: bool = True,
                     tame: bool = False, **overrides) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    text = {**DIMS, **(TAME if tame else {}), **overrides}
    n = text.get("num_hidden_layers", 4)
    torch.manual_seed(seed)
    model = Glm5NextForConditionalGeneration(tiny_config(**text)).eval()
    _spread_weights(model, seed)
    if tame:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.ndim >= 2 and "embed_tokens" not in name and "lm_head" not in name:
                    p.mul_(0.1)
    fp32 = re.compile("|".join(re.escape(k) for k in model._keep_in_fp32_modules_strict))
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        state = {}
        for f in sorted(Path(tmp).glob("*.safetensors")):
            state.update(load_file(str(f)))
        config = json.loads((Path(tmp) / "config.json").read_text())
    if mtp:
        state.update(_mtp_block(state, n, seed + 1))
    out = {}
    for k, v in sorted(state.items()):
        if fp32.search(checkpoint_name(k) or k):  # the reference's float32 modules, as it names them
            out[k] = v.float()
        elif fp8 and v.ndim == 2 and ".layers." in k and k.endswith(".weight") and ".mlp.gate." not in k and "visual" not in k:
            out[k], out[k + "_scale_inv"] = fp8_block_quantize(v)
        else:
            out[k] = v.to(torch.bfloat16)
    config["dtype"] = "bfloat16"
    if fp8:
        config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    text_keys = [k for k in out if "visual" not in k]
    vision = [k for k in out if "visual" in k]
    per = -(-len(text_keys) // shards)
    groups = [text_keys[i * per:(i + 1) * per] for i in range(shards)] + [vision]
    weight_map = {}
    for i, keys in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: out[k] for k in keys}, str(path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in keys})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    write_tokenizer(path)
    return path
