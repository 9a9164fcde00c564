"""`ember serve --replicas 2`: a real local Ray cluster, two engine replicas on the tiny model, the `openai`
client; the same text as one process, both replicas under load, shared prefixes sticking to a replica, a killed
replica replaced while the service keeps answering, SIGTERM draining. (One cluster for the module: Ray takes
~30 s to start on two cores.)"""
from __future__ import annotations

import concurrent.futures as cf
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import Server, free_port

pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")

KEY = "test-key"
HEADERS = {"Authorization": f"Bearer {KEY}"}


def replicas_reporting(url: str) -> list[str]:
    """The replicas whose metrics the ingress holds (each reports every second; a dead one drops out)."""
    text = httpx.get(f"{url}/metrics", headers=HEADERS, timeout=10).text
    return sorted(set(re.findall(r'^ember_num_requests_running\{replica="([^"]+)"\}', text, re.M)))


def replica_pids(log: Path) -> dict[str, int]:
    """Each replica's process, from its "ready" line in the server's output."""
    found = re.findall(r"replica (EmberEngine#\w+) ready \(\d+ torch threads, pid (\d+)\)", log.read_text())
    return {name: int(pid) for name, pid in found}


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def cluster(tiny_llama3: Path, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("ray")
    port, log = free_port(), tmp / "server.log"
    cmd = [sys.executable, "-m", "ember.cli", "serve", str(tiny_llama3), "--port", str(port), "--replicas", "2",
           "--api-key", KEY, "--kv-cache-memory", "0.05", "--max-model-len", "1024", "--shutdown-grace", "30",
           "--memory-db", str(tmp / "memory.sqlite3")]
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    srv = Server(f"http://127.0.0.1:{port}", proc, tiny_llama3.name, log)


    def up() -> bool:
        assert proc.poll() is None, f"server exited:\n{log.read_text()[-3000:]}"
        return len(replicas_reporting(srv.url)) == 2

    try:
        wait_for(up, 300, "two replicas")
        yield srv
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def client(srv: Server) -> "openai.OpenAI":
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def chat(srv: Server, messages: list[dict], **kw):
    raw = client(srv).chat.completions.with_raw_response.create(model=srv.model, messages=messages, **kw)
    return raw.headers["x-ember-replica"], raw.parse()


def test_same_greedy_text_as_one_process(cluster: Server, tiny_llama3: Path) -> None:
    from ember import LLM, SamplingParams

    messages = [{"role": "user", "content": "It is a truth universally acknowledged"}]
    llm = LLM(str(tiny_llama3), max_model_len=512, kv_cache_memory=0.02)
    expected = llm.chat(messages, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0].outputs[0].text
    replica, out = chat(cluster, messages, max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    assert replica.startswith("EmberEngine#") and out.choices[0].message.content == expected
    stream = client(cluster).chat.completions.create(model=cluster.model, messages=messages, max_tokens=24,
                                                     temperature=0, stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected
    completion = client(cluster).completions.create(model=cluster.model, prompt="It is a truth", max_tokens=8,
                                                    temperature=0, extra_body={"ignore_eos": True})
    assert completion.choices[0].text == llm.generate("It is a truth", SamplingParams(
        max_tokens=8, temperature=0, ignore_eos=True))[0].outputs[0].text


def test_api_key_and_errors_pass_through(cluster: Server) -> None:
    assert httpx.get(f"{cluster.url}/v1/models").status_code == 401
    assert httpx.get(f"{cluster.url}/health").status_code == 200
    page = httpx.get(f"{cluster.url}/")  # the chat page, served by the ingress itself, open without the key
    assert page.status_code == 200 and "ember chat" in page.text and "x-ember-replica" not in page.headers
    bad = httpx.post(f"{cluster.url}/v1/chat/completions", headers=HEADERS,
                     json={"model": cluster.model, "messages": [], "max_tokens": 4})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages"
    assert bad.headers["x-ember-replica"].startswith("EmberEngine#")


def test_both_replicas_serve_concurrent_load(cluster: Server) -> None:
    def one(i: int) -> str:
        return chat(cluster, [{"role": "user", "content": f"{i} " * 20 + "tell me a story"}], max_tokens=32,
                    temperature=0, extra_body={"ignore_eos": True})[0]

    with cf.ThreadPoolExecutor(12) as pool:
        served = list(pool.map(one, range(12)))
    assert len(set(served)) == 2


def test_shared_prefixes_stick_to_one_replica(cluster: Server) -> None:
    homes = {}
    for name in ("pirate", "poet"):
        system = f"You are a {name}. " + "Answer briefly and stay in character. " * 12
        seen = [chat(cluster, [{"role": "system", "content": system}, {"role": "user", "content": f"Question {q}?"}],
                     max_tokens=2, temperature=0) for q in range(5)]
        homes[name] = {replica for replica, _ in seen}
        assert len(homes[name]) == 1
        assert all(out.usage.prompt_tokens_details.cached_tokens > 0 for _, out in seen[1:])
    turns = [chat(cluster, [{"role": "user", "content": f"turn {i}: my name is Ann"}], max_tokens=4,
                  extra_body={"session": "ann"}) for i in range(3)]
    assert len({replica for replica, _ in turns}) == 1  # a memory session sticks too
    stored = httpx.get(f"{cluster.url}/v1/sessions/ann", headers=HEADERS).json()
    assert len(stored["turns"]) == 3


def test_metrics_merge_the_replicas(cluster: Server) -> None:
    time.sleep(1.5)  # the replicas' latest counts arrive within a second
    text = httpx.get(f"{cluster.url}/metrics", headers=HEADERS).text
    assert re.search(r"^ember_replicas 2$", text, re.M)
    names = set(re.findall(r'ember_generation_tokens_total\{replica="(EmberEngine#\w+)"\}', text))
    assert len(names) == 2
    assert "prefix" in re.findall(r'^ember_routed_requests_total\{replica="[^"]+",reason="([\w-]+)"\}', text, re.M)


def test_killed_replica_is_retried_then_replaced(cluster: Server) -> None:
    prefix = "A long shared document about ships and the sea. " * 4
    victim, _ = chat(cluster, [{"role": "user", "content": prefix + "warm-up"}], max_tokens=1)
    pid = wait_for(lambda: replica_pids(cluster.log).get(victim), 30, "the replica's pid in the log")  # (lags)
    long_kw = dict(max_tokens=800, temperature=0, extra_body={"ignore_eos": True})
    with cf.ThreadPoolExecutor(2) as pool:
        stream = client(cluster).chat.completions.create(
            model=cluster.model, messages=[{"role": "user", "content": prefix + "stream"}], stream=True, **long_kw)
        pending = pool.submit(chat, cluster, [{"role": "user", "content": prefix + "whole"}], **long_kw)
        chunks = iter(stream)
        for _ in range(5):
            next(chunks)  # generating on the victim (the prefix routes there)
        time.sleep(0.3)
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(openai.APIError, match="died while streaming"):
            for _ in chunks:
                pass
        replica, out = pending.result(timeout=120)  # nothing was sent yet: retried on the live replica
    assert replica != victim and out.choices[0].finish_reason == "length"
    for i in range(4):  # meanwhile, new requests are answered
        assert chat(cluster, [{"role": "user", "content": f"after {i}"}], max_tokens=2)[0] != victim

    def replaced() -> bool:
        live = replicas_reporting(cluster.url)
        return len(live) == 2 and victim not in live

    wait_for(replaced, 180, "a replacement replica")
    wait_for(lambda: len(replica_pids(cluster.log)) == 3, 30, "the replacement's ready line")


def test_sigterm_drains_every_replica(cluster: Server) -> None:
    """Last: stops the module's cluster."""
    stream = client(cluster).completions.create(model=cluster.model, prompt="Once upon a time", max_tokens=800,
                                                temperature=0, stream=True, extra_body={"ignore_eos": True})
    chunks = iter(stream)
    next(chunks)
    cluster.proc.send_signal(signal.SIGTERM)
    for _ in range(40):  # until the drain begins (the signal is seen within half a second)
        refused = httpx.post(f"{cluster.url}/v1/completions", headers=HEADERS,
                             json={"model": cluster.model, "prompt": "new", "max_tokens": 1})
        if refused.status_code != 200:
            break
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
    rest = list(chunks)
    assert rest[-1].choices[0].finish_reason == "length"  # finished, not cut
    assert cluster.proc.wait(timeout=90) == 0


def test_replicas_without_ray_say_how_to_install(tiny_llama3: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture) -> None:
    from ember.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)
    assert main(["serve", str(tiny_llama3), "--replicas", "2", "--port", str(free_port())]) == 2
    assert "pip install 'ember[ray]'" in capsys.readouterr().err
