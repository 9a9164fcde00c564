"""Stopping `ember serve`: SIGTERM drains for the grace period, then (or at once, on a second signal) the
requests still running end with an error their clients can read; the process exits 0 with a clean log."""
from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.reliability.test_hostile_requests import FLAGS, LONG
from tests.server.conftest import Server, start_server


def _stream_events(server: Server, started: threading.Event, events: list[dict]) -> None:
    with httpx.stream("POST", f"{server.url}/v1/completions", json={**LONG, "stream": True}, timeout=60) as resp:
        for line in resp.iter_lines():
            if line == "data: [DONE]":
                events.append({"done": True})
            elif line.startswith("data: "):
                events.append(json.loads(line[6:]))
                started.set()


def _non_streaming(server: Server, results: list[httpx.Response]) -> None:
    results.append(httpx.post(f"{server.url}/v1/completions", json=LONG, timeout=60))


def _in_flight(server: Server) -> tuple[list[dict], list[httpx.Response], list[threading.Thread]]:
    events: list[dict] = []
    results: list[httpx.Response] = []
    started = threading.Event()
    threads = [threading.Thread(target=_stream_events, args=(server, started, events)),
               threading.Thread(target=_non_streaming, args=(server, results))]
    for t in threads:
        t.start()
    assert started.wait(30)
    time.sleep(0.3)
    return events, results, threads


def _check_cut(server: Server, events: list[dict], results: list[httpx.Response],
               threads: list[threading.Thread], within: float) -> None:
    start = time.monotonic()
    for t in threads:
        t.join(timeout=within)
    assert not any(t.is_alive() for t in threads), "requests were not ended"
    errors = [e["error"] for e in events if "error" in e]
    assert errors and errors[0]["code"] == "shutting_down" and "shut" in errors[0]["message"]
    assert events[-1] == {"done": True}
    assert results[0].status_code == 503 and results[0].json()["error"]["code"] == "shutting_down"
    assert server.proc.wait(timeout=within) == 0
    assert time.monotonic() - start < within
    log = server.log.read_text()
    assert "Traceback" not in log and "CancelledError" not in log, log[-3000:]
    assert "server stopped" in log


def test_the_grace_period_ends_requests_with_an_error(tiny_llama3: Path, tmp_path: Path) -> None:
    server = start_server(tiny_llama3, tmp_path, *FLAGS, "--shutdown-grace", "1")
    try:
        events, results, threads = _in_flight(server)
        server.proc.send_signal(signal.SIGTERM)
        _check_cut(server, events, results, threads, within=8)  # a full run would take ~6 s each, in turn
    finally:
        if server.proc.poll() is None:
            server.proc.kill()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_second_signal_stops_now(tiny_llama3: Path, tmp_path: Path, sig: int) -> None:
    server = start_server(tiny_llama3, tmp_path, *FLAGS)  # the default grace: 60 s
    try:
        events, results, threads = _in_flight(server)
        server.proc.send_signal(sig)
        time.sleep(0.3)
        server.proc.send_signal(sig)
        _check_cut(server, events, results, threads, within=5)
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
