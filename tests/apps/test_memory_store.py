"""The SQLite memory stream: turns kept in order per session, across reopening; sessions never see each other's
turns; exact cosine search; deletion; concurrent writers; a process killed mid-turn loses only that turn."""
from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from ember.apps.memory_store import MemoryStore
from ember.errors import InvalidParameterError


def _vec(i: int, dim: int = 8) -> np.ndarray:
    return np.random.default_rng(i).standard_normal(dim).astype(np.float32)


def _add(store: MemoryStore, session: str, i: int, dim: int = 8) -> int:
    return store.add_turn(session, f"question {i}", f"answer {i}", f"answer {i}", 10 + i, 10 + i, _vec(i, dim))


def test_turns_persist_in_order_and_sessions_are_apart(tmp_path: Path) -> None:
    db = tmp_path / "m.sqlite3"
    with MemoryStore(db) as store:
        assert [_add(store, "a", i) for i in range(3)] == [0, 1, 2]
        assert _add(store, "b", 7) == 0
    with MemoryStore(db) as store:  # reopened, as after a restart
        turns = store.turns("a")
        assert [t.index for t in turns] == [0, 1, 2] and [t.user for t in turns] == [f"question {i}" for i in range(3)]
        assert turns[1].text == "[Turn 1]\n\nUser: question 1\n\nAssistant: answer 1"
        assert [t.user for t in store.turns("b")] == ["question 7"]
        assert store.turns("nobody") == [] and store.sessions() == ["a", "b"]
        last = store.last_turn("a")
        assert last is not None and (last.index, last.user) == (2, "question 2") and store.last_turn("nobody") is None
        assert np.array_equal(last.embedding, turns[2].embedding)
        assert store.next_index("a") == 3 and store.next_index("nobody") == 0
        assert np.isclose(np.linalg.norm(turns[0].embedding), 1.0)


def test_search_finds_the_nearest_turns_before_an_index(tmp_path: Path) -> None:
    with MemoryStore(tmp_path / "m.sqlite3") as store:
        for i in range(20):
            _add(store, "s", i)
        _add(store, "other", 5)  # the same vector in another session is never returned
        hits = store.search("s", _vec(5) + 0.01 * _vec(99), k=3)
        assert hits[0][0].index == 5 and hits[0][1] > 0.99
        assert [h[1] for h in hits] == sorted((h[1] for h in hits), reverse=True) and len(hits) == 3
        assert all(t.index < 5 for t, _ in store.search("s", _vec(5), k=4, before=5))
        assert store.search("s", _vec(5), k=0) == [] and store.search("empty", _vec(5), k=3) == []
        with pytest.raises(InvalidParameterError, match="dimensions"):
            store.search("s", _vec(5, dim=4), k=2)


def test_delete_and_bad_input(tmp_path: Path) -> None:
    with MemoryStore(tmp_path / "m.sqlite3") as store:
        _add(store, "s", 1)
        assert store.delete("s") and not store.delete("s")
        assert store.turns("s") == [] and store.sessions() == []
        assert _add(store, "s", 2) == 0  # a deleted session starts again from turn 0
        with pytest.raises(InvalidParameterError, match="session"):
            store.turns("")
        with pytest.raises(InvalidParameterError, match="embedding"):
            store.add_turn("s", "q", "a", "a", 1, 1, np.zeros(8))
        with pytest.raises(InvalidParameterError, match="8 dimensions"):
            _add(store, "s", 3, dim=4)
        assert [t.index for t in store.turns("s")] == [0]  # the refused turns left nothing behind


def test_concurrent_writers_get_distinct_indices(tmp_path: Path) -> None:
    db = tmp_path / "m.sqlite3"
    stores = [MemoryStore(db) for _ in range(2)]  # two connections, as two processes would have
    errors: list[BaseException] = []

    def write(store: MemoryStore, base: int) -> None:
        try:
            for i in range(25):
                _add(store, "shared", base + i)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(s, 100 * n)) for n, s in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert [t.index for t in stores[0].turns("shared")] == list(range(50))
    for s in stores:
        s.close()


def test_a_process_killed_mid_turn_leaves_the_committed_turns(tmp_path: Path) -> None:
    db = tmp_path / "m.sqlite3"
    with MemoryStore(db) as store:
        _add(store, "s", 0)
    # A second process stores a turn, then dies inside its next turn's transaction, before the commit.
    script = f"""
import os, numpy as np
from ember.apps.memory_store import MemoryStore
store = MemoryStore({str(db)!r})
store.add_turn("s", "q1", "a1", "a1", 1, 1, np.ones(8))
db = store._db
db.execute("BEGIN IMMEDIATE")
db.execute("INSERT INTO turns VALUES ('s', 2, 'q2', 'a2', 'a2', 1, 1, ?, 0)", (np.ones(8, np.float32).tobytes(),))
os._exit(9)
"""
    done = subprocess.run([sys.executable, "-c", script], timeout=120)
    assert done.returncode == 9
    with MemoryStore(db) as store:
        assert [t.user for t in store.turns("s")] == ["question 0", "q1"]
        assert _add(store, "s", 3) == 2
    assert sqlite3.connect(db).execute("PRAGMA integrity_check").fetchone() == ("ok",)
