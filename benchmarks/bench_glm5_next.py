"""GLM-5.3-Flash (glm5_next) text path: glm-mlx vs mlx-vlm's `glm5_next` on one tiny checkpoint.

    python benchmarks/bench_glm5_next.py --make-venv   # once: mlx-vlm in its own venv (see below)
    python benchmarks/bench_glm5_next.py               # ~8 min here: contexts 128 / 2048, growth 1K..32K
    python benchmarks/bench_glm5_next.py --quick       # ~1 min: growth 1K..8K, one round, fewer steps

The checkpoint is written by transformers' own Glm5NextForConditionalGeneration.save_pretrained
(tests/glm5_next_reference.py's weight spread, a one-block vision tower) with a tiny text config but
the real layer pattern: 8 layers, 3 KDA : 1 DSA (layers 3 and 7 DSA, both with their own indexer),
hc_mult 4, the real index_kpool 16 (so the pool count at a context is the real model's) and a small
index_topk 128 (8 pools), float32. Both implementations load that folder as it is: mlx-vlm 0.7.x's
`glm5_next` sanitize maps transformers' names itself (no remapping needed here).

mlx-vlm runs in a subprocess from its own venv (default ~/.cache/glm-mlx-bench/mlxvlm-venv,
`--make-venv` builds it: mlx[cpu] pinned to this environment's MLX version + mlx-vlm), so
installing it never touches this environment's pins (mlx-vlm pulls in datasets, opencv, mlx-audio,
...). The two sides alternate (glm-mlx, mlx-vlm, then mlx-vlm, glm-mlx: --rounds, default 2) and the
fastest figure of the rounds is kept (the 1x / 16x runs are also repeated 3 times within a round):
this machine's 2 cores are shared.

Measured, both sides driven by the same loop (chunks of 2048 prompt tokens, logits of the last
position only; decode pipelined like mlx-lm's generate_step, greedy, median step):
  * prefill and decode tok/s at 1x and 16x index_topk of context, from an empty cache;
  * the cost of one decode step at 1K, 2K, ... 32K of context (one cache prefilled in steps), and
    where it goes: one more, instrumented step per point evaluates each attention block's input
    first and its output after, so the KDA blocks, the DSA blocks and the DSA indexers are timed
    apart (per layer, median of the instrumented steps); "rest" is the hyper-connections, MLP/MoE,
    norms and head;
  * greedy agreement: the tokens each side generates after the 1x and 16x prompts and at every growth
    point, and those of transformers' reference (a full forward per token) after the 1x prompt (17
    tokens) and the 16x one (5).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402  (benchmarks/machine.py: the BLAS/backend line)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VENV = Path.home() / ".cache" / "glm-mlx-bench" / "mlxvlm-venv"
MLX_VLM = "mlx-vlm==0.7.10"
STEP = 2048  # prefill chunk: mlx-lm's / mlx-vlm's prefill_step_size and glm-mlx Engine's prefill_step

N_LAYERS = 8
TEXT = dict(
    vocab_size=512, hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=N_LAYERS,
    num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
    kv_lora_rank=64, q_lora_rank=96, qk_rope_head_dim=0, qk_nope_head_dim=32, v_head_dim=32,
    index_topk=128, index_head_dim=128, index_n_heads=32, index_kpool=16, linear_head_dim=32, linear_num_heads=4,
    mlp_layer_types=["dense"] * 3 + ["sparse"] * (N_LAYERS - 3), hc_mult=4, hc_sinkhorn_iters=20,
    swiglu_limit=10.0, pad_token_id=0, eos_token_id=[1, 2], max_position_embeddings=65536,
)
VISION = dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=32, out_hidden_size=128,
              projection_intermediate_size=32)


# --- checkpoint (main environment: torch + transformers) ---------------------------------------
def write_checkpoint(path: Path, topk: int) -> dict:
    """transformers' save_pretrained of a tiny Glm5NextForConditionalGeneration; reused when its
    text config matches."""
    text = {**TEXT, "index_topk": topk}
    stamp = path / "bench_text_config.json"
    if stamp.exists() and json.loads(stamp.read_text()) == text and (path / "config.json").exists():
        return text
    import torch
    from transformers import Glm5NextConfig, Glm5NextForConditionalGeneration

    sys.path.insert(0, str(ROOT / "tests"))
    from glm5_next_reference import _spread_weights

    torch.manual_seed(0)
    model = Glm5NextForConditionalGeneration(Glm5NextConfig(text_config=text, vision_config=VISION)).eval()
    _spread_weights(model, 0)
    model.save_pretrained(path)
    stamp.write_text(json.dumps(text))
    return text


def reference_greedy(path: Path, prompt: list[int], n: int) -> list[int]:
    import torch
    from transformers import Glm5NextForConditionalGeneration

    model = Glm5NextForConditionalGeneration.from_pretrained(path).eval()
    toks = list(prompt)
    with torch.no_grad():
        for _ in range(n):  # no cache: a full forward per token
            toks.append(int(model(input_ids=torch.tensor([toks])).logits[0, -1].argmax()))
    return toks[len(prompt):]


# --- the two implementations (worker side) ------------------------------------------------------
class Side:
    """What differs between glm-mlx and mlx-vlm: loading, caches, a forward, the attention classes."""

    def __init__(self, name: str, path: Path):
        self.name = name
        if name == "glm-mlx":
            from glm_mlx import load_model
            from glm_mlx.model.glm5_next_attention import PooledIndexer, PooledMLAttention
            from glm_mlx.model.kda import KimiDeltaAttention

            self.model = load_model(path)
            self.kinds = {KimiDeltaAttention: "kda", PooledMLAttention: "dsa", PooledIndexer: "indexer"}
        else:
            from mlx_vlm.models.glm5_next.language import Glm5NextAttention, Glm5NextIndexer, Glm5NextLinearAttention
            from mlx_vlm.utils import load_model

            self.model = load_model(path).language_model  # the text path
            self.kinds = {Glm5NextLinearAttention: "kda", Glm5NextAttention: "dsa", Glm5NextIndexer: "indexer"}

    def cache(self):
        return self.model.make_cache()

    def __call__(self, toks: mx.array, cache) -> mx.array:
        """[1, L] tokens -> the last position's logits [1, V]."""
        if self.name == "glm-mlx":
            return self.model(toks, cache=cache, last_only=True)[:, -1]
        return self.model(toks, cache=cache, num_logits_to_keep=1).logits[:, -1]


def arrays_of(tree) -> list:
    if isinstance(tree, mx.array):
        return [tree]
    if isinstance(tree, (list, tuple, dict)):
        return [v for _, v in tree_flatten(tree) if isinstance(v, mx.array)]
    return []


def cache_arrays(cache) -> list:
    out = []
    for c in cache:
        for sub in (getattr(c, "caches", None) or [c]):  # mlx-vlm's CacheList holds several
            out += arrays_of(sub.state)
    return out


def prefill(side: Side, cache, toks: np.ndarray) -> tuple[mx.array, float]:
    t = time.perf_counter()
    for s in range(0, toks.shape[1], STEP):
        logits = side(mx.array(toks[:, s : s + STEP]), cache)
        mx.eval(logits, cache_arrays(cache))
        mx.clear_cache()
    return logits, time.perf_counter() - t


def decode(side: Side, cache, logits: mx.array, n: int) -> tuple[list[int], float]:
    """n greedy steps after `logits`, pipelined (step i+1 is built before the host reads token i).
    Returns (the first token and the n generated after it, median seconds per step)."""
    y = mx.argmax(logits, axis=-1)

    def step(y):
        return mx.argmax(side(y[:, None], cache), axis=-1)

    toks, times = [], []
    nxt = step(y)
    mx.async_eval(nxt)
    toks.append(y.item())
    t = time.perf_counter()
    for i in range(n):
        y = nxt
        if i + 1 < n:
            nxt = step(y)
            mx.async_eval(nxt)
        toks.append(y.item())
        times.append(time.perf_counter() - t)
        t = time.perf_counter()
    return toks, float(np.median(times[1:] if n > 2 else times))  # the first step also compiles


@contextmanager
def instrumented(side: Side, acc: dict):
    """Time every attention block / indexer call: evaluate its array inputs, run it, evaluate its output."""
    saved = {cls: cls.__call__ for cls in side.kinds}

    def wrap(cls, kind):
        orig = saved[cls]

        def call(self, *a, **kw):
            mx.eval(arrays_of(list(a)) + arrays_of(list(kw.values())))
            t = time.perf_counter()
            out = orig(self, *a, **kw)
            mx.eval(arrays_of(out))
            acc.setdefault(kind, []).append(time.perf_counter() - t)
            return out

        return call

    for cls, kind in side.kinds.items():
        cls.__call__ = wrap(cls, kind)
    try:
        yield
    finally:
        for cls, f in saved.items():
            cls.__call__ = f


def breakdown(side: Side, cache, logits: mx.array, n: int) -> dict:
    """n instrumented decode steps: per-layer ms of each block kind (median over steps) and the step."""
    y = mx.argmax(logits, axis=-1)
    per_step, totals = {}, []
    for _ in range(n):
        acc = {}
        with instrumented(side, acc):
            t = time.perf_counter()
            y = mx.argmax(side(y[:, None], cache), axis=-1)
            mx.eval(y)
            totals.append(time.perf_counter() - t)
        for kind, ts in acc.items():
            per_step.setdefault(kind, []).append((sum(ts), len(ts)))
    out = {"instrumented_step_ms": 1e3 * float(np.median(totals))}
    for kind, rows in per_step.items():
        out[f"{kind}_ms"] = 1e3 * float(np.median([s for s, _ in rows])) / rows[0][1]  # per layer
        out[f"{kind}_layers"] = rows[0][1]
        out[f"{kind}_total_ms"] = 1e3 * float(np.median([s for s, _ in rows]))
    return out


def prompt_tokens(n: int, vocab: int, seed: int) -> np.ndarray:
    return np.random.RandomState(seed).randint(3, vocab, size=(1, n))  # no pad / eos ids


def worker(name: str, path: Path, plan: dict) -> dict:
    side = Side(name, path)
    vocab = plan["vocab"]
    res = {"name": name, "machine": describe(), "ctx": {}, "growth": {}}
    c = side.cache()  # warm-up: compiled functions, the allocator
    logits, _ = prefill(side, c, prompt_tokens(STEP + 64, vocab, 99))
    decode(side, c, logits, 3)
    for ctx in plan["contexts"]:
        best = None
        for _ in range(plan["reps"]):  # short runs: repeated, the fastest kept (bursts of load are seconds long)
            c = side.cache()
            logits, secs = prefill(side, c, prompt_tokens(ctx, vocab, ctx))
            toks, step = decode(side, c, logits, plan["decode"])
            best = {"tokens": toks, "prefill_tps": max(ctx / secs, best["prefill_tps"] if best else 0),
                    "decode_tps": max(1.0 / step, best["decode_tps"] if best else 0)}
        res["ctx"][ctx] = best
        secs, step = ctx / best["prefill_tps"], 1.0 / best["decode_tps"]
        acc = {}
        with instrumented(side, acc):  # one more prefill of the same prompt: where its time goes
            _, res["ctx"][ctx]["instrumented_prefill_s"] = prefill(side, side.cache(), prompt_tokens(ctx, vocab, ctx))
        res["ctx"][ctx].update({f"prefill_{k}_s": sum(v) for k, v in acc.items()})
        print(f"  {name} ctx {ctx}: prefill {ctx / secs:.0f} tok/s, decode {1 / step:.1f} tok/s", file=sys.stderr,
              flush=True)
    c, done = side.cache(), 0
    stream = prompt_tokens(plan["growth"][-1], vocab, 7)
    for ctx in plan["growth"]:
        logits, secs = prefill(side, c, stream[:, done:ctx])
        seg = ctx - done
        toks, step = decode(side, c, logits, plan["growth_decode"])
        # the decode steps added tokens: the next segment starts at the cache's own offset
        b = breakdown(side, c, logits, plan["breakdown"])
        done = ctx + plan["growth_decode"] + plan["breakdown"]
        res["growth"][ctx] = {"prefill_tps": seg / secs, "step_ms": 1e3 * step, "tokens": toks, **b}
        print(f"  {name} ctx {ctx}: step {1e3 * step:.2f} ms, {json.dumps({k: round(v, 3) for k, v in b.items()})}",
              file=sys.stderr, flush=True)
        mx.clear_cache()
    return res


# --- driver -------------------------------------------------------------------------------------
def make_venv(venv: Path):
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", f"mlx[cpu]=={mx.__version__}", MLX_VLM], check=True)
    print(f"mlx-vlm installed in {venv}")


def run_worker(python: str, name: str, path: Path, plan: dict) -> dict:
    out = Path(plan["out_dir"]) / f"{name}.json"
    cmd = [python, __file__, "--worker", name, "--ckpt", str(path), "--plan", json.dumps(plan), "--out", str(out)]
    subprocess.run(cmd, check=True, cwd=ROOT)
    return json.loads(out.read_text())


def merge(runs: list[dict]) -> dict:
    """The fastest figure of each point over the rounds (load on this shared machine only adds time)."""
    best = json.loads(json.dumps(runs[0]))
    for r in runs[1:]:
        for ctx, v in r["ctx"].items():
            b = best["ctx"][ctx]
            for k in ("prefill_tps", "decode_tps"):
                b[k] = max(b[k], v[k])
            for k in [k for k in v if k.endswith("_s")]:
                b[k] = min(b[k], v[k])
        for ctx, v in r["growth"].items():
            b = best["growth"][ctx]
            for k, x in v.items():
                if k.endswith("_ms"):
                    b[k] = min(b[k], x)
                elif k == "prefill_tps":
                    b[k] = max(b[k], x)
    return best


def report(res: dict, ref: dict, plan: dict, text: dict, secs: float, cmd: str) -> str:
    o, v = res["glm-mlx"], res["mlx-vlm"]
    topk = text["index_topk"]
    L = []
    L.append(f"$ {cmd}")
    L.append(o["machine"])
    if v["machine"] != o["machine"]:
        L.append(f"(mlx-vlm's process) {v['machine']}")
    L.append(f"mlx-vlm {plan['mlx_vlm']}; checkpoint: {N_LAYERS} layers (KDA x6, DSA x2), hidden {text['hidden_size']}, "
             f"indexer {text['index_n_heads']} x {text['index_head_dim']}, index_topk {topk}, index_kpool "
             f"{text['index_kpool']}, float32; {plan['rounds']} round(s) x {plan['reps']} runs at 1x / 16x, "
             f"{plan['decode']} decode steps per run; total {secs:.0f} s")
    L.append("")
    L.append("| context | prefill tok/s glm-mlx / mlx-vlm | ratio | decode tok/s glm-mlx / mlx-vlm | ratio |")
    L.append("|---|---|---|---|---|")
    for ctx in plan["contexts"]:
        a, b = o["ctx"][str(ctx)], v["ctx"][str(ctx)]
        L.append(f"| {ctx} ({ctx // topk}x) | {a['prefill_tps']:.0f} / {b['prefill_tps']:.0f} | "
                 f"{a['prefill_tps'] / b['prefill_tps']:.2f} | {a['decode_tps']:.1f} / {b['decode_tps']:.1f} | "
                 f"{a['decode_tps'] / b['decode_tps']:.2f} |")
    L.append("")
    L.append("Where one prefill of the prompt goes (an instrumented run: each block's input evaluated first, "
             "its output after; seconds, all layers of a kind):")
    L.append("")
    L.append("| context | prefill s glm-mlx / mlx-vlm | KDA blocks (x6) | DSA blocks (x2) | of which indexers | rest |")
    L.append("|---|---|---|---|---|---|")
    for ctx in plan["contexts"]:
        a, b = o["ctx"][str(ctx)], v["ctx"][str(ctx)]

        def prest(r):
            return r["instrumented_prefill_s"] - r.get("prefill_kda_s", 0) - r.get("prefill_dsa_s", 0)

        L.append(f"| {ctx} | {a['instrumented_prefill_s']:.3f} / {b['instrumented_prefill_s']:.3f} | "
                 f"{a['prefill_kda_s']:.3f} / {b['prefill_kda_s']:.3f} | {a['prefill_dsa_s']:.3f} / "
                 f"{b['prefill_dsa_s']:.3f} | {a['prefill_indexer_s']:.3f} / {b['prefill_indexer_s']:.3f} | "
                 f"{prest(a):.3f} / {prest(b):.3f} |")
    L.append("")
    L.append("One decode step as the context grows (ms; per-layer figures from the instrumented steps; "
             "'prefill' is the segment's prompt tok/s):")
    L.append("")
    L.append("| context | step glm-mlx / mlx-vlm | ratio | KDA block / layer | DSA block / layer | of which indexer "
             "| rest (HC, MLP/MoE, head) | prefill tok/s of the segment |")
    L.append("|---|---|---|---|---|---|---|---|")

    def rest(g):  # of the instrumented step (it pays one evaluation per block on top)
        return g["instrumented_step_ms"] - g.get("kda_total_ms", 0) - g.get("dsa_total_ms", 0)

    for ctx in plan["growth"]:
        a, b = o["growth"][str(ctx)], v["growth"][str(ctx)]
        L.append(f"| {ctx // 1024}K | {a['step_ms']:.2f} / {b['step_ms']:.2f} | {a['step_ms'] / b['step_ms']:.2f} | "
                 f"{a['kda_ms']:.3f} / {b['kda_ms']:.3f} | {a['dsa_ms']:.3f} / {b['dsa_ms']:.3f} | "
                 f"{a['indexer_ms']:.3f} / {b['indexer_ms']:.3f} | {rest(a):.2f} / {rest(b):.2f} | "
                 f"{a['prefill_tps']:.0f} / {b['prefill_tps']:.0f} |")
    g0, g1 = plan["growth"][0], plan["growth"][-1]
    L.append("")
    for name, r in (("glm-mlx", o), ("mlx-vlm", v)):
        a, b = r["growth"][str(g0)], r["growth"][str(g1)]
        L.append(f"{name}, {g0 // 1024}K -> {g1 // 1024}K: step x{b['step_ms'] / a['step_ms']:.2f}, KDA layer "
                 f"x{b['kda_ms'] / a['kda_ms']:.2f}, DSA layer x{b['dsa_ms'] / a['dsa_ms']:.2f} "
                 f"(+{b['dsa_ms'] - a['dsa_ms']:.3f} ms), indexer x{b['indexer_ms'] / a['indexer_ms']:.2f} "
                 f"(+{b['indexer_ms'] - a['indexer_ms']:.3f} ms)")
    L.append("")
    L.append("Greedy tokens (the first from the prefill, then the decode steps; growth points: the steps after "
             "each prefill segment, every earlier token of both caches included):")

    def first_diff(a, b):
        return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)

    points = [(f"prompt {c}", o["ctx"][str(c)]["tokens"], v["ctx"][str(c)]["tokens"], ref.get(str(c)))
              for c in plan["contexts"]]
    points += [(f"growth {c // 1024}K", o["growth"][str(c)]["tokens"], v["growth"][str(c)]["tokens"], None)
               for c in plan["growth"]]
    for label, a, b, r in points:
        d = first_diff(a, b)
        line = f"  {label}: glm-mlx / mlx-vlm " + ("identical" if d is None else f"DIFFER from token {d}")
        line += f" ({len(a)} tokens)"
        if r is not None:
            for name, t in (("glm-mlx", a), ("mlx-vlm", b)):
                e = first_diff(t, r)
                line += f"; {name} / transformers " + ("identical" if e is None else f"DIFFER from token {e}")
        L.append(line + f": {a}" + ("" if d is None else f" vs {b}") + ("" if r is None or r == a else f" (reference {r})"))
    return "\n".join(L)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="growth 1K..8K, fewer steps, one round")
    p.add_argument("--rounds", type=int, help="alternating rounds per side (default 2, quick 1)")
    p.add_argument("--topk", type=int, default=128, help="index_topk of the checkpoint (contexts: 1x and 16x)")
    p.add_argument("--max-context", type=int, help="last context of the growth table (default 32768, quick 8192)")
    p.add_argument("--ckpt", type=Path, default=Path("/tmp/glm5_next_bench"))
    p.add_argument("--venv", type=Path, default=Path(os.environ.get("GLM_MLX_VLM_VENV", DEFAULT_VENV)),
                   help="the venv holding mlx-vlm (GLM_MLX_VLM_VENV)")
    p.add_argument("--make-venv", action="store_true", help=f"create --venv with mlx[cpu] and {MLX_VLM}, then exit")
    p.add_argument("--no-reference", action="store_true", help="skip transformers' greedy tokens")
    p.add_argument("--json", type=Path, help="also write the raw numbers here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--plan", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        res = worker(args.worker, args.ckpt, json.loads(args.plan))
        args.out.write_text(json.dumps(res))
        return
    print(describe(), flush=True)
    if args.make_venv:
        make_venv(args.venv)
        return
    python = args.venv / "bin" / "python"
    if not python.exists():
        sys.exit(f"no mlx-vlm venv at {args.venv}: run `python benchmarks/bench_glm5_next.py --make-venv` "
                 f"(or point --venv / GLM_MLX_VLM_VENV at one with mlx-vlm 0.7.x)")
    vlm_version = subprocess.run([str(python), "-c", "import mlx_vlm, mlx.core as mx; "
                                  "print(mlx_vlm.__version__, 'mlx', mx.__version__)"],
                                 capture_output=True, text=True, check=True).stdout.strip()
    t0 = time.perf_counter()
    text = write_checkpoint(args.ckpt, args.topk)
    top = args.max_context or (8192 if args.quick else 32768)
    growth = [c for c in (1024, 2048, 4096, 8192, 16384, 32768, 65536) if c <= top]
    plan = {"vocab": text["vocab_size"], "contexts": [args.topk, 16 * args.topk], "growth": growth,
            "decode": 8 if args.quick else 16, "growth_decode": 4 if args.quick else 8,
            "breakdown": 3 if args.quick else 5, "rounds": args.rounds or (1 if args.quick else 2), "reps": 2 if args.quick else 3,
            "mlx_vlm": vlm_version, "out_dir": str(args.ckpt)}
    print(f"checkpoint {args.ckpt}; mlx-vlm {vlm_version} from {args.venv}", flush=True)
    runs = {"glm-mlx": [], "mlx-vlm": []}
    pythons = {"glm-mlx": sys.executable, "mlx-vlm": str(python)}
    for rnd in range(plan["rounds"]):
        for name in (["glm-mlx", "mlx-vlm"] if rnd % 2 == 0 else ["mlx-vlm", "glm-mlx"]):
            print(f"round {rnd + 1}: {name}", flush=True)
            runs[name].append(run_worker(pythons[name], name, args.ckpt, plan))
    res = {k: merge(v) for k, v in runs.items()}
    ref = {}
    if not args.no_reference:  # after the 16x prompt too (5 tokens: full forwards of 2K), unless --quick
        for i, ctx in enumerate(plan["contexts"][: 1 if args.quick else None]):
            print(f"transformers' greedy tokens after {ctx}", flush=True)
            ref[str(ctx)] = reference_greedy(args.ckpt, prompt_tokens(ctx, text["vocab_size"], ctx)[0].tolist(),
                                             plan["decode"] + 1 if i == 0 else 5)
    cmd = "python benchmarks/bench_glm5_next.py " + " ".join(sys.argv[1:])
    if os.environ.get("LD_PRELOAD"):
        cmd = f"LD_PRELOAD={os.environ['LD_PRELOAD']} " + cmd
    if os.environ.get("OPENBLAS_NUM_THREADS"):
        cmd = f"OPENBLAS_NUM_THREADS={os.environ['OPENBLAS_NUM_THREADS']} " + cmd
    print()
    print(report(res, ref, plan, text, time.perf_counter() - t0, cmd.strip()))
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "best": res, "reference": ref, "plan": plan}, indent=1))


if __name__ == "__main__":
    main()
