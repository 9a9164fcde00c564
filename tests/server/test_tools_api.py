"""Tool calls through the server with the `openai` client: tools described to a model whose template has no
place for them (a system prompt), `<tool_call>` replies parsed into tool_calls (streamed too), required and
named choices enforced so that the arguments always follow the function's schema, tool results accepted back."""
from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from ember.server.tools import ToolPlan, parse, visible
from tests.server.conftest import start_server, stop_server

WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
           "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]}, "unit": {"enum": ["C", "F"]}}}
TIME = {"type": "object", "additionalProperties": False, "required": ["zone"],
        "properties": {"zone": {"enum": ["UTC", "CET"]}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(tiny_llama3, tmp_path_factory):
    """The tiny tokenizer spends ~600 tokens on these tools' descriptions: the model's whole 1,024 context."""
    srv = start_server(tiny_llama3, tmp_path_factory.mktemp("tools"), "--max-model-len", "1024")
    yield srv
    stop_server(srv)


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def check_calls(calls, names=tuple(SCHEMAS)) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_required_and_named_choices_always_call_with_valid_arguments(server) -> None:
    for seed in range(3):
        out = client(server).chat.completions.create(model=server.model, messages=USER, tools=TOOLS, seed=seed,
                                                    tool_choice="required", temperature=1.0, max_tokens=300)
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        check_calls(choice.message.tool_calls)
    named = {"type": "function", "function": {"name": "get_time"}}
    out = client(server).chat.completions.create(model=server.model, messages=USER, tools=TOOLS, tool_choice=named,
                                                temperature=1.0, seed=5, max_tokens=300, parallel_tool_calls=False)
    assert len(out.choices[0].message.tool_calls) == 1
    check_calls(out.choices[0].message.tool_calls, ("get_time",))


def test_streamed_tool_calls(server) -> None:
    stream = client(server).chat.completions.create(model=server.model, messages=USER, tools=TOOLS, stream=True,
                                                    tool_choice="required", temperature=0, max_tokens=300)
    calls, finish, content = [], None, ""
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        calls += delta.tool_calls or []
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and "<tool_call>" not in content
    check_calls(calls)


def test_tool_results_go_back_to_the_model(server) -> None:
    history = USER + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps({"city": "Paris", "unit": "C"})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees and sunny"}]
    out = client(server).chat.completions.create(model=server.model, messages=history, tools=TOOLS, max_tokens=8,
                                                temperature=0)
    assert out.choices[0].finish_reason in ("stop", "length", "tool_calls")
    none = client(server).chat.completions.create(model=server.model, messages=history, tools=TOOLS, max_tokens=8,
                                                 temperature=0, tool_choice="none")
    assert none.choices[0].message.tool_calls is None


@pytest.mark.parametrize("body,param", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
])
def test_bad_tool_requests_are_a_400(server, body: dict, param: str) -> None:
    resp = httpx.post(f"{server.url}/v1/chat/completions", timeout=60,
                      json={"model": server.model, "messages": USER, "max_tokens": 4, **body})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == param, resp.text


def test_parse_and_visible() -> None:
    text = 'Let me check.\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>'
    content, calls = parse(text, {"get_time"})
    assert content == "Let me check." and json.loads(calls[0]["function"]["arguments"]) == {"zone": "UTC"}
    assert parse(text, {"other"}) == (text, [])  # an unknown function stays text
    assert parse("<tool_call>not json</tool_call>", {"get_time"})[1] == []
    assert visible("Hello <tool") == "Hello " and visible("Hello <tool_call>{") == "Hello " and visible("a<b") == "a<b"
    grammar = ToolPlan(TOOLS, "get_time", parallel=False).constraint()
    assert grammar is not None and "get_time" in grammar.grammar and "get_weather" not in grammar.grammar
    assert ToolPlan(TOOLS, "auto").constraint() is None
