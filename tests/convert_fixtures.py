"""Tiny GLM-5.1-shaped HF checkpoints for the converter tests: BF16 or FP8 (DeepSeek-V3 block scales),
split over several shards with an index, with an MTP layer and a tokenizer."""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

import torch
from reference import add_mtp_layer, make_reference, write_tokenizer
from safetensors.torch import load_file, save_file

# Dims that the common group sizes divide (hidden 128, experts 64 wide), unlike tests/reference.TINY.
DIMS = dict(hidden_size=128, intermediate_size=128, moe_intermediate_size=64, q_lora_rank=64, kv_lora_rank=64,
            qk_nope_head_dim=32, v_head_dim=32, qk_rope_head_dim=16, index_head_dim=32)
FP8_BLOCK = 128


def fp8_block_quantize(w: torch.Tensor):
    """float8_e4m3 weight + one float32 scale per 128x128 block (what FP8 checkpoints store)."""
    m, n = w.shape
    bm, bn = -(-m // FP8_BLOCK), -(-n // FP8_BLOCK)
    padded = torch.zeros(bm * FP8_BLOCK, bn * FP8_BLOCK)
    padded[:m, :n] = w.float()
    blocks = padded.view(bm, FP8_BLOCK, bn, FP8_BLOCK)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
    q = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn)
    return q.view(bm * FP8_BLOCK, bn * FP8_BLOCK)[:m, :n].contiguous(), scale


def make_source(path: Path, *, fp8: bool = False, shards: int = 3, seed: int = 0, **overrides) -> Path:
    """Write a tiny HF checkpoint (bf16 or fp8) at `path` in `shards` shards; return path."""
    path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ref = make_reference(tmp, seed=seed, **{**DIMS, **overrides})
        add_mtp_layer(tmp, ref, seed=seed + 1)
        state = {}
        for f in sorted(tmp.glob("*.safetensors")):
            state.update(load_file(str(f)))
        config = json.loads((tmp / "config.json").read_text())
    out = {}
    for k, v in sorted(state.items()):
        if k.endswith("e_score_correction_bias"):
            out[k] = v.float()
        elif fp8 and v.ndim == 2 and k.startswith("model.layers.") and ".mlp.gate." not in k:
            out[k], out[k + "_scale_inv"] = fp8_block_quantize(v)
        else:
            out[k] = v.to(torch.bfloat16)
    config["dtype"] = "bfloat16"
    if fp8:
        config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    # mlx-lm's glm_moe_dsa args need these keys (transformers' config omits them).
    config.update(topk_method="noaux_tc", scoring_func="sigmoid", moe_layer_freq=1)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    keys = list(out)
    per = -(-len(keys) // shards)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: out[k] for k in keys[i * per:(i + 1) * per]}
        save_file(part, str(path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    write_tokenizer(path)
    return path


def tree_bytes(folder: Path) -> dict[str, bytes]:
    """Every file of a folder (recursively) -> its bytes, for byte-identity checks."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _header(path: Path) -> tuple[int, dict]:
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return n, json.loads(f.read(n))


def swap_tensors(path: Path, a: str, b: str) -> None:
    """Swap two same-shape tensors of a safetensors file by swapping their offsets in the header: the
    weights change, the size does not, and neither does the mtime (put back, as `cp -p` would)."""
    st = path.stat()
    n, meta = _header(path)
    assert (meta[a]["dtype"], meta[a]["shape"]) == (meta[b]["dtype"], meta[b]["shape"])
    meta[a]["data_offsets"], meta[b]["data_offsets"] = meta[b]["data_offsets"], meta[a]["data_offsets"]
    text = json.dumps(meta, separators=(",", ":")).encode()
    assert len(text) <= n
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(text + b" " * (n - len(text)))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def negate_tensor(path: Path, name: str) -> None:
    """Flip the sign of a bf16 tensor in place: same header, same size, other weights; the mtime is set
    one second later (as any write does; explicit so that coarse file-system clocks still see it)."""
    st = path.stat()
    n, meta = _header(path)
    assert meta[name]["dtype"] == "BF16"
    a, b = meta[name]["data_offsets"]
    with open(path, "r+b") as f:
        f.seek(8 + n + a)
        data = bytearray(f.read(b - a))
        data[1::2] = bytes(x ^ 0x80 for x in data[1::2])  # little-endian: the sign bit is in each odd byte
        f.seek(8 + n + a)
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
