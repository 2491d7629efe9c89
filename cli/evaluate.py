"""`glm-mlx eval`: how close a quantized checkpoint stays to its source on a text file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from glm_mlx.errors import GlmMlxError

from .options import ModelOpt, pick_model


def evaluate(
    # No -r: across glm-mlx, -r is --revision (download).
    reference: Annotated[str, typer.Option("--reference", help="The unquantized source checkpoint.")],
    text: Annotated[Path, typer.Option("--text", "-t", help="UTF-8 text file to score.")],
    model: Annotated[Optional[str], typer.Argument(help="The quantized checkpoint folder (with tokenizer).",
                                                   show_default=False)] = None,
    model_opt: ModelOpt = None,
    window: Annotated[int, typer.Option("--window", help="Tokens per sequence.")] = 256,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Most tokens of the text used.")] = 4096,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
):
    """Perplexity, mean KL divergence of next-token distributions vs the source, and top-1 agreement.

    Example: glm-mlx eval ./glm-mini-iq4 --reference ./glm-mini --text held_out.txt
    """
    from glm_mlx.quantize.evaluate import evaluate as run

    model = pick_model(model, model_opt)
    if model is None:
        raise GlmMlxError("no MODEL given", "Pass the quantized checkpoint, e.g. glm-mlx eval ./glm-mini-iq4 "
                          "--reference ./glm-mini --text held_out.txt (or --model ./glm-mini-iq4).")
    q = run(model, reference, text, window=window, max_tokens=max_tokens)
    if as_json:
        typer.echo(json.dumps(q.to_dict()))
        return
    typer.echo(f"tokens        {q.tokens:,}\nperplexity    {q.ppl:.4f} (reference {q.ppl_reference:.4f})\n"
               f"mean KL       {q.kl:.6f} nats/token\ntop-1 agree   {100 * q.top1:.2f}%")
