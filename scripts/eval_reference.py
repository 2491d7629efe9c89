"""Evaluate glm-mini (or any glm_moe_dsa checkpoint with its tokenizer) on the held-out split.

    python scripts/eval_reference.py [--model glm_mlx/data/glm-mini] [--json out.json]

Reports
  * held-out perplexity (inference forward pass, DSA active past index_topk) vs the unigram
    baseline (train-split token frequencies, add-one smoothed) on the same tokens;
  * MTP greedy acceptance: glm_mlx.generation.engine.Engine(mtp=True), drafts accepted / drafted
    (StepStats.acceptance_rate) while greedily continuing held-out prompts;
  * indexer recall: |indexer top-k ∩ dense attention's top-k keys| / k (dense probabilities
    summed over heads), for queries with more than k causal keys, vs chance k / (t + 1).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reference_data as rd
import reference_ops as ops

from glm_mlx.generation.engine import Engine, StepStats
from glm_mlx.model.loading import load
from glm_mlx.generation.sampling import SamplingParams

ROOT = Path(__file__).resolve().parents[1]


def token_stream(tokenizer, docs: list[str]) -> np.ndarray:
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    enc = tokenizer.backend_tokenizer.encode  # the fast tokenizer itself: no max-length warnings
    ids = []
    for d in docs:
        ids += enc(d, add_special_tokens=False).ids + [eot]
    return np.array(ids, np.int64)


def perplexity(model, ids: np.ndarray, ctx: int) -> float:
    """Non-overlapping windows of ctx+1 tokens; mean next-token NLL over all predicted tokens."""
    nll, n = 0.0, 0
    for s in range(0, len(ids) - 1, ctx):
        w = ids[s : s + ctx + 1]
        if len(w) < 2:
            break
        logits = model(mx.array(w[None, :-1])).astype(mx.float32)
        lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        tgt = mx.array(w[None, 1:])
        nll -= float(mx.take_along_axis(lp, tgt[..., None], axis=-1).sum())
        n += len(w) - 1
    return math.exp(nll / n)


def unigram_perplexity(train_ids: np.ndarray, ids: np.ndarray, vocab: int) -> float:
    counts = np.bincount(train_ids, minlength=vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return math.exp(-logp[ids[1:]].mean())


def mtp_acceptance(model, ids: np.ndarray, n_prompts: int, prompt_len: int, gen: int, num_draft: int) -> dict:
    engine = Engine(model, SamplingParams(temp=0.0), mtp=True, num_draft=num_draft)
    drafted = accepted = generated = passes = 0
    starts = np.linspace(0, len(ids) - prompt_len - 1, n_prompts).astype(int)
    for s in starts:
        stats = StepStats()
        for _ in engine.generate([int(t) for t in ids[s : s + prompt_len]], max_tokens=gen, stats=stats):
            pass
        drafted, accepted = drafted + stats.drafted, accepted + stats.accepted
        generated, passes = generated + stats.generated, passes + stats.main_passes
    return {"acceptance": accepted / max(drafted, 1), "drafted": drafted,
            "tokens_per_pass": generated / max(passes, 1), "num_draft": num_draft}


def mtp_teacher_forced(model, ids: np.ndarray, ctx: int, n_windows: int) -> float:
    """Top-1 accuracy of the MTP head on the real token after next (main hidden states as input)."""
    hits = total = 0
    for s in np.linspace(0, len(ids) - ctx - 1, n_windows).astype(int):
        w = mx.array(ids[None, s : s + ctx])
        _, h = model(w, return_hidden=True)
        logits, _ = model.mtp_logits(h[:, :-1], w[:, 1:])
        pred = mx.argmax(logits[:, :-1], axis=-1)
        hits += int((pred == w[:, 2:]).sum())
        total += ctx - 2
    return hits / total


def indexer_recall(model, ids: np.ndarray, ctx: int, n_windows: int) -> dict:
    """Per layer: recall of the dense attention's top-k keys by the indexer's top-k, vs chance."""
    k = model.args.index_topk
    per_layer = {}
    chance = np.mean([k / (t + 1) for t in range(k, ctx)])
    for s in np.linspace(0, len(ids) - ctx - 1, n_windows).astype(int):
        h = model.model.embed_tokens(mx.array(ids[None, s : s + ctx]))
        for li, dec in enumerate(model.layers):
            x = dec.input_layernorm(h)
            _, _, ex = ops.attention(dec.self_attn, x, sparse=False, return_probs=True)
            if ex.get("index") is not None:
                dense = np.array(ex["probs"].sum(axis=1))[0]  # [L, L]
                index = np.array(ex["index"])[0]
                rec, mass = [], []
                for t in range(k, ctx):
                    top_d = np.argpartition(-dense[t, : t + 1], k - 1)[:k]
                    top_i = np.argpartition(-index[t, : t + 1], k - 1)[:k]
                    rec.append(len(np.intersect1d(top_d, top_i)) / k)
                    mass.append(dense[t, top_i].sum() / dense[t, : t + 1].sum())
                acc = per_layer.setdefault(li, {"recall": [], "mass": []})
                acc["recall"].append(np.mean(rec))
                acc["mass"].append(np.mean(mass))
            h, _ = dec(h)  # the real (sparse) layer output feeds the next layer
    layers = {li: {"recall": float(np.mean(v["recall"])), "attention_mass": float(np.mean(v["mass"]))}
              for li, v in per_layer.items()}
    return {"layers": layers, "mean_recall": float(np.mean([v["recall"] for v in layers.values()])),
            "chance": float(chance), "topk": k, "context": ctx}


def index_cache_8bit(model, ids: np.ndarray, ctx: int, n_windows: int) -> dict:
    """The opt-in 8-bit indexer key cache against exact keys: held-out perplexity, and per layer
    the share of the exact top-k that the 8-bit scores select (queries past index_topk)."""
    k = model.args.index_topk
    agree = {}
    for s in np.linspace(0, len(ids) - ctx - 1, n_windows).astype(int):
        h = model.model.embed_tokens(mx.array(ids[None, s : s + ctx]))
        for li, dec in enumerate(model.layers):
            attn = dec.self_attn
            if attn.indexer is not None:
                x = dec.input_layernorm(h)
                qr = attn.q_a_layernorm(attn.q_a_proj(x))
                picks = []
                for bits in (None, 8):
                    attn.indexer.key_bits = bits
                    picks.append(np.array(attn.indexer(x, qr, 0, None))[0])
                attn.indexer.key_bits = None
                exact, q8 = picks
                agree.setdefault(li, []).append(np.mean([len(np.intersect1d(exact[t], q8[t])) / k for t in range(k, ctx)]))
            h, _ = dec(h)
    exact_ppl = perplexity(model, ids, ctx)
    model.set_index_cache_bits(8)
    try:
        q8_ppl = perplexity(model, ids, ctx)
    finally:
        model.set_index_cache_bits(None)
    return {"perplexity_exact": exact_ppl, "perplexity_8bit": q8_ppl,
            "topk_agreement": {li: float(np.mean(v)) for li, v in agree.items()}, "context": ctx}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=ROOT / "glm_mlx" / "data" / "glm-mini")
    p.add_argument("--cache", type=Path, default=ROOT / "build" / "reference_corpus")
    p.add_argument("--text", type=Path, help="evaluate on this text file instead of the held-out split")
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--prompts", type=int, default=24)
    p.add_argument("--gen", type=int, default=64)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    ops.ensure_fast_blas()
    t0 = time.time()
    model, tokenizer = load(args.model, dtype=mx.float32)
    if args.text:
        held = token_stream(tokenizer, [args.text.read_text()])
        train = None
    else:
        corpus = rd.build_corpus(args.cache)
        held = token_stream(tokenizer, corpus["heldout"])
        train = token_stream(tokenizer, corpus["train"])
    out = {"model": str(args.model), "heldout_tokens": len(held)}
    out["perplexity"] = perplexity(model, held, args.ctx)
    if train is not None:
        out["unigram_perplexity"] = unigram_perplexity(train, held, model.args.vocab_size)
    print(json.dumps(out), flush=True)
    out["mtp_teacher_forced_top1"] = mtp_teacher_forced(model, held, args.ctx, 16)
    out["mtp"] = mtp_acceptance(model, held, args.prompts, 64, args.gen, num_draft=1)
    out["mtp_draft2"] = mtp_acceptance(model, held, args.prompts // 2, 64, args.gen, num_draft=2)
    print(json.dumps({k: out[k] for k in ("mtp_teacher_forced_top1", "mtp", "mtp_draft2")}), flush=True)
    out["indexer"] = indexer_recall(model, held, args.ctx, 8)
    out["index_cache_8bit"] = index_cache_8bit(model, held, args.ctx, 8)
    out["eval_seconds"] = round(time.time() - t0, 1)
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
