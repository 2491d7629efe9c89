"""The glm-mlx Typer app. Each command lives in its own module and registers itself here."""

from __future__ import annotations

import typer

from .errors import run_with_errors

app = typer.Typer(
    name="glm-mlx",
    help="Run GLM-5.1 (glm_moe_dsa) locally on Apple Silicon with MLX.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root():
    """Run GLM-5.1 (glm_moe_dsa) locally on Apple Silicon with MLX.

    Start with `glm-mlx fit` (does GLM-5.1 fit your Mac?), then `download`, `convert`, `chat`.
    """


@app.command()
def version():
    """Print the glm-mlx, MLX and mlx-lm versions."""
    from importlib.metadata import version as v

    typer.echo(f"glm-mlx {v('glm-mlx')}  mlx {v('mlx')}  mlx-lm {v('mlx-lm')}")


def main():
    """Console-script entry point: one error handler around the whole app."""
    run_with_errors(app, standalone_mode=True)


if __name__ == "__main__":
    main()
