"""mlx-lm sets the open-files limit at import (mlx_lm/utils.py: setrlimit(RLIMIT_NOFILE, (2048, 4096))),
which raised under a lower hard limit, so nothing of glm-mlx could start under `ulimit -n 256`.
glm_mlx/__init__.py fits that one call within the hard limit and never lets it lower either limit."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(sys.platform == "win32" or not shutil.which("bash"), reason="POSIX rlimits")

SHOW = "import resource; print(*resource.getrlimit(resource.RLIMIT_NOFILE))"


def _run(ulimit: str, code: str) -> subprocess.CompletedProcess:
    py = f"{sys.executable} -c '{code}'"
    return subprocess.run(["bash", "-c", f"{ulimit} || exit 99; {py}"], capture_output=True, text=True, timeout=300)


def _expected(soft: int, hard: int) -> tuple[int, int]:
    # what mlx-lm asks for (soft 2048), within the hard limit, never lower than it was (-1: unlimited)
    inf = -1
    want = 2048 if hard == inf or hard >= 2048 else hard
    return (soft if soft == inf or soft >= want else want), hard


@pytest.mark.parametrize("ulimit", ["ulimit -n 256", "ulimit -Sn 256", "true"])
def test_server_imports_under_a_low_open_files_limit(ulimit):
    r = _run(ulimit, f"{SHOW}; import glm_mlx.serve.app, mlx_lm.utils; {SHOW}")
    if r.returncode == 99:
        pytest.skip(f"{ulimit} refused here")
    assert r.returncode == 0, r.stderr[-2000:]
    before, after = (tuple(int(x) for x in line.split()) for line in r.stdout.split("\n")[:2])
    assert after == _expected(*before)


def test_serve_help_under_ulimit_256():
    r = _run("ulimit -n 256", "import sys; from glm_mlx.cli.app import main; sys.argv = [\"glm-mlx\", \"serve\", \"--help\"]; main()")
    assert r.returncode == 0 and "--cache-disk" in r.stdout, r.stderr[-2000:]
