"""Long-term memory with a dedicated sentence embedder (all-MiniLM-L6-v2 through sentence-transformers): a planted
fact is found by its sentence when asked about in other words, sentence vectors live and die with their turns, a
session keeps its embedder, and files written before the embedder column still open."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from ember import LLM
from ember.apps.embedder import MINILM, SentenceEmbedder, resolve_embedder, sentences
from ember.apps.memory import MemoryController, MemoryOptions
from ember.apps.memory_store import MemoryStore
from ember.apps.plan import drive
from ember.bench.memory_eval import generate_dialogues, run_scm
from ember.errors import InvalidParameterError
from tests.conftest import TEXT

pytest.importorskip("sentence_transformers")


@pytest.fixture(scope="module")
def minilm() -> SentenceEmbedder:
    embedder = resolve_embedder(MINILM)
    assert embedder is not None
    return embedder


@pytest.fixture(scope="module")
def llm(tiny_llama3: Path) -> LLM:
    return LLM(tiny_llama3, max_num_seqs=4, max_model_len=1024)


def test_paraphrased_questions_find_the_planted_turn(llm: LLM, minilm: SentenceEmbedder, tmp_path: Path) -> None:
    """Synthetic dialogues from the test text (facts stated alone or inside a shared passage, asked 20-40 turns
    later in other words): the planted turn is among those recalled in each."""
    dialogues = generate_dialogues(TEXT, 4, seed=11, min_gap=20, max_gap=40)
    options = MemoryOptions(judge=False, summarize_over=10_000)  # no model summaries: retrieval alone is tested
    for i, d in enumerate(dialogues):
        trial = run_scm(llm, d, options, 4, tmp_path / f"{i}.sqlite3", minilm)
        assert trial.recalled, (d.asked.question, d.turns[d.asked.turn][0][:120], trial.extra["turns_used"])
        assert trial.within_budget


def test_sentence_vectors_are_stored_searched_and_deleted(minilm: SentenceEmbedder, tmp_path: Path) -> None:
    store = MemoryStore(tmp_path / "m.sqlite3")
    turns = [("The weather was dull all week. Anyway, back to the book.", "Indeed."),
             ("My neighbour is called Ingrid. She moved in on Monday.", "Noted."),
             ("Here is a passage about ships and harbours.", "It is about the sea.")]
    for user, assistant in turns:
        text = f"User: {user}\n\nAssistant: {assistant}"
        vectors = minilm.embed([text, *sentences(text)])
        store.add_turn("s", user, assistant, user, 20, 5, vectors[0], vectors[1:], minilm.name)
    (query,) = minilm.embed(["What is the lady next door called?"])
    found = store.search_sentences("s", query, 1)
    assert found[0][0].index == 1 and 0 < found[0][1] <= 1
    assert [t.index for t, _ in store.search_sentences("s", query, 3, before=1)] == [0]
    assert store.embedder("s") == minilm.name
    assert store.delete("s")
    assert store._db.execute("SELECT COUNT(*) FROM sentences").fetchone()[0] == 0


def test_a_session_keeps_its_embedder(llm: LLM, minilm: SentenceEmbedder, tmp_path: Path) -> None:
    store = MemoryStore(tmp_path / "m.sqlite3")
    tok = llm.get_tokenizer()
    with_minilm = MemoryController(store, tok, 1024, MemoryOptions(judge=False), minilm)
    served = MemoryController(store, tok, 1024, MemoryOptions(judge=False))
    for n in range(2):
        drive(with_minilm.remember("s", f"hello {n}", "hi"), llm._run_jobs)
    with pytest.raises(InvalidParameterError, match="stored with the memory embedder"):
        drive(served.recall("s", "hello?"), llm._run_jobs)
    with pytest.raises(InvalidParameterError, match="stored with the memory embedder"):
        drive(served.remember("s", "more", "ok"), llm._run_jobs)
    assert len(store.turns("s")) == 2  # nothing half-written
    assert drive(with_minilm.recall("s", "hello 0?"), llm._run_jobs).turns_used


def test_a_file_from_before_the_embedder_column_opens(tmp_path: Path) -> None:
    path = tmp_path / "m.sqlite3"
    MemoryStore(path).add_turn("s", "old", "turn", "old", 3, 3, np.ones(4))
    db = sqlite3.connect(path)
    db.execute("ALTER TABLE sessions DROP COLUMN embedder")  # as a file written before it existed
    db.commit()
    db.close()
    store = MemoryStore(path)
    assert store.embedder("s") == "model" and store.turns("s")[0].user == "old"


def test_bad_embedder_choices_are_refused(tmp_path: Path) -> None:
    import argparse

    from ember.apps.embedder import check_choice

    assert check_choice("model") == "model" and check_choice("minilm") == "minilm"
    with pytest.raises(argparse.ArgumentTypeError, match="neither"):
        check_choice(str(tmp_path / "missing"))
    assert resolve_embedder("model") is None
    with pytest.raises(InvalidParameterError):
        sentences("  \n ")
