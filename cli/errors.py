"""One error handler: known exceptions become `Error: ...` + `Hint: ...` on stderr and exit 1.

Set GLM_MLX_DEBUG=1 to see the traceback instead. The app's group class (`HandledGroup`) applies the handler
around every command, so the console script and Typer's CliRunner print the same Error/Hint text.
Operating-system errors (read-only disk, port in use, ...) name their cause; a closed stdout pipe
(`glm-mlx fit | head -2`) ends the command quietly with exit 0.
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


# errno -> (what happened, what to do): the operating system's refusals are the user's to fix, not bugs.
_OS_ERRORS = {
    errno.ENOSPC: ("no space left on device", "Free disk space, then re-run: finished work is kept."),
    errno.EDQUOT: ("disk quota exceeded", "Free space within your quota or write to another disk, then re-run."),
    errno.EROFS: ("read-only file system", "Write to a folder on a writable disk."),
    errno.EACCES: ("permission denied", "Check the permissions, or choose a folder you can write to."),
    errno.EPERM: ("operation not permitted", "Check the permissions, or choose another folder."),
    errno.ENOENT: ("not found", "Check the path."),
    errno.ENOTDIR: ("not a folder (a part of this path is a file)", "Choose a path whose parents are folders."),
    errno.EISDIR: ("is a folder, where a file was expected", "Pass a file, or choose another path."),
    errno.EEXIST: ("already exists", "Remove it, or choose another path."),
    errno.ENAMETOOLONG: ("file name too long", "Choose a shorter path."),
    errno.EMFILE: ("too many open files", "Raise the limit (e.g. ulimit -n 4096), then re-run."),
    errno.ENFILE: ("too many open files on this system", "Close other programs or raise the limit, then re-run."),
    errno.EADDRINUSE: ("address already in use", "Pick another --port (0 takes any free one), or stop what is using it."),
    errno.EADDRNOTAVAIL: ("address not available on this machine", "Check --host, e.g. 127.0.0.1 or 0.0.0.0."),
    errno.ENOMEM: ("out of memory", "Close other programs, or choose a smaller model or context."),
}


def describe(exc: BaseException) -> tuple[str, str] | None:
    """(message, hint) for exceptions a user can act on; None for bugs."""
    if isinstance(exc, GlmMlxError):
        return str(exc), exc.hint
    if isinstance(exc, OSError) and exc.errno in _OS_ERRORS:
        what, hint = _OS_ERRORS[exc.errno]
        where = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
        return (f"{what}: {where}" if where else what), hint
    return None


def _quiet_exit():
    """The reader of our output took what it wanted (`glm-mlx fit | head -2`): exit 0 without a word. Python flushes
    stdout again at exit, so point it at devnull first (the recipe in the docs of `signal`, "Note on SIGPIPE")."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # no real file descriptor (e.g. a test runner's capture)
        pass
    sys.exit(0)


def run_with_errors(fn, *args, **kwargs):
    """Call fn; map known exceptions to a clean message and exit code 1."""
    try:
        return fn(*args, **kwargs)
    except _CLICK_FLOW:
        raise  # usage errors, --help, typer.Exit: Typer/click report these themselves
    except KeyboardInterrupt:
        stderr.print("[yellow]Interrupted.[/]")
        sys.exit(130)
    except SystemExit as exc:
        if isinstance(exc.__context__, BrokenPipeError):  # rich's Console.on_broken_pipe: exit(1), stdout at devnull
            _quiet_exit()
        raise
    except Exception as exc:  # noqa: BLE001 - this is the one place exceptions become messages
        if isinstance(exc, BrokenPipeError):  # in this thread, only stdout/stderr: sockets fail in serve's own threads
            _quiet_exit()
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
    """The app's command group: runs each command under `run_with_errors`, with its options checked against
    cli/options.py's table of ranges and its help shown as written (see `options.install`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from .options import install

        install(self.commands)

    def invoke(self, ctx):
        return run_with_errors(super().invoke, ctx)
