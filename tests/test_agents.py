"""The real coding-agent clients against the real `glm-mlx serve`: Claude Code, Codex CLI, opencode, aider
(installed outside the repo by scripts/install_agents.sh) and LangChain's ChatOpenAI / ChatAnthropic.

One server for the module: the CLI started as a user starts it, over a copy of glm-mini whose context is
raised to 64K (Claude Code's own prompt is ~20K tokens and it asks for 128K completion tokens). Every client
talks to it through tests/agent_proxy.py, which records each request (path, body, status, an error's body),
so a failure says exactly what the client sent that the server refused. Each client runs one turn (its own
timeout) and must exit 0, with no 4xx/5xx and no traceback in the server's log; where the model called a
tool, the client's next request must carry the tool's result. The agent CLIs get the get_weather tool that
glm-mini was tuned on from tests/agent_weather_mcp.py (MCP), asked "What is the weather in Paris?".

Skipped, with the reason, where a client is not installed: `bash scripts/install_agents.sh` (CI runs it).
Run alone: python -m pytest -q -m agents tests/test_agents.py
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent_proxy import RecordingProxy
from glm_mlx.model.reference import DEFAULT_MODEL
from server_util import Server

pytestmark = pytest.mark.agents

AGENTS_DIR = Path(os.environ.get("GLM_MLX_AGENTS_DIR") or Path.home() / ".cache" / "glm-mlx-agents")
NODE_BIN = AGENTS_DIR / "node" / "node_modules" / ".bin"
AIDER = AGENTS_DIR / "aider" / "bin" / "aider"
MCP_SERVER = Path(__file__).with_name("agent_weather_mcp.py")
CONTEXT = 65536
PROMPT = "What is the weather in Paris?"
INSTALL_HINT = "run `bash scripts/install_agents.sh`"
# Nothing but the variables a client needs: no user config, no real keys, no proxies.
BASE_ENV = {"PATH": os.pathsep.join([str(Path(sys.executable).parent), "/usr/local/bin", "/usr/bin", "/bin"]),
            "LANG": "C.UTF-8", "TERM": "dumb", "NO_COLOR": "1"}


def client(path: Path, name: str) -> Path:
    if not path.exists():
        pytest.skip(f"{name} is not installed ({path} missing): {INSTALL_HINT}")
    return path


# --------------------------------------------------------------------------------------- the server

@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(server, proxy): `glm-mlx serve` over a 64K-context copy of glm-mini, and the recording proxy."""
    model = tmp_path_factory.mktemp("model") / "glm-mini"
    shutil.copytree(DEFAULT_MODEL, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["max_position_embeddings"] = CONTEXT
    (model / "config.json").write_text(json.dumps(cfg, indent=2))
    # --max-tokens: the completion budget of a request that sets none (aider, Codex).
    server = Server(str(model), "--context", str(CONTEXT), "--max-tokens", "1024", startup_timeout=300).start()
    proxy = RecordingProxy(server.port).start()
    try:
        yield server, proxy
    finally:
        proxy.stop()
        server.stop()
        server.cleanup()


class Turn:
    """What one client run sent: the proxy's exchanges and the server's log lines since it began."""

    def __init__(self, served):
        self.server, self.proxy = served
        self.mark, self.log_mark = self.proxy.mark(), len(self.server.log_lines())

    def finish(self):
        self.exchanges = self.proxy.since(self.mark)
        self.log = self.server.log_lines()[self.log_mark:]
        record = os.environ.get("GLM_MLX_AGENTS_RECORD")  # a folder: each test's exchanges as JSON, to read
        if record:
            Path(record).mkdir(parents=True, exist_ok=True)
            name = os.environ.get("PYTEST_CURRENT_TEST", "turn").split(" ")[0].split("::")[-1]
            (Path(record) / f"{name}.json").write_text(json.dumps(
                {"exchanges": [vars(e) for e in self.exchanges], "log": self.log}, indent=1, default=str))
        return self

    def report(self) -> str:
        out = []
        for e in self.exchanges:
            out.append(e.summary())
            if isinstance(e.body, dict):
                out.append(f"    body keys: {sorted(e.body)}")
            if e.status >= 400 or e.status == 0:
                out.append(f"    body: {json.dumps(e.body)[:3000]}")
                out.append(f"    response: {e.response[:1500]}")
        out.append("server log:")
        out += ["    " + line for line in self.log[-40:]]
        return "\n".join(out)

    def check(self, api_paths: tuple[str, ...], tool_result):
        """No refused request, no traceback, at least one model request, and a tool call's result sent back."""
        bad = [e for e in self.exchanges if e.status >= 400 or e.status == 0]
        assert not bad, "the server refused requests:\n" + self.report()
        assert not any("Traceback" in line for line in self.log), "traceback in the server log:\n" + self.report()
        model_calls = [e for e in self.exchanges if e.path.split("?")[0] in api_paths]
        assert model_calls, f"no request to {api_paths}:\n" + self.report()
        for i, e in enumerate(model_calls):
            if tool_called(e.response) and i + 1 < len(model_calls) and not tool_result(model_calls[i + 1].body):
                raise AssertionError(f"request {i + 1} answered a tool call; the next did not carry its result:\n"
                                     + self.report())
        return model_calls


def tool_called(response: str) -> bool:
    return any(s in response for s in ('"type": "tool_use"', '"type": "function_call"', '"tool_calls"'))


def anthropic_tool_result(body) -> bool:
    return any(isinstance(m.get("content"), list) and any(b.get("type") == "tool_result" for b in m["content"])
               for m in body.get("messages", []))


def responses_tool_result(body) -> bool:
    items = body.get("input")
    return isinstance(items, list) and any(it.get("type") == "function_call_output" for it in items)


def chat_tool_result(body) -> bool:
    return any(m.get("role") == "tool" for m in body.get("messages", []))


def run(cmd: list, env: dict, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    t0 = time.monotonic()
    try:
        proc = subprocess.run([str(c) for c in cmd], env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"{cmd[0]} did not finish within {timeout}s; stdout:\n{e.stdout}\nstderr:\n{e.stderr}")
    proc.seconds = time.monotonic() - t0
    return proc


def said(proc) -> str:
    return f"exit {proc.returncode} after {proc.seconds:.0f}s\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"


def mcp_calls(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# ------------------------------------------------------------------------------------------ Claude Code

def claude_env(home: Path, proxy) -> dict:
    return {**BASE_ENV, "HOME": str(home), "CLAUDE_CONFIG_DIR": str(home / ".claude"),
            "ANTHROPIC_BASE_URL": proxy.url, "ANTHROPIC_API_KEY": "sk-ant-dummy",
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_TELEMETRY": "1", "DISABLE_AUTOUPDATER": "1",
            "DISABLE_ERROR_REPORTING": "1", "DISABLE_BUG_COMMAND": "1", "DISABLE_COST_WARNINGS": "1",
            "CLAUDE_CODE_DISABLE_FEEDBACK_SURVEY": "1", "CLAUDE_CODE_IDE_SKIP_AUTO_INSTALL": "1"}


def claude_json(proc) -> dict:
    assert proc.returncode == 0, said(proc)
    out = json.loads(proc.stdout)
    assert out.get("is_error") is False and out.get("subtype") == "success", said(proc)
    return out


def test_claude_code_default_prompt(request, tmp_path):
    """Claude Code as it comes: its ~20K-token system prompt and tools, thinking adaptive, max_tokens 128000."""
    claude = client(NODE_BIN / "claude", "Claude Code")
    served = request.getfixturevalue("served")  # the server starts only for an installed client
    turn = Turn(served)
    proc = run([claude, "-p", PROMPT, "--output-format", "json"], claude_env(tmp_path, served[1]), tmp_path, 900)
    turn.finish()
    claude_json(proc)
    turn.check(("/v1/messages",), anthropic_tool_result)


def test_claude_code_mcp_tool(request, tmp_path):
    """Claude Code with only an MCP get_weather tool: the model's tool_use is run and its tool_result sent."""
    claude = client(NODE_BIN / "claude", "Claude Code")
    served = request.getfixturevalue("served")  # the server starts only for an installed client
    calls = tmp_path / "calls.jsonl"
    mcp = tmp_path / "mcp.json"
    mcp.write_text(json.dumps({"mcpServers": {"weather": {
        "type": "stdio", "command": sys.executable, "args": [str(MCP_SERVER)],
        "env": {"WEATHER_MCP_LOG": str(calls)}}}}))
    turn = Turn(served)
    proc = run([claude, "-p", PROMPT, "--output-format", "json", "--system-prompt", "You are a helpful assistant.",
                "--tools", "", "--mcp-config", mcp, "--strict-mcp-config",
                "--allowedTools", "mcp__weather__get_weather"], claude_env(tmp_path, served[1]), tmp_path, 300)
    turn.finish()
    claude_json(proc)
    sent = turn.check(("/v1/messages",), anthropic_tool_result)
    if mcp_calls(calls):  # the client ran the tool: its result went back
        assert any(anthropic_tool_result(e.body) for e in sent), turn.report()


# ------------------------------------------------------------------------------------------- Codex CLI

def codex_home(tmp_path: Path, proxy, calls: Path) -> Path:
    """CODEX_HOME with config.toml: the custom provider (wire_api "responses"), headless (no approvals, no
    sandbox), thinking off, and a lean prompt: Codex's own ~11K-token instructions and tools make glm-mini
    ramble to its token cap, which Codex reports as a failed turn (response.incomplete)."""
    home = tmp_path / "codex-home"
    home.mkdir()
    (home / "instructions.md").write_text("You are a helpful assistant.\n")
    (home / "config.toml").write_text(f'''
model = "glm-mini"
model_provider = "glm-mlx"
model_reasoning_effort = "minimal"
approval_policy = "never"
sandbox_mode = "danger-full-access"
check_for_update_on_startup = false
model_context_window = {CONTEXT}
model_instructions_file = {json.dumps(str(home / "instructions.md"))}
web_search = "disabled"
include_environment_context = false

[features]
goals = false

[agents]
enabled = false

[model_providers.glm-mlx]
name = "glm-mlx"
base_url = "{proxy.url}/v1"
env_key = "GLM_MLX_API_KEY"
wire_api = "responses"
request_max_retries = 0
stream_max_retries = 0

[mcp_servers.weather]
command = {json.dumps(sys.executable)}
args = [{json.dumps(str(MCP_SERVER))}]
env = {{ WEATHER_MCP_LOG = {json.dumps(str(calls))} }}
''')
    return home


def test_codex_exec(request, tmp_path):
    codex = client(NODE_BIN / "codex", "Codex CLI")
    served = request.getfixturevalue("served")  # the server starts only for an installed client
    calls = tmp_path / "calls.jsonl"
    home = codex_home(tmp_path, served[1], calls)
    work = tmp_path / "work"
    work.mkdir()
    env = {**BASE_ENV, "HOME": str(tmp_path), "CODEX_HOME": str(home), "GLM_MLX_API_KEY": "dummy"}
    turn = Turn(served)
    proc = run([codex, "exec", "--strict-config", "--skip-git-repo-check", "--ephemeral", "--json", PROMPT], env, work, 600)
    turn.finish()
    assert proc.returncode == 0, said(proc) + "\n" + turn.report()
    sent = turn.check(("/v1/responses",), responses_tool_result)
    if mcp_calls(calls):
        assert any(responses_tool_result(e.body) for e in sent), turn.report()


# -------------------------------------------------------------------------------------------- opencode

def test_opencode_run(request, tmp_path):
    opencode = client(NODE_BIN / "opencode", "opencode")
    served = request.getfixturevalue("served")  # the server starts only for an installed client
    calls = tmp_path / "calls.jsonl"
    config = tmp_path / "opencode.json"
    config.write_text(json.dumps({
        "$schema": "https://opencode.ai/config.json",
        "autoupdate": False, "share": "disabled",
        "model": "glm-mlx/glm-mini", "small_model": "glm-mlx/glm-mini",
        "provider": {"glm-mlx": {
            "npm": "@ai-sdk/openai-compatible", "name": "glm-mlx",
            "options": {"baseURL": served[1].url + "/v1", "apiKey": "dummy"},
            "models": {"glm-mini": {"name": "glm-mini", "tool_call": True,
                                    "limit": {"context": CONTEXT, "output": 1024}}}}},
        "mcp": {"weather": {"type": "local", "command": [sys.executable, str(MCP_SERVER)],
                            "environment": {"WEATHER_MCP_LOG": str(calls)}}},
    }, indent=2))
    home, work = tmp_path / "home", tmp_path / "work"
    work.mkdir()
    env = {**BASE_ENV, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
           "XDG_DATA_HOME": str(home / ".local/share"), "XDG_STATE_HOME": str(home / ".local/state"),
           "XDG_CACHE_HOME": str(home / ".cache"), "OPENCODE_CONFIG": str(config),
           "OPENCODE_DISABLE_AUTOUPDATE": "1", "OPENCODE_DISABLE_MODELS_FETCH": "1",
           "OPENCODE_DISABLE_LSP_DOWNLOAD": "1", "OPENCODE_DISABLE_SHARE": "1",
           "OPENCODE_DISABLE_DEFAULT_PLUGINS": "1", "OPENCODE_DISABLE_CLAUDE_CODE": "1"}
    turn = Turn(served)
    proc = run([opencode, "run", "--print-logs", PROMPT], env, work, 600)
    turn.finish()
    assert proc.returncode == 0, said(proc) + "\n" + turn.report()
    sent = turn.check(("/v1/chat/completions",), chat_tool_result)
    if mcp_calls(calls):
        assert any(chat_tool_result(e.body) for e in sent), turn.report()


# ----------------------------------------------------------------------------------------------- aider

def test_aider_message(request, tmp_path):
    aider = client(AIDER, "aider")
    served = request.getfixturevalue("served")  # the server starts only for an installed client
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    env = {**BASE_ENV, "HOME": str(home), "OPENAI_API_KEY": "dummy", "LITELLM_LOCAL_MODEL_COST_MAP": "True",
           "AIDER_ANALYTICS": "false"}
    turn = Turn(served)
    proc = run([aider, "--message", "Say hello.", "--yes-always", "--no-git",
                "--openai-api-base", served[1].url + "/v1", "--model", "openai/glm-mini",
                "--no-check-update", "--analytics-disable", "--no-show-model-warnings", "--no-show-release-notes",
                "--no-pretty", "--no-fancy-input", "--map-tokens", "0", "--no-detect-urls",
                "--input-history-file", home / "input.history", "--chat-history-file", home / "chat.md"],
               env, work, 300)
    turn.finish()
    assert proc.returncode == 0, said(proc) + "\n" + turn.report()
    turn.check(("/v1/chat/completions",), chat_tool_result)


# ------------------------------------------------------------------------------------------- LangChain

def get_weather(city: str) -> str:
    """Get the current weather for a city."""
    return f"The weather in {city}: sunny, 21 C"


def langchain_models(served):
    lc_openai = pytest.importorskip("langchain_openai", reason="langchain-openai is in the test extra")
    lc_anthropic = pytest.importorskip("langchain_anthropic", reason="langchain-anthropic is in the test extra")
    url = served[1].url
    return {
        "openai": lc_openai.ChatOpenAI(model="glm-mini", base_url=url + "/v1", api_key="dummy", max_tokens=200,
                                       temperature=0, max_retries=0, timeout=120),
        "anthropic": lc_anthropic.ChatAnthropic(model="claude-sonnet-4-5", base_url=url, api_key="dummy",
                                                max_tokens=200, temperature=0, max_retries=0, timeout=120),
    }


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
def test_langchain_tool_round_trip(served, kind):
    from langchain_core.messages import HumanMessage, ToolMessage

    llm = langchain_models(served)[kind]
    turn = Turn(served)
    bound = llm.bind_tools([get_weather], tool_choice="get_weather")  # forced: glm-mini need not choose
    question = HumanMessage(PROMPT)
    ai = bound.invoke([question])
    assert ai.tool_calls and ai.tool_calls[0]["name"] == "get_weather", ai
    call = ai.tool_calls[0]
    result = ToolMessage(get_weather(**call["args"]) if "city" in call["args"] else "unknown city",
                         tool_call_id=call["id"])
    final = llm.bind_tools([get_weather]).invoke([question, ai, result])
    assert final.content is not None
    turn.finish()
    paths = ("/v1/chat/completions",) if kind == "openai" else ("/v1/messages",)
    sent = turn.check(paths, chat_tool_result if kind == "openai" else anthropic_tool_result)
    assert len(sent) == 2 and (chat_tool_result if kind == "openai" else anthropic_tool_result)(sent[1].body), \
        turn.report()


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
@pytest.mark.parametrize("kind", ["openai", "anthropic"])
def test_langchain_structured_output(served, kind, method):
    from typing import Literal

    from pydantic import BaseModel

    class Weather(BaseModel):  # closed fields: glm-mini, held to the schema, cannot ramble inside a string
        """The weather in a city."""
        city: Literal["Paris", "London", "Tokyo"]
        sunny: bool

    llm = langchain_models(served)[kind]
    turn = Turn(served)
    structured = llm.with_structured_output(Weather, method=method)  # ChatOpenAI's default: json_schema
    out = structured.invoke("Is it sunny in Paris? Answer as JSON with the city and sunny fields.")
    assert isinstance(out, Weather), out
    turn.finish()
    turn.check(("/v1/chat/completions", "/v1/messages"), lambda body: True)
