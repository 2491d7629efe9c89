"""The `glm-mlx` command as the tests run it: in-process (typer's CliRunner, with the error handler on,
as users get it) or as the real command in a subprocess; and the check every bad input must pass: exit
1, one `Error:` line and a `Hint:`, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

from glm_mlx.cli.app import app
from typer.testing import CliRunner

CLI = [sys.executable, "-m", "glm_mlx.cli.app"]


def invoke(*args, ok: bool = True, input: str | None = None):
    """In-process; `ok`: assert exit 0."""
    result = CliRunner().invoke(app, [str(a) for a in args], input=input, env={"GLM_MLX_DEBUG": None})
    if ok:
        assert result.exit_code == 0, result.output
    return result


def command(*args, ok: bool = False, timeout: float = 300) -> subprocess.CompletedProcess:
    """The real command in a subprocess (this environment, e.g. the `hub` fixture's HF_ENDPOINT, without
    GLM_MLX_DEBUG); `ok`: assert exit 0."""
    env = {k: v for k, v in os.environ.items() if k != "GLM_MLX_DEBUG"}
    r = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout, check=False)
    if ok:
        assert r.returncode == 0, r.stderr
    return r


def assert_clean_error(result, *needles: str, in_line: bool = False):
    """Exit 1, exactly one `Error:` line and a `Hint:` on stderr, no traceback (a CliRunner result or a
    CompletedProcess). Each needle is in stderr (`in_line`: in the `Error:` line itself)."""
    code = getattr(result, "exit_code", getattr(result, "returncode", None))
    assert code == 1, (result.stdout, result.stderr)
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1 and "Hint:" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr + result.stdout, (result.stdout, result.stderr)
    for n in needles:
        assert n in (errors[0] if in_line else result.stderr), result.stderr
