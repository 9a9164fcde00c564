"""Memory sessions on the server: chat completions with "session" (the openai client's extra_body) store each
turn and recall earlier ones, streamed or not; a session survives a server restart; two sessions stay apart;
GET/DELETE /v1/sessions/<id>; bad requests get a 400 and store nothing."""
from __future__ import annotations

from pathlib import Path

import httpx
import openai

from tests.server.conftest import start_server, stop_server


def _chat(client: openai.OpenAI, model: str, session: str, text: str, stream: bool = False) -> dict:
    kw = dict(model=model, messages=[{"role": "user", "content": text}], max_tokens=6, temperature=0,
              extra_body={"session": session})
    if not stream:
        return client.chat.completions.create(**kw).model_dump()
    chunks = list(client.chat.completions.create(stream=True, **kw))
    memory = [c.model_extra["memory"] for c in chunks if c.model_extra and "memory" in c.model_extra]
    assert len(memory) == 1 and chunks[-1].model_extra.get("memory") == memory[0]
    return {"memory": memory[0], "text": "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)}


def test_sessions_store_recall_survive_a_restart_and_stay_apart(tiny_llama3: Path, tmp_path: Path) -> None:
    db = tmp_path / "memory.sqlite3"
    srv = start_server(tiny_llama3, tmp_path, "--memory-db", str(db))
    try:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x")
        first = _chat(client, srv.model, "s1", "My sister lives in Lisbon")
        assert first["memory"]["turns_used"] == [] and first["memory"]["turn"] == 0
        second = _chat(client, srv.model, "s1", "Where does she live?", stream=True)
        assert second["memory"]["turns_used"] == [0] and second["memory"]["turn"] == 1
        assert second["memory"]["memory_tokens"] > 0
        other = _chat(client, srv.model, "s2", "Hello")
        assert other["memory"]["turns_used"] == [] and other["memory"]["turn"] == 0
        bad = httpx.post(f"{srv.url}/v1/chat/completions", json={
            "model": srv.model, "session": "s1", "max_tokens": 4,
            "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                         {"role": "user", "content": "c"}]})
        assert bad.status_code == 400 and "only the new user message" in bad.json()["error"]["message"]
        assert httpx.get(f"{srv.url}/v1/sessions/nobody").status_code == 404
    finally:
        assert stop_server(srv) == 0
    srv = start_server(tiny_llama3, tmp_path, "--memory-db", str(db))  # restarted: the sessions are there
    try:
        got = httpx.get(f"{srv.url}/v1/sessions/s1").json()
        assert [t["user"] for t in got["turns"]] == ["My sister lives in Lisbon", "Where does she live?"]
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x")
        third = _chat(client, srv.model, "s1", "And my sister?")
        assert third["memory"]["turns_used"][-1] == 1 and third["memory"]["turn"] == 2
        gone = httpx.delete(f"{srv.url}/v1/sessions/s1")
        assert gone.status_code == 200 and gone.json()["deleted"] is True
        assert httpx.get(f"{srv.url}/v1/sessions/s1").status_code == 404
        assert httpx.delete(f"{srv.url}/v1/sessions/s1").status_code == 404
        assert [t["user"] for t in httpx.get(f"{srv.url}/v1/sessions/s2").json()["turns"]] == ["Hello"]
    finally:
        assert stop_server(srv) == 0
