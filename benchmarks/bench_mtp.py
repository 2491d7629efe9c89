"""Decode speed with and without MTP speculative decoding, and mlx-lm on the same checkpoint.

    python benchmarks/bench_mtp.py [MODEL] [--prompts FILE] [--max-tokens 128] [--num-draft 1 2]

MODEL defaults to the built-in reference model. Prompts are held-out text (one per line) or chat
messages; greedy decoding, so the MTP and plain runs produce the same tokens. Prints tok/s, the
MTP acceptance rate, tokens per main-model pass, and ratios against plain decoding and mlx-lm.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import mlx.core as mx

from glm_mlx import load
from glm_mlx.engine import Engine, StepStats
from glm_mlx.generate import encode_prompt


def default_model() -> str:
    from glm_mlx.reference_model import DEFAULT_MODEL

    return str(DEFAULT_MODEL)


def default_prompts(path: Path) -> list[str]:
    held_out = path / "heldout_sample.txt"
    if held_out.exists():
        text = held_out.read_text()
        return [text[i : i + 400] for i in range(0, min(len(text), 400 * 8), 400)]
    return ["The history of the printing press", "def fibonacci(n):", "Once upon a time",
            "The capital of France is"]


def run_ours(model, prompts_ids, max_tokens, mtp, num_draft):
    total_tokens, total_time, drafted, accepted, passes = 0, 0.0, 0, 0, 0
    outputs = []
    for ids in prompts_ids:
        stats = StepStats()
        toks = list(Engine(model, mtp=mtp, num_draft=num_draft).generate(ids, max_tokens=max_tokens, stats=stats))
        outputs.append(toks)
        total_tokens += stats.generated - 1  # the first token comes from prefill
        total_time += stats.gen_time
        drafted, accepted, passes = drafted + stats.drafted, accepted + stats.accepted, passes + stats.main_passes
    return {"tok_s": total_tokens / total_time, "acceptance": accepted / drafted if drafted else 0.0,
            "tok_per_pass": total_tokens / passes if passes else 0.0, "outputs": outputs}


def run_mlx_lm(path, prompts_ids, max_tokens):
    try:
        from mlx_lm import load as mlx_lm_load
        from mlx_lm.generate import generate_step

        model, _ = mlx_lm_load(str(path))
        if mx.default_device().type == mx.DeviceType.cpu:
            model.set_dtype(mx.float32)  # the CPU backend's gather_mm needs float32 (as glm_mlx.load does)
    except Exception as e:  # noqa: BLE001 - report why mlx-lm cannot run it, keep benchmarking ours
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"}
    for ids in prompts_ids[:1]:  # warm-up, as for ours
        for _ in zip(range(8), generate_step(mx.array(ids), model, max_tokens=8)):
            pass
    total_tokens, total_time = 0, 0.0
    for ids in prompts_ids:
        gen = generate_step(mx.array(ids), model, max_tokens=max_tokens)
        next(gen)  # prefill + first token
        start, n = time.perf_counter(), 0
        for _ in gen:
            n += 1
        total_time += time.perf_counter() - start
        total_tokens += n
    return {"tok_s": total_tokens / total_time}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?")
    ap.add_argument("--prompts", type=Path)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--num-draft", type=int, nargs="+", default=[1, 2])
    a = ap.parse_args()
    path = Path(a.model or default_model())
    model, tokenizer = load(path)
    prompts = a.prompts.read_text().splitlines() if a.prompts else default_prompts(path)
    prompts_ids = [encode_prompt(tokenizer, p) for p in prompts if p.strip()]
    for ids in prompts_ids[:1]:  # warm-up (compilation, allocation)
        list(Engine(model, mtp=False).generate(ids, max_tokens=8))
    plain = run_ours(model, prompts_ids, a.max_tokens, False, 1)
    print(f"checkpoint: {path}  prompts: {len(prompts_ids)}  max tokens: {a.max_tokens}  device: {mx.default_device()}")
    print(f"{'run':<22}{'decode tok/s':>14}{'vs plain':>10}{'acceptance':>12}{'tok/pass':>10}")
    print(f"{'glm-mlx, no MTP':<22}{plain['tok_s']:>14.1f}{1.0:>10.2f}{'-':>12}{1.0:>10.2f}")
    for k in a.num_draft:
        r = run_ours(model, prompts_ids, a.max_tokens, True, k)
        assert r["outputs"] == plain["outputs"], "greedy MTP must reproduce plain greedy decoding"
        print(f"{f'glm-mlx, MTP k={k}':<22}{r['tok_s']:>14.1f}{r['tok_s'] / plain['tok_s']:>10.2f}"
              f"{r['acceptance']:>12.2f}{r['tok_per_pass']:>10.2f}")
    theirs = run_mlx_lm(path, prompts_ids, a.max_tokens)
    if "error" in theirs:
        print(f"{'mlx-lm':<22}  cannot load: {theirs['error']}")
    else:
        print(f"{'mlx-lm (no MTP)':<22}{theirs['tok_s']:>14.1f}{theirs['tok_s'] / plain['tok_s']:>10.2f}")


if __name__ == "__main__":
    main()
