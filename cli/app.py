"""The glm-mlx Typer app. Each command lives in its own module and registers itself here."""

from __future__ import annotations

import typer

from .errors import HandledGroup, run_with_errors

app = typer.Typer(
    name="glm-mlx",
    cls=HandledGroup,  # one error handler for every command, also under CliRunner
    help="Run GLM-5.1 (glm_moe_dsa) locally on Apple Silicon with MLX.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",  # explicit: options.install escapes help text for this mode
    context_settings={"help_option_names": ["-h", "--help"]},  # -h as in mlx-lm and hf; commands inherit it
)


@app.callback()
def _root():
    """Run GLM-5.1 (glm_moe_dsa) locally on Apple Silicon with MLX.

    Start with `glm-mlx fit` (does GLM-5.1 fit your Mac?), then `download`, `convert`, `chat`.
    """


@app.command()
def version():
    """Print the glm-mlx, MLX and mlx-lm versions.

    Example: glm-mlx version
    """
    from importlib.metadata import version as v

    typer.echo(f"glm-mlx {v('glm-mlx')}  mlx {v('mlx')}  mlx-lm {v('mlx-lm')}")


from . import download as _download  # noqa: E402

app.command(name="download")(_download.download)


from . import fit as _fit  # noqa: E402

app.command(name="fit", cls=_fit.FitCommand)(_fit.fit)

from . import bench as _bench  # noqa: E402
from . import chat as _chat  # noqa: E402
from . import generate as _generate  # noqa: E402
from . import launch as _launch  # noqa: E402
from . import serve as _serve  # noqa: E402

app.command(name="chat")(_chat.chat)
app.command(name="generate")(_generate.generate)
app.command(name="serve")(_serve.serve)
app.command(name="bench")(_bench.bench)
app.command(name="launch", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(_launch.launch)

from . import convert as _convert  # noqa: E402
from . import evaluate as _evaluate  # noqa: E402

app.command(name="convert")(_convert.convert)
app.command(name="eval")(_evaluate.evaluate)


def main():
    """Console-script entry point: one error handler around the whole app."""
    run_with_errors(app, standalone_mode=True)


if __name__ == "__main__":
    main()
