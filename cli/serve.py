"""`glm-mlx serve`: an OpenAI-compatible API (/v1/chat/completions, /v1/models) on localhost."""

from __future__ import annotations

import typer
from rich.console import Console
from typing_extensions import Annotated

from .options import ModelArg, NoMtp, NumDraft, load_for_generation


def serve(
    model: ModelArg = None,
    host: Annotated[str, typer.Option("--host", help="Address to bind; keep 127.0.0.1 unless you mean to share it.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port.")] = 8080,
    no_mtp: NoMtp = False, num_draft: NumDraft = 1,
):
    """Serve the model over an OpenAI-compatible HTTP API.

    Example: glm-mlx serve ./GLM-5.1-mlx --port 8080, then point an OpenAI client at http://127.0.0.1:8080/v1
    """
    from glm_mlx.server import Server

    m, tokenizer, path = load_for_generation(model, mtp=not no_mtp)
    httpd = Server(m, tokenizer, model_id=path.name, mtp=not no_mtp, num_draft=num_draft).serve(host, port)
    Console(stderr=True).print(f"Serving {path.name} on http://{host}:{httpd.server_address[1]}/v1 (Ctrl-C to stop)")
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
