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
from glm_mlx.generation.engine import Engine, StepStats
from glm_mlx.generation.text import encode_prompt
from machine import describe  # noqa: E402  (benchmarks/machine.py: the BLAS/backend line)


def default_model() -> str:
    from glm_mlx.model.reference import DEFAULT_MODEL

    return str(DEFAULT_MODEL)


def default_prompts(path: Path) -> list[str]:
    held_out = path / "heldout_sample.txt"
    if held_out.exists():
        text = held_out.read_text()
        return [text[i : i + 400] for i in range(0, min(len(text), 400 * 8), 400)]
    return ["The history of the printing press", "def fibonacci(n):", "Once upon a time",
            "The capital of France is"]


def ours(model, mtp, num_draft):
    """A runner: prompt ids -> (tokens after the first, seconds, stats) for one generation."""
    def run(ids, max_tokens):
        stats = StepStats()
        toks = list(Engine(model, mtp=mtp, num_draft=num_draft).generate(ids, max_tokens=max_tokens, stats=stats))
        return toks, stats.gen_time, stats
    return run


def mlx_lm_runner(path):
    """mlx-lm's own generator on the same checkpoint, or the reason it cannot load it."""
    try:
        from mlx_lm import load as mlx_lm_load
        from mlx_lm.generate import generate_step

        model, _ = mlx_lm_load(str(path))
        if mx.default_device().type == mx.DeviceType.cpu:
            model.set_dtype(mx.float32)  # the CPU backend's gather_mm needs float32 (as glm_mlx.load does)
    except Exception as e:  # noqa: BLE001 - report why mlx-lm cannot run it, keep benchmarking ours
        return f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"

    def run(ids, max_tokens):
        gen = generate_step(mx.array(ids), model, max_tokens=max_tokens)
        toks = [next(gen)[0]]  # prefill + first token, not timed (as for ours)
        start = time.perf_counter()
        toks += [t for t, _ in gen]
        return toks, time.perf_counter() - start, None
    return run


def cost_breakdown(model, ids, num_draft: int, tokens_per_pass: float, reps: int = 200) -> str:
    """Synchronous device time of one plain step, one verification pass of 1+k tokens and one
    draft step (MTP layer + head), at the end of `ids`, and the speed-up they bound MTP to:
    tokens_per_pass * plain / (verify + k * draft), i.e. with zero host overhead."""
    pc = model.make_cache(mtp=True)
    mtp_cache = pc.pop()
    _, h = model(mx.array([ids]), cache=pc, return_hidden=True)
    model.mtp_logits(h[:, :-1], mx.array([ids[1:]]), mtp_cache)
    mx.eval([c.state for c in pc + [mtp_cache]], h)

    def timed(fn):
        times = []
        for _ in range(reps):
            out = fn()
            start = time.perf_counter()
            mx.eval(out)  # graph building excluded: pipelining hides it
            times.append(time.perf_counter() - start)
        return sorted(times)[reps // 2] * 1e3  # median, ms

    def main_pass(n):
        def run():
            logits = model(mx.array([ids[-n:]]), cache=pc)
            for c in pc:
                c.trim(n)
            return mx.argmax(logits[0], axis=-1)
        return run

    def draft():
        logits, _ = model.mtp_draft(h[:, -1:], mx.array([ids[-1:]]), mtp_cache)
        mtp_cache.trim(1)
        return mx.argmax(logits, axis=-1)

    plain, verify, one = timed(main_pass(1)), timed(main_pass(1 + num_draft)), timed(draft)
    bound = tokens_per_pass * plain / (verify + num_draft * one)
    return (f"k={num_draft}: plain step {plain:.2f} ms, verify {1 + num_draft} tokens {verify:.2f} ms, "
            f"draft step {one:.2f} ms -> MTP bound {tokens_per_pass:.2f} x {plain:.2f} / "
            f"({verify:.2f} + {num_draft} x {one:.2f}) = {bound:.2f}x")


def main():
    print(describe(), flush=True)
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
    runs = {"glm-mlx, no MTP": ours(model, False, 1)}
    runs.update({f"glm-mlx, MTP k={k}": ours(model, True, k) for k in a.num_draft})
    theirs = mlx_lm_runner(path)
    if callable(theirs):
        runs["mlx-lm (no MTP)"] = theirs
    for run in runs.values():  # warm-up (compilation, allocation)
        run(prompts_ids[0], 8)
    # Interleaved: every prompt runs through every variant back to back (in a rotating order), so
    # a change in machine load affects all variants alike.
    names = list(runs)
    tokens, seconds = dict.fromkeys(names, 0), dict.fromkeys(names, 0.0)
    drafted, accepted, passes = dict.fromkeys(names, 0), dict.fromkeys(names, 0), dict.fromkeys(names, 0)
    for i, ids in enumerate(prompts_ids):
        outputs = {}
        for name in names[i % len(names):] + names[: i % len(names)]:
            toks, secs, stats = runs[name](ids, a.max_tokens)
            outputs[name] = toks
            tokens[name] += len(toks) - 1  # the first token comes from the prefill pass
            seconds[name] += secs
            if stats is not None:
                drafted[name] += stats.drafted
                accepted[name] += stats.accepted
                passes[name] += stats.main_passes
        for name in names[1:]:
            if name.startswith("glm-mlx"):
                assert outputs[name] == outputs[names[0]], "greedy MTP must reproduce plain greedy decoding"
    print(f"checkpoint: {path}  prompts: {len(prompts_ids)}  max tokens: {a.max_tokens}  device: {mx.default_device()}")
    print(f"{'run':<22}{'decode tok/s':>14}{'vs plain':>10}{'acceptance':>12}{'tok/pass':>10}")
    base = tokens[names[0]] / seconds[names[0]]
    for name in names:
        tok_s = tokens[name] / seconds[name]
        acc = f"{accepted[name] / drafted[name]:.2f}" if drafted[name] else "-"
        per_pass = f"{tokens[name] / passes[name]:.2f}" if passes[name] else "-"
        print(f"{name:<22}{tok_s:>14.1f}{tok_s / base:>10.2f}{acc:>12}{per_pass:>10}")
    if not callable(theirs):
        print(f"{'mlx-lm':<22}  cannot load: {theirs}")
    if model.has_mtp:
        print("device time per step (median, synchronous; the ceiling MTP can reach at this acceptance):")
        ids = max(prompts_ids, key=len)
        for k in a.num_draft:
            name = f"glm-mlx, MTP k={k}"
            print("  " + cost_breakdown(model, ids, k, tokens[name] / passes[name]))


if __name__ == "__main__":
    main()
