"""SCM's memory stream, stored: sessions and their turns (text, summary, embedding, token counts, and with a
dedicated embedder their sentences' vectors) in SQLite, one transaction per turn, with exact cosine search over a
session's turns or sentences and BM25 over their words (FTS5)."""
from __future__ import annotations

import re
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ember.errors import InvalidParameterError

SESSION_ID_MAX = 256
_NEXT_INDEX = "SELECT COALESCE(MAX(idx) + 1, 0) FROM turns WHERE session = ?"
SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
  id TEXT PRIMARY KEY,
  created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS turns (
  session TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
  idx INTEGER NOT NULL,
  user TEXT NOT NULL,
  assistant TEXT NOT NULL,
  summary TEXT NOT NULL,
  tokens INTEGER NOT NULL,
  summary_tokens INTEGER NOT NULL,
  embedding BLOB NOT NULL,
  created REAL NOT NULL,
  PRIMARY KEY (session, idx)
);
CREATE TABLE IF NOT EXISTS sentences (
  session TEXT NOT NULL,
  idx INTEGER NOT NULL,
  k INTEGER NOT NULL,
  embedding BLOB NOT NULL,
  PRIMARY KEY (session, idx, k),
  FOREIGN KEY (session, idx) REFERENCES turns(session, idx) ON DELETE CASCADE
);
"""
SERVED = "model"  # a session embedded by the served model (and every session of a file older than the column)
# The turns' words for BM25 (SQLite's FTS5, Porter stemming): lexical recall of names, numbers and rare words
# that a small model's embedding misses. Kept in step with `turns` inside the same transactions.
FTS = "CREATE VIRTUAL TABLE turns_fts USING fts5(session UNINDEXED, idx UNINDEXED, body, tokenize='porter unicode61')"
WORD = re.compile(r"\w+")
# Function words left out of a query: they match nearly every turn, and with them rank fusion would favour
# turns that match many of them over the one that matches the rare word. Lucene's English stop set plus
# pronouns, auxiliaries and question words.
STOP_WORDS = frozenset("""a an and are as at be but by for if in into is it no not of on or such that the their then
there these they this to was will with i me my mine we us our you your yours he him his she her hers its them
what which who whom whose when where why how do does did done am were been being have has had can could would
should shall may might must so than too very just about again also any all some from up down out over under
tell remind please know""".split())


def default_path() -> Path:
    """Where sessions live unless told otherwise: $EMBER_HOME/memory.sqlite3."""
    from ember.loading.registry import ember_home

    return ember_home() / "memory.sqlite3"


@dataclass(frozen=True)
class Turn:
    """One exchange of a conversation as memory keeps it (index: 0-based, in the order stored)."""

    index: int
    user: str
    assistant: str
    summary: str  # the model's summary of a long turn, else the exchange itself
    tokens: int  # of `text`
    summary_tokens: int  # of the summary as quoted: "[Turn i] summary"
    embedding: np.ndarray  # float32 [dim], unit length

    @property
    def text(self) -> str:
        return turn_text(self.index, self.user, self.assistant)


def turn_text(index: int, user: str, assistant: str) -> str:
    """An exchange as SCM quotes it in a prompt."""
    return f"[Turn {index}]\n\n{exchange_text(user, assistant)}"


def exchange_text(user: str, assistant: str) -> str:
    """An exchange without its turn label: what is embedded, and a short turn's summary."""
    return f"User: {user}\n\nAssistant: {assistant}"


def check_session_id(session: object) -> str:
    if not isinstance(session, str) or not session.strip() or len(session) > SESSION_ID_MAX:
        raise InvalidParameterError(f"session must be a non-empty string of at most {SESSION_ID_MAX} characters, "
                                    f"got {session!r}", "session")
    return session


class MemoryStore:
    """Sessions in one SQLite file (WAL: readers never wait for a writer; several processes may share it). A turn
    is stored in one transaction, so a process killed mid-turn leaves the turns committed before it intact.
    Usable from several threads (one connection behind a lock)."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else default_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA)
        self._add_word_index()
        self._add_embedder_column()

    def _add_embedder_column(self) -> None:
        """sessions.embedder: what embedded a session's turns (a file written before it existed: the model)."""
        with self._lock:
            columns = {r[1] for r in self._db.execute("PRAGMA table_info(sessions)")}
            if "embedder" not in columns:
                try:
                    self._db.execute(f"ALTER TABLE sessions ADD COLUMN embedder TEXT NOT NULL DEFAULT '{SERVED}'")
                except sqlite3.OperationalError:  # another process added it first
                    pass

    def _add_word_index(self) -> None:
        """Create the word index (and fill it from the turns of a file written before it existed)."""
        with self._lock:
            if self._db.execute("SELECT 1 FROM sqlite_master WHERE name = 'turns_fts'").fetchone():
                return
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if not self._db.execute("SELECT 1 FROM sqlite_master WHERE name = 'turns_fts'").fetchone():
                    self._db.execute(FTS)
                    self._db.execute("INSERT INTO turns_fts SELECT session, idx, user || ' ' || assistant FROM turns")
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "MemoryStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add_turn(self, session: str, user: str, assistant: str, summary: str, tokens: int, summary_tokens: int,
                 embedding: np.ndarray | list[float], sentences: np.ndarray | None = None, embedder: str = SERVED
                 ) -> int:
        """Store the session's next turn (creating the session), with its sentences' vectors if given (rows);
        returns its index. A session keeps the embedder that stored its first turn."""
        check_session_id(session)
        vec = _unit(embedding)
        rows = [] if sentences is None else [_unit(v).tobytes() for v in sentences]
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")  # the index is read and written under one write lock
            try:
                self._db.execute("INSERT OR IGNORE INTO sessions (id, created, embedder) VALUES (?, ?, ?)",
                                 (session, time.time(), embedder))
                check_embedder(session, self._embedder(session), embedder)
                row = self._db.execute("SELECT embedding FROM turns WHERE session = ? LIMIT 1", (session,)).fetchone()
                if row is not None and len(row[0]) != vec.nbytes:
                    raise InvalidParameterError(f"session {session!r} holds embeddings of {len(row[0]) // 4} "
                                                f"dimensions, not {vec.size}", "embedding")
                (idx,) = self._db.execute(_NEXT_INDEX, (session,)).fetchone()
                self._db.execute("INSERT INTO turns VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                 (session, idx, user, assistant, summary, tokens, summary_tokens, vec.tobytes(),
                                  time.time()))
                self._db.execute("INSERT INTO turns_fts VALUES (?, ?, ?)", (session, idx, f"{user} {assistant}"))
                self._db.executemany("INSERT INTO sentences VALUES (?, ?, ?, ?)",
                                     [(session, idx, k, v) for k, v in enumerate(rows)])
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return int(idx)

    def turns(self, session: str) -> list[Turn]:
        """The session's turns in the order stored ([] for an unknown session)."""
        check_session_id(session)
        return self._turns(session)

    def get(self, session: str, indices: list[int]) -> list[Turn]:
        """The session's turns with these indices, in index order (unknown ones left out)."""
        check_session_id(session)
        return self._turns(session, list(indices)) if indices else []

    def last_turn(self, session: str) -> Turn | None:
        """The session's newest turn (None for an unknown session)."""
        check_session_id(session)
        with self._lock:
            row = self._db.execute("SELECT MAX(idx) FROM turns WHERE session = ?", (session,)).fetchone()
        return None if row[0] is None else self._turns(session, [row[0]])[0]

    def next_index(self, session: str) -> int:
        """The index the session's next turn will get."""
        check_session_id(session)
        with self._lock:
            return int(self._db.execute(_NEXT_INDEX, (session,)).fetchone()[0])

    def _turns(self, session: str, indices: list[int] | None = None) -> list[Turn]:
        where = "" if indices is None else f" AND idx IN ({', '.join('?' * len(indices))})"
        with self._lock:
            rows = self._db.execute("SELECT idx, user, assistant, summary, tokens, summary_tokens, embedding FROM "
                                    f"turns WHERE session = ?{where} ORDER BY idx",
                                    (session, *(indices or []))).fetchall()
        return [Turn(i, u, a, s, t, st, np.frombuffer(e, dtype=np.float32)) for i, u, a, s, t, st, e in rows]

    def search(self, session: str, query: np.ndarray | list[float], k: int, before: int | None = None
               ) -> list[tuple[Turn, float]]:
        """The k turns most similar to `query` by cosine, best first; only turns with index < `before` if given.
        Exact: every candidate's embedding is scored (only the embeddings are read for it)."""
        return self._search(session, query, k, before, "turns")

    def embedder(self, session: str) -> str | None:
        """What embedded the session's turns (None for an unknown session)."""
        check_session_id(session)
        with self._lock:
            return self._embedder(session)

    def _embedder(self, session: str) -> str | None:
        row = self._db.execute("SELECT embedder FROM sessions WHERE id = ?", (session,)).fetchone()
        return None if row is None else str(row[0])

    def search_sentences(self, session: str, query: np.ndarray | list[float], k: int, before: int | None = None
                         ) -> list[tuple[Turn, float]]:
        """The k turns whose best sentence is most similar to `query` (cosine), best first, with that score;
        only turns with index < `before` if given. Exact, over every stored sentence vector."""
        return self._search(session, query, k, before, "sentences")

    def _search(self, session: str, query: np.ndarray | list[float], k: int, before: int | None, table: str
                ) -> list[tuple[Turn, float]]:
        """search / search_sentences: a turn scores its best row of `table` (turns: its one embedding)."""
        check_session_id(session)
        limit = before if before is not None else 2 ** 62
        with self._lock:
            rows = self._db.execute(f"SELECT idx, embedding FROM {table} WHERE session = ? AND idx < ? ORDER BY idx",
                                    (session, limit)).fetchall()
        if not rows or k <= 0:
            return []
        q = _unit(query)
        matrix = np.frombuffer(b"".join(e for _, e in rows), dtype=np.float32).reshape(len(rows), -1)
        if matrix.shape[1] != q.size:
            raise InvalidParameterError(f"query has {q.size} dimensions, the session's {table} {matrix.shape[1]}",
                                        "embedding")
        turns, inverse = np.unique(np.array([i for i, _ in rows]), return_inverse=True)
        best = np.full(len(turns), -np.inf, dtype=np.float32)
        np.maximum.at(best, inverse, matrix @ q)
        order = np.argsort(-best, kind="stable")[:k]
        picked = {int(turns[i]): float(best[i]) for i in order}
        found = {t.index: t for t in self._turns(session, sorted(picked))}
        return [(found[idx], score) for idx, score in picked.items()]

    def search_words(self, session: str, text: str, k: int, before: int | None = None) -> list[int]:
        """Indices of the k turns that best match the words of `text` by BM25, best first (turns with index <
        `before` if given); [] when no word matches."""
        check_session_id(session)
        words = {w.lower() for w in WORD.findall(text)} - STOP_WORDS
        if not words or k <= 0:
            return []
        query = " OR ".join('"' + w.replace('"', '""') + '"' for w in sorted(words))
        limit = before if before is not None else 2 ** 62
        with self._lock:
            rows = self._db.execute("SELECT idx FROM turns_fts WHERE turns_fts MATCH ? AND session = ? AND idx < ? "
                                    "ORDER BY bm25(turns_fts) LIMIT ?", (query, session, limit, k)).fetchall()
        return [int(r[0]) for r in rows]

    def sessions(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT id FROM sessions ORDER BY created, id")]

    def delete(self, session: str) -> bool:
        """Forget a session and its turns; False if there was none."""
        check_session_id(session)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("DELETE FROM turns_fts WHERE session = ?", (session,))
                cur = self._db.execute("DELETE FROM sessions WHERE id = ?", (session,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return cur.rowcount > 0


def check_embedder(session: str, stored: str | None, given: str) -> None:
    if stored is not None and stored != given:
        raise InvalidParameterError(f"session {session!r} was stored with the memory embedder {stored!r}, not "
                                    f"{given!r}: its vectors are not comparable; use that embedder "
                                    "(--memory-embedder) or another session", "session")


def _unit(vec: np.ndarray | list[float]) -> np.ndarray:
    v = np.asarray(vec, dtype=np.float32).reshape(-1)
    norm = float(np.linalg.norm(v))
    if v.size == 0 or not np.isfinite(norm) or norm == 0.0:
        raise InvalidParameterError("an embedding must be a non-empty, finite, non-zero vector", "embedding")
    return v / norm
