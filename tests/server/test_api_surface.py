"""Every request field is honoured or refused by name; echo + logprobs score prompts as vLLM's legacy API does;
errors name the field sent; unknown routes and methods answer OpenAI-style; /v1/models/{id} works."""
from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest

from ember import LLM, SamplingParams

CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
USER = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
# (path, field, value that asks for something ember lacks, the param the 400 names)
REFUSED = [
    (CHAT, "functions", [TOOL["function"]], "functions"),
    (CHAT, "function_call", {"name": "f"}, "function_call"),
    (CHAT, "guided_decoding_backend", "xgrammar", "guided_decoding_backend"),
    (CHAT, "audio", {"voice": "alloy", "format": "wav"}, "audio"),
    (CHAT, "modalities", ["text", "audio"], "modalities"),
    (CHAT, "prediction", {"type": "content", "content": "x"}, "prediction"),
    (COMP, "prompt_logprobs", 1, "prompt_logprobs"),
    (CHAT, "echo", True, "echo"),
    (COMP, "suffix", "end", "suffix"),
    (COMP, "best_of", 3, "best_of"),
    (CHAT, "use_beam_search", True, "use_beam_search"),
    (CHAT, "store", True, "store"),
    (CHAT, "reasoning_effort", "high", "reasoning_effort"),
    (CHAT, "stream_options", {"include_usage": True, "continuous_usage_stats": True},
     "stream_options.continuous_usage_stats"),
]
# Values that ask for nothing (the defaults): accepted.
OFF = [
    (CHAT, {"tools": [], "tool_choice": "none", "parallel_tool_calls": False, "functions": None}),
    (CHAT, {"tools": None, "tool_choice": "auto", "response_format": {"type": "text"}, "modalities": ["text"]}),
    (CHAT, {"metadata": {"k": "v"}, "store": False, "service_tier": "auto", "guided_json": None}),
    (COMP, {"suffix": "", "best_of": 2, "n": 2, "echo": False, "response_format": None}),
]


def _post(server, path: str, body: dict, **kw) -> httpx.Response:
    if path == CHAT:
        body = {"messages": USER, **body}
    else:
        body = {"prompt": "It is a truth", **body}
    return httpx.post(f"{server.url}{path}", json={"max_tokens": 2, **body}, timeout=60, **kw)


def _error(resp: httpx.Response, status: int = 400) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


@pytest.mark.parametrize("path,field,value,param", REFUSED, ids=[f"{r[0][4:]}-{r[1]}" for r in REFUSED])
def test_an_unsupported_field_is_refused_by_name(server, path: str, field: str, value: object, param: str) -> None:
    body = {"stream": True, field: value} if field == "stream_options" else {field: value}
    err = _error(_post(server, path, body))
    assert err["param"] == param and "not supported" in err["message"], err


@pytest.mark.parametrize("path,body", OFF)
def test_off_values_are_accepted(server, path: str, body: dict) -> None:
    assert _post(server, path, body).status_code == 200


def test_content_parts_and_message_fields(server) -> None:
    image = {"type": "image_url", "image_url": {"url": "data:,"}}
    err = _error(_post(server, CHAT, {"messages": [{"role": "user", "content": [image]}]}))
    assert err["param"] == "messages.0.content.0.image_url" and "not supported" in err["message"]
    err = _error(_post(server, CHAT, {"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": {}}}]}, *USER]}))
    assert err["param"] == "messages.0.tool_calls.0.function.arguments"  # OpenAI sends arguments as JSON text
    # The test model's template ignores `name`: refused rather than dropped.
    err = _error(_post(server, CHAT, {"messages": [{"role": "user", "content": "hi", "name": "ann"}]}))
    assert err["param"] == "messages.0.name" and "template" in err["message"]
    text = [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]
    assert _post(server, CHAT, {"messages": [{"role": "user", "content": text}]}).status_code == 200


def test_stream_options_need_stream(server) -> None:
    err = _error(_post(server, COMP, {"stream_options": {"include_usage": True}}))
    assert err["param"] == "stream_options" and "stream" in err["message"]


def test_unknown_fields_are_ignored_with_one_warning_and_user_is_logged(server) -> None:
    for _ in range(2):
        assert _post(server, COMP, {"frobnicate": 1, "user": "user-42"}).status_code == 200
    log = server.log.read_text()
    assert log.count("'frobnicate'") == 1, log[-2000:]
    assert "user 'user-42'" in log


def test_errors_name_the_field_sent(server) -> None:
    err = _error(_post(server, CHAT, {"logprobs": True, "top_logprobs": 50}))
    assert err["param"] == "top_logprobs" and "top_logprobs" in err["message"]
    err = _error(_post(server, CHAT, {"max_completion_tokens": 100_000, "max_tokens": None}))
    assert err["param"] == "max_completion_tokens" and err["message"].startswith("max_completion_tokens")
    err = _error(_post(server, CHAT, {"messages": [{"role": "user", "content": "word " * 600}]}))
    assert err["param"] == "messages"
    err = _error(_post(server, COMP, {"max_tokens": 0}))
    assert err["param"] == "max_tokens" and "echo" in err["message"]


def test_unknown_routes_and_methods_answer_openai_errors(server) -> None:
    err = _error(httpx.post(f"{server.url}/v1/nothing", json={}), 404)
    assert err["type"] == "invalid_request_error" and "route" in err["message"]
    resp = httpx.get(f"{server.url}{CHAT}")
    assert "POST" in resp.headers["allow"] and "method" in _error(resp, 405)["message"]
    assert _error(httpx.delete(f"{server.url}/v1/models"), 405)


def test_models_retrieve_with_the_openai_client(server) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    listed = client.models.list().data[0]
    assert client.models.retrieve(server.model).model_dump() == listed.model_dump()
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4")
    assert e.value.code == "model_not_found"


def _stream(server, body: dict) -> list[dict]:
    chunks = []
    with httpx.stream("POST", f"{server.url}{COMP}", json={**body, "stream": True}, timeout=60) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                chunks.append(json.loads(line[6:]))
    return chunks


def _joined(chunks: list[dict]) -> dict:
    """The streamed logprobs of choice 0, concatenated."""
    out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for c in chunks:
        for choice in c["choices"]:
            for k in out:
                out[k] += choice["logprobs"][k]
    return out


@pytest.fixture(scope="module")
def offline(tiny_llama3: Path) -> LLM:
    return LLM(tiny_llama3, kv_cache_memory=0.01, max_model_len=512)


def test_echo_logprobs_cover_the_prompt(server, offline: LLM) -> None:
    prompt = "It is a truth universally acknowledged"
    body = {"prompt": prompt, "max_tokens": 4, "temperature": 0, "logprobs": 2, "echo": True, "ignore_eos": True}
    resp = httpx.post(f"{server.url}{COMP}", json=body, timeout=60).json()
    choice, usage = resp["choices"][0], resp["usage"]
    lp = choice["logprobs"]
    n = usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["completion_tokens"] == 4 and all(len(lp[k]) == n for k in lp)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(isinstance(x, float) for x in lp["token_logprobs"][1:])
    assert all(2 <= len(t) <= 3 for t in lp["top_logprobs"][1:])  # the top 2 and the token itself
    assert "".join(lp["tokens"]) == choice["text"] and choice["text"].startswith(prompt)
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(n)]
    expected = offline.generate(prompt, SamplingParams(max_tokens=1, prompt_logprobs=2))[0].prompt_logprobs
    ids = offline.get_tokenizer().encode(prompt)
    assert lp["token_logprobs"][1:usage["prompt_tokens"]] == pytest.approx(
        [d[t].logprob for d, t in zip(expected[1:], ids[1:])], abs=1e-4)
    streamed = _stream(server, body)
    joined = _joined(streamed)
    assert joined["tokens"] == lp["tokens"] and joined["text_offset"] == lp["text_offset"]
    assert joined["token_logprobs"][0] is None and joined["top_logprobs"][0] is None
    assert joined["token_logprobs"][1:] == pytest.approx(lp["token_logprobs"][1:], abs=1e-5)
    assert "".join(c["choices"][0]["text"] for c in streamed) == choice["text"]


def test_max_tokens_zero_with_echo_scores_the_prompt(server) -> None:
    prompt = "It is a truth universally acknowledged"
    body = {"prompt": prompt, "max_tokens": 0, "logprobs": 1, "echo": True}
    resp = httpx.post(f"{server.url}{COMP}", json=body, timeout=60).json()
    choice = resp["choices"][0]
    assert choice["text"] == prompt and choice["finish_reason"] == "length"
    assert resp["usage"]["completion_tokens"] == 0
    assert len(choice["logprobs"]["tokens"]) == resp["usage"]["prompt_tokens"]
    assert choice["logprobs"]["token_logprobs"][0] is None
    streamed = _stream(server, body)
    assert "".join(c["choices"][0]["text"] for c in streamed) == prompt
    assert [c["choices"][0]["finish_reason"] for c in streamed][-1] == "length"
    assert _joined(streamed)["tokens"] == choice["logprobs"]["tokens"]
    plain = httpx.post(f"{server.url}{COMP}", json={"prompt": prompt, "max_tokens": 0, "echo": True}).json()
    assert plain["choices"][0]["text"] == prompt and plain["choices"][0]["logprobs"] is None
