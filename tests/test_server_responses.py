"""The OpenAI Responses API (/v1/responses, what Codex CLI and the Agents SDK speak) on the real server,
driven by the official SDK: every whole response is validated against the SDK's Response model, every
streamed event against its event types (raw SSE, strictly) and the event order checked exactly.
"""

from __future__ import annotations

import base64
import json

import pytest

from serve_helpers import ASK_WEATHER, MODEL, POEM, SCENE, WEATHER, WEATHER_RESULT, chat_ids, needs_tool_model

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
from openai.types.responses import Response, ResponseStreamEvent  # noqa: E402
from pydantic import TypeAdapter  # noqa: E402

from glm_mlx.serve import responses_api  # noqa: E402
from glm_mlx.generation.output_parser import Event, ToolCall  # noqa: E402
from glm_mlx.serve.responses_output import PING, Responder  # noqa: E402
from glm_mlx.serve.worker import Delta, Failed, Finished  # noqa: E402

EVENTS = TypeAdapter(ResponseStreamEvent)
OFF = {"effort": "none"}
WEATHER_FLAT = {"type": "function", **WEATHER["function"]}  # Responses tools are flat


# --- helpers ---------------------------------------------------------------------------------------
def create(oa, **kw) -> Response:
    """A whole response, validated strictly from the raw JSON (the SDK itself parses leniently)."""
    raw = oa.responses.with_raw_response.create(model=kw.pop("model", MODEL), **kw)
    body = raw.http_response.json()
    return Response.model_validate(body)


def stream(server, **body) -> tuple[list, Response]:
    """Raw SSE: every event validated against the SDK's types, names matching types, sequence numbers 0..n-1,
    and the exact documented order for the output it built. -> (events, the final response)."""
    events = []
    with httpx.stream("POST", server.url + "/v1/responses", json={"model": MODEL, "stream": True, **body},
                      timeout=120) as r:
        assert r.status_code == 200, r.read()
        name = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: "):
                data = json.loads(line[len("data: "):])
                assert data["type"] == name
                events.append(EVENTS.validate_python(data))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response
    assert collapsed([e.type for e in events]) == expected_order(final)
    assert all(e.response.id == final.id for e in events if hasattr(e, "response"))
    return events, final


def collapsed(types: list[str]) -> list[str]:
    """Runs of one delta type as one entry."""
    return [t for i, t in enumerate(types) if not (t.endswith(".delta") and i and types[i - 1] == t)]


def expected_order(final: Response) -> list[str]:
    """The documented sequence for `final`'s output (a run of deltas as one entry)."""
    order = ["response.created", "response.in_progress"]
    for item in final.output:
        order.append("response.output_item.added")
        if item.type in ("message", "reasoning"):
            kind = "output_text" if item.type == "message" else "reasoning_text"
            order += ["response.content_part.added", *([f"response.{kind}.delta"] if item.content[0].text else []),
                      f"response.{kind}.done", "response.content_part.done"]
        elif item.type == "function_call":
            order += ["response.function_call_arguments.delta", "response.function_call_arguments.done"]
        order.append("response.output_item.done")
    order.append({"completed": "response.completed", "incomplete": "response.incomplete",
                  "failed": "response.failed"}[final.status])
    return order


def text_of(r: Response) -> str:
    return "".join(c.text for it in r.output if it.type == "message" for c in it.content)


def reasoning_of(r: Response) -> str:
    return "".join(c.text for it in r.output if it.type == "reasoning" for c in it.content or [])


def chat_prompt_tokens(oa, messages, **kw) -> int:
    return oa.chat.completions.create(model=MODEL, messages=messages, max_tokens=1, **kw).usage.prompt_tokens


def as_input(output) -> list[dict]:
    return [it.model_dump(exclude_none=True) for it in output]


# --- whole and streamed ----------------------------------------------------------------------------
@pytest.mark.parametrize("thinking", [False, True], ids=["off", "on"])
def test_string_input_whole_and_streamed(oa, server, tokenizer, thinking):
    msgs = [{"role": "user", "content": POEM}]
    kw = dict(input=POEM, max_output_tokens=16, temperature=0, reasoning={"effort": "high" if thinking else "none"})
    r = create(oa, model="any-model-name", **kw)
    assert r.object == "response" and r.id.startswith("resp_") and r.model == "any-model-name"
    assert r.usage.input_tokens == len(chat_ids(tokenizer, msgs, thinking))
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.status in ("completed", "incomplete") and r.temperature == 0 and r.max_output_tokens == 16
    chat = oa.chat.completions.create(model=MODEL, messages=msgs, max_tokens=16, temperature=0,
                                      reasoning_effort="high" if thinking else "none")
    assert text_of(r) == (chat.choices[0].message.content or "")
    assert reasoning_of(r) == (getattr(chat.choices[0].message, "reasoning_content", None) or "")
    assert bool(reasoning_of(r)) == any(it.type == "reasoning" for it in r.output)
    if not thinking:
        assert not any(it.type == "reasoning" for it in r.output)
        assert r.usage.output_tokens_details.reasoning_tokens == 0
    events, final = stream(server, **kw)
    assert text_of(final) == text_of(r) and reasoning_of(final) == reasoning_of(r)
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == text_of(r)
    assert [it.type for it in final.output] == [it.type for it in r.output]


def test_sdk_stream_helpers(oa):
    with oa.responses.stream(model=MODEL, input=SCENE, max_output_tokens=8, temperature=0, reasoning=OFF) as s:
        events = list(s)
    types = [e.type for e in events]
    assert types[0] == "response.created" and types[-1] == "response.incomplete"  # cut at 8 tokens
    snapshot = [e.snapshot for e in events if e.type == "response.output_text.delta"][-1]  # the SDK's accumulation
    assert snapshot and snapshot == text_of(events[-1].response)
    streamed = oa.responses.create(model=MODEL, input=SCENE, max_output_tokens=8, temperature=0, reasoning=OFF,
                                   stream=True)
    assert [e.type for e in streamed] == types


@needs_tool_model
def test_sdk_stream_helper_final_response(oa):
    """get_final_response() needs response.completed: a tool call ends the answer before the budget."""
    with oa.responses.stream(model=MODEL, input=ASK_WEATHER[0]["content"], tools=[WEATHER_FLAT],
                             max_output_tokens=48, temperature=0, reasoning=OFF) as s:
        list(s)
        final = s.get_final_response()
    assert final.status == "completed" and [it.type for it in final.output][-1] == "function_call"


def test_max_output_tokens_cut_is_incomplete(oa, server):
    r = create(oa, input=SCENE, max_output_tokens=2, temperature=0, reasoning=OFF)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 2 and r.output[-1].status == "incomplete"
    events, final = stream(server, input=SCENE, max_output_tokens=2, temperature=0, reasoning=OFF)
    assert events[-1].type == "response.incomplete" and final.incomplete_details.reason == "max_output_tokens"


# --- input items -----------------------------------------------------------------------------------
def test_items_instructions_and_chat_render_alike(oa):
    items = [{"type": "message", "role": "developer", "content": "Be brief."},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
             {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hello!"}]},
             {"role": "user", "content": "Tell me a story."}]
    r = create(oa, input=items, instructions="You are a poet.", max_output_tokens=4, reasoning=OFF)
    assert r.instructions == "You are a poet."
    chat = [{"role": "system", "content": "You are a poet."}, {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Tell me a story."}]
    assert r.usage.input_tokens == chat_prompt_tokens(oa, chat, reasoning_effort="none")


def test_image_and_file_parts_are_refused(oa):
    for part, word in ([{"type": "input_image", "image_url": "data:image/png;base64,AAAA"}, "images"],
                       [{"type": "input_file", "file_data": "x", "filename": "a.pdf"}, "files"]):
        with pytest.raises(openai.BadRequestError) as e:
            oa.responses.create(model=MODEL, input=[{"role": "user", "content": [
                {"type": "input_text", "text": "What is this?"}, part]}], max_output_tokens=4)
        assert e.value.status_code == 400
        assert part["type"] in e.value.body["message"] and f"{word} are not supported" in e.value.body["message"]
        assert e.value.body["param"] == "input[0].content[1]"


def test_unknown_fields_and_builtin_tools_accepted(oa, tokenizer):
    msgs = [{"role": "user", "content": "Hi"}]
    r = create(oa, input="Hi", max_output_tokens=3, reasoning={"effort": "minimal", "summary": "auto"},
               metadata={"k": "v"}, user="u1", service_tier="auto", prompt_cache_key="abc", truncation="auto",
               background=False, parallel_tool_calls=False, text={"format": {"type": "text"}},
               tools=[{"type": "web_search"}, {"type": "local_shell"},
                      {"type": "custom", "name": "apply_patch", "description": "patch"}],
               extra_body={"some_future_field": {"x": 1}, "max_tool_calls": 3, "safety_identifier": "s",
                           "stream_options": {"include_obfuscation": False}})
    assert r.metadata == {"k": "v"} and r.user == "u1" and r.parallel_tool_calls is False
    assert r.usage.input_tokens == len(chat_ids(tokenizer, msgs, False))  # built-in tools are not rendered
    assert [t.type for t in r.tools] == ["web_search", "local_shell", "custom"]


def test_text_format_json_schema_and_json_object(oa, server):
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
              "required": ["city", "days"], "additionalProperties": False}
    fmt = {"type": "json_schema", "name": "trip", "schema": schema, "strict": True}
    r = create(oa, input="Plan a trip to Paris as JSON.", text={"format": fmt}, max_output_tokens=48,
               temperature=0, reasoning=OFF)
    assert r.text.format.type == "json_schema" and r.text.format.name == "trip"
    assert text_of(r).startswith("{")  # the grammar's JSON (the tiny model may not finish it in 48 tokens)
    if r.status == "completed":
        value = json.loads(text_of(r))
        assert set(value) == {"city", "days"} and isinstance(value["days"], int)
    _, final = stream(server, input="Plan a trip as JSON.", text={"format": {"type": "json_object"}},
                      max_output_tokens=24, temperature=0, reasoning=OFF)
    assert text_of(final).lstrip().startswith("{")
    with pytest.raises(openai.BadRequestError) as e:
        oa.responses.create(model=MODEL, input="x", text={"format": {"type": "yaml"}}, max_output_tokens=2)
    assert e.value.body["param"] == "text.format"


# --- tools -----------------------------------------------------------------------------------------
def test_forced_tool_call_and_tool_output_render_like_chat(oa):
    r = create(oa, input=ASK_WEATHER[0]["content"], tools=[WEATHER_FLAT], max_output_tokens=32, temperature=0,
               reasoning=OFF, tool_choice={"type": "function", "name": "get_weather"})
    assert r.tool_choice.name == "get_weather"
    calls = [it for it in r.output if it.type == "function_call"]
    if not calls:
        pytest.skip(f"the model did not finish the forced call: {r.output}")
    c = calls[0]
    assert c.name == "get_weather" and c.call_id.startswith("call_") and c.id.startswith("fc_")
    assert c.status == "completed" and isinstance(json.loads(c.arguments), dict)
    # the call and its result back in: the same prompt chat completions render for the same conversation
    items = [{"role": "user", "content": ASK_WEATHER[0]["content"]}, *as_input(r.output),
             {"type": "function_call_output", "call_id": c.call_id, "output": WEATHER_RESULT}]
    final = create(oa, input=items, tools=[WEATHER_FLAT], max_output_tokens=8, temperature=0, reasoning=OFF)
    chat = ASK_WEATHER + [{"role": "assistant", "content": text_of(r) or None, "tool_calls": [
        {"id": c.call_id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}]},
        {"role": "tool", "tool_call_id": c.call_id, "content": WEATHER_RESULT}]
    assert final.usage.input_tokens == chat_prompt_tokens(oa, chat, tools=[WEATHER], reasoning_effort="none")


@needs_tool_model
def test_tool_round_trip_streamed(server, oa):
    kw = dict(tools=[WEATHER_FLAT], temperature=0, reasoning=OFF)
    events, first = stream(server, input=ASK_WEATHER[0]["content"], max_output_tokens=48, **kw)
    calls = [it for it in first.output if it.type == "function_call"]
    assert calls and first.status == "completed", first.output
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert [e.arguments for e in done] == [c.arguments for c in calls]
    out = [{"type": "function_call_output", "call_id": c.call_id,
            "output": [{"type": "input_text", "text": WEATHER_RESULT}]} for c in calls]
    _, final = stream(server, input=out, previous_response_id=first.id, max_output_tokens=16, **kw)
    assert final.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens - 8


# --- reasoning round trip --------------------------------------------------------------------------
def test_encrypted_reasoning_comes_back_as_reasoning_content(oa):
    r = create(oa, input=POEM, max_output_tokens=24, temperature=0, reasoning={"effort": "high"},
               include=["reasoning.encrypted_content"], store=False)
    reasoning = [it for it in r.output if it.type == "reasoning"]
    if not reasoning or not reasoning[0].content[0].text:
        pytest.skip("the model wrote no reasoning")
    item = reasoning[0]
    assert item.encrypted_content and base64.b64decode(item.encrypted_content)
    assert responses_api.decrypt_reasoning(item.encrypted_content) == item.content[0].text
    # Codex sends reasoning items back with encrypted_content only: the reasoning renders again (it is the
    # turn after the last user message, so GLM's template keeps it), as chat's reasoning_content would
    opaque = {"type": "reasoning", "id": item.id, "summary": [], "encrypted_content": item.encrypted_content}
    answer = text_of(r) or "ok"
    items = [{"role": "user", "content": POEM}, opaque,
             {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": answer}]}]
    back = create(oa, input=items, max_output_tokens=1, reasoning={"effort": "high"})
    chat = [{"role": "user", "content": POEM},
            {"role": "assistant", "content": answer, "reasoning_content": item.content[0].text}]
    assert back.usage.input_tokens == chat_prompt_tokens(oa, chat, reasoning_effort="high")
    foreign = {**opaque, "encrypted_content": "gAAAAB-not-ours"}  # another server's: dropped, not refused
    shorter = create(oa, input=[items[0], foreign, items[2]], max_output_tokens=1, reasoning={"effort": "high"})
    assert shorter.usage.input_tokens < back.usage.input_tokens


# --- previous_response_id and the store ------------------------------------------------------------
def test_previous_response_id_continues_and_get_delete(oa):
    first = create(oa, input="Hi", max_output_tokens=6, temperature=0, reasoning=OFF)
    second = create(oa, input="And then?", previous_response_id=first.id, max_output_tokens=4, reasoning=OFF)
    assert second.previous_response_id == first.id
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": text_of(first)},
            {"role": "user", "content": "And then?"}]
    assert second.usage.input_tokens == chat_prompt_tokens(oa, chat, reasoning_effort="none")
    got = oa.responses.with_raw_response.retrieve(first.id).http_response.json()
    assert Response.model_validate(got) == first
    items = oa.responses.input_items.list(first.id)
    assert [it.type for it in items.data] == ["message"]
    oa.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        oa.responses.retrieve(first.id)


def test_unknown_and_unstored_previous_response(oa):
    with pytest.raises(openai.BadRequestError) as e:
        oa.responses.create(model=MODEL, input="Hi", previous_response_id="resp_nope", max_output_tokens=2)
    assert e.value.body == {"message": "Previous response with id 'resp_nope' not found.",
                            "type": "invalid_request_error", "param": "previous_response_id",
                            "code": "previous_response_not_found"}
    unstored = create(oa, input="Hi", max_output_tokens=2, store=False, reasoning=OFF)
    with pytest.raises(openai.BadRequestError):
        oa.responses.create(model=MODEL, input="Hi", previous_response_id=unstored.id, max_output_tokens=2)


# --- the event machine on its own (no server): failures and keep-alives ----------------------------
def _call(**kw) -> responses_api.Call:
    from glm_mlx.serve.prompt import Prompt
    from glm_mlx.serve.worker import GenRequest
    echo = {"model": "m", "instructions": None, "tools": [], "tool_choice": "auto", "parallel_tool_calls": True,
            "temperature": 1.0, "top_p": 1.0}
    return responses_api.Call(Prompt([1, 2], False, "", True), GenRequest([1, 2], 8), True, None, True, echo, [],
                              False, False, **kw)


def test_failure_mid_stream_ends_in_response_failed():
    items = [("ping", None), ("token", Delta("hi", 5, None)), ("event", Event("content", "hi")),
             ("end", Failed("the worker failed"))]
    out = list(Responder(_call()).events(iter(items)))
    assert out[2] == (PING, None)
    types = [name for name, _ in out if name != PING]
    assert types == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", "response.output_text.delta", "response.output_text.done",
                     "response.content_part.done", "response.output_item.done", "response.failed"]
    final = Response.model_validate(out[-1][1]["response"])
    assert final.status == "failed" and final.error.message == "the worker failed"
    assert final.output[0].status == "incomplete"


def test_reasoning_then_calls_one_machine():
    end = Finished("stop", None, 2, 0, 3, 0.0, 0.0, 0.0)
    call = ToolCall("get_weather", {"city": "Paris"})
    items = [("token", Delta("x", 1, None)), ("event", Event("reasoning", "think")), ("token", Delta("y", 2, None)),
             ("event", Event("tool_call", call=call)), ("end", end)]
    r = Responder(_call())
    body, failed = r.whole(iter(items))
    final = Response.model_validate(body)
    assert failed is None and final.status == "completed"
    assert [it.type for it in final.output] == ["reasoning", "function_call"]
    assert final.output[1].call_id == call.id and json.loads(final.output[1].arguments) == {"city": "Paris"}
    assert final.usage.output_tokens_details.reasoning_tokens == 1


def test_messages_merge_calls_into_one_assistant_turn():
    items = [{"role": "user", "content": "q"},
             {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": "r"}]},
             {"type": "function_call", "call_id": "c1", "name": "a", "arguments": "{}"},
             {"type": "function_call", "call_id": "c2", "name": "b", "arguments": "{\"x\": 1}"},
             {"type": "function_call_output", "call_id": "c1", "output": "1"},
             {"type": "function_call_output", "call_id": "c2", "output": "2"},
             {"type": "web_search_call", "id": "ws_1", "status": "completed"}]
    msgs = responses_api.messages(items, "sys")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "tool", "tool"]
    assert msgs[2]["reasoning_content"] == "r" and [c["id"] for c in msgs[2]["tool_calls"]] == ["c1", "c2"]
    assert msgs[2]["tool_calls"][1]["function"]["arguments"] == {"x": 1}


def test_text_format_becomes_chat_response_format():
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    fmt = {"type": "json_schema", "name": "thing", "schema": schema, "strict": True}
    assert responses_api.response_format({"format": fmt}) == {
        "type": "json_schema", "json_schema": {"name": "thing", "schema": schema, "strict": True}}
    assert responses_api.response_format({"format": {"type": "json_object"}}) == {"type": "json_object"}
    assert responses_api.response_format({"format": {"type": "text"}}) is None


def test_namespaced_tools_are_shown_and_called_with_their_namespace(oa):
    """Codex sends every MCP tool inside a `namespace` tool: the model sees NAMESPACE__NAME, and a call
    comes back as the function's own name with its `namespace` (and goes back in the same way)."""
    space = {"type": "namespace", "name": "mcp__weather", "description": "Tools in the mcp__weather namespace.",
             "tools": [WEATHER_FLAT]}
    r = create(oa, input=ASK_WEATHER[0]["content"], tools=[space], max_output_tokens=64, temperature=0,
               reasoning=OFF, tool_choice="required")
    flat = {**WEATHER["function"], "name": "mcp__weather__get_weather"}
    chat_tokens = chat_prompt_tokens(oa, ASK_WEATHER, tools=[{"type": "function", "function": flat}],
                                     reasoning_effort="none", tool_choice="required")
    assert r.usage.input_tokens == chat_tokens  # shown to the model as mcp__weather__get_weather
    calls = [it for it in r.output if it.type == "function_call"]
    assert calls, r.output  # forced: a declared tool, whatever the model would write
    c = calls[0]
    assert c.name == "get_weather" and c.namespace == "mcp__weather"
    items = [{"role": "user", "content": ASK_WEATHER[0]["content"]}, *as_input(r.output),
             {"type": "function_call_output", "call_id": c.call_id, "output": WEATHER_RESULT}]
    final = create(oa, input=items, tools=[space], max_output_tokens=4, temperature=0, reasoning=OFF)
    chat = ASK_WEATHER + [{"role": "assistant", "content": text_of(r) or None, "tool_calls": [
        {"id": c.call_id, "type": "function", "function": {"name": flat["name"], "arguments": c.arguments}}]},
        {"role": "tool", "tool_call_id": c.call_id, "content": WEATHER_RESULT}]
    assert final.usage.input_tokens == chat_prompt_tokens(oa, chat, tools=[{"type": "function", "function": flat}],
                                                         reasoning_effort="none")
