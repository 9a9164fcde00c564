"""`ember bench soak`: a short soak of a real server on a tiny model, and its refusal of remote URLs."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from ember.bench.soak import SoakConfig, check_soak_config, is_loopback, plan_request, proc_rss
from ember.errors import InvalidParameterError
from tests.server.conftest import start_server, stop_server


def _soak(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ember.cli", "bench", "soak", *args], capture_output=True,
                          text=True, timeout=180)


def test_soak_against_a_real_server(tiny_llama3: Path, tmp_path: Path) -> None:
    srv = start_server(tiny_llama3, tmp_path)
    try:
        proc = _soak("--url", srv.url, "--minutes", "0.25", "--report-every", "5", "--concurrency", "4",
                     "--input-len", "24", "--output-len", "24", "--invalid-frac", "0.15", "--disconnect-frac", "0.15",
                     "--json")
    finally:
        stop_server(srv)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = json.loads(proc.stdout)
    assert r["benchmark"] == "soak" and r["passed"] and r["problems"] == []
    assert r["completed"] > 0 and r["failed"] == 0 and r["failures"] == {}
    assert r["expected_errors"] > 0 and set(r["expected_errors_by_status"]) <= {"400", "404"}
    assert r["disconnected"] > 0 and 0 < r["server_aborted"] <= r["disconnected"]  # hang-ups were aborted
    assert r["requests"] == r["completed"] + r["expected_errors"] + r["disconnected"]
    assert r["kv_idle_after_s"] is not None and 0 <= r["kv_idle_after_s"] <= r["idle_timeout_s"]
    assert r["kv_usage_max"] > 0 and r["running_max"] >= 1
    assert r["request_throughput"] > 0 and r["output_throughput"] > 0 and r["output_tokens"] > 0
    assert 0 < r["ttft_ms_p50"] <= r["e2e_ms_p95"] and r["e2e_ms_p50"] <= r["e2e_ms_p95"]
    assert r["rss_source"] in ("metrics", None)
    assert r["rss_growth_pct"] is None or isinstance(r["rss_growth_pct"], float)
    assert r["rss_end_mb"] is None or r["rss_end_mb"] > 10
    assert 3 <= len(r["intervals"]) <= 4  # 15 s in lines of 5 s, the last one with the drain
    assert sum(i["completed"] for i in r["intervals"]) == r["completed"]
    assert r["load_s"] == pytest.approx(15, abs=0.5)
    assert "t(s)" in proc.stderr  # interval lines go to stderr beside --json


@pytest.mark.parametrize("url", ["http://10.1.2.3:8000", "http://example.com", "https://[2001:db8::1]:8000/v1"])
def test_soak_refuses_a_remote_url(url: str) -> None:
    proc = _soak("--url", url, "--minutes", "1")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: ") and "not a loopback address" in proc.stderr
    assert "--allow-remote" in proc.stderr and "Traceback" not in proc.stderr


def test_soak_checks_its_options_before_sending() -> None:
    for host in ("127.0.0.1", "127.8.9.10", "[::1]", "localhost", "LOCALHOST."):
        assert check_soak_config(SoakConfig(f"http://{host}:8000/v1/", 1)) == f"http://{host}:8000"
    assert is_loopback("::1") and not is_loopback("localhost.example.com") and not is_loopback("0.0.0.0")
    assert check_soak_config(SoakConfig("http://10.1.2.3:8000", 1, allow_remote=True)) == "http://10.1.2.3:8000"
    for bad in (dict(minutes=0), dict(minutes=float("nan")), dict(concurrency=0), dict(report_every=0),
                dict(disconnect_frac=0.7, invalid_frac=0.5), dict(invalid_frac=-0.1), dict(pid=0)):
        with pytest.raises(InvalidParameterError):
            check_soak_config(SoakConfig("http://127.0.0.1:8000", **{"minutes": 1, **bad}))
    with pytest.raises(InvalidParameterError, match="expected http"):
        check_soak_config(SoakConfig("127.0.0.1:8000", 1))
    assert proc_rss(os.getpid()) > 10 << 20 and proc_rss(2**22 + 7) is None  # the --pid fallback
    proc = _soak("--url", "http://127.0.0.1:8000", "--minutes", "-1")
    assert proc.returncode == 2 and "--minutes" in proc.stderr and "Traceback" not in proc.stderr


def test_the_mix_is_seeded_and_varied() -> None:
    cfg = SoakConfig("http://127.0.0.1:8000", 1, disconnect_frac=0.1, invalid_frac=0.05)
    reqs = [plan_request(random.Random("0-0"), "m", cfg, 64, 128) for _ in range(2)]
    assert reqs[0] == reqs[1]
    rng = random.Random(0)
    reqs = [plan_request(rng, "m", cfg, 64, 128) for _ in range(2000)]
    assert {r.endpoint for r in reqs} == {"completions", "chat/completions"}
    assert {r.body["stream"] for r in reqs} == {True, False}
    assert 0.06 < sum(r.hangup is not None for r in reqs) / len(reqs) < 0.14
    assert all(r.body["stream"] for r in reqs if r.hangup is not None)
    assert 0.03 < sum(r.invalid is not None for r in reqs) / len(reqs) < 0.07
    assert any(r.body.get("n", 1) > 1 for r in reqs) and any("stop" in r.body for r in reqs)
    assert all(r.body["max_tokens"] <= 128 for r in reqs if not r.invalid)
    lengths = {len(r.body.get("prompt") or r.body["messages"][-1]["content"]) for r in reqs}
    assert max(lengths) > 3 * min(lengths)
