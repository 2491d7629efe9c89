"""One error handler: known exceptions become `Error: ...` + `Hint: ...` on stderr and exit 1.

Set GLM_MLX_DEBUG=1 to see the traceback instead.
"""

from __future__ import annotations

import errno
import os
import sys

from rich.console import Console

from glm_mlx.errors import GlmMlxError

stderr = Console(stderr=True, highlight=False)


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
        stderr.print(f"[bold red]Error:[/] {message}")
        if hint:
            stderr.print(f"[bold]Hint:[/] {hint}")
        sys.exit(1)
