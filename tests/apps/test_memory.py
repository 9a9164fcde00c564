"""SCM's controller and writer on a tiny model: the previous turn always comes, a turn whose embedding matches the
message is retrieved, the memory budget is never exceeded (judge or not), long turns get a summary shorter than
themselves, sessions persist across reopening and never see each other's turns."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ember import LLM, SamplingParams
from ember.apps.memory import Memory, MemoryController, MemoryOptions, extractive_summary
from ember.apps.memory_store import MemoryStore
from ember.apps.plan import drive
from ember.errors import InvalidParameterError
from tests.conftest import TEXT
from tests.engine.test_batching import assert_no_leaks

WORDS = TEXT.split()
REPLY = SamplingParams(max_tokens=12, temperature=0)


@pytest.fixture(scope="module")
def llm(tiny_llama3: Path) -> LLM:
    return LLM(tiny_llama3, max_num_seqs=4, max_model_len=1024)


def _fill(store: MemoryStore, llm: LLM, session: str, n: int, words: int = 20) -> None:
    for i in range(n):
        user = " ".join(WORDS[i * 7 % 100:][:words])
        store.add_turn(session, user, f"answer {i}", f"answer {i}", 4 * words, 6,
                       np.asarray(llm.embed(f"unrelated {i} " + user)[0]))


def test_recall_brings_the_previous_turn_and_the_matching_one(llm: LLM, tmp_path: Path) -> None:
    store = MemoryStore(tmp_path / "m.sqlite3")
    _fill(store, llm, "s", 8)
    message = "where did the planted fact go"
    store.add_turn("s", "the planted fact", "is here", "planted", 20, 3, np.asarray(llm.embed(message)[0]))
    _fill(store, llm, "s", 3)  # turns after the planted one; the last is the previous turn
    ctl = MemoryController(store, llm.get_tokenizer(), llm.engine.max_model_len, MemoryOptions(top_k=3, judge=False))
    recall = drive(ctl.recall("s", message), llm._run_jobs)
    assert 8 in recall.turns_used and recall.turns_used[-1] == 11  # planted, then the previous turn
    assert recall.turns_used == sorted(recall.turns_used) and len(recall.turns_used) == 4
    assert recall.messages[-1] == {"role": "user", "content": message}
    assert "the planted fact" in recall.messages[0]["content"] and "[Turn 11]" in recall.messages[0]["content"]
    assert recall.memory_tokens <= 2500
    assert_no_leaks(llm.engine)


@pytest.mark.parametrize("judge", [False, True])
def test_the_budget_is_never_exceeded(llm: LLM, tmp_path: Path, judge: bool) -> None:
    store = MemoryStore(tmp_path / "m.sqlite3")
    _fill(store, llm, "s", 12, words=60)
    for budget in (400, 250, 100):
        ctl = MemoryController(store, llm.get_tokenizer(), llm.engine.max_model_len,
                               MemoryOptions(top_k=6, budget=budget, judge=judge))
        recall = drive(ctl.recall("s", "tell me about the fortune"), llm._run_jobs)
        assert recall.memory_tokens <= budget
        assert recall.turns_used[-1] == 11
        assert all(d == "raw" or d == "summary" or d.startswith("dropped") for d in recall.decisions.values())
    assert_no_leaks(llm.engine)


def test_memory_chat_stores_turns_summarises_long_ones_and_survives_reopening(llm: LLM, tmp_path: Path) -> None:
    db = tmp_path / "m.sqlite3"
    mem = Memory(llm, db, MemoryOptions(summarize_over=40, summary_max_tokens=16))
    first = mem.chat("alice", " ".join(WORDS[:60]), REPLY)  # long: summarised
    second = mem.chat("alice", "and then?", REPLY)
    assert (first.index, second.index) == (0, 1) and first.recall.turns_used == []
    assert second.recall.turns_used == [0]
    turns = mem.turns("alice")
    assert turns[0].tokens > 40  # the long one
    for t in turns:  # a turn over summarize_over gets a summary of at most summary_max_tokens, else its text
        if t.tokens > 40:
            assert t.summary_tokens < t.tokens and mem.controller.count(t.summary) <= 16
        else:
            assert t.summary == f"User: {t.user}\n\nAssistant: {t.assistant}"
    assert mem.chat("bob", "hello", REPLY).index == 0  # another session starts apart
    mem.close()
    again = Memory(llm, db)
    assert [t.user for t in again.turns("alice")] == [" ".join(WORDS[:60]), "and then?"]
    assert [t.user for t in again.turns("bob")] == ["hello"]
    assert again.chat("bob", "more", REPLY).recall.turns_used == [0]  # bob's own turn only
    assert again.delete("alice") and again.turns("alice") == []
    again.close()
    assert_no_leaks(llm.engine)


def test_extractive_summary_and_bad_input(llm: LLM, tmp_path: Path) -> None:
    ctl = MemoryController(MemoryStore(tmp_path / "m.sqlite3"), llm.get_tokenizer(), llm.engine.max_model_len)
    text = "First sentence here. Second one follows. " * 20
    summary = extractive_summary(text, ctl, 12)
    assert summary.startswith("First sentence here.") and ctl.count(summary) <= 12
    index = drive(ctl.remember("s", "hi", "hello there"), llm._run_jobs)  # short: its own summary, no generation
    (turn,) = ctl.store.turns("s")
    assert index == 0 and turn.summary == "User: hi\n\nAssistant: hello there"
    assert ctl.count(f"[Turn 0] {turn.summary}") == turn.summary_tokens
    with pytest.raises(InvalidParameterError, match="message"):
        drive(ctl.recall("s", "  "), llm._run_jobs)
    with pytest.raises(InvalidParameterError, match="session"):
        drive(ctl.recall("", "hi"), llm._run_jobs)
    with pytest.raises(InvalidParameterError, match="budget"):
        MemoryOptions(budget=-1)


def test_words_find_a_turn_the_embedding_misses(llm: LLM, tmp_path: Path) -> None:
    """A planted turn whose embedding points away from the question but shares its rare words: BM25 brings it
    back through the fused ranking; the embedding ranking alone (lexical=False, SCM's) does not."""
    store = MemoryStore(tmp_path / "m.sqlite3")
    _fill(store, llm, "s", 10)
    message = "what is the combination of my zorblat locker"
    near = np.asarray(llm.embed(message)[0])
    away = np.random.default_rng(0).standard_normal(near.size)  # about orthogonal: other turns are far closer
    store.add_turn("s", "my zorblat locker opens with 4921", "noted", "noted", 12, 3, away)
    _fill(store, llm, "s", 12)
    for lexical, found in ((True, True), (False, False)):
        ctl = MemoryController(store, llm.get_tokenizer(), llm.engine.max_model_len,
                               MemoryOptions(top_k=3, judge=False, lexical=lexical))
        recall = drive(ctl.recall("s", message), llm._run_jobs)
        assert (10 in recall.turns_used) is found, (lexical, recall.turns_used)
        assert len(recall.turns_used) == 4


def test_the_word_index_is_built_for_an_older_file(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "m.sqlite3"
    MemoryStore(path).add_turn("s", "the harbour pilot", "ok", "ok", 3, 3, np.ones(4))
    db = sqlite3.connect(path)
    db.execute("DROP TABLE turns_fts")  # as a file written before the index existed
    db.commit()
    db.close()
    store = MemoryStore(path)
    assert store.search_words("s", "Who was the pilot?", 3) == [0]
    assert store.delete("s") and store.search_words("s", "pilot", 3) == []
