"""Every command's options against the one table of ranges (cli/options.py RANGES), help text as written,
operating-system errors as their causes, and a closed stdout pipe.

The out-of-range cases are generated from the table and the app's own commands, so a new numeric option
must get a table entry (test_every_numeric_option_is_in_the_table) and is then tested like the others.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
from pathlib import Path

import errno
import pytest
import typer.main
from cli_util import CLI, assert_clean_error
from typer.testing import CliRunner

from glm_mlx.cli.app import app
from glm_mlx.cli.errors import describe
from glm_mlx.cli.options import RANGES, OptionRangeError, check_option, option_name

runner = CliRunner()
# Required arguments, so that a command reaches its option checks (the checks come before any work).
REQUIRED = {"convert": ["src", "dst"], "eval": ["model", "--reference", "ref", "--text", "t.txt"],
            "download": ["org/name"], "launch": ["--", "chat"]}


def commands() -> dict:
    return typer.main.get_command(app).commands


def python_type(param):
    """int, float, str, ... of a parameter, under Typer's own parameter model or click's."""
    desc = getattr(param, "type_descriptor", None)
    if desc is not None:
        return desc.annotation
    name = param.type.name
    return int if name.startswith("integer") else float if name.startswith("float") else str if name == "text" else None


def table_options() -> list[tuple[str, str, type]]:
    """(command, option, python type) for every option of every command that the table covers."""
    return [(c, option_name(p), python_type(p)) for c, cmd in commands().items() for p in cmd.params
            if option_name(p) in RANGES]


def outside(option: str, kind: type) -> list[str]:
    """Values just outside each bound, and NaN where the type can spell it."""
    r = RANGES[option]
    if r.size:
        return ["0" if r.lo_open else "-1GB", "nan", "abc"]
    step = 1 if kind is int else 1e-6
    values = [] if r.lo is None else [str(r.lo if r.lo_open else r.lo - step)]
    values += [] if r.hi is None else [str(r.hi + step)]
    return values + (["nan", "inf"] if kind is float else [])


CASES = [(c, o, v) for c, o, kind in table_options() for v in outside(o, kind)]


def invoke(command: str, *args: str):
    return runner.invoke(app, [command, *args, *REQUIRED.get(command, [])], env={"GLM_MLX_DEBUG": None})


def assert_one_line_error(result, *needles: str):
    """cli_util's check, and more: the needles in the `Error:` line, nothing on stdout, not called a bug."""
    assert_clean_error(result, *needles, in_line=True)
    assert "bug" not in result.stderr and not result.stdout.strip(), (result.stdout, result.stderr)


# --- the table --------------------------------------------------------------------------------------------
def test_every_numeric_option_is_in_the_table():
    numeric = [(c, option_name(p)) for c, cmd in commands().items() for p in cmd.params if python_type(p) in (int, float)]
    assert numeric, "found no numeric options: the introspection is broken"
    assert [x for x in numeric if x[1] not in RANGES] == []
    # Each entry is used, and size entries are strings (a numeric option of the same name would be misread).
    used = {o: kind for _, o, kind in table_options()}
    assert set(used) == set(RANGES)
    assert [o for o, kind in used.items() if RANGES[o].size != (kind is str)] == []


@pytest.mark.parametrize("command,option,value", CASES, ids=[" ".join(c) for c in CASES])
def test_out_of_range_is_a_one_line_error(command, option, value):
    r = invoke(command, option, value)
    assert_one_line_error(r, option, "must be", "got")


@pytest.mark.parametrize("args", [
    ["generate", "--max-tokens", "-1"], ["generate", "--temp", "nan"], ["convert", "--bits", "0", "src", "dst"],
    ["fit", "--bandwidth", "nan", "--memory", "192GB"], ["convert", "--shard-size", "0", "src", "dst"],
], ids=" ".join)
def test_out_of_range_in_the_real_cli(args):
    r = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120)
    assert_one_line_error(r, args[1], "must be")


@pytest.mark.parametrize("option", sorted(RANGES))
def test_bounds_and_defaults_pass(option):
    r = RANGES[option]
    inside = ([] if r.lo is None or r.lo_open else [r.lo]) + ([] if r.hi is None else [r.hi])
    for v in inside:
        check_option(option, f"{v}GB" if r.size else v, "test")
    for c, cmd in commands().items():
        for p in cmd.params:
            if option_name(p) == option and p.default is not None:
                check_option(option, p.default, c)  # a default outside the table would fail every run
    with pytest.raises(OptionRangeError, match=re.escape(option)):
        check_option(option, "nan" if r.size else math.nan, "test")


# --- help ---------------------------------------------------------------------------------------------------
def _normal(text: str) -> str:
    """Help text without Rich's box borders and line wrapping."""
    return " ".join(text.replace("│", " ").split())


@pytest.mark.parametrize("command", sorted(commands()))
def test_help_shows_defaults_ranges_and_an_example(command):
    cmd = commands()[command]
    out = _normal(runner.invoke(app, [command, "--help"], env={"COLUMNS": "100"}).stdout)
    assert "Example" in out
    written = [t.replace("\\[", "[") for obj in (cmd, *cmd.params) for t in [getattr(obj, "help", None) or ""]]
    notes = [n for t in written for n in re.findall(r"\[(?:default|range):[^\]]*\]", t)]
    for note in notes:
        assert _normal(note) in out, note
    if command in ("chat", "generate", "serve", "bench"):
        assert "[default: the built-in reference model]" in out


def test_every_default_note_in_the_source_is_shown():
    """Every `[default: ...]` in a help string or docstring of cli/*.py shows in some command's --help (Rich
    once took them for markup and dropped them)."""
    import ast

    import glm_mlx.cli as cli

    names = {c.callback.__name__ for c in commands().values()}  # the command functions: their docstrings
    texts = []
    for path in Path(cli.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.keyword) and node.arg == "help" and isinstance(node.value, ast.Constant):
                texts.append(node.value.value)
            elif isinstance(node, ast.FunctionDef) and node.name in names and ast.get_docstring(node):
                texts.append(ast.get_docstring(node))
    notes = {n for t in texts for n in re.findall(r"\[default: [^\]]*\]", t)}
    assert len(notes) >= 4
    helps = _normal(" ".join(runner.invoke(app, [c, "--help"], env={"COLUMNS": "100"}).stdout for c in commands()))
    for note in notes:
        assert _normal(note) in helps, note


# --- a closed stdout pipe -----------------------------------------------------------------------------------
@pytest.mark.parametrize("pipeline", ["fit | head -2", "fit | true", "version | true", "fit --json | true"])
def test_closed_stdout_is_quiet(pipeline):
    cmd, reader = pipeline.split(" | ")
    r = subprocess.run(["bash", "-o", "pipefail", "-c", f"{' '.join(CLI)} {cmd} | {reader}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stderr == "", r.stderr


# --- operating-system errors --------------------------------------------------------------------------------
@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES, errno.ENOTDIR, errno.EISDIR, errno.EEXIST,
                                  errno.EADDRINUSE, errno.ENOSPC, errno.EDQUOT, errno.EMFILE, errno.ENOENT])
def test_os_errors_name_their_cause(code):
    message, hint = describe(OSError(code, os.strerror(code), "/some/path"))
    assert "/some/path" in message and hint and "bug" not in hint


def test_unknown_errors_stay_bugs():
    assert describe(RuntimeError("x")) is None and describe(OSError(errno.EIO, "I/O error")) is None


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    from convert_fixtures import make_source

    return make_source(tmp_path_factory.mktemp("opt") / "src")


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs /proc")
def test_convert_into_a_pseudo_file_system(src):
    r = subprocess.run([*CLI, "convert", str(src), "/proc/glm-mlx-out", "--bits", "4"], capture_output=True,
                       text=True, timeout=300)
    assert_one_line_error(r, "pseudo file system")
    assert "not enough disk space" not in r.stderr


def test_convert_into_a_file(src, tmp_path):
    (tmp_path / "file").write_text("x")
    for dst in (tmp_path / "file", tmp_path / "file" / "sub"):
        r = runner.invoke(app, ["convert", str(src), str(dst), "--bits", "4"], env={"GLM_MLX_DEBUG": None})
        assert_one_line_error(r, "file" if dst.name == "file" else "not a folder")


def test_space_checks_name_a_read_only_or_pseudo_target(tmp_path, monkeypatch):
    from glm_mlx import disk
    from glm_mlx.hub import download as hub
    from glm_mlx.disk import OutputPathError

    if Path("/proc/self").exists():
        with pytest.raises(OutputPathError, match="pseudo file system"):
            hub.check_disk([("a.safetensors", 10)], "/proc/glm-mlx-out")
    real = os.statvfs(tmp_path)
    monkeypatch.setattr(disk.os, "statvfs", lambda p: os.statvfs_result(
        (real.f_bsize, real.f_frsize, real.f_blocks, 0, 0, real.f_files, 0, 0, os.ST_RDONLY, real.f_namemax)))
    with pytest.raises(OutputPathError, match="read-only file system"):
        hub.check_disk([("a.safetensors", 10)], tmp_path / "out")
