"""Structured outputs through the server with the clients people use: the `openai` client's response_format and
beta.chat.completions.parse, vLLM's guided_* and structured_outputs; streamed or not, on chat and completions;
bad constraints are a 400 naming the field, before any work. (A tiny random model: only the constraint makes
its output valid.)"""
from __future__ import annotations

import json
import re
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["colour", "count"],
          "properties": {"colour": {"enum": ["red", "green", "blue"]},
                         "count": {"type": "integer", "minimum": 0, "maximum": 99}}}
USER = [{"role": "user", "content": "Pick a colour and a count."}]


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_response_format_json_schema_streamed_or_not(server) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "pick", "schema": SCHEMA, "strict": True}}
    for seed in range(3):
        out = client(server).chat.completions.create(model=server.model, messages=USER, max_tokens=200, seed=seed,
                                                    temperature=1.0, response_format=fmt)
        assert out.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(out.choices[0].message.content), SCHEMA)
    stream = client(server).chat.completions.create(model=server.model, messages=USER, max_tokens=200, seed=7,
                                                    temperature=1.0, response_format=fmt, stream=True)
    jsonschema.validate(json.loads("".join(c.choices[0].delta.content or "" for c in stream if c.choices)), SCHEMA)


def test_openai_parse_with_a_pydantic_model(server) -> None:
    class Pick(BaseModel):
        colour: Literal["red", "green", "blue"]
        count: int = Field(ge=0, le=99)

    out = client(server).beta.chat.completions.parse(model=server.model, messages=USER, response_format=Pick,
                                                     max_tokens=200, temperature=0)
    pick = out.choices[0].message.parsed
    assert isinstance(pick, Pick) and 0 <= pick.count <= 99


def test_vllm_guided_fields_on_completions(server) -> None:
    c = client(server)
    kw = dict(model=server.model, prompt="Answer:", max_tokens=30, temperature=1.0, seed=1)
    assert c.completions.create(**kw, extra_body={"guided_choice": ["yes", "no"]}).choices[0].text in ("yes", "no")
    text = c.completions.create(**kw, extra_body={"guided_regex": r"[A-Z][a-z]{1,5}!"}).choices[0].text
    assert re.fullmatch(r"[A-Z][a-z]{1,5}!", text), text
    text = c.completions.create(**kw, extra_body={"guided_grammar": 'root ::= "up" | "down"'}).choices[0].text
    assert text in ("up", "down")
    kw["max_tokens"] = 300  # room for the whitespace a random model puts between JSON tokens
    out = c.completions.create(**kw, n=2, extra_body={"structured_outputs": {"json": SCHEMA}})
    for choice in out.choices:
        jsonschema.validate(json.loads(choice.text), SCHEMA)
    stream = c.completions.create(**kw, stream=True, extra_body={"guided_json": SCHEMA})
    jsonschema.validate(json.loads("".join(ch.choices[0].text for ch in stream if ch.choices)), SCHEMA)


@pytest.mark.parametrize("body,param,says", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format", "Invalid type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema",
     "needs json_schema.schema"),
    ({"guided_regex": "(unclosed"}, "guided_regex", "invalid regex"),
    ({"guided_json": {"type": "object"}, "guided_choice": ["a"]}, "guided_choice", "one structured-output"),
    ({"structured_outputs": {"json": SCHEMA, "regex": "a"}}, "structured_outputs", "exactly one"),
    ({"guided_decoding_backend": "xgrammar"}, "guided_decoding_backend", "not supported"),
])
def test_bad_constraints_are_a_400_naming_the_field(server, body: dict, param: str, says: str) -> None:
    resp = httpx.post(f"{server.url}/v1/chat/completions", timeout=60,
                      json={"model": server.model, "messages": USER, "max_tokens": 4, **body})
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["param"] == param and says in err["message"], err
