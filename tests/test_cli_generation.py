"""`generate`, `bench`, `chat` (in a real terminal via tmux) and `serve` (real HTTP clients)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from glm_mlx.cli.app import app

runner = CliRunner()


@pytest.fixture(scope="module")
def ckpt(mtp_ckpt):
    return mtp_ckpt


def test_generate_text_and_json(ckpt):
    r = runner.invoke(app, ["generate", str(ckpt), "--prompt", "hello", "-m", "12"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["generate", str(ckpt), "--prompt", "hello", "-m", "12", "--json"])
    out = json.loads(r.stdout)
    assert out["generation_tokens"] <= 12 and out["finish_reason"] in ("stop", "length") and "text" in out
    r = runner.invoke(app, ["generate", str(ckpt), "-m", "5", "--json", "--no-mtp"], input="from stdin")
    assert json.loads(r.stdout)["tokens_per_pass"] in (0.0, 1.0)


@pytest.mark.parametrize("args,needle", [
    (["generate", "/nonexistent/model", "-p", "hi"], "no checkpoint folder"),
    (["bench", "/nonexistent/model"], "no checkpoint folder"),
])
def test_errors_are_one_line(args, needle):
    r = runner.invoke(app, args)
    assert r.exit_code == 1 and needle in r.output and "Traceback" not in r.output and "Hint:" in r.output


def test_wrong_model_type(ckpt, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    r = runner.invoke(app, ["generate", str(bad), "-p", "hi"])
    assert r.exit_code == 1 and "model_type is 'llama'" in r.output


def test_bench_json(ckpt):
    r = runner.invoke(app, ["bench", str(ckpt), "--prompt-tokens", "32", "-g", "16", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["gen_tokens"] == 16 and out["prompt_tps"] > 0 and out["mtp"] is True


def test_chat_piped(ckpt, tmp_path):
    save = tmp_path / "conv.safetensors"
    r = runner.invoke(app, ["chat", str(ckpt), "-m", "8"], input=f"hi\n/stats\nagain\n/save {save}\n/exit\n")
    assert r.exit_code == 0, r.output
    assert "tok/s" in r.output and "saved to" in r.output and save.exists()
    r = runner.invoke(app, ["chat", str(ckpt), "-m", "8"], input=f"/load {save}\n/bogus\n/help\n")
    assert "loaded" in r.output and "4 messages" in r.output and "unknown command" in r.output and "/think" in r.output


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed (.ci/run installs it)")
def test_chat_in_tmux(ckpt):
    """A real terminal: two turns, a slash command, Ctrl-C during an answer, then exit."""
    session = f"glmchat{int(time.time() * 1000) % 100000}"
    cmd = f"{sys.executable} -m glm_mlx.cli.app chat {ckpt} -m 400"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "200", "-y", "50", cmd], check=True)

    def screen():
        return subprocess.run(["tmux", "capture-pane", "-p", "-t", session, "-S", "-200"],
                              capture_output=True, text=True).stdout

    def wait_for(text, timeout=60, count=1):
        end = time.time() + timeout
        while time.time() < end:
            if screen().count(text) >= count:
                return
            time.sleep(0.2)
        raise AssertionError(f"{text!r} not on screen:\n{screen()}")

    def keys(*k):
        subprocess.run(["tmux", "send-keys", "-t", session, *k], check=True)

    try:
        wait_for("/help for commands")
        keys("hello", "Enter")
        wait_for("tok/s", count=1)
        keys("/stats", "Enter")
        wait_for("MB for", timeout=10)
        keys("second turn", "Enter")
        time.sleep(0.3)
        keys("C-c")  # stop the answer if it is still streaming
        wait_for("tok/s", count=2)
        keys("/think", "Enter")
        wait_for("thinking on")
        keys("/exit", "Enter")
        end = time.time() + 20
        while time.time() < end and subprocess.run(["tmux", "has-session", "-t", session],
                                                    capture_output=True).returncode == 0:
            time.sleep(0.2)
        assert subprocess.run(["tmux", "has-session", "-t", session], capture_output=True).returncode != 0
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)


def test_chat_multiline_reset_and_named_saves(ckpt, tmp_path):
    """A pasted block between triple quotes is one message; /stats after /reset shows nothing stale;
    /save NAME without an extension writes NAME.safetensors and /load NAME finds it."""
    from safetensors import safe_open

    name = tmp_path / "notes"
    block = '"""\nfirst line\n\nthird line\n"""\n'
    r = runner.invoke(app, ["chat", str(ckpt), "-m", "4"],
                      input=block + "/stats\n/reset\n/stats\ncontinued \\\nline\n/save " + str(name) + "\n/exit\n")
    assert r.exit_code == 0, r.output
    assert r.output.count("tok/s") >= 2  # two answers (the block, the continued line), one /stats
    assert "no answer yet" in r.output.split("conversation cleared")[1]
    saved = name.with_name("notes.safetensors")
    assert saved.exists() and f"saved to {saved}" in r.output
    with safe_open(str(saved), "numpy") as f:
        messages = json.loads(f.metadata()["extra"])["messages"]
    assert [m["content"] for m in messages if m["role"] == "user"] == ["continued \nline"]
    r = runner.invoke(app, ["chat", str(ckpt), "-m", "4"], input=f"/load {name}\n/stats\n/exit\n")
    assert f"loaded {saved}" in r.output and "2 messages" in r.output and "no answer yet" in r.output
    r = runner.invoke(app, ["chat", str(ckpt), "-m", "4"], input=block + f"/save {name}\n/exit\n")
    with safe_open(str(saved), "numpy") as f:
        messages = json.loads(f.metadata()["extra"])["messages"]
    assert messages[0] == {"role": "user", "content": "first line\n\nthird line"}
