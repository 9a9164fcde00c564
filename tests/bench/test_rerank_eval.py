"""`ember eval rerank`: the BM25 first stage and its metrics checked by hand, the plumbing from input order to
ranked ids checked with fake re-rankers, reciprocal-rank fusion on a tiny example, every method on a tiny random
model, and the command (JSON, bad input, missing extra)."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from ember.apps.plan import Usage
from ember.apps.rerank import Ranking
from ember.bench.rerank import (EVAL_METHODS, Example, document_text, evaluate, first_stage, format_table,
                                load_dataset, metrics, parse_layers, parse_methods, rrf)
from ember.errors import InvalidParameterError
from tests.conftest import DATA

PAPERS = DATA / "papers-small.jsonl"
METRICS = ("mrr@10", "ndcg@10", "recall@1")


@pytest.fixture(scope="module")
def data() -> list[Example]:
    return load_dataset(PAPERS)


def _rows(result: dict) -> dict[str, dict]:
    return {row["method"]: row for row in result["rows"]}


def test_load_dataset_builds_title_dot_abstract(data: list[Example], tmp_path: Path) -> None:
    first = json.loads(PAPERS.read_text().splitlines()[0])
    assert len(data) == 24 and data[0] == Example(first["id"], f"{first['title']}. {first['abstract']}",
                                                  first["query"])
    assert document_text("Why?", "Because.") == "Why? Because." and document_text("", "Only.") == "Only."
    bad = tmp_path / "bad.jsonl"
    for text, message in (("{not json\n", "bad.jsonl:1: not JSON"),
                          ('{"id": "a", "title": "t"}\n', "expected"),
                          (PAPERS.read_text().splitlines()[0] + "\n" + PAPERS.read_text().splitlines()[0],
                           "appears twice"),
                          ("\n\n", "has no examples")):
        bad.write_text(text)
        with pytest.raises(InvalidParameterError, match=message):
            load_dataset(bad)
    with pytest.raises(InvalidParameterError, match="not found"):
        load_dataset(tmp_path / "missing.jsonl")


def test_parse_methods_and_layers() -> None:
    assert parse_methods("bm25, icr,bm25") == ["bm25", "icr"]
    assert parse_methods(",".join(EVAL_METHODS)) == list(EVAL_METHODS)
    with pytest.raises(InvalidParameterError, match="unknown method 'bm52'"):
        parse_methods("icr,bm52")
    assert parse_layers(None) is None and parse_layers("4-6,1,5") == [1, 4, 5, 6] and parse_layers("all") == "all"
    with pytest.raises(InvalidParameterError, match="layers"):
        parse_layers("1-x")


def test_rrf_on_a_tiny_example() -> None:
    # a: 1/61 + 1/63 = 0.0322664, b: 2/62 = 0.0322581, c as a: a and c tie, broken by the first ranking
    assert rrf([["a", "b", "c"], ["c", "b", "a"]]) == ["a", "c", "b"]
    assert rrf([["c", "b", "a"], ["a", "b", "c"]]) == ["c", "a", "b"]
    # an item missing from a ranking gets nothing from it: a 1/61 + 1/62 > c 1/61 > b 1/62
    assert rrf([["a", "b"], ["c", "a"]]) == ["a", "c", "b"]
    # k=0: y 1/2 + 1 > x 1 + 1/3 > z 1/3 + 1/2
    assert rrf([["x", "y", "z"], ["y", "z", "x"]], k=0) == ["y", "x", "z"]
    assert rrf([[3, 1, 2]]) == [3, 1, 2]


def test_metrics_by_hand() -> None:
    relevant = {"q1": "a", "q2": "b", "q3": "z"}
    runs = {"q1": ["a", "b", "c"], "q2": ["a", "c", "b"], "q3": ["a", "b"]}  # ranks 1, 3, missing
    got = metrics(relevant, runs)
    assert got["mrr@10"] == pytest.approx((1 + 1 / 3 + 0) / 3)
    assert got["ndcg@10"] == pytest.approx((1 + 1 / math.log2(4) + 0) / 3)
    assert got["recall@1"] == pytest.approx(1 / 3)
    # the order counts, not what a method scored: equal documents never get reordered by their ids
    assert metrics({"q": "a"}, {"q": ["b", "a"]})["mrr@10"] == pytest.approx(0.5)


def test_bm25_row_is_the_first_stage_order_by_hand(data: list[Example]) -> None:
    hits = first_stage([e.text for e in data], [e.query for e in data], 5)
    ranks = [h.index(i) + 1 if i in h else None for i, h in enumerate(hits)]
    assert None in ranks and any(r and r > 1 for r in ranks)  # the small set keeps a miss and a rank-4 hit
    result = evaluate(None, data, ["bm25"], top_k=5)
    row = _rows(result)["bm25"]
    n = len(data)
    assert row["mrr@10"] == pytest.approx(sum(1 / r for r in ranks if r) / n)
    assert row["ndcg@10"] == pytest.approx(sum(1 / math.log2(r + 1) for r in ranks if r) / n)
    assert row["recall@1"] == pytest.approx(ranks.count(1) / n)
    assert result["first_stage_recall"] == pytest.approx(sum(r is not None for r in ranks) / n)
    assert row["forward_passes_per_query"] == 0 and row["malformed"] is None
    shuffled = evaluate(None, data, ["bm25"], top_k=5, shuffle=True)
    assert _rows(shuffled)["bm25"]["mrr@10"] == row["mrr@10"]  # BM25 ranks by its own scores


def test_random_baseline_follows_the_seed(data: list[Example]) -> None:
    def random_row(seed: int) -> tuple:
        return tuple(_rows(evaluate(None, data, ["bm25"], top_k=5, seed=seed))["random"][m] for m in METRICS)

    assert random_row(0) == random_row(0)
    assert random_row(0) != random_row(1)
    for value in random_row(2):
        assert 0 <= value <= 1


class FakeLLM:
    """A re-ranker that keeps the order it is given (or reverses it), to check the plumbing exactly."""

    def __init__(self, reverse: bool = False) -> None:
        self.reverse, self.calls = reverse, []
        self.engine = SimpleNamespace(config=SimpleNamespace(num_layers=30))

    def rerank(self, query: str, documents: list[str], method: str, **options) -> object:
        self.calls.append((query, list(documents), method))
        n = len(documents)
        order = list(reversed(range(n))) if self.reverse else list(range(n))
        ranking = Ranking([float(n - order.index(i)) for i in range(n)], order)

        class Out:
            pass

        out = Out()
        out.ranking, out.usage = ranking, Usage(requests=1, prompt_tokens=10 * n, computed_tokens=n,
                                                forward_passes=2)
        return out


def test_input_order_reaches_the_method_as_documented(data: list[Example]) -> None:
    llm = FakeLLM()
    result = evaluate(llm, data, ["icr", "bm25"], top_k=5)
    assert result["layers"] == [6, 7, 8, 9]  # the default band, as scored
    plain = _rows(result)
    corpus = {e.text: e.id for e in data}
    hits = first_stage([e.text for e in data], [e.query for e in data], 5)
    calls = [c for c in llm.calls if c[0] != "warm-up"]
    assert [[corpus[d] for d in docs] for _, docs, _ in calls] == [[data[i].id for i in h] for h in hits]
    for m in METRICS:  # keeping BM25's order scores as BM25
        assert plain["icr"][m] == plain["bm25"][m]
    assert plain["icr"]["forward_passes_per_query"] == 2 and plain["icr"]["prompt_tokens_per_query"] == 50
    shuffled = _rows(evaluate(FakeLLM(), data, ["icr"], top_k=5, shuffle=True, seed=3, fuse=True))
    for m in METRICS:  # ... and keeping the shuffled order scores as the random baseline
        assert shuffled["icr"][m] == shuffled["random"][m]
        assert shuffled["bm25+icr"][m] == shuffled["bm25+random"][m]
    reversed_ = _rows(evaluate(FakeLLM(reverse=True), data, ["icr"], top_k=5))["icr"]
    ranks = [h.index(i) + 1 if i in h else None for i, h in enumerate(hits)]
    assert reversed_["mrr@10"] == pytest.approx(sum(1 / (6 - r) for r in ranks if r) / len(data))


def test_every_method_on_a_tiny_model(tiny_llama3: Path, data: list[Example]) -> None:
    from ember import LLM

    llm = LLM(tiny_llama3, max_model_len=1024)
    methods = list(EVAL_METHODS)
    result = evaluate(llm, data, methods, top_k=5, shuffle=True, fuse=True, queries=4, max_tokens_per_doc=24)
    rows = _rows(result)
    assert list(rows) == ["random", *methods, *[f"bm25+{m}" for m in ["random", *methods[:-1]]]]
    assert result["queries"] == 4 and result["corpus"] == 24 and result["top_k"] == 5
    for name, row in rows.items():
        for m in METRICS:
            assert 0 <= row[m] <= 1, (name, m)
        assert row["malformed"] is None or 0 <= row["malformed"] <= 1
    assert rows["icr"]["forward_passes_per_query"] == 2  # the query pass and the N/A pass
    assert rows["icr"]["computed_tokens_per_query"] < rows["icr"]["prompt_tokens_per_query"]  # N/A: prefix cache
    assert rows["pairwise"]["forward_passes_per_query"] == 5 * 4  # all pairs, both orders
    assert rows["pointwise"]["forward_passes_per_query"] == 5
    assert rows["embedding"]["forward_passes_per_query"] == 6  # the query and each document
    assert rows["listwise"]["malformed"] is not None and rows["icr"]["malformed"] is None
    assert all(rows[m]["seconds_per_query"] > 0 for m in methods if m != "bm25")
    table = format_table({**result, "model": "tiny"})
    assert all(name in table for name in rows) and "MRR@10" in table and "reciprocal-rank fusion" in table


def test_the_command(tiny_llama3: Path, capsys: pytest.CaptureFixture) -> None:
    from ember.cli import main, parse_args

    for argv in (["eval", "rerank", "m", "--data", "f"], ["eval", "rerank", "--data", "f", "-m", "m"]):
        assert parse_args(argv).model == "m"
    assert main(["eval", "rerank", str(tiny_llama3), "--data", str(PAPERS), "--top-k", "5", "--queries", "3",
                 "--methods", "icr,bm25", "--max-tokens-per-doc", "24", "--layers", "0-1", "--fuse",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == str(tiny_llama3) and out["methods"] == ["icr", "bm25"] and out["layers"] == [0, 1]
    assert [r["method"] for r in out["rows"]] == ["random", "icr", "bm25", "bm25+random", "bm25+icr"]
    assert main(["eval", "rerank", "--data", str(PAPERS), "--top-k", "5", "--methods", "bm25"]) == 0
    text = capsys.readouterr().out
    assert "bm25 " in text and "MRR@10" in text and "recall@5 0.958" in text


@pytest.mark.parametrize("argv,message", [
    (["--methods", "icr,colbert"], "unknown method 'colbert'"),
    (["--data", "missing.jsonl"], "data file 'missing.jsonl' not found"),
    (["--layers", "a-b"], "layers: expected numbers"),
])
def test_bad_input_is_one_line_before_the_model_loads(argv: list[str], message: str,
                                                      capsys: pytest.CaptureFixture) -> None:
    from ember.cli import main

    args = ["eval", "rerank", "no-such-model.gguf", "--data", str(PAPERS), *argv]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: {message}" or (err.startswith(f"error: {message}") and err.count("\n") == 1)


def test_a_missing_extra_names_the_install(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from ember.cli import main

    monkeypatch.setitem(sys.modules, "ir_measures", None)  # import fails as if not installed
    assert main(["eval", "rerank", "--data", str(PAPERS), "--methods", "bm25"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: the re-ranking evaluation needs ir-measures: pip install 'ember[eval]'"
