"""`ember bench spec`: a prompt set's greedy chat completions against any OpenAI-compatible server (ember serve
with or without --speculative-config, llama-server with or without its speculation), one stream at a time
and N at once: output tok/s, the server's draft acceptance where it reports it, and the outputs themselves,
so runs can be checked to give the same text."""
from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from ember.bench.common import json_lines, machine, percentiles, read_lines
from ember.bench.serve import Result, _client, _first_model, _one
from ember.errors import InvalidParameterError

_SPEC_COUNTERS = ("ember_spec_decode_num_drafts_total", "ember_spec_decode_num_draft_tokens_total",
                  "ember_spec_decode_num_accepted_tokens_total")


def load_prompts(path: str | Path) -> list[dict[str, Any]]:
    """A JSONL prompt set: one object per line with `messages` (chat) and optionally `id`, `kind`, `max_tokens`."""
    rows = []
    for i, row in json_lines(read_lines(path, "prompt set", "prompts"), path, "prompts",
                             '; each line is a JSON object {"messages": [...]}'):
        if not isinstance(row, dict) or not isinstance(row.get("messages"), list) or not row["messages"]:
            raise InvalidParameterError(f'{path}:{i}: each line needs "messages": [{{"role", "content"}}, ...]',
                                        "prompts")
        row.setdefault("id", str(i))
        rows.append(row)
    if not rows:
        raise InvalidParameterError(f"{path} holds no prompts", "prompts")
    return rows


async def _metrics(session: Any, url: str) -> dict[str, float]:
    """The speculative-decoding counters of an ember server ({} from a server without them)."""
    try:
        async with session.get(f"{url}/metrics") as resp:
            text = await resp.text() if resp.status == 200 else ""
    except Exception:
        return {}
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in _SPEC_COUNTERS:
            out[name] = float(value)
    return out


async def _drive(url: str, model: str | None, prompts: list[dict[str, Any]], streams: int, max_tokens: int,
                 api_key: str | None) -> tuple[list[Result], float, str, dict[str, float]]:
    async with _client(api_key, fresh_connections=True) as client:
        model = model or await _first_model(client, url)
        before = await _metrics(client, url)
        results = [Result(prompt_words=0) for _ in prompts]
        queue = list(range(len(prompts)))

        async def worker() -> None:
            while queue:
                i = queue.pop(0)
                body = {"model": model, "messages": prompts[i]["messages"], "temperature": 0,
                        "max_tokens": prompts[i].get("max_tokens", max_tokens), "stream": True,
                        "stream_options": {"include_usage": True}}
                await _one(client, f"{url}/v1/chat/completions", body, results[i])

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(streams)))
        duration = time.perf_counter() - start
        after = await _metrics(client, url)
        return results, duration, model, {k: after[k] - before.get(k, 0.0) for k in after}


def _acceptance(ok: list[Result], counters: dict[str, float]) -> dict[str, Any]:
    """Drafted and accepted tokens: ember's /metrics, or llama-server's per-response timings."""
    if counters:
        drafts, drafted, accepted = (counters.get(k, 0.0) for k in _SPEC_COUNTERS)
    else:
        drafted = sum(r.timings.get("draft_n", 0) for r in ok)
        accepted = sum(r.timings.get("draft_n_accepted", 0) for r in ok)
        drafts = None
    out: dict[str, Any] = {"draft_tokens": drafted, "accepted_tokens": accepted,
                           "acceptance_rate": accepted / drafted if drafted else None}
    if drafts:
        out["mean_acceptance_length"] = 1 + accepted / drafts
    return out


def run_spec(url: str, prompts_path: str | Path, streams: int = 1, max_tokens: int = 256, model: str | None = None,
             api_key: str | None = None) -> dict[str, Any]:
    prompts = load_prompts(prompts_path)
    url = url.rstrip("/").removesuffix("/v1")
    results, duration, model, counters = asyncio.run(_drive(url, model, prompts, streams, max_tokens, api_key))
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    rates = {p["id"]: (r.output_tokens - 1) / (r.e2e - r.ttft)
             for p, r in zip(prompts, results) if r.ok and r.output_tokens > 1 and r.e2e > r.ttft}
    decode_rates = list(rates.values())
    result: dict[str, Any] = {
        "benchmark": "spec", "machine": machine(), "url": url, "model": model, "prompts": str(prompts_path),
        "num_prompts": len(prompts), "streams": streams, "max_tokens": max_tokens, "completed": len(ok),
        "failed": len(results) - len(ok), "errors": sorted({r.error for r in results if r.error})[:3],
        "duration_s": duration, "output_tokens": out_tokens,
        # All streams together, from the first request sent to the last token received.
        "output_throughput": out_tokens / duration,
        # One request's decode speed, from its first token to its last (prompt processing excluded).
        "decode_tok_s_mean": sum(decode_rates) / len(decode_rates) if decode_rates else float("nan"),
    }
    by_kind: dict[str, list[float]] = {}
    for p in prompts:
        if "kind" in p and p["id"] in rates:
            by_kind.setdefault(str(p["kind"]), []).append(rates[p["id"]])
    if by_kind:  # what speculation gains depends on how much of the answer the prompt holds
        result["decode_tok_s_by_kind"] = {k: sum(v) / len(v) for k, v in by_kind.items()}
    result.update(percentiles([r.ttft for r in ok], "ttft_ms"))
    result.update(_acceptance(ok, counters))
    result["outputs"] = {p["id"]: r.text for p, r in zip(prompts, results)}
    return result


def compare_outputs(result: dict[str, Any], reference_path: str | Path) -> dict[str, Any]:
    """How many outputs equal those of a reference run (its saved --json result)."""
    ref = json.loads(Path(reference_path).read_text())["outputs"]
    same = [k for k, v in result["outputs"].items() if ref.get(k) == v]
    return {"identical_outputs": len(same), "compared_outputs": len(result["outputs"]),
            "differing_ids": sorted(set(result["outputs"]) - set(same))[:10]}
