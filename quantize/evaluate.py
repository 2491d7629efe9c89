"""Quality of a quantized model against its unquantized source on a text: perplexity, mean KL
divergence of the next-token distributions KL(source || quantized), and top-1 agreement.

The text is tokenized once and cut into windows of `window` tokens, each run as its own sequence
(no cache), so both models see exactly the same inputs. Logits are compared in float32.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx

from glm_mlx.errors import GlmMlxError


class EvalError(GlmMlxError):
    hint = "Pass a UTF-8 text file with at least two tokens, and models that share a tokenizer and vocabulary."


@dataclass
class Quality:
    tokens: int  # predicted positions
    ppl: float  # the quantized model's perplexity
    ppl_reference: float
    kl: float  # mean KL(reference || quantized), nats per token
    top1: float  # fraction of positions whose argmax agrees

    def to_dict(self) -> dict:
        return asdict(self)


def windows(ids: list[int], window: int, max_tokens: int | None = None) -> list[list[int]]:
    ids = ids[:max_tokens] if max_tokens else ids
    return [ids[i:i + window] for i in range(0, len(ids), window) if len(ids[i:i + window]) > 1]


def compare(model, reference, chunks: list[list[int]]) -> Quality:
    """Both callables map tokens [1, L] -> logits [1, L, V]."""
    n, nll_q, nll_r, kl, agree = 0, 0.0, 0.0, 0.0, 0
    for c in chunks:
        x = mx.array([c])
        lr = reference(x)[0, :-1].astype(mx.float32)
        lq = model(x)[0, :-1].astype(mx.float32)
        if lr.shape != lq.shape:
            raise EvalError(f"the models' vocabularies differ ({lr.shape[-1]} vs {lq.shape[-1]} logits)")
        pr = lr - mx.logsumexp(lr, axis=-1, keepdims=True)
        pq = lq - mx.logsumexp(lq, axis=-1, keepdims=True)
        target = mx.array(c[1:])[:, None]
        stats = mx.stack([
            -mx.take_along_axis(pq, target, axis=-1).sum(),
            -mx.take_along_axis(pr, target, axis=-1).sum(),
            (mx.exp(pr) * (pr - pq)).sum(),
            (mx.argmax(pr, axis=-1) == mx.argmax(pq, axis=-1)).sum().astype(mx.float32),
        ])
        a, b, k, t = stats.tolist()
        n, nll_q, nll_r, kl, agree = n + len(c) - 1, nll_q + a, nll_r + b, kl + k, agree + t
    if n == 0:
        raise EvalError("the text has fewer than two tokens")
    return Quality(n, math.exp(nll_q / n), math.exp(nll_r / n), kl / n, agree / n)


def evaluate(model_path, reference_path, text_file, *, window: int = 256, max_tokens: int | None = 4096, dtype=None) -> Quality:
    """Load both checkpoints (glm_mlx.load), tokenize `text_file` with the quantized model's
    tokenizer, and compare. dtype defaults to float32 (the CPU backend's unquantized MoE needs it)."""
    from glm_mlx import load, load_model

    try:
        text = Path(text_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EvalError(f"cannot read text file {text_file}: {e}") from None
    dtype = dtype or mx.float32
    model, tok = load(model_path, dtype=dtype, mtp=False)
    from transformers.utils import logging

    logging.set_verbosity_error()  # "sequence longer than the model's context": the text is cut into windows
    reference = load_model(reference_path, dtype=dtype, mtp=False)
    return compare(model, reference, windows(tok.encode(text), window, max_tokens))
