"""Peak resident memory of the streaming converter on two synthetic GLM-shaped checkpoints of
different sizes (same layer shapes, more layers): if memory is bounded by the largest tensor block,
not the model, the two peaks are about equal.

    python benchmarks/convert_rss.py --sizes 2 8 --work /tmp/rss     # the figures in docs/quantization.md
    python benchmarks/convert_rss.py --tiny --sizes 0.01 0.04 --work /tmp/x  # a quick check (the test)

Each conversion runs in its own process; its peak is that process's ru_maxrss. Synthetic weights are
random bfloat16 values written in the HF layout (per-expert tensors, joined kv_b_proj, an MTP layer).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from machine import describe  # benchmarks/machine.py: the BLAS/backend line

# GLM-5.1's structure (MLA + DSA indexer, dense then MoE layers, shared expert, MTP layer) at small widths.
BASE = dict(model_type="glm_moe_dsa", architectures=["GlmMoeDsaForCausalLM"], dtype="bfloat16", vocab_size=32768,
            hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512, first_k_dense_replace=1,
            moe_layer_freq=1, num_nextn_predict_layers=1, num_attention_heads=8, num_key_value_heads=8,
            q_lora_rank=512, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, qk_head_dim=96,
            v_head_dim=64, index_topk=256, index_head_dim=64, index_n_heads=8, n_routed_experts=32,
            num_experts_per_tok=4, n_shared_experts=1, n_group=1, topk_group=1, routed_scaling_factor=2.5,
            norm_topk_prob=True, scoring_func="sigmoid", topk_method="noaux_tc", hidden_act="silu",
            rms_norm_eps=1e-5, max_position_embeddings=4096, rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
            attention_bias=False, tie_word_embeddings=False)
# The same structure, narrower: checkpoints of a few MB per layer for the quick check.
TINY = {**BASE, "vocab_size": 2048, "hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 128,
        "q_lora_rank": 128, "kv_lora_rank": 64, "n_routed_experts": 8, "num_experts_per_tok": 2}


def hf_tensors(cfg: dict):
    """(name, shape, dtype) of the HF checkpoint, in layer order."""
    h, H = cfg["hidden_size"], cfg["num_attention_heads"]
    yield "model.embed_tokens.weight", (cfg["vocab_size"], h), "BF16"
    for l in range(cfg["num_hidden_layers"] + 1):  # + the MTP layer
        p = f"model.layers.{l}"
        if l == cfg["num_hidden_layers"]:
            yield from ((f"{p}.{n}.weight", (h,), "BF16") for n in ("enorm", "hnorm", "shared_head.norm"))
            yield f"{p}.eh_proj.weight", (h, 2 * h), "BF16"
        for n in ("input_layernorm", "post_attention_layernorm"):
            yield f"{p}.{n}.weight", (h,), "BF16"
        a, q, kv = f"{p}.self_attn", cfg["q_lora_rank"], cfg["kv_lora_rank"]
        yield f"{a}.q_a_proj.weight", (q, h), "BF16"
        yield f"{a}.q_a_layernorm.weight", (q,), "BF16"
        yield f"{a}.q_b_proj.weight", (H * cfg["qk_head_dim"], q), "BF16"
        yield f"{a}.kv_a_proj_with_mqa.weight", (kv + cfg["qk_rope_head_dim"], h), "BF16"
        yield f"{a}.kv_a_layernorm.weight", (kv,), "BF16"
        yield f"{a}.kv_b_proj.weight", (H * (cfg["qk_nope_head_dim"] + cfg["v_head_dim"]), kv), "BF16"
        yield f"{a}.o_proj.weight", (h, H * cfg["v_head_dim"]), "BF16"
        d = cfg["index_head_dim"]
        yield f"{a}.indexer.wq_b.weight", (cfg["index_n_heads"] * d, q), "BF16"
        yield f"{a}.indexer.wk.weight", (d, h), "BF16"
        yield f"{a}.indexer.k_norm.weight", (d,), "BF16"
        yield f"{a}.indexer.k_norm.bias", (d,), "BF16"
        yield f"{a}.indexer.weights_proj.weight", (cfg["index_n_heads"], h), "BF16"
        m = f"{p}.mlp"
        if l < cfg["first_k_dense_replace"]:
            i = cfg["intermediate_size"]
            yield from ((f"{m}.{n}.weight", s, "BF16") for n, s in (("gate_proj", (i, h)), ("up_proj", (i, h)), ("down_proj", (h, i))))
            continue
        E, i = cfg["n_routed_experts"], cfg["moe_intermediate_size"]
        yield f"{m}.gate.weight", (E, h), "BF16"
        yield f"{m}.gate.e_score_correction_bias", (E,), "F32"
        for e in range(E):
            yield from ((f"{m}.experts.{e}.{n}.weight", s, "BF16") for n, s in (("gate_proj", (i, h)), ("up_proj", (i, h)), ("down_proj", (h, i))))
        yield from ((f"{m}.shared_experts.{n}.weight", s, "BF16") for n, s in (("gate_proj", (i, h)), ("up_proj", (i, h)), ("down_proj", (h, i))))
    yield "model.norm.weight", (h,), "BF16"
    yield "lm_head.weight", (cfg["vocab_size"], h), "BF16"


def layers_for(gb: float, base: dict) -> int:
    """Decoder layers that bring the checkpoint to about `gb` GB (at least 2: one dense, one MoE)."""
    cfg = {**base, "num_hidden_layers": 2}
    two = sum(int(np.prod(s)) * (4 if d == "F32" else 2) for _, s, d in hf_tensors(cfg))
    cfg["num_hidden_layers"] = 3
    per_layer = sum(int(np.prod(s)) * (4 if d == "F32" else 2) for _, s, d in hf_tensors(cfg)) - two
    return max(2, 2 + round((gb * 1e9 - two) / per_layer))


def write_checkpoint(path: Path, gb: float, shard_bytes: int = 10**9, seed: int = 0, base: dict = BASE) -> int:
    """Random bf16 weights (|w| in [2^-7, 2), random signs) in shards of ~shard_bytes; returns bytes."""
    from glm_mlx.quantize.source import layout

    path.mkdir(parents=True, exist_ok=True)
    cfg = {**base, "num_hidden_layers": layers_for(gb, base)}
    (path / "config.json").write_text(json.dumps(cfg, indent=1))
    rng = np.random.default_rng(seed)
    groups, cur, size = [], [], 0
    for t in hf_tensors(cfg):
        nbytes = int(np.prod(t[1])) * (4 if t[2] == "F32" else 2)
        if cur and size + nbytes > shard_bytes:
            groups.append(cur)
            cur, size = [], 0
        cur.append((t[0], t[2], t[1], nbytes))
        size += nbytes
    groups.append(cur)
    weight_map, total = {}, 0
    for k, g in enumerate(groups):
        name = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        header, _ = layout(g)
        with open(path / name, "wb") as f:
            f.write(header)
            for n, dtype, shape, nbytes in g:
                count = int(np.prod(shape))
                if dtype == "F32":
                    f.write((rng.standard_normal(count, dtype=np.float32) * 0.01).tobytes())
                else:  # bf16 bit patterns: exponent 120..127, random mantissa and sign
                    bits = rng.integers(0x3C00, 0x4000, size=count, dtype=np.uint16) | (rng.integers(0, 2, count, dtype=np.uint16) << 15)
                    f.write(bits.tobytes())
                weight_map[n] = name
                total += nbytes
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


def convert_and_measure(src: str, dst: str) -> None:
    """Child process: one conversion (default recipe), then its peak RSS as JSON on stdout."""
    import resource

    from glm_mlx.quantize.converter import convert
    from glm_mlx.quantize.recipe import default_recipe

    t = time.time()
    r = convert(src, dst, default_recipe(), force=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    print(json.dumps({"peak_rss": peak, "seconds": time.time() - t, "tensor_bytes": r.tensor_bytes, "shards": len(r.plan.shards)}))


def measure(sizes: list[float], work: Path, keep: bool = False, base: dict = BASE) -> list[dict]:
    import shutil

    out = []
    for gb in sizes:
        src, dst = work / f"src-{gb}GB", work / f"out-{gb}GB"
        if not (src / "config.json").exists():
            shutil.rmtree(src, ignore_errors=True)
            write_checkpoint(src, gb, shard_bytes=max(10**6, int(gb * 1e9 / 8)), base=base)
        source_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
        run = subprocess.run([sys.executable, __file__, "--child", str(src), str(dst)], capture_output=True, text=True, check=True)
        res = {"source_gb": source_bytes / 1e9, **json.loads(run.stdout.strip().splitlines()[-1])}
        out.append(res)
        if not keep:
            shutil.rmtree(dst, ignore_errors=True)
    return out


if __name__ == "__main__":
    if "--child" not in sys.argv:  # a child prints one JSON line for its parent
        print(describe(), flush=True)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=float, nargs="+", default=[2, 8], help="Checkpoint sizes in GB.")
    ap.add_argument("--work", type=Path, default=Path("/tmp/glm-mlx-rss"))
    ap.add_argument("--tiny", action="store_true", help="Narrow layers (quick check).")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        convert_and_measure(*a.child)
        sys.exit(0)
    results = measure(a.sizes, a.work, base=TINY if a.tiny else BASE)
    for r in results:
        print(f"source {r['source_gb']:.3f} GB -> {r['tensor_bytes'] / 1e9:.3f} GB in {r['shards']} shards, "
              f"{r['seconds']:.0f} s, peak RSS {r['peak_rss'] / 2**20:.0f} MiB")
    lo, hi = min(r["peak_rss"] for r in results), max(r["peak_rss"] for r in results)
    print(f"peak RSS ratio {hi / lo:.3f}")
