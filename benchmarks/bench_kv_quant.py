"""Quantized KV cache (--kv-bits): quality and speed against the unquantized cache, on glm-mini.

    python benchmarks/bench_kv_quant.py [--model glm_mlx/data/glm-mini] [--ctx 512] [--json out.json]

For the unquantized cache (the model dtype) and --kv-bits 8 and 4 it prints one table:
  * cache bytes per token (the planner's analytic figure, checked against a real cache's nbytes);
  * held-out perplexity through the cache (windows of --ctx tokens, prefilled into a fresh cache, so
    every query reads the quantized rows; DSA is active past index_topk) and the mean per-token
    KL(unquantized || quantized) and top-1 agreement on the same windows;
  * logits drift in decode past index_topk: teacher-forced token-by-token decoding of held-out text,
    per position the largest |logit difference| (mean and max over positions past index_topk) and
    the mean KL there;
  * greedy agreement: Engine greedy continuations of held-out prompts (longer than index_topk), the
    share of generated tokens equal to the unquantized run's and the mean tokens before the first
    difference;
  * decode tok/s (Engine, plain decoding, a --decode-prompt-token prompt, --decode-gen tokens; best
    of --repeat runs) and the ratio to the unquantized cache.
Then the sparse attention core at GLM-5.1's sizes (64 heads, kv_lora_rank 512, rope 64, 2048 rows
gathered per decoded token): the unquantized gather, dequantizing the gathered quantized rows (what
glm_mlx.model.attention does), and mx.quantized_matmul on them, in ms per layer and token.

The held-out split is scripts/reference_data.py's (the corpus in build/reference_corpus). On the CPU
backend the model (an MoE) runs in float32, so "unquantized" is a float32 cache there (bfloat16 on
Metal). Linux: OpenBLAS is preloaded as scripts/eval_reference.py does.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from machine import describe  # noqa: E402  (benchmarks/machine.py: the BLAS/backend line)

BITS = (None, 8, 4)


def name(bits) -> str:
    return f"{bits}-bit" if bits else "unquantized"


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def kl(ref: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Per-position KL(softmax(ref) || softmax(other)) over the last axis."""
    a, b = log_softmax(ref), log_softmax(other)
    return (np.exp(a) * (a - b)).sum(-1)


def windows(ids: np.ndarray, ctx: int, n: int) -> list[np.ndarray]:
    starts = np.linspace(0, len(ids) - ctx - 2, n).astype(int)
    return [ids[s : s + ctx + 1] for s in starts]


def prefill_logits(model, w: np.ndarray) -> tuple[np.ndarray, int]:
    """Logits [ctx, V] of a window prefilled into a fresh cache, and the cache's nbytes."""
    cache = model.make_cache()
    logits = model(mx.array(w[None, :-1]), cache=cache).astype(mx.float32)
    mx.eval(logits)
    return np.array(logits[0]), sum(c.nbytes for c in cache)


def heldout(model, wins: list[np.ndarray]) -> dict:
    """Perplexity, KL to the unquantized cache and top-1 agreement, per bits."""
    out, ref = {}, None
    for bits in BITS:
        model.set_kv_cache_bits(bits)
        nll = n = 0
        all_logits, nbytes = [], 0
        for w in wins:
            logits, nbytes = prefill_logits(model, w)
            lp = log_softmax(logits)
            nll -= lp[np.arange(len(w) - 1), w[1:]].sum()
            n += len(w) - 1
            all_logits.append(logits)
        logits = np.concatenate(all_logits)
        row = {"perplexity": math.exp(nll / n), "nbytes": nbytes, "tokens": len(wins[0]) - 1,
               "bytes_per_token": model.cache_bytes_per_token()}
        if ref is None:
            ref = logits
        else:
            row["kl"] = float(kl(ref, logits).mean())
            row["top1_agree"] = float((ref.argmax(-1) == logits.argmax(-1)).mean())
        out[name(bits)] = row
    model.set_kv_cache_bits(None)
    return out


def decode_drift(model, wins: list[np.ndarray], prefill: int) -> dict:
    """Teacher-forced decoding (prefill `prefill` tokens, then one token per step): logits past index_topk."""
    k = model.args.index_topk
    runs = {}
    for bits in BITS:
        model.set_kv_cache_bits(bits)
        per_win = []
        for w in wins:
            cache = model.make_cache()
            model(mx.array(w[None, :prefill]), cache=cache)
            steps = []
            for t in range(prefill, len(w) - 1):
                logits = model(mx.array(w[None, t : t + 1]), cache=cache)[0, 0].astype(mx.float32)
                mx.eval(logits)
                steps.append((t, np.array(logits)))
            per_win.append(steps)
        runs[name(bits)] = per_win
    model.set_kv_cache_bits(None)
    out = {}
    for key in runs:
        if key == "unquantized":
            continue
        diffs, kls = [], []
        for ref_steps, steps in zip(runs["unquantized"], runs[key]):
            for (t, r), (_, q) in zip(ref_steps, steps):
                if t >= k:  # this position's query attends to its top-k of t + 1 keys: sparse
                    diffs.append(np.abs(r - q).max())
                    kls.append(kl(r, q))
        out[key] = {"max_abs_logit_diff_mean": float(np.mean(diffs)), "max_abs_logit_diff_max": float(np.max(diffs)),
                    "kl_past_topk": float(np.mean(kls)), "positions": len(diffs)}
    return out


def greedy(model, prompts: list[list[int]], gen: int) -> dict:
    from glm_mlx.generation.engine import Engine

    runs = {}
    for bits in BITS:
        model.set_kv_cache_bits(bits)
        runs[name(bits)] = [list(Engine(model, mtp=False).generate(p, max_tokens=gen)) for p in prompts]
    model.set_kv_cache_bits(None)
    out = {}
    for key in runs:
        if key == "unquantized":
            continue
        same = total = 0
        first = []
        for ref, got in zip(runs["unquantized"], runs[key]):
            same += sum(a == b for a, b in zip(ref, got))
            total += len(ref)
            first.append(next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), len(ref)))
        out[key] = {"greedy_same": same / total, "tokens_before_first_difference": float(np.mean(first))}
    return out


def decode_speed(model, prompt: list[int], gen: int, repeat: int) -> dict:
    from glm_mlx.generation.engine import Engine, StepStats

    out = {}
    for _ in range(repeat):  # interleaved, so drifting machine load hits every variant alike
        for bits in BITS:
            model.set_kv_cache_bits(bits)
            stats = StepStats()
            for _ in Engine(model, mtp=False).generate(prompt, max_tokens=gen, stats=stats):
                pass
            tps = (stats.generated - 1) / stats.gen_time
            out[name(bits)] = max(out.get(name(bits), 0.0), tps)
    model.set_kv_cache_bits(None)
    return out


def sparse_core(repeat: int = 20, dtype=mx.float32) -> dict:
    """ms per decoded token and layer for GLM-5.1's sparse attention core (no projections)."""
    H, C, R, k, T, g = 64, 512, 64, 2048, 8192, 64
    mx.random.seed(0)
    lat = mx.random.normal((T, C)).astype(dtype)
    rope = mx.random.normal((T, R)).astype(dtype)
    rows = mx.concatenate([lat, rope], axis=-1)
    q = mx.random.normal((1, 1, H, C + R)).astype(dtype)
    idx = mx.random.randint(0, T, (1, 1, k))

    def softmax(s):
        return mx.softmax(s.astype(mx.float32), axis=-1).astype(dtype)

    def plain():
        sel = mx.take(rows, idx, axis=0)
        return (softmax(q @ sel.swapaxes(-1, -2)) @ sel)[..., :C]

    variants = {"unquantized": plain}
    for bits in (8, 4):
        parts = (*mx.quantize(lat, group_size=g, bits=bits), rope)
        mx.eval(parts)

        def dequantized(parts=parts, bits=bits):
            cq, cs, cb, r = (mx.take(a, idx, axis=0) for a in parts)
            lt = mx.dequantize(cq, cs, cb, group_size=g, bits=bits)
            p = softmax(q[..., :C] @ lt.swapaxes(-1, -2) + q[..., C:] @ r.swapaxes(-1, -2))
            return p @ lt

        def fused(parts=parts, bits=bits):
            cq, cs, cb, r = (mx.take(a, idx, axis=0) for a in parts)
            s = mx.quantized_matmul(q[..., :C], cq, cs, cb, transpose=True, group_size=g, bits=bits)
            p = softmax(s + q[..., C:] @ r.swapaxes(-1, -2))
            return mx.quantized_matmul(p, cq, cs, cb, transpose=False, group_size=g, bits=bits)

        variants[f"{bits}-bit dequantize"] = dequantized
        variants[f"{bits}-bit quantized_matmul"] = fused
    mx.eval(plain(), *(f() for f in variants.values()))
    best = {}
    for _ in range(3):  # rounds, interleaved; the best round counts
        for key, f in variants.items():
            t = time.perf_counter()
            for _ in range(repeat):
                mx.eval(f())
            best[key] = min(best.get(key, math.inf), (time.perf_counter() - t) / repeat * 1e3)
    return best


def table(res: dict) -> str:
    rows = ["| cache | bytes/token | held-out ppl | KL vs unquantized | top-1 agree | decode max abs logit diff "
            "past top-k (mean / max) | decode KL past top-k | greedy same | decode tok/s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    base = res["decode_tps"]["unquantized"]
    for key in ("unquantized", "8-bit", "4-bit"):
        h, d, g = res["heldout"][key], res["drift"].get(key), res["greedy"].get(key)
        tps = res["decode_tps"][key]
        rows.append(
            f"| {key} | {h['bytes_per_token']:,} | {h['perplexity']:.3f} | "
            f"{h.get('kl', 0):.5f} | {h.get('top1_agree', 1):.3f} | "
            + (f"{d['max_abs_logit_diff_mean']:.3f} / {d['max_abs_logit_diff_max']:.3f} | {d['kl_past_topk']:.5f} | "
               f"{g['greedy_same']:.3f} ({g['tokens_before_first_difference']:.0f} tok) | " if d else "- | - | - | ")
            + f"{tps:.1f} ({tps / base:.2f}x) |")
    core = res["sparse_core_ms"]
    rows += ["", "Sparse attention core at GLM-5.1 sizes (64 heads, 2048 gathered rows of 512 + 64), "
             f"{res['core_dtype']}, ms per layer and decoded token:", "",
             "| variant | ms |", "|---|---:|"] + [f"| {k} | {v:.2f} |" for k, v in core.items()]
    return "\n".join(rows)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=ROOT / "glm_mlx" / "data" / "glm-mini")
    p.add_argument("--cache", type=Path, default=ROOT / "build" / "reference_corpus")
    p.add_argument("--ctx", type=int, default=512, help="tokens per held-out window")
    p.add_argument("--windows", type=int, default=16, help="held-out windows for perplexity and KL")
    p.add_argument("--drift-windows", type=int, default=4)
    p.add_argument("--drift-ctx", type=int, default=256)
    p.add_argument("--prompts", type=int, default=8, help="greedy prompts")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen", type=int, default=64)
    p.add_argument("--decode-prompt", type=int, default=1024)
    p.add_argument("--decode-gen", type=int, default=128)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", type=Path)
    args = p.parse_args()

    import reference_ops as ops

    ops.ensure_fast_blas()
    print(describe(), flush=True)  # after the re-exec, so the BLAS is the one measured with
    import reference_data as rd
    from eval_reference import token_stream

    from glm_mlx.model.loading import load

    t0 = time.time()
    model, tokenizer = load(args.model)
    held = token_stream(tokenizer, rd.build_corpus(args.cache)["heldout"])
    res = {"model": str(args.model), "device": str(mx.default_device()),
           "dtype": str(model.model.norm.weight.dtype), "index_topk": model.args.index_topk,
           "kv_group_size": model.args.kv_cache_group_size, "ctx": args.ctx}
    res["heldout"] = heldout(model, windows(held, args.ctx, args.windows))
    for row in res["heldout"].values():
        assert row["nbytes"] == row["bytes_per_token"] * row["tokens"], row  # the planner's figure, exactly
    print(json.dumps(res["heldout"]), file=sys.stderr, flush=True)
    res["drift"] = decode_drift(model, windows(held, args.drift_ctx, args.drift_windows), prefill=16)
    print(json.dumps(res["drift"]), file=sys.stderr, flush=True)
    prompts = [[int(t) for t in w[: args.prompt_len]] for w in windows(held, args.prompt_len, args.prompts)]
    res["greedy"] = greedy(model, prompts, args.gen)
    print(json.dumps(res["greedy"]), file=sys.stderr, flush=True)
    speed_prompt = [int(t) for t in held[: args.decode_prompt]]
    res["decode_tps"] = decode_speed(model, speed_prompt, args.decode_gen, args.repeat)
    res["core_dtype"] = "float32" if mx.default_device().type == mx.DeviceType.cpu else "bfloat16"
    res["sparse_core_ms"] = sparse_core(dtype=mx.float32 if res["core_dtype"] == "float32" else mx.bfloat16)
    res["seconds"] = round(time.time() - t0, 1)
    print(f"{args.model.name} ({res['dtype']}, {res['device']}), index_topk {res['index_topk']}, group "
          f"{res['kv_group_size']}; held-out windows of {args.ctx} tokens; decode: {args.decode_prompt}-token prompt, "
          f"{args.decode_gen} tokens\n")
    print(table(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
