"""What the `glm-mlx serve` tests share: the model they serve, the requests they send, and helpers that
drive the official SDKs and read the access log (fixtures: conftest.py).

The bundled model is tiny and greedy by default (its generation_config has do_sample false). It often runs on
past its own turn into an invented `<|assistant|>` turn (generation does not stop there: only <|endoftext|>,
<|user|> and <|observation|> end it), so text checks that concern one turn look at `own_turn(text)`.
"""

from __future__ import annotations

import json
import os
import re
import socket
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from glm_mlx.model.reference import DEFAULT_MODEL

# GLM_MLX_TEST_SERVE_MODEL: serve another checkpoint instead (e.g. a glm-mini fine-tune before it is bundled)
MODEL_DIR = Path(os.environ.get("GLM_MLX_TEST_SERVE_MODEL") or DEFAULT_MODEL)
MODEL = MODEL_DIR.name  # the id the server reports
CONTEXT = 4096  # passed explicitly: the default depends on the machine's memory
NO_THINK = {"chat_template_kwargs": {"enable_thinking": False}}
GREEDY = {"temperature": 0}  # the anthropic SDK has no temperature argument (the server takes one)
TAGS = ("<think>", "</think>")
TURN_MARKERS = ("<|assistant|>", "<|user|>", "<|system|>", "<|observation|>")
SCENE = "Continue this scene from Hamlet:\n\nHAMLET.\nTo be, or not to be, that is the question."
POEM = "请背诵李白的《静夜思》。"  # glm-mini writes some reasoning for this one (with thinking on)


def _chat_template() -> str:
    jinja = MODEL_DIR / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text()
    return json.loads((MODEL_DIR / "tokenizer_config.json").read_text()).get("chat_template") or ""


# The tool fine-tune of glm-mini brings a template that renders tools (and <tool_call> markup); until it lands
# the model has never seen a tool and cannot be expected to call one.
TOOL_MODEL = "<tool_call>" in _chat_template()
needs_tool_model = pytest.mark.skipif(
    not TOOL_MODEL, reason="glm-mini's chat template has no tool rendering yet (the tool-calling fine-tune has not "
    "landed), so the model cannot call tools; runs automatically once it does")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}},
                   "required": ["city"]}}}
WEATHER_ANTHROPIC = {"name": "get_weather", "description": "Get the current weather for a city",
                     "input_schema": WEATHER["function"]["parameters"]}
WEATHER_RESULT = json.dumps({"city": "Paris", "temperature": 18, "condition": "sunny"})
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]


# --- helpers --------------------------------------------------------------------------------------
def own_turn(text: str) -> str:
    """Text up to the first turn marker the model writes (the bundled model runs on into invented turns)."""
    cut = min((i for m in TURN_MARKERS if (i := text.find(m)) >= 0), default=len(text))
    return text[:cut]


def no_tags(text: str | None) -> bool:
    return not any(t in own_turn(text or "") for t in TAGS)


def rendered(tokenizer, messages, thinking: bool, tools=None) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False,
                                         enable_thinking=thinking)


def ids_of(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def chat_ids(tokenizer, messages, thinking: bool, tools=None) -> list[int]:
    return ids_of(tokenizer, rendered(tokenizer, messages, thinking, tools))


def whole_chat(client, **kw) -> SimpleNamespace:
    r = client.chat.completions.create(model=MODEL, **kw)
    c = r.choices[0]
    calls = [(t.id, t.function.name, t.function.arguments) for t in c.message.tool_calls or []]
    return SimpleNamespace(content=c.message.content or "", reasoning=getattr(c.message, "reasoning_content", None)
                           or "", finish=c.finish_reason, usage=r.usage, tool_calls=calls, logprobs=c.logprobs)


def stream_chat(client, **kw) -> SimpleNamespace:
    content, reasoning, finish, usage, calls, logprobs = [], [], None, None, {}, []
    for ch in client.chat.completions.create(model=MODEL, stream=True, stream_options={"include_usage": True}, **kw):
        if ch.usage is not None:
            assert not ch.choices  # the usage chunk comes alone, last
            usage = ch.usage
        for c in ch.choices:
            assert finish is None, "a chunk after the one with finish_reason"
            d = c.delta
            content.append(d.content or "")
            reasoning.append(getattr(d, "reasoning_content", None) or "")
            for t in d.tool_calls or []:
                slot = calls.setdefault(t.index, {"id": None, "name": "", "arguments": ""})
                slot["id"] = slot["id"] or t.id
                slot["name"] += (t.function.name or "") if t.function else ""
                slot["arguments"] += (t.function.arguments or "") if t.function else ""
            if c.logprobs and c.logprobs.content:
                logprobs.extend(c.logprobs.content)
            if c.finish_reason:
                finish = c.finish_reason
    assert usage is not None, "no usage chunk although stream_options.include_usage was set"
    return SimpleNamespace(content="".join(content), reasoning="".join(reasoning), finish=finish, usage=usage,
                           tool_calls=[(c["id"], c["name"], c["arguments"]) for _, c in sorted(calls.items())],
                           logprobs=logprobs)


def check_usage(usage, prompt_tokens: int, max_tokens: int, finish: str):
    assert usage.prompt_tokens == prompt_tokens
    assert 1 <= usage.completion_tokens <= max_tokens
    if finish == "length":
        assert usage.completion_tokens == max_tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert 0 <= usage.prompt_tokens_details.cached_tokens < usage.prompt_tokens


def expected_split(raw: str, in_think: bool) -> tuple[str, str]:
    """(reasoning, content) of GLM output without tools: reasoning up to </think> when the prompt ends inside
    <think> or the output starts with <think>; one newline after </think> is not content."""
    s = raw
    if not in_think:
        stripped = s.lstrip()
        if not stripped.startswith("<think>"):
            return "", raw
        s = stripped[len("<think>"):]
    i = s.find("</think>")
    if i < 0:
        return s, ""
    content = s[i + len("</think>"):]
    return s[:i], content[1:] if content.startswith("\n") else content


def pick_stop(text: str) -> str:
    """A short stop string from the middle of the model's own turn (the text before it is the expected answer)."""
    turn = own_turn(text)
    for m in re.finditer(r"[A-Za-z\u4e00-\u9fff]{3,}", turn):
        if m.start() >= 2:
            return m.group()[:3]
    pytest.skip(f"no usable stop string in {turn!r}")


def raw_request(server, path: str, body, timeout: float = 30) -> socket.socket:
    """A request on a raw socket (the caller reads and closes it as it pleases)."""
    s = socket.create_connection(("127.0.0.1", server.port), timeout=timeout)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return s


def log_line(server, start: int, *needles: str, timeout: float = 10) -> str:
    return server.wait_for_log(lambda line: '"POST ' in line and all(n in line for n in needles), timeout, start)


def ttft_of(line: str) -> float:
    m = re.search(r"ttft=([\d.]+)s", line)
    assert m, line
    return float(m.group(1))


def forced_token(tokenizer) -> int:
    """A plain-text token that is one token on its own (for logit_bias forcing)."""
    ids = ids_of(tokenizer, "hi")
    assert len(ids) == 1
    return ids[0]


def long_text(tokenizer, tokens: int) -> str:
    """A unique user message of about `tokens` tokens (unique: no prefix-cache hit from an earlier test)."""
    per_word = len(ids_of(tokenizer, "word " * 100)) / 100
    text = f"{uuid.uuid4().hex} " + "word " * int(tokens / per_word)
    n = len(ids_of(tokenizer, text))
    assert abs(n - tokens) < 50, n
    return text


RAW_EVENTS = {"message_start", "content_block_start", "content_block_delta", "content_block_stop", "message_delta",
              "message_stop"}


def check_event_order(events) -> None:
    kinds = [e.type for e in events if e.type in RAW_EVENTS]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"], kinds
    open_index, next_index = None, 0
    for e in events:
        if e.type == "content_block_start":
            assert open_index is None and e.index == next_index, kinds
            open_index, next_index = e.index, next_index + 1
        elif e.type == "content_block_delta":
            assert e.index == open_index, kinds
        elif e.type == "content_block_stop":
            assert e.index == open_index, kinds
            open_index = None
        elif e.type in ("message_delta", "message_stop"):
            assert open_index is None, kinds
    assert kinds.count("message_start") == kinds.count("message_delta") == kinds.count("message_stop") == 1


def anthropic_text(msg) -> str:
    return "".join(b.text for b in msg.content if b.type == "text")


def tool_conversation_openai(call_id="call_1", arguments='{"city": "Paris"}'):
    return ASK_WEATHER + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": call_id, "content": WEATHER_RESULT}]


def tool_conversation_anthropic(call_id="toolu_1"):
    return ASK_WEATHER + [
        {"role": "assistant", "content": [{"type": "tool_use", "id": call_id, "name": "get_weather",
                                           "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call_id, "content": WEATHER_RESULT}]}]
