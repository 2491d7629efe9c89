"""What a grammar costs per generated token on glm-mini: decode ms/token with and without one, and the
mask alone (llguidance's matcher advance + bitmask + the masked logits on the device).

    python benchmarks/bench_grammar.py [--tokens 128] [--model PATH]

Prints the backend it ran on (MLX device, machine, numpy's BLAS) and the figures
docs/structured_output.md quotes.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from glm_mlx.generation import constrain as engine_grammar
from glm_mlx.generation.engine import Engine
from glm_mlx.model.reference import DEFAULT_MODEL
from glm_mlx.serve import grammar as G
from machine import describe  # benchmarks/machine.py: the BLAS/backend line

SCHEMA = {"type": "object", "properties": {"story": {"type": "string"}}, "required": ["story"]}
TOOLS = [{"type": "function", "function": {"name": "write", "parameters": {
    "type": "object", "properties": {"path": {"type": "string"}, "body": {"type": "string"}},
    "required": ["path", "body"]}}}]


def decode(model, tokenizer, ids, n, grammar=None):
    eng = Engine(model, mtp=False, prefill_step=256)
    if grammar is not None:
        eng.sampler.processors.extend(engine_grammar.processors(tokenizer, model, len(ids), grammar))
    out, t0 = [], None
    for tok in eng.generate(ids, max_tokens=n):
        if t0 is None:
            t0 = time.perf_counter()  # from the first token: decode steps only
        out.append(tok)
        if len(out) >= n:
            break
    return (time.perf_counter() - t0) * 1000 / max(len(out) - 1, 1), len(out)


def mask_only(tokenizer, grammar, vocab, prefix: list[int], reps: int = 200) -> float:
    """ms per mask: advance by one token, compute the bitmask, mask [1, V] logits (evaluated)."""
    logits = mx.zeros((1, vocab))
    proc = engine_grammar.GrammarProcessor(engine_grammar.matcher(grammar, tokenizer), 0, [0])
    hist = []
    total = 0.0
    for i in range(reps):
        tok = prefix[i % len(prefix)] if i < len(prefix) else None
        if tok is None:  # keep going inside the string value with an allowed token
            allowed = np.nonzero(proc.allowed(vocab))[0]
            tok = int(allowed[len(allowed) // 2])
        hist.append(tok)
        t = time.perf_counter()
        mx.eval(proc(mx.array(hist), logits))
        total += time.perf_counter() - t
    return total * 1000 / reps


def main():
    print(describe(), flush=True)
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from glm_mlx import load_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    a = ap.parse_args()
    model = load_model(a.model)
    tok = load_tokenizer(Path(a.model), eos_token_ids=model.args.eos_token_ids or None)
    ids = tok.encode("Write a long story about a king.", add_special_tokens=False)
    decode(model, tok, ids, 8)  # warm-up
    plain, n0 = decode(model, tok, ids, a.tokens)
    js, n1 = decode(model, tok, ids, a.tokens, G.json_schema_grammar(SCHEMA))
    print(f"decode, no grammar:   {plain:.2f} ms/token ({n0} tokens)")
    print(f"decode, JSON schema:  {js:.2f} ms/token ({n1} tokens)  (+{js - plain:.2f})")
    vocab = model.args.vocab_size
    prefix = tok._tokenizer.encode('{"story": "', add_special_tokens=False)
    print(f"mask alone, JSON schema: {mask_only(tok, G.json_schema_grammar(SCHEMA), vocab, prefix):.3f} ms/token "
          f"(vocab {vocab})")
    call = G.tool_call_grammar(TOOLS, "write", parallel=False, forced="<tool_call>write")
    prefix = tok._tokenizer.encode("<arg_key>path</arg_key><arg_value>a.txt</arg_value><arg_key>body</arg_key>"
                                   "<arg_value>", add_special_tokens=False)
    print(f"mask alone, tool call:   {mask_only(tok, call, vocab, prefix):.3f} ms/token")


if __name__ == "__main__":
    main()
