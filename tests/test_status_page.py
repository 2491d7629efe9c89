"""The status page at `/`, in a real browser: headless Chromium (Debian's `chromium`) loads it while a
request runs, its script fills it from /status, and the screenshot is a page, not a blank.

GLM_MLX_STATUS_SCREENSHOT=docs/status_page.png keeps the screenshot (how the one in the docs is made).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from serve_helpers import CONTEXT, MODEL, NO_THINK, SCENE
from server_util import Server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no headless Chromium here (apt-get install chromium)")


def _browser(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    home = os.environ.get("TMPDIR", "/tmp")
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--user-data-dir={home}/glm-mlx-chromium-{os.getpid()}", "--window-size=1100,620",
                           "--virtual-time-budget=4000", *args], capture_output=True, text=True, timeout=timeout)


def test_status_page_in_a_browser(tmp_path, tokenizer):
    from PIL import Image

    s = Server("--prefill-step", "16", "--context", str(CONTEXT), "--no-prefix-cache").start()
    sock = None
    try:
        ends = {str(tokenizer.convert_tokens_to_ids(t)): -100 for t in ("<|endoftext|>", "<|user|>", "<|observation|>")}
        body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": SCENE}], "max_tokens": 3000,
                           "temperature": 0, "logit_bias": ends, "stream": True, **NO_THINK}).encode()
        sock = socket.create_connection(("127.0.0.1", s.port), timeout=30)  # a request running meanwhile
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        sock.recv(4096)
        time.sleep(1.0)
        dom = _browser("--dump-dom", s.url + "/").stdout
        assert f'<span id="model">{MODEL}</span>' in dom, dom[-3000:]
        assert '<b id="state" class="ok">ok</b>' in dom
        assert '<b id="running">1</b>' in dom  # the running request, from /status
        assert 'id="updated">never<' not in dom
        shot = Path(os.environ.get("GLM_MLX_STATUS_SCREENSHOT") or tmp_path / "status.png")
        r = _browser(f"--screenshot={shot}", s.url + "/")
        assert shot.exists(), r.stderr[-2000:]
        img = Image.open(shot).convert("RGB")
        assert img.size == (1100, 620)
        raw = img.resize((110, 62)).tobytes()
        pixels = [raw[i:i + 3] for i in range(0, len(raw), 3)]
        colours, dark = len(set(pixels)), sum(1 for p in pixels if sum(p) < 600)
        assert colours > 20 and dark > 40, (colours, dark)  # text, cards and a table, not a blank page
    finally:
        if sock is not None:
            sock.close()
        s.stop()
        s.cleanup()
