"""A stdio MCP server with one tool, get_weather(city), for tests/test_agents.py: an agent CLI (Claude Code,
Codex, opencode) starts it from its MCP config, so the agent offers glm-mini the tool it was tuned to call
(tests/test_glm_mini_tools.py). Each call is appended to $WEATHER_MCP_LOG as a JSON line, so a test can tell
that the client ran the tool the model asked for. Newline-delimited JSON-RPC 2.0 on stdin/stdout."""

from __future__ import annotations

import json
import os
import sys

TOOL = {"name": "get_weather", "description": "Get the current weather for a city",
        "inputSchema": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}},
                        "required": ["city"]}}
ANSWER = "sunny, 21 C"


def result(req_id, value):
    return {"jsonrpc": "2.0", "id": req_id, "result": value}


def handle(msg: dict):
    method, req_id = msg.get("method"), msg.get("id")
    if req_id is None:  # a notification (notifications/initialized, cancelled, ...): no answer
        return None
    if method == "initialize":
        version = (msg.get("params") or {}).get("protocolVersion") or "2025-06-18"
        return result(req_id, {"protocolVersion": version, "capabilities": {"tools": {"listChanged": False}},
                               "serverInfo": {"name": "weather", "version": "1.0.0"}})
    if method == "ping":
        return result(req_id, {})
    if method == "tools/list":
        return result(req_id, {"tools": [TOOL]})
    if method == "tools/call":
        params = msg.get("params") or {}
        log = os.environ.get("WEATHER_MCP_LOG")
        if log:
            with open(log, "a", encoding="utf-8") as f:
                f.write(json.dumps({"name": params.get("name"), "arguments": params.get("arguments")}) + "\n")
        city = (params.get("arguments") or {}).get("city", "?")
        return result(req_id, {"content": [{"type": "text", "text": f"The weather in {city}: {ANSWER}"}],
                               "isError": False})
    if method in ("resources/list", "prompts/list", "resources/templates/list"):
        key = method.split("/")[0] if method != "resources/templates/list" else "resourceTemplates"
        return result(req_id, {key: []})
    return {"jsonrpc": "2.0", "id": req_id, "error": {"code": -32601, "message": f"method not found: {method}"}}


def main():
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        reply = handle(msg) if isinstance(msg, dict) else None
        if reply is not None:
            sys.stdout.write(json.dumps(reply) + "\n")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
