"""Tool calls through the server with the `openai` client: tools described to a model whose template has no
place for them (a system prompt), `<tool_call>` replies parsed into tool_calls (streamed too), required and
named choices enforced so that the arguments always follow the function's schema, tool results accepted back."""
from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from ember.server.tools import CallStream, ToolPlan, outside, parse, visible
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


def test_streamed_tool_calls_arrive_piece_by_piece(server) -> None:
    """As OpenAI streams them: id, type and name first (arguments ""), then the arguments' text in pieces that
    add up to the non-streamed reply's arguments."""
    kw = dict(model=server.model, messages=USER, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=300)
    stream = client(server).chat.completions.create(stream=True, **kw)
    calls: dict[int, dict] = {}
    pieces: dict[int, int] = {}
    finish, content = None, ""
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for d in delta.tool_calls or []:
            if d.index not in calls:
                assert d.id and d.type == "function" and d.function.name and d.function.arguments == ""
                calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": ""}
            else:
                assert d.id is None and d.function.name is None
                calls[d.index]["arguments"] += d.function.arguments
                pieces[d.index] = pieces.get(d.index, 0) + 1
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and "<tool_call>" not in content and sorted(calls) == list(range(len(calls)))
    assert all(n > 1 for n in pieces.values()) and len(pieces) == len(calls)  # the arguments came incrementally
    whole = client(server).chat.completions.create(**kw).choices[0].message.tool_calls
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [(c.function.name, c.function.arguments)
                                                                     for c in whole]
    check_calls(whole)


def test_the_sdks_stream_helper_accumulates_the_calls(server) -> None:
    with client(server).chat.completions.stream(model=server.model, messages=USER, tools=TOOLS, max_tokens=300,
                                                tool_choice="required", temperature=0) as stream:
        argument_deltas = sum(1 for event in stream if event.type == "tool_calls.function.arguments.delta")
        final = stream.get_final_completion()
    assert argument_deltas > 1
    check_calls(final.choices[0].message.tool_calls)


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


def stream_by_chars(text: str, plan: ToolPlan) -> tuple[dict[int, dict], int]:
    """Feeds a reply to a CallStream one character at a time, as tokens would come; the accumulated calls."""
    stream, calls = CallStream(plan), {}
    for n in range(1, len(text) + 1):
        for d in stream.deltas(text[:n]):
            calls.setdefault(d["index"], {"name": None, "arguments": ""})
            calls[d["index"]]["name"] = d.get("function", {}).get("name") or calls[d["index"]]["name"]
            calls[d["index"]]["arguments"] += d["function"]["arguments"]
    for d in stream.finish(text):
        calls.setdefault(d["index"], {"name": d["function"].get("name"), "arguments": ""})
        calls[d["index"]]["arguments"] += d["function"]["arguments"]
    return calls, stream.count


def test_call_stream_pieces_add_up_to_the_parsed_calls() -> None:
    tricky = {"zone": "U}T\"C{", "list": [1, {"a": []}]}  # braces and quotes inside strings
    text = ("Sure.\n<tool_call>\n" + json.dumps({"name": "get_time", "arguments": tricky}) + "\n</tool_call>\n"
            '<tool_call>\n{"name":"get_weather","arguments":{"city":"Oslo","unit":"C"}}\n</tool_call>')
    plan = ToolPlan(TOOLS)
    calls, count = stream_by_chars(text, plan)
    content, parsed = parse(text, plan.names)
    assert count == 2 and content == "Sure."
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (p["function"]["name"], p["function"]["arguments"]) for p in parsed]
    assert json.loads(calls[0]["arguments"]) == tricky
    assert calls[1]["arguments"] == '{"city":"Oslo","unit":"C"}'  # as written, not re-serialised
    one, count = stream_by_chars(text, ToolPlan(TOOLS, parallel=False))
    assert count == 1 and list(one) == [0] and len(parse(text, plan.names, parallel=False)[1]) == 1


def test_call_stream_edge_cases() -> None:
    plan = ToolPlan(TOOLS)
    late_name = '<tool_call>\n{"arguments": {"zone": "UTC"}, "name": "get_time"}\n</tool_call>'
    calls, count = stream_by_chars(late_name, plan)  # cannot stream before the name: sent whole at the end
    assert count == 1 and calls[0] == {"name": "get_time", "arguments": '{"zone": "UTC"}'}
    unknown = '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>'
    assert stream_by_chars(unknown, plan) == ({}, 0) and parse(unknown, plan.names) == (unknown, [])
    cut = 'Hm <tool_call>\n{"name": "get_time", "arguments": {"zone": "UT'  # max_tokens cut it short
    calls, count = stream_by_chars(cut, plan)
    assert count == 1 and calls[0]["arguments"] == '{"zone": "UT' and outside(cut) == "Hm"


def test_required_grammar_takes_parallel_calls_only_when_allowed(tiny_llama3) -> None:
    from ember.engine.structured import GrammarCompiler
    from ember.loading.tokenizer import Tokenizer

    tok = Tokenizer.from_hf_folder(tiny_llama3)
    compiler = GrammarCompiler(tok, tok.vocab_size)
    call = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>'

    def accepts(text: str, parallel: bool) -> bool:
        matcher = compiler.matcher(ToolPlan(TOOLS, "required", parallel).constraint())
        return matcher.consume_tokens(tok.encode(text, add_special_tokens=False)) and matcher.is_accepting()

    assert accepts(call, True) and accepts(call + call, True) and accepts(call, False)
    assert not accepts(call + call, False) and not accepts('<tool_call>\n{"name": "get_time"}\n</tool_call>', True)
