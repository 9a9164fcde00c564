"""The server under load, disconnects, bad input, auth and SIGTERM: it keeps serving and leaks nothing."""
from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import pytest

from ember import LLM, SamplingParams
from tests.server.conftest import start_server, stop_server


async def _stream(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int, stop_after: int | None,
                  on_first_chunk=None) -> tuple[str, str | None]:
    """Stream a completion; if stop_after is set, hang up after that many chunks."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True}
    text, finish, chunks = "", None, 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
        assert resp.status_code == 200
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            text += choice["text"]
            finish = choice["finish_reason"] or finish
            chunks += 1
            if chunks == 1 and on_first_chunk:
                on_first_chunk()
            if stop_after is not None and chunks >= stop_after:
                return text, "disconnected"
    return text, finish


def test_32_streams_complete_while_8_disconnect(server, tiny_llama3: Path) -> None:
    prompts = [f"Chapter {i}. It is a truth universally acknowledged that" for i in range(40)]
    before_aborted = server.metric("ember_request_aborted_total")
    before_ok = server.metric('ember_request_success_total{finished_reason="length"}') \
        if "length" in httpx.get(f"{server.url}/metrics").text else 0.0

    async def run() -> list[tuple[str, str | None]]:
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*[
                # The 8 that hang up ask for far more tokens, so they cannot finish before the hang-up lands.
                _stream(client, server.url, p, 400 if i >= 32 else 24, 4 if i >= 32 else None)
                for i, p in enumerate(prompts)])

    results = asyncio.run(run())
    offline = LLM(tiny_llama3, kv_cache_memory=0.01, max_model_len=512)
    expected = [o.outputs[0].text for o in offline.generate(
        prompts[:32], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))]
    assert [r[0] for r in results[:32]] == expected
    assert all(r[1] == "length" for r in results[:32])
    assert all(r[1] == "disconnected" for r in results[32:])
    deadline = time.monotonic() + 30  # aborts are processed by the engine thread
    while time.monotonic() < deadline and (server.metric("ember_num_requests_running") > 0 or
                                           server.metric("ember_kv_cache_usage_perc") > 0):
        time.sleep(0.2)
    assert server.metric("ember_kv_cache_usage_perc") == 0
    assert server.metric("ember_num_requests_running") == 0
    assert server.metric("ember_num_requests_waiting") == 0
    assert server.metric("ember_request_aborted_total") - before_aborted == 8
    assert server.metric('ember_request_success_total{finished_reason="length"}') - before_ok == 32
    assert server.metric("ember_time_to_first_token_seconds_count") >= 32
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}


BAD = [
    ("malformed JSON", "/v1/chat/completions", b'{"messages": [', 400, None),
    ("wrong type", "/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("negative temperature", "/v1/completions", {"prompt": "hi", "temperature": -0.5}, 400, "temperature"),
    ("top_p zero", "/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("top_p above one", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "hi"}], "top_p": 1.5}, 400, "top_p"),
    ("max_tokens zero", "/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens beyond context", "/v1/completions", {"prompt": "hi", "max_tokens": 100000}, 400, "max_tokens"),
    ("unknown model", "/v1/completions", {"model": "gpt-4", "prompt": "hi"}, 404, "model"),
    ("empty messages", "/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("prompt too long", "/v1/completions", {"prompt": "word " * 2000}, 400, "prompt"),
    ("suffix", "/v1/completions", {"prompt": "hi", "suffix": "end"}, 400, "suffix"),
    ("bad role", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, None),
]


@pytest.mark.parametrize("name,path,body,status,param", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_a_json_error_and_the_server_keeps_serving(server, name, path, body, status, param) -> None:
    kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) \
        else {"json": body}
    resp = httpx.post(f"{server.url}{path}", timeout=60, **kwargs)
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param:
        assert err["param"] is not None and err["param"].startswith(param)
    if name == "prompt too long":
        assert "tokens" in err["message"] and "512" in err["message"]
    ok = httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] in ("length", "stop")


def test_api_key_and_sigterm(tiny_llama3: Path, tmp_path: Path) -> None:
    srv = start_server(tiny_llama3, tmp_path, "--api-key", "sekret")
    try:
        body = {"prompt": "hi", "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            resp = httpx.post(f"{srv.url}/v1/completions", json=body, headers=headers)
            assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"
        good = {"Authorization": "Bearer sekret"}
        assert httpx.post(f"{srv.url}/v1/completions", json=body, headers=good).status_code == 200
        assert httpx.get(f"{srv.url}/health").status_code == 200  # health stays open for probes

        # SIGTERM mid-stream: the stream still completes, then the process exits 0.
        async def stream_then_term() -> tuple[str, str | None]:
            async with httpx.AsyncClient(timeout=120, headers=good) as client:
                return await _stream(client, srv.url, "It is a truth", 400, None,
                                     on_first_chunk=lambda: srv.proc.send_signal(15))

        text, finish = asyncio.run(stream_then_term())
        assert finish == "length" and text
        with pytest.raises(httpx.ConnectError):  # no longer accepting
            httpx.post(f"{srv.url}/v1/completions", json=body, headers=good)
        assert srv.proc.wait(timeout=60) == 0
        assert "server stopped" in srv.log.read_text()
    finally:
        if srv.proc.poll() is None:
            stop_server(srv)
