"""`ember eval memory`: the dialogue generator (facts planted early, asked in other words within the gap, seeded),
each condition's recall measured from what it really gives the model (SCM's Recall.turns_used, the turns
`ember chat` keeps, the streaming window), and the command on a tiny model."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from ember import LLM
from ember.apps.memory import MemoryController, MemoryOptions
from ember.bench import memory_eval as me
from ember.chat import fit_history
from ember.errors import InvalidParameterError
from tests.conftest import DATA, TEXT

SMALL = dict(min_gap=2, max_gap=4, facts=1, passage_chars=40)  # a dozen short turns at most


@pytest.fixture(scope="module")
def llm(tiny_llama3: Path) -> LLM:
    return LLM(tiny_llama3, max_num_seqs=1, max_model_len=1024)


def test_generator_plants_facts_early_and_asks_within_the_gap() -> None:
    text = (DATA / "pride-and-prejudice-ch1.txt").read_text()
    dialogues = me.generate_dialogues(text, 12, seed=3, min_gap=5, max_gap=30, facts=3)
    assert {d.asked.kind for d in dialogues} != {dialogues[0].asked.kind}  # several templates are used
    for d in dialogues:
        assert 5 <= d.gap <= 30 and len(d.turns) == d.asked.turn + d.gap
        assert len({f.kind for f in d.facts}) == len(d.facts) >= 1
        for fact in d.facts:
            assert fact.turn < me.PLANT_WITHIN
            holding = [i for i, (u, a) in enumerate(d.turns) if me.mentions(u + " " + a, fact.value)]
            assert holding == [fact.turn] and me.mentions(d.turns[fact.turn][0], fact.value)  # the user said it
            assert not me.mentions(text, fact.value)
        question = d.asked.question
        assert not me.mentions(question, d.asked.value) and question not in d.turns[d.asked.turn][0]
        assert d.messages()[-1] == {"role": "user", "content": question}
        assert len(d.messages()) == 2 * len(d.turns) + 1


def test_generator_is_seeded_and_each_dialogue_stands_alone() -> None:
    a = me.generate_dialogues(TEXT, 4, seed=7)
    assert a == me.generate_dialogues(TEXT, 4, seed=7)
    assert a[:2] == me.generate_dialogues(TEXT, 2, seed=7)  # dialogue i does not depend on how many are made
    assert a != me.generate_dialogues(TEXT, 4, seed=8)
    assert all(50 <= d.gap <= 200 for d in a)


def test_passages_and_bad_input() -> None:
    chunks = me.passages(TEXT, 120)
    assert chunks and all(len(c) <= 120 for c in chunks)
    assert not any(c.startswith(("Chapter", "CHAPTER")) and len(c.split()) < 6 for c in chunks)
    assert "Mrs. Bennet" in " ".join(chunks)  # no passage boundary after a title's full stop
    with pytest.raises(InvalidParameterError, match="min_gap"):
        me.generate_dialogues(TEXT, 1, min_gap=9, max_gap=3)
    with pytest.raises(InvalidParameterError, match="paragraphs"):
        me.generate_dialogues("One short line only here, nothing more.", 1)
    with pytest.raises(InvalidParameterError, match="condition"):
        me.parse_conditions("scm,rag")


def test_scm_recall_is_read_from_recall_turns_used(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    (d,) = me.generate_dialogues(TEXT, 1, seed=1, **SMALL)
    options = MemoryOptions(top_k=16, judge=False)  # every earlier turn retrieved, and it all fits
    result = me.evaluate(llm, [d], ["scm"], options, reply_tokens=8)
    (row,) = result["rows"]
    used = result["per_dialogue"][0]["scm"]["turns_used"]
    assert used == list(range(len(d.turns))) and row["recall"] == 1.0 and row["within_budget"]
    assert row["prompt_tokens_max"] <= llm.engine.max_model_len and row["k"] == 16
    original = MemoryController.recall

    def without_planted(self: MemoryController, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        recall = yield from original(self, *args, **kwargs)
        recall.turns_used = [i for i in recall.turns_used if i != d.asked.turn]  # the prompt still holds it
        return recall

    monkeypatch.setattr(MemoryController, "recall", without_planted)
    result = me.evaluate(llm, [d], ["scm"], options, reply_tokens=8)
    assert result["rows"][0]["recall"] == 0.0
    assert d.asked.turn not in result["per_dialogue"][0]["scm"]["turns_used"]
    json.dumps(result)


def test_truncation_keeps_what_ember_chat_keeps(llm: LLM) -> None:
    tok = llm.get_tokenizer()
    (d,) = me.generate_dialogues(TEXT, 1, seed=2, **{**SMALL, "min_gap": 6, "max_gap": 8})
    for budget in (120, 300, 2000):
        ids, kept = me.truncate(tok, d, budget)
        history = d.messages()
        assert ids == fit_history(tok, history, budget) and kept == (len(history) - 1) // 2
    result = me.evaluate(llm, [d], ["truncation"], reply_tokens=8, context=160)
    full, small = result["rows"]
    assert (full["condition"], small["condition"]) == ("truncation", "truncation@160")
    assert full["recall"] == 1.0 and full["prompt_tokens_max"] == result["history_tokens_max"]
    assert small["recall"] == 0.0 and small["prompt_tokens_max"] <= 160 - 8 and small["within_budget"]
    assert "truncation@160" in me.format_table(result)


def test_streaming_recall_is_the_window_and_missing_support_is_reported(llm: LLM, tiny_llama3: Path) -> None:
    (d,) = me.generate_dialogues(TEXT, 1, seed=4, **{**SMALL, "min_gap": 6, "max_gap": 8})
    tok = llm.get_tokenizer()
    start, end = me.planted_span(tok, d)
    ids = tok.apply_chat_template(d.messages(), tokenize=True)
    assert d.asked.value in tok.decode(ids[start:end]) and d.asked.value not in tok.decode(ids[end:])

    def unsupported(max_len: int) -> LLM:
        raise TypeError("unexpected keyword argument 'long_context'")

    result = me.evaluate(llm, [d], ["streaming"], reply_tokens=8, streaming_factory=unsupported)
    assert result["rows"] == [{"condition": "streaming", "available": False,
                               "note": "not available: unexpected keyword argument 'long_context'"}]
    assert "not available" in me.format_table(result)
    near = len(ids) - start  # a window that just reaches the planted turn, and one that just misses it
    for window, recalled in ((near, True), (len(ids) - end, False)):
        result = me.evaluate(llm, [d], ["streaming"], reply_tokens=8, streaming_factory=lambda n: LLM(
            tiny_llama3, max_num_seqs=1, max_model_len=n, long_context="streaming", attention_window=window))
        assert result["rows"][0]["recall"] == float(recalled) and result["window"] == window


def test_command_on_a_tiny_model(tiny_llama3: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ember.cli import _resolve_model

    parser = argparse.ArgumentParser(prog="ember eval")
    me.add_memory_parser(parser.add_subparsers(dest="kind"))
    out = tmp_path / "r.json"
    a = parser.parse_args(["memory", str(DATA / "pride-and-prejudice-ch1.txt"), str(tiny_llama3), "--dialogues",
                           "2", "--min-gap", "2", "--max-gap", "3", "--passage-chars", "60", "--facts", "1",
                           "--max-tokens", "4", "--conditions", "truncation,scm", "--context", "100", "--json",
                           str(out), "--max-model-len", "1024"])
    _resolve_model(a)
    assert a.func(a) == 0
    result = json.loads(out.read_text())
    assert [r["condition"] for r in result["rows"]] == ["truncation", "truncation@100", "scm"]
    assert result["dialogues"] == 2 and all(2 <= d["gap"] <= 3 for d in result["per_dialogue"])
    assert "truncation@100" in capsys.readouterr().out
