"""`ember bench soak`: minutes of steady, varied load on a running server, reported interval by interval.

Closed-loop clients (`concurrency`) each send their next request when the last ends, drawn from a seeded
mix: chat and completions, streaming or not, varied prompt and output lengths, some n > 1, some stop
strings, some sampled, some sharing a system prompt (the prefix cache); a fraction hang up mid-stream and
a fraction are invalid (they must get a 4xx: expected errors, not failures). Every `report_every` seconds
one line: requests, throughput, latency percentiles, and from the server's /metrics its RSS, KV-cache
usage and queues. After the load stops (in-flight requests get `drain_timeout`), the server must go idle:
KV usage, running and waiting back to 0 within `idle_timeout`; and its RSS must not grow by more than
`max_rss_growth_pct` from the end of the first interval (allocator warm-up) to the end of the last.
Loopback servers only, unless `allow_remote`: a soak is minutes of load.
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import urlsplit

from ember.bench.common import emit, machine, percentiles, sample_lengths, synthetic_prompt
from ember.bench.serve import _client
from ember.errors import EmberError, InvalidParameterError

LENGTH_RANGE = 0.9  # prompt and output lengths uniform in mean * (1 +- 0.9); 5% of prompts 4x longer
SYSTEM = ("You are a helpful assistant. Answer the question plainly and briefly, in full sentences, "
          "and say so when you do not know.")  # shared by half the chats: prefix-cache hits and block sharing
STOPS = (".", "\n\n", " the", ",", "!")
INVALID = (  # what any OpenAI-compatible server must refuse with a 4xx
    ("negative temperature", {"temperature": -0.5}),
    ("top_p above one", {"top_p": 1.5}),
    ("unknown model", {"model": "ember-soak-no-such-model"}),
    ("max_tokens zero", {"max_tokens": 0}),
    ("n zero", {"n": 0}),
    ("max_tokens beyond context", {"max_tokens": 10**9}),
)
GAUGES = ("ember_kv_cache_usage_perc", "ember_num_requests_running", "ember_num_requests_waiting")
SCRAPED = GAUGES + ("process_resident_memory_bytes", "ember_request_aborted_total", "ember_num_preemptions_total")
MB = 1 << 20


@dataclass
class SoakConfig:
    url: str
    minutes: float
    model: str | None = None
    concurrency: int = 8
    report_every: float = 60.0
    input_len: int = 128
    output_len: int = 64
    disconnect_frac: float = 0.1
    invalid_frac: float = 0.05
    max_rss_growth_pct: float = 10.0
    pid: int | None = None
    api_key: str | None = None
    allow_remote: bool = False
    drain_timeout: float = 120.0
    idle_timeout: float = 10.0
    seed: int = 0


@dataclass
class Req:
    endpoint: str  # "completions" or "chat/completions"
    body: dict[str, Any]
    hangup: int | None = None  # hang up after this many content chunks
    invalid: str | None = None  # what is wrong with it: a 4xx is expected


@dataclass
class Rec:
    start: float = 0.0
    end: float = 0.0
    outcome: str = ""  # ok | disconnected | expected | failed; "" while in flight
    detail: str = ""  # failure kind, or the expected error's status
    message: str = ""
    tokens: int = 0
    ttft: float | None = None
    itls: list[float] = field(default_factory=list)

    def fail(self, kind: str, message: str = "") -> None:
        self.outcome, self.detail, self.message = "failed", kind, (message or kind)[:300]


def is_loopback(host: str) -> bool:
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_soak_config(cfg: SoakConfig) -> str:
    """The base URL to use, or an InvalidParameterError naming the bad option (before any request)."""
    try:
        parts = urlsplit(cfg.url)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as e:
        raise InvalidParameterError(f"--url {cfg.url!r}: {e}", "url") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidParameterError(f"--url {cfg.url!r}: expected http://HOST:PORT", "url")
    if not (cfg.allow_remote or is_loopback(parts.hostname)):
        raise InvalidParameterError(
            f"--url {cfg.url!r}: {parts.hostname} is not a loopback address (127.0.0.0/8, ::1, localhost); a soak "
            "is minutes of load, so it only targets this machine unless --allow-remote is given", "url")
    checks = [(cfg.minutes > 0 and math.isfinite(cfg.minutes), f"--minutes {cfg.minutes}: must be > 0"),
              (cfg.concurrency >= 1, f"--concurrency {cfg.concurrency}: must be >= 1"),
              (0 < cfg.report_every < math.inf, f"--report-every {cfg.report_every}: must be > 0"),
              (cfg.input_len >= 1 and cfg.output_len >= 1, "--input-len and --output-len must be >= 1"),
              (0 <= cfg.disconnect_frac and 0 <= cfg.invalid_frac and cfg.disconnect_frac + cfg.invalid_frac <= 1,
               "--disconnect-frac and --invalid-frac must be >= 0 and sum to at most 1"),
              (cfg.max_rss_growth_pct >= 0, "--max-rss-growth-pct must be >= 0"),
              (0 <= cfg.drain_timeout < math.inf and 0 <= cfg.idle_timeout < math.inf,
               "--drain-timeout and --idle-timeout must be seconds >= 0"),
              (cfg.pid is None or cfg.pid > 0, f"--pid {cfg.pid}: must be a process id")]
    for ok, message in checks:
        if not ok:
            raise InvalidParameterError(message)
    return cfg.url.rstrip("/").removesuffix("/v1")


def plan_request(rng: random.Random, model: str, cfg: SoakConfig, max_words: int, max_out: int) -> Req:
    """One request of the mix, drawn from `rng` (each client has its own, seeded)."""
    draw = rng.random()
    chat = rng.random() < 0.5
    words = sample_lengths(rng, 1, cfg.input_len, LENGTH_RANGE)[0] * (4 if rng.random() < 0.05 else 1)
    out = sample_lengths(rng, 1, cfg.output_len, LENGTH_RANGE)[0]
    hangup = rng.randint(1, 4) if cfg.invalid_frac <= draw < cfg.invalid_frac + cfg.disconnect_frac else None
    stream = hangup is not None or rng.random() < 0.6
    text = synthetic_prompt(rng, min(words, max_words))
    body: dict[str, Any] = {"model": model, "max_tokens": min(out, max_out), "stream": stream,
                            "temperature": rng.choice((0.0, 0.0, 0.7, 1.0))}
    if chat:
        system = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.5 else []
        body["messages"] = system + [{"role": "user", "content": text}]
    else:
        body["prompt"] = text
    if stream:
        body["stream_options"] = {"include_usage": True}
    if body["temperature"]:
        body["seed"] = rng.randrange(1 << 30)
        if rng.random() < 0.5:
            body["top_p"] = 0.9
    if rng.random() < 0.5:
        body["ignore_eos"] = True
    if rng.random() < 0.1:
        body["n"] = rng.choice((2, 3))
    if rng.random() < 0.2:
        body["stop"] = rng.sample(STOPS, rng.randint(1, 2))
    req = Req("chat/completions" if chat else "completions", body, hangup)
    if draw < cfg.invalid_frac:
        req.invalid, bad = INVALID[rng.randrange(len(INVALID))]
        body.update(bad)
    return req


async def _read_stream(resp: Any, req: Req, rec: Rec) -> None:
    n = req.body.get("n", 1)
    last: dict[int, float] = {}  # choice index -> time of its latest content chunk
    finished: set[int] = set()
    chunks, done = 0, False
    async for line in resp.content:  # server-sent events, one `data: {...}` line per chunk
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            done = True
            break
        event = json.loads(data)
        if event.get("error"):
            return rec.fail(f"stream error: {event['error'].get('type')}", json.dumps(event["error"]))
        if event.get("usage"):
            rec.tokens = event["usage"].get("completion_tokens") or rec.tokens
        now = time.perf_counter()
        for choice in event.get("choices") or []:
            i = choice.get("index", 0)
            if choice.get("text") or (choice.get("delta") or {}).get("content"):
                rec.ttft = now - rec.start if rec.ttft is None else rec.ttft
                if i in last:
                    rec.itls.append(now - last[i])
                last[i], chunks = now, chunks + 1
            if choice.get("finish_reason"):
                finished.add(i)
        if req.hangup is not None and chunks >= req.hangup and len(finished) < n:
            resp.close()  # drop the connection mid-stream: the server must abort and free the request
            rec.outcome, rec.tokens = "disconnected", chunks
            return
    rec.tokens = rec.tokens or chunks
    if not done:
        rec.fail("stream ended without [DONE]")
    elif len(finished) < n:
        rec.fail("stream without a finish_reason for every choice", f"{len(finished)} of n={n} finished")
    else:
        rec.outcome = "ok"


async def send(session: Any, url: str, req: Req, rec: Rec) -> None:
    """Send one request and record how it went; failures are recorded, never raised."""
    rec.start = time.perf_counter()
    try:
        async with session.post(f"{url}/v1/{req.endpoint}", json=req.body) as resp:
            if resp.status != 200 or req.invalid:
                text = (await resp.read())[:300].decode(errors="replace")
                if req.invalid and 400 <= resp.status < 500:
                    rec.outcome, rec.detail = "expected", str(resp.status)
                elif req.invalid:
                    rec.fail(f"invalid request ({req.invalid}) got HTTP {resp.status}", text)
                else:
                    rec.fail(f"HTTP {resp.status}", text)
            elif req.body["stream"]:
                await _read_stream(resp, req, rec)
            else:
                data = await resp.json()
                if data.get("error") or len(data.get("choices") or []) != req.body.get("n", 1):
                    rec.fail("bad response body", json.dumps(data)[:300])
                else:
                    rec.outcome, rec.tokens = "ok", (data.get("usage") or {}).get("completion_tokens", 0)
    except Exception as e:  # connection refused or reset, timeouts, unparseable bodies: all failures
        rec.fail(type(e).__name__, f"{type(e).__name__}: {e}")
    finally:
        rec.end = time.perf_counter()


async def scrape(session: Any, url: str) -> dict[str, float]:
    """The gauges and counters of SCRAPED that the server's /metrics has ({} without /metrics)."""
    import aiohttp

    try:
        async with session.get(f"{url}/metrics", timeout=aiohttp.ClientTimeout(total=10)) as resp:
            if resp.status != 200:
                return {}
            text = await resp.text()
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return {}
    values: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in SCRAPED:
            try:
                values[name] = float(value)
            except ValueError:
                pass
    return values


def proc_rss(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:")), None)
    except (OSError, ValueError, IndexError):
        return None


def _pct(values: list[float], prefix: str, keys: tuple[str, ...] = ("p50", "p95")) -> dict[str, float | None]:
    stats = percentiles(values, prefix)
    return {f"{prefix}_{k}": None if math.isnan(stats[f"{prefix}_{k}"]) else stats[f"{prefix}_{k}"] for k in keys}


def _counts(recs: list[Rec]) -> dict[str, int]:
    return {o: sum(r.outcome == o for r in recs) for o in ("ok", "failed", "expected", "disconnected")}


def interval_stats(recs: list[Rec], samples: list[dict[str, float]], t_s: float, seconds: float,
                   rss: int | None) -> dict[str, Any]:
    """One report line: the requests that ended in the interval, the /metrics samples taken in it."""
    c = _counts(recs)
    ok = [r for r in recs if r.outcome == "ok"]
    tokens = sum(r.tokens for r in recs if r.outcome in ("ok", "disconnected"))
    stats: dict[str, Any] = {"t_s": round(t_s, 1), "completed": c["ok"], "failed": c["failed"],
                             "expected_errors": c["expected"], "disconnected": c["disconnected"],
                             "req_s": c["ok"] / seconds, "out_tok_s": tokens / seconds}
    stats.update(_pct([r.ttft for r in ok if r.ttft is not None], "ttft_ms"))
    stats.update(_pct([r.end - r.start for r in ok], "e2e_ms"))
    stats.update(_pct([x for r in ok for x in r.itls], "itl_ms", ("p95",)))
    stats["rss_mb"] = None if rss is None else rss / MB
    for key, name in (("kv_usage_max", GAUGES[0]), ("running_max", GAUGES[1]), ("waiting_max", GAUGES[2])):
        stats[key] = max((s[name] for s in samples if name in s), default=None)
    return stats


COLUMNS = (("t_s", "t(s)", "{:.0f}", 6), ("completed", "ok", "{}", 5), ("failed", "fail", "{}", 5),
           ("expected_errors", "4xx", "{}", 4), ("disconnected", "hup", "{}", 4), ("req_s", "req/s", "{:.2f}", 6),
           ("out_tok_s", "tok/s", "{:.1f}", 7), ("ttft_ms_p50", "ttft50", "{:.0f}", 7),
           ("ttft_ms_p95", "ttft95", "{:.0f}", 7), ("e2e_ms_p50", "e2e50", "{:.0f}", 7),
           ("e2e_ms_p95", "e2e95", "{:.0f}", 7), ("itl_ms_p95", "itl95", "{:.0f}", 6),
           ("rss_mb", "rss_MB", "{:.1f}", 8), ("kv_usage_max", "kv_max", "{:.3f}", 7),
           ("running_max", "run", "{:.0f}", 4), ("waiting_max", "wait", "{:.0f}", 5))


def table_header() -> str:
    return " ".join(f"{title:>{width}}" for _, title, _, width in COLUMNS) + "   (latencies in ms)"


def table_line(stats: dict[str, Any]) -> str:
    return " ".join(f"{'-' if stats[k] is None else fmt.format(stats[k]):>{width}}" for k, _, fmt, width in COLUMNS)


async def _model_card(session: Any, url: str) -> dict[str, Any]:
    import aiohttp

    try:
        async with session.get(f"{url}/v1/models", timeout=aiohttp.ClientTimeout(total=30)) as resp:
            if resp.status != 200:
                raise EmberError(f"{url}/v1/models answered HTTP {resp.status}: "
                                 f"{(await resp.read())[:200].decode(errors='replace')}")
            return (await resp.json())["data"][0]
    except (aiohttp.ClientError, asyncio.TimeoutError, KeyError, IndexError, ValueError) as e:
        raise EmberError(f"cannot reach an OpenAI-compatible server at {url} ({type(e).__name__}: {e}); "
                         "is it running?") from None


async def _soak(cfg: SoakConfig, url: str, progress: Callable[[str], None]) -> dict[str, Any]:
    async with _client(cfg.api_key) as session:
        card = await _model_card(session, url)
        model = cfg.model or card["id"]
        max_len = card.get("max_model_len") or 4096  # so that no valid request is too long for the context
        max_words, max_out = max(8, max_len // 10), max(1, max_len // 4)  # up to ~4 tokens a word
        before = await scrape(session, url)

        def rss_of(sample: dict[str, float]) -> int | None:
            if "process_resident_memory_bytes" in sample:
                return int(sample["process_resident_memory_bytes"])
            return proc_rss(cfg.pid) if cfg.pid else None

        rss_source = ("metrics" if "process_resident_memory_bytes" in before else
                      "pid" if cfg.pid and proc_rss(cfg.pid) is not None else None)
        records: list[Rec] = []
        unreported: list[Rec] = []
        samples: list[dict[str, float]] = []
        t0 = time.perf_counter()
        stop_at = t0 + cfg.minutes * 60

        async def client(i: int) -> None:
            rng = random.Random(f"{cfg.seed}-{i}")
            while time.perf_counter() < stop_at:
                rec = Rec()
                records.append(rec)
                try:
                    await send(session, url, plan_request(rng, model, cfg, max_words, max_out), rec)
                finally:
                    unreported.append(rec)

        async def sampler() -> None:
            while True:
                samples.append(await scrape(session, url))
                await asyncio.sleep(1.0)

        intervals: list[dict[str, Any]] = []
        rss_values: list[int | None] = []

        async def close_interval(since: float) -> float:
            now_scrape = await scrape(session, url)
            now = time.perf_counter()
            batch, unreported[:] = unreported[:], []
            window, samples[:] = samples[:] + [now_scrape], []
            rss_values.append(rss_of(now_scrape))
            intervals.append(interval_stats(batch, window, now - t0, now - since, rss_values[-1]))
            progress(table_line(intervals[-1]))
            return now

        progress(f"soak: {cfg.concurrency} clients on {url} ({model}) for {cfg.minutes:g} min, "
                 f"a line every {cfg.report_every:g} s; RSS from {rss_source or 'nowhere (unknown)'}")
        progress(table_header())
        monitor = asyncio.create_task(sampler())
        clients = [asyncio.create_task(client(i)) for i in range(cfg.concurrency)]
        since, k = t0, 1
        while t0 + k * cfg.report_every < stop_at:  # the last interval closes after the drain
            await asyncio.sleep(max(0.0, t0 + k * cfg.report_every - time.perf_counter()))
            since, k = await close_interval(since), k + 1
        _, late = await asyncio.wait(clients, timeout=max(0.0, stop_at - time.perf_counter()) + cfg.drain_timeout)
        for task in late:
            task.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
        for rec in records:
            if not rec.outcome:
                rec.fail("unfinished after the drain timeout", f"still running {cfg.drain_timeout:g} s after the "
                         "load stopped")
        drained = time.perf_counter()
        await close_interval(since)
        monitor.cancel()
        await asyncio.gather(monitor, return_exceptions=True)

        idle_after, last = None, await scrape(session, url)  # the server, left alone, must free everything
        while any(name in last for name in GAUGES):
            if all(last.get(name, 0) == 0 for name in GAUGES):
                idle_after = time.perf_counter() - drained
                break
            if time.perf_counter() - drained > cfg.idle_timeout:
                break
            await asyncio.sleep(0.2)
            last = await scrape(session, url)
        return _summary(cfg, url, model, records, intervals, rss_values, rss_source, before, last, idle_after,
                        stop_at - t0, drained - t0, drained - stop_at)


def _summary(cfg: SoakConfig, url: str, model: str, records: list[Rec], intervals: list[dict[str, Any]],
             rss_values: list[int | None], rss_source: str | None, before: dict[str, float],
             last: dict[str, float], idle_after: float | None, load_s: float, total_s: float,
             drain_s: float) -> dict[str, Any]:
    c = _counts(records)
    ok = [r for r in records if r.outcome == "ok"]
    tokens = sum(r.tokens for r in records if r.outcome in ("ok", "disconnected"))
    failures: dict[str, int] = {}
    expected: dict[str, int] = {}
    for r in records:
        if r.outcome == "failed":
            failures[r.detail] = failures.get(r.detail, 0) + 1
        elif r.outcome == "expected":
            expected[r.detail] = expected.get(r.detail, 0) + 1

    def delta(name: str) -> int | None:
        return int(last[name] - before[name]) if name in last and name in before else None

    known = [v for v in rss_values if v is not None]
    start, end = (rss_values[0], rss_values[-1]) if len(rss_values) >= 2 else (None, None)
    growth = None if start is None or end is None else end - start
    growth_pct = None if growth is None else 100 * growth / start
    result: dict[str, Any] = {
        "benchmark": "soak", "machine": machine(), "url": url, "model": model, "minutes": cfg.minutes,
        "concurrency": cfg.concurrency, "seed": cfg.seed, "report_every_s": cfg.report_every,
        "input_len": cfg.input_len, "output_len": cfg.output_len, "disconnect_frac": cfg.disconnect_frac,
        "invalid_frac": cfg.invalid_frac, "load_s": load_s, "drain_s": drain_s, "requests": len(records),
        "completed": c["ok"], "failed": c["failed"], "failures": failures,
        "error_samples": sorted({r.message for r in records if r.outcome == "failed"})[:3],
        "expected_errors": c["expected"], "expected_errors_by_status": expected, "disconnected": c["disconnected"],
        "server_aborted": delta("ember_request_aborted_total"), "preemptions": delta("ember_num_preemptions_total"),
        "request_throughput": c["ok"] / total_s, "output_throughput": tokens / total_s, "output_tokens": tokens,
    }
    result.update(_pct([r.ttft for r in ok if r.ttft is not None], "ttft_ms", ("p50", "p95", "p99")))
    result.update(_pct([r.end - r.start for r in ok], "e2e_ms", ("p50", "p95", "p99")))
    result.update(_pct([x for r in ok for x in r.itls], "itl_ms", ("p50", "p95", "p99")))
    result.update({
        "rss_source": rss_source, "rss_start_mb": None if start is None else start / MB,
        "rss_end_mb": None if end is None else end / MB, "rss_max_mb": max(known) / MB if known else None,
        "rss_growth_mb": None if growth is None else growth / MB, "rss_growth_pct": growth_pct,
        "max_rss_growth_pct": cfg.max_rss_growth_pct,
        "kv_usage_max": max((i["kv_usage_max"] for i in intervals if i["kv_usage_max"] is not None), default=None),
        "running_max": max((i["running_max"] for i in intervals if i["running_max"] is not None), default=None),
        "waiting_max": max((i["waiting_max"] for i in intervals if i["waiting_max"] is not None), default=None),
        "kv_idle_after_s": idle_after, "idle_timeout_s": cfg.idle_timeout,
    })
    problems = []
    if c["failed"]:
        problems.append(f"{c['failed']} of {len(records)} requests failed: {json.dumps(failures)}")
    if not c["ok"]:
        problems.append("no request completed")
    if any(name in last for name in GAUGES) and idle_after is None:
        state = ", ".join(f"{name} {last.get(name)}" for name in GAUGES)
        problems.append(f"the server did not go idle within {cfg.idle_timeout:g} s of the load ending: {state}")
    if growth_pct is not None and growth_pct > cfg.max_rss_growth_pct:
        problems.append(f"server RSS grew {growth / MB:.1f} MB ({growth_pct:.1f}%) from the first interval to the "
                        f"last, over --max-rss-growth-pct {cfg.max_rss_growth_pct:g}")
    notes = []
    if not any(name in last for name in GAUGES):
        notes.append("no ember_* gauges in /metrics: the idle check (KV back to 0) was skipped")
    if rss_source is None:
        notes.append("RSS unknown: no process_resident_memory_bytes in /metrics and no --pid")
    elif growth_pct is None:
        notes.append("RSS growth needs two intervals or more (--report-every shorter than the run)")
    result.update({"passed": not problems, "problems": problems, "notes": notes, "intervals": intervals})
    return result


def run_soak(cfg: SoakConfig, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Soak the server at cfg.url; `progress` gets the header and a table line per interval as they come."""
    url = check_soak_config(cfg)
    return asyncio.run(_soak(cfg, url, progress or (lambda line: None)))


def print_soak(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        emit(result, True, "ember bench soak")
        return
    emit({k: v for k, v in result.items() if k not in ("intervals", "problems", "notes", "passed")}, False,
         "ember bench soak")
    for note in result["notes"]:
        print(f"note: {note}")
    for problem in result["problems"]:
        print(f"FAIL: {problem}")
    if result["passed"]:
        checks = ["no request failed unexpectedly"]
        if result["kv_idle_after_s"] is not None:
            checks.append(f"server idle (KV usage, running, waiting 0) {result['kv_idle_after_s']:.1f} s "
                          "after the load")
        if result["rss_growth_pct"] is not None:
            checks.append(f"RSS grew {result['rss_growth_pct']:.1f}% (limit {result['max_rss_growth_pct']:g}%)")
        print("PASS: " + "; ".join(checks))


def soak_progress(as_json: bool) -> Callable[[str], None]:
    """Interval lines as they come: on stdout before the summary table, on stderr beside --json."""
    stream = sys.stderr if as_json else sys.stdout
    return lambda line: print(line, file=stream, flush=True)
