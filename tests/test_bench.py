"""Smoke tests of `ember bench`: each kind runs on a tiny model and prints valid JSON with every field."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.server.conftest import start_server, stop_server

PERCENTILE_FIELDS = [f"{m}_{s}" for m in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms") for s in ("mean", "p50", "p95", "p99")]


def _bench(*args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "ember.cli", "bench", *args, "--json"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_bench_throughput(tiny_llama3: Path) -> None:
    r = _bench("throughput", "--model", str(tiny_llama3), "--num-prompts", "5", "--input-len", "20",
               "--output-len", "6", "--kv-cache-memory", "0.01", "--max-model-len", "256")
    for key in ("requests_per_s", "output_tokens_per_s", "total_tokens_per_s", "elapsed_s", "machine"):
        assert key in r
    assert r["output_tokens"] == 30 and r["prompt_tokens"] == 100 and r["output_tokens_per_s"] > 0
    assert r["steps"] >= 6 and r["mean_step_ms"] > 0 and 0 < r["engine_overhead_fraction"] < 1


def test_bench_latency(tiny_llama3: Path) -> None:
    r = _bench("latency", "--model", str(tiny_llama3), "--pp", "32", "--tg", "8", "-r", "2",
               "--kv-cache-memory", "0.01", "--max-model-len", "256")
    for key in ("pp32_tok_s", "tg8_tok_s", "weight_bytes_per_token", "achieved_bandwidth_gb_s",
                "machine_read_bandwidth_gb_s", "bandwidth_fraction"):
        assert key in r and r[key] > 0
    assert r["weight_bytes_per_token"] > 64 * 64 * 4  # at least one projection's worth
    assert r["depth"] == 0 and r["kv_cache_dtype"] == "auto"


def test_bench_latency_at_depth_with_a_quantized_cache(tiny_llama3: Path) -> None:
    r = _bench("latency", str(tiny_llama3), "--pp", "16", "--tg", "8", "-r", "1", "--depth", "100",
               "--kv-cache-dtype", "int4", "--no-membw")  # MODEL positional, as every command takes it
    assert r["depth"] == 100 and r["kv_cache_dtype"] == "int4" and r["tg8_tok_s"] > 0


def test_bench_sizes_the_kv_cache_to_its_runs(tiny_llama3: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "ember.cli", "bench", "latency", str(tiny_llama3), "--pp", "40",
                           "--tg", "8", "-r", "1", "--depth", "20", "--no-membw", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "KV cache: 3 blocks of 16 tokens = 48 tokens" in proc.stderr  # max(pp + 1, depth + tg + 1) = 41
    proc = subprocess.run([sys.executable, "-m", "ember.cli", "bench", "throughput", str(tiny_llama3),
                           "--num-prompts", "3", "--input-len", "20", "--output-len", "6", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "KV cache: 6 blocks of 16 tokens = 96 tokens" in proc.stderr  # 3 sequences of 26 -> 32 tokens


def test_bench_latency_skips_a_zero_count_and_refuses_bad_ones(tiny_llama3: Path) -> None:
    r = _bench("latency", "--model", str(tiny_llama3), "--pp", "16", "--tg", "0", "-r", "1", "--no-membw")
    assert r["pp16_tok_s"] > 0 and not any(k.startswith("tg") for k in r)
    for bad in (["--pp", "0", "--tg", "0"], ["--pp", "-4"], ["--repetitions", "0"]):
        proc = subprocess.run([sys.executable, "-m", "ember.cli", "bench", "latency", "--model", str(tiny_llama3),
                               *bad], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


def test_bench_serve_against_a_real_server(tiny_llama3: Path, tmp_path: Path) -> None:
    srv = start_server(tiny_llama3, tmp_path)
    try:
        r = _bench("serve", "--url", srv.url, "--num-prompts", "6", "--input-len", "20", "--output-len", "8",
                   "--request-rate", "20", "--burstiness", "0.5")
    finally:
        stop_server(srv)
    assert r["completed"] == 6 and r["failed"] == 0 and r["output_tokens"] == 48
    for key in PERCENTILE_FIELDS + ["request_throughput", "output_throughput", "total_token_throughput",
                                    "effective_throughput_req_s", "slo_met", "duration_s"]:
        assert key in r
    assert 0 < r["ttft_ms_p50"] <= r["e2e_ms_p50"] and r["itl_ms_mean"] > 0


def test_bench_mixed_against_a_real_server(tiny_llama3: Path, tmp_path: Path) -> None:
    srv = start_server(tiny_llama3, tmp_path, "--max-num-batched-tokens", "32")
    try:
        r = _bench("mixed", "--url", srv.url, "--streams", "3", "--stream-output", "120", "--long-prompts", "2",
                   "--long-prompt-len", "60", "--interval", "0.05")
    finally:
        stop_server(srv)
    assert r["completed"] == 5 and r["failed"] == 0
    for key in ("decode_itl_ms_p95", "decode_itl_ms_max", "long_prompt_ttft_ms_p50", "output_throughput"):
        assert key in r


def test_bench_spec_and_a_speculating_server_against_the_openai_client(tiny_llama3: Path, tmp_path: Path) -> None:
    """`bench spec` on a prompt set against a server without speculation, then one whose model drafts for
    itself: the same outputs (counted by --reference), every draft accepted (read from /metrics), and the
    official client gets the same answers, streamed or not."""
    import openai

    prompts = tmp_path / "prompts.jsonl"
    text = "It is a truth universally acknowledged, that a single man in possession of a good fortune"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": text[:n]}], "max_tokens": 24,
                                           "kind": kind}) + "\n" for n, kind in ((30, "a"), (60, "b"), (90, "a"))))
    ref = tmp_path / "ref.json"
    chat = dict(messages=[{"role": "user", "content": text}], max_tokens=20, temperature=0)
    answers = []
    for spec in (None, json.dumps({"method": "draft", "model": str(tiny_llama3), "num_speculative_tokens": 3})):
        srv = start_server(tiny_llama3, tmp_path, *(["--speculative-config", spec] if spec else []))
        try:
            args = ["spec", "--url", srv.url, "--prompts", str(prompts), "--streams", "2"]
            r = _bench(*args, *(["--reference", str(ref)] if spec else ["--save-outputs", str(ref)]))
            client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x")
            whole = client.chat.completions.create(model=srv.model, **chat).choices[0].message.content
            streamed = "".join(c.choices[0].delta.content or "" for c in
                               client.chat.completions.create(model=srv.model, stream=True, **chat) if c.choices)
            answers.append((whole, streamed))
        finally:
            stop_server(srv)
        assert r["completed"] == 3 and r["failed"] == 0 and r["output_tokens"] > 0 and r["output_throughput"] > 0
    assert r["identical_outputs"] == r["compared_outputs"] == 3
    assert set(r["decode_tok_s_by_kind"]) == {"a", "b"} and min(r["decode_tok_s_by_kind"].values()) > 0
    assert r["draft_tokens"] > 0 and r["acceptance_rate"] == 1.0 and r["mean_acceptance_length"] > 1
    assert answers[0] == answers[1] and answers[0][0] == answers[0][1]


def test_bench_spec_refuses_a_bad_prompt_set(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "no messages"}\n')
    proc = subprocess.run([sys.executable, "-m", "ember.cli", "bench", "spec", "--url", "http://127.0.0.1:9",
                           "--prompts", str(bad)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and 'each line needs "messages"' in proc.stderr and "Traceback" not in proc.stderr
