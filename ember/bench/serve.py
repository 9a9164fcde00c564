"""`ember bench serve`: streaming load against any OpenAI-compatible server (ember, llama-server, vLLM)."""
from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ember.bench.common import machine, percentiles, sample_lengths, synthetic_prompt


@dataclass
class Result:
    prompt_words: int
    ok: bool = False
    error: str = ""
    start: float = 0.0
    chunk_times: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int | None = None
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens, where the server reports it
    replica: str | None = None  # X-Ember-Replica, from `ember serve --replicas N`
    text: str = ""
    timings: dict[str, Any] = field(default_factory=dict)  # llama-server's own counters, when it sends them

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.start

    @property
    def e2e(self) -> float:
        return self.chunk_times[-1] - self.start


async def _one(session: Any, url: str, body: dict[str, Any], res: Result) -> None:
    res.start = time.perf_counter()
    try:
        async with session.post(url, json=body) as resp:
            if resp.status != 200:
                res.error = f"HTTP {resp.status}: {(await resp.read())[:200]!r}"
                return
            res.replica = resp.headers.get("x-ember-replica")
            async for line in resp.content:  # server-sent events, one `data: {...}` line per chunk
                if not line.startswith(b"data:") or line.strip() == b"data: [DONE]":
                    continue
                event = json.loads(line[5:])
                if event.get("usage"):
                    res.prompt_tokens = event["usage"].get("prompt_tokens")
                    res.cached_tokens = (event["usage"].get("prompt_tokens_details") or {}).get("cached_tokens")
                    res.output_tokens = event["usage"].get("completion_tokens") or res.output_tokens
                if event.get("timings"):
                    res.timings = event["timings"]
                for choice in event.get("choices") or []:
                    piece = choice.get("text") or (choice.get("delta") or {}).get("content")  # completions, chat
                    if piece:
                        res.chunk_times.append(time.perf_counter())
                        res.text += piece
        res.output_tokens = max(res.output_tokens, len(res.chunk_times))
        res.ok = bool(res.chunk_times)
    except Exception as e:  # a benchmark reports failures, it does not stop on them
        res.error = f"{type(e).__name__}: {e}"


def _intervals(rng: random.Random, n: int, rate: float, burstiness: float) -> list[float]:
    if rate == float("inf"):
        return [0.0] * n
    theta = 1.0 / (rate * burstiness)  # gamma with mean 1/rate; burstiness 1 = Poisson arrivals
    return [rng.gammavariate(burstiness, theta) for _ in range(n)]


def _client(api_key: str | None, fresh_connections: bool = False) -> Any:
    """An HTTP session without connection limits (the load is the point) and with long timeouts;
    fresh_connections: a new connection per request (llama-server closes a kept-alive one between a
    client's sequential requests, which aiohttp then finds dead).

    aiohttp (as vLLM's benchmark): the client shares the CPU with the server it measures, and reading
    16 streams of 128 chunks took it 0.31 s of CPU where httpx took 0.58-0.61 (measured here).
    """
    import aiohttp

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=3600),
                                 connector=aiohttp.TCPConnector(limit=0, force_close=fresh_connections))


async def _first_model(session: Any, url: str) -> str:
    async with session.get(f"{url}/v1/models") as resp:
        return (await resp.json())["data"][0]["id"]


@dataclass
class SharedPrefixes:
    """vLLM's prefix-repetition dataset: `num_prefixes` prefixes of `prefix_len` tokens (a system prompt, a
    document), each request one of them (in shuffled order) followed by its own --input-len tokens."""

    num_prefixes: int = 4
    prefix_len: int = 1000


def _prompts(rng: random.Random, lengths: list[int], shared: SharedPrefixes | None) -> list[str]:
    if shared is None:
        return [synthetic_prompt(rng, n) for n in lengths]
    heads = [synthetic_prompt(rng, shared.prefix_len) for _ in range(shared.num_prefixes)]
    order = [i % shared.num_prefixes for i in range(len(lengths))]
    rng.shuffle(order)
    return [f"{heads[k]} {synthetic_prompt(rng, n)}" for k, n in zip(order, lengths)]


async def _drive(url: str, model: str | None, num_prompts: int, input_len: int, output_len: int,
                 range_ratio: float, request_rate: float, burstiness: float, max_concurrency: int | None,
                 seed: int, api_key: str | None, shared: SharedPrefixes | None = None
                 ) -> tuple[list[Result], float, str]:
    rng = random.Random(seed)
    async with _client(api_key) as client:
        model = model or await _first_model(client, url)
        ins = sample_lengths(rng, num_prompts, input_len, range_ratio)
        outs = sample_lengths(rng, num_prompts, output_len, range_ratio)
        waits = _intervals(rng, num_prompts, request_rate, burstiness)
        prompts = _prompts(rng, ins, shared)
        sem = asyncio.Semaphore(max_concurrency or num_prompts)
        results = [Result(prompt_words=n + (shared.prefix_len if shared else 0)) for n in ins]

        async def go(i: int) -> None:
            body = {"model": model, "prompt": prompts[i], "max_tokens": outs[i],
                    "temperature": 0, "stream": True, "ignore_eos": True,
                    "stream_options": {"include_usage": True}}
            async with sem:
                await _one(client, f"{url}/v1/completions", body, results[i])

        start = time.perf_counter()
        tasks = []
        for i, wait in enumerate(waits):
            await asyncio.sleep(wait)
            tasks.append(asyncio.create_task(go(i)))
        await asyncio.gather(*tasks)
        return results, time.perf_counter() - start, model


def run_serve(url: str, model: str | None = None, num_prompts: int = 16, input_len: int = 250,
              output_len: int = 128, range_ratio: float = 0.0, request_rate: float = float("inf"),
              burstiness: float = 1.0, max_concurrency: int | None = None, seed: int = 0,
              api_key: str | None = None, slo_scale: float = 8.0, slo_gen_rate: float = 2.0,
              shared: SharedPrefixes | None = None) -> dict[str, Any]:
    url = url.rstrip("/").removesuffix("/v1")
    results, duration, model = asyncio.run(_drive(url, model, num_prompts, input_len, output_len, range_ratio,
                                                  request_rate, burstiness, max_concurrency, seed, api_key,
                                                  shared))
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    prompt_tokens = sum(r.prompt_tokens or r.prompt_words for r in ok)
    itls = [b - a for r in ok for a, b in zip(r.chunk_times, r.chunk_times[1:])]
    tpots = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    # DeepSpeed-FastGen's effective throughput, with its SLAs rescaled for CPUs by slo_scale:
    # prompt latency <= prompt_tokens / 512 * scale seconds, and generation >= slo_gen_rate tok/s.
    good = [r for r in ok if r.ttft <= (r.prompt_tokens or r.prompt_words) / 512 * slo_scale
            and (r.output_tokens <= 1 or (r.output_tokens - 1) / max(1e-9, r.e2e - r.ttft) >= slo_gen_rate)]
    result: dict[str, Any] = {
        "benchmark": "serve", "machine": machine(), "url": url, "model": model,
        "num_prompts": num_prompts, "input_len": input_len, "output_len": output_len,
        "request_rate": "inf" if request_rate == float("inf") else request_rate, "burstiness": burstiness,
        "max_concurrency": max_concurrency, "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:3], "duration_s": duration,
        "request_throughput": len(ok) / duration, "output_throughput": out_tokens / duration,
        "total_token_throughput": (out_tokens + prompt_tokens) / duration,
        "prompt_tokens": prompt_tokens, "output_tokens": out_tokens,
        "slo": {"prompt_latency_s_per_512_tokens": slo_scale, "min_generation_tok_s": slo_gen_rate},
        "slo_met": len(good), "effective_throughput_req_s": len(good) / duration,
    }
    if shared is not None:
        result["dataset"] = {"name": "prefix-repetition", "num_prefixes": shared.num_prefixes,
                             "prefix_len": shared.prefix_len, "suffix_len": input_len}
    if ok and all(r.cached_tokens is not None for r in ok):
        result["prefix_cache_hit_rate"] = sum(r.cached_tokens or 0 for r in ok) / max(1, prompt_tokens)
    if any(r.replica for r in ok):
        result["requests_per_replica"] = dict(sorted(Counter(r.replica or "?" for r in ok).items()))
    result.update(percentiles([r.ttft for r in ok], "ttft_ms"))
    result.update(percentiles(tpots, "tpot_ms"))
    result.update(percentiles(itls, "itl_ms"))
    result.update(percentiles([r.e2e for r in ok], "e2e_ms"))
    return result


async def _drive_mixed(url: str, model: str | None, streams: int, stream_output: int, prompts: int,
                       prompt_len: int, interval: float, seed: int, api_key: str | None
                       ) -> tuple[list[Result], list[Result], float, str]:
    rng = random.Random(seed)
    async with _client(api_key) as client:
        model = model or await _first_model(client, url)

        def body(words: int, out: int) -> dict[str, Any]:
            return {"model": model, "prompt": synthetic_prompt(rng, words), "max_tokens": out, "temperature": 0,
                    "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}

        decoders = [Result(prompt_words=32) for _ in range(streams)]
        longs = [Result(prompt_words=prompt_len) for _ in range(prompts)]
        start = time.perf_counter()
        tasks = [asyncio.create_task(_one(client, f"{url}/v1/completions", body(32, stream_output), r))
                 for r in decoders]
        while not all(r.chunk_times for r in decoders):  # the long prompts arrive once all decode
            await asyncio.sleep(0.05)
        for r in longs:
            await asyncio.sleep(interval)
            tasks.append(asyncio.create_task(_one(client, f"{url}/v1/completions", body(prompt_len, 16), r)))
        await asyncio.gather(*tasks)
        return decoders, longs, time.perf_counter() - start, model


def run_mixed(url: str, model: str | None = None, streams: int = 8, stream_output: int = 256, prompts: int = 4,
              prompt_len: int = 1500, interval: float = 2.0, seed: int = 0, api_key: str | None = None
              ) -> dict[str, Any]:
    """Decode streams running while long prompts arrive: does prefill stall the decodes (ITL tail)?"""
    url = url.rstrip("/").removesuffix("/v1")
    decoders, longs, duration, model = asyncio.run(_drive_mixed(
        url, model, streams, stream_output, prompts, prompt_len, interval, seed, api_key))
    ok = [r for r in decoders + longs if r.ok]
    # Inter-token gaps of the decode streams over the whole run: a prompt that stalls them shows up
    # in the tail (p95/p99/max).
    itls = [b - a for r in decoders if r.ok for a, b in zip(r.chunk_times, r.chunk_times[1:])]
    out_tokens = sum(r.output_tokens for r in ok)
    result: dict[str, Any] = {
        "benchmark": "mixed", "machine": machine(), "url": url, "model": model, "streams": streams,
        "stream_output": stream_output, "long_prompts": prompts, "long_prompt_len": prompt_len,
        "interval_s": interval, "completed": len(ok), "failed": len(decoders) + len(longs) - len(ok),
        "errors": sorted({r.error for r in decoders + longs if r.error})[:3], "duration_s": duration,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (out_tokens + sum(r.prompt_tokens or r.prompt_words for r in ok)) / duration,
    }
    result.update(percentiles(itls, "decode_itl_ms"))
    result["decode_itl_ms_max"] = max(itls, default=float("nan")) * 1000
    result.update(percentiles([r.ttft for r in longs if r.ok], "long_prompt_ttft_ms"))
    return result
