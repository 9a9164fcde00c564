"""Storms against a real `ember serve`: clients leaving in every way at once, and a KV cache so small that
sequences are preempted again and again; finished outputs equal solo runs, and nothing is left behind."""
from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import httpx
import pytest

from ember import LLM, SamplingParams
from tests.reliability.test_hostile_requests import FLAGS, _wait_idle
from tests.server.conftest import Server, start_server, stop_server

PROMPTS = [f"Chapter {i}. It is a truth universally acknowledged that" for i in range(12)]


async def _stream(client: httpx.AsyncClient, url: str, body: dict, hang_up_after: int | None) -> tuple[str, bool]:
    """Stream a completion; hang up after that many chunks if asked. (text, whether it hung up)"""
    text, chunks = "", 0
    async with client.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}) as resp:
        assert resp.status_code == 200
        async for line in resp.aiter_lines():
            if not line.startswith("data: {"):
                continue
            text += json.loads(line[6:])["choices"][0]["text"]
            chunks += 1
            if hang_up_after is not None and chunks >= hang_up_after:
                return text, True
    return text, False


async def _leave_early(url: str, body: dict, seconds: float) -> None:
    """A non-streaming client that gives up (as curl --max-time)."""
    async with httpx.AsyncClient(timeout=seconds) as client:
        with pytest.raises(httpx.TimeoutException):
            await client.post(f"{url}/v1/completions", json=body)


def test_disconnect_storm(tiny_llama3: Path, tmp_path: Path) -> None:
    server = start_server(tiny_llama3, tmp_path, *FLAGS)
    rng = random.Random(7)
    finishing = {"max_tokens": 48, "temperature": 0, "ignore_eos": True}
    endless = {"max_tokens": 900, "ignore_eos": True}
    try:
        aborted = server.metric("ember_request_aborted_total")

        async def storm() -> list:
            async with httpx.AsyncClient(timeout=120) as client:
                jobs = [_stream(client, server.url, {**finishing, "prompt": p}, None) for p in PROMPTS]
                jobs += [_stream(client, server.url, {**endless, "prompt": p}, rng.randint(1, 30)) for p in PROMPTS]
                # 16 x 900 tokens take ~3 s even alone on 2 cores: these cannot finish before their clients leave
                jobs += [_leave_early(server.url, {**endless, "prompt": p, "n": 16}, rng.uniform(0.2, 1.0))
                         for p in PROMPTS[:6]]
                jobs += [_leave_early(server.url, {**endless, "prompt": PROMPTS[:3], "n": 8}, 0.5)]
                return await asyncio.gather(*jobs)

        results = asyncio.run(storm())
        offline = LLM(tiny_llama3, kv_cache_memory=0.02, max_model_len=1024)
        expected = [o.outputs[0].text for o in offline.generate(PROMPTS, SamplingParams(**finishing))]
        assert [r[0] for r in results[:12]] == expected
        assert all(r[1] for r in results[12:24])
        _wait_idle(server, 10)
        # every client that left had its request aborted: 12 streams, 6 non-streaming, 3 prompts of one
        assert server.metric("ember_request_aborted_total") - aborted == 12 + 6 + 3
        assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    finally:
        stop_server(server)


def test_preemption_storm_matches_solo_runs(tiny_llama3: Path, tmp_path: Path) -> None:
    # ~630 tokens of cache for 8 requests of ~150 tokens: sequences are preempted and recomputed over and over.
    server = start_server(tiny_llama3, tmp_path, "--kv-cache-memory", "0.0003", "--max-model-len", "256")
    params = [dict(max_tokens=120, temperature=0, ignore_eos=True) if i % 2 else
              dict(max_tokens=120, temperature=0.9, top_p=0.9, seed=100 + i, ignore_eos=True) for i in range(8)]
    try:
        async def storm() -> list[str]:
            async with httpx.AsyncClient(timeout=300) as client:
                replies = await asyncio.gather(*[client.post(f"{server.url}/v1/completions",
                                                             json={"prompt": p, **k}) for p, k in zip(PROMPTS, params)])
            assert all(r.status_code == 200 for r in replies)
            return [r.json()["choices"][0]["text"] for r in replies]

        texts = asyncio.run(storm())
        assert server.metric("ember_num_preemptions_total") >= 4
        _wait_idle(server, 10)
    finally:
        stop_server(server)
    solo = LLM(tiny_llama3, kv_cache_memory=0.01, max_model_len=256)
    expected = [solo.generate(p, SamplingParams(**k))[0].outputs[0].text for p, k in zip(PROMPTS, params)]
    assert texts == expected
