"""Tools through a chat template that renders them (Qwen2.5's, on the tiny model): the prompt equals what
transformers renders for the same messages and tools, tool calls and results in the history included; the
server uses it instead of its fallback system prompt; required calls, parallel calls and streaming work."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Iterator

import httpx
import jsonschema
import openai
import pytest

from ember.loading.tokenizer import Tokenizer
from tests.server.conftest import Server, start_server, stop_server

# Qwen2.5-Instruct's chat template (tools in the system turn, <tool_call> blocks, <tool_response> turns).
QWEN25_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

TIME = {"type": "object", "additionalProperties": False, "required": ["zone"],
        "properties": {"zone": {"enum": ["UTC", "CET"]}}}
TOOLS = [{"type": "function", "function": {"name": "get_time", "description": "The time now", "parameters": TIME}}]
USER = [{"role": "user", "content": "What time is it?"}]
HISTORY = USER + [
    {"role": "assistant", "content": "Let me look.", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": "UTC"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": "CET"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "12:00"},
    {"role": "tool", "tool_call_id": "call_2", "content": "13:00"}]


@pytest.fixture(scope="module")
def qwen_tools_model(tiny_llama3: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with Qwen2.5's tool-rendering template (its tokenizer has the same ChatML tokens)."""
    folder = tmp_path_factory.mktemp("qwen-tools") / "model"
    shutil.copytree(tiny_llama3, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": QWEN25_TEMPLATE}))
    return folder


@pytest.fixture(scope="module")
def server(qwen_tools_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(qwen_tools_model, tmp_path_factory.mktemp("tools-template"), "--max-model-len", "1024")
    yield srv
    stop_server(srv)


def hf_ids(folder: Path, messages: list[dict[str, Any]]) -> list[int]:
    """transformers' rendering, with the assistant's arguments as objects (what Hugging Face templates take)."""
    from transformers import AutoTokenizer

    hf_messages = [{**m, "tool_calls": [{**c, "function": {**c["function"],
                                                             "arguments": json.loads(c["function"]["arguments"])}}
                                        for c in m["tool_calls"]]} if m.get("tool_calls") else m for m in messages]
    return AutoTokenizer.from_pretrained(folder).apply_chat_template(hf_messages, tools=TOOLS,
                                                                     add_generation_prompt=True, tokenize=True,
                                                                     return_dict=False)


def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@pytest.mark.parametrize("messages", [USER, HISTORY], ids=["question", "calls-and-results"])
def test_prompt_is_the_templates_own(server: Server, qwen_tools_model: Path, messages: list[dict[str, Any]]) -> None:
    assert Tokenizer.from_hf_folder(qwen_tools_model).renders_tools()
    expected = hf_ids(qwen_tools_model, messages)
    tokenized = httpx.post(f"{server.url}/tokenize", json={"messages": messages, "tools": TOOLS}).json()
    assert tokenized["tokens"] == expected
    out = client(server).chat.completions.create(model=server.model, messages=messages, tools=TOOLS, max_tokens=4,
                                                temperature=0)
    assert out.usage.prompt_tokens == len(expected)  # not the fallback system prompt


def test_required_parallel_calls_stream_and_validate(server: Server) -> None:
    kw = dict(model=server.model, messages=USER, tools=TOOLS, tool_choice="required", max_tokens=200)
    for seed in range(3):
        out = client(server).chat.completions.create(temperature=1.0, seed=seed, **kw)
        calls = out.choices[0].message.tool_calls
        assert out.choices[0].finish_reason == "tool_calls" and calls
        for call in calls:
            jsonschema.validate(json.loads(call.function.arguments), TIME)
    with client(server).chat.completions.stream(temperature=0, **kw) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.tool_calls and final.choices[0].finish_reason == "tool_calls"
    one = client(server).chat.completions.create(temperature=1.0, seed=0, parallel_tool_calls=False, **kw)
    assert len(one.choices[0].message.tool_calls) == 1
