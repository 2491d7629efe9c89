"""One error handler: known exceptions become `Error: ...` + `Hint: ...` on stderr and exit 1.

Set GLM_MLX_DEBUG=1 to see the traceback instead. The app's group class (`HandledGroup`) applies the handler
around every command, so the console script and Typer's CliRunner print the same Error/Hint text.
"""

from __future__ import annotations

import errno
import os
import sys

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from glm_mlx.errors import GlmMlxError

stderr = Console(stderr=True, highlight=False)


def _click_flow() -> tuple[type[BaseException], ...]:
    """Exit/Abort/usage errors, which Typer reports itself. Recent Typer vendors click (its errors derive from
    TyperException); older Typer uses click's own classes. Name whichever exist."""
    classes: list[type[BaseException]] = [typer.Exit, typer.Abort]
    try:
        from typer.exceptions import TyperException

        classes.append(TyperException)
    except ImportError:
        pass
    try:
        import click

        classes += [click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort]
    except ImportError:
        pass
    return tuple(classes)


_CLICK_FLOW = _click_flow()


def describe(exc: BaseException) -> tuple[str, str] | None:
    """(message, hint) for exceptions a user can act on; None for bugs."""
    if isinstance(exc, GlmMlxError):
        return str(exc), exc.hint
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return f"no space left on device ({exc.filename or 'output'})", "Free disk space, then re-run: finished work is kept."
    if isinstance(exc, FileNotFoundError):
        return f"not found: {exc.filename or exc}", "Check the path."
    if isinstance(exc, PermissionError):
        return f"permission denied: {exc.filename or exc}", "Check the file permissions."
    return None


def run_with_errors(fn, *args, **kwargs):
    """Call fn; map known exceptions to a clean message and exit code 1."""
    try:
        return fn(*args, **kwargs)
    except _CLICK_FLOW:
        raise  # usage errors, --help, typer.Exit: Typer/click report these themselves
    except KeyboardInterrupt:
        stderr.print("[yellow]Interrupted.[/]")
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - this is the one place exceptions become messages
        if os.environ.get("GLM_MLX_DEBUG") == "1":
            raise
        known = describe(exc)
        if known is None:
            message, hint = f"{type(exc).__name__}: {exc}", "This looks like a bug; re-run with GLM_MLX_DEBUG=1 and report the traceback."
        else:
            message, hint = known
        # soft_wrap: one line per message even when piped (rich would wrap at 80 columns); escape: paths with [ ].
        stderr.print(f"[bold red]Error:[/] {escape(message)}", soft_wrap=True)
        if hint:
            stderr.print(f"[bold]Hint:[/] {escape(hint)}", soft_wrap=True)
        sys.exit(1)


class HandledGroup(TyperGroup):
    """The app's command group: runs each command under `run_with_errors`."""

    def invoke(self, ctx):
        return run_with_errors(super().invoke, ctx)
