"""`ember rerank`: the ranking the API computes, printed as a table or in the rerank API's JSON shape; documents from
arguments or a JSON-lines file; bad input is a one-line error and exit code 2, never a traceback."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ember import LLM
from ember.cli import main, parse_args
from tests.conftest import TEXT

QUERY = "Who is the new tenant of Netherfield Park?"
DOCS = [TEXT[0:160], TEXT[900:1000], TEXT[2000:2200], TEXT[3100:3180]]


def _ember(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ember.cli", *args], capture_output=True, text=True, input=stdin,
                          timeout=300, env=dict(os.environ))


def _json(capsys: pytest.CaptureFixture, argv: list[str]) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("method", ["icr", "embedding"])
def test_json_is_the_rerank_api_shape_and_matches_llm_rerank(tiny_llama3: Path, method: str,
                                                             capsys: pytest.CaptureFixture) -> None:
    out = _json(capsys, ["rerank", QUERY, *DOCS, "-m", str(tiny_llama3), "--method", method, "--json"])
    expected = LLM(tiny_llama3, max_model_len=1024).rerank(QUERY, DOCS, method=method)
    assert [r["index"] for r in out["results"]] == [r.index for r in expected.results]
    assert [r["relevance_score"] for r in out["results"]] == pytest.approx(
        [r.relevance_score for r in expected.results], rel=1e-4, abs=1e-6)
    assert all(set(r) == {"index", "relevance_score", "document"} for r in out["results"])
    assert [r["document"]["text"] for r in out["results"]] == [DOCS[r["index"]] for r in out["results"]]
    usage = out["usage"]
    assert usage["prompt_tokens"] == expected.usage.prompt_tokens and usage["total_tokens"] >= usage["prompt_tokens"]
    assert usage["forward_passes"] == (2 if method == "icr" else len(DOCS) + 1)
    assert out["method"] == method and out["meta"]["windows"] == 1


def test_table_top_n_and_documents_file(tiny_llama3: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps(DOCS[0]) + "\n\n" + json.dumps({"text": DOCS[1]}) + "\n"
                    + json.dumps({"title": "Netherfield", "abstract": DOCS[2]}) + "\n")
    out = _json(capsys, ["rerank", QUERY, "--docs", str(docs), "-m", str(tiny_llama3), "--json"])
    assert sorted(r["document"]["text"] for r in out["results"]) == sorted(
        [DOCS[0], DOCS[1], f"Netherfield. {DOCS[2]}"])
    assert main(["rerank", QUERY, *DOCS, "--model", str(tiny_llama3), "--top-n", "2"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0].split() == ["rank", "index", "score", "document"] and len(lines) == 3
    rank, index, _score, *words = lines[1].split()
    assert rank == "1" and " ".join(words).startswith(" ".join(DOCS[int(index)].split())[:40])
    assert lines[1].endswith("...") and len(lines[1].split(None, 3)[3]) == 83  # 80 characters and "..."
    assert "[icr: 4 documents, 2 forward passes" in captured.err


def test_the_model_comes_from_the_flag_only() -> None:
    args = parse_args(["rerank", "q", "d1", "d2", "-m", "m.gguf"])
    assert (args.model, args.query, args.documents) == ("m.gguf", "q", ["d1", "d2"])
    assert parse_args(["rerank", "q", "d1"]).model is None  # the default model


@pytest.mark.parametrize("args,message", [
    (["q"], "no documents: give them after QUERY or with --docs FILE"),
    (["q", "a", "b", "--method", "colbert"], "method must be one of icr, listwise, pairwise, pointwise, embedding"),
    (["q", "a", "--docs", "{file}"], "give the documents after QUERY or with --docs FILE, not both"),
    (["q", "--docs", "{file}"], "has no documents"),
    (["q", "--docs", "missing.jsonl"], "documents file 'missing.jsonl' not found"),
    (["  ", "a"], "the query is empty"),
    (["q", "a", " "], "document 1 is empty"),
])
def test_bad_input_before_loading(args: list[str], message: str, tmp_path: Path,
                                  capsys: pytest.CaptureFixture) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    argv = ["rerank", *[a.replace("{file}", str(empty)) for a in args], "-m", "no-such-model.gguf"]
    assert main(argv) == 2  # the model would fail to load: the input is checked first
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_bad_input_from_the_command_line(tiny_llama3: Path) -> None:
    """As a user runs it: a message, exit code 2, no traceback; documents that do not fit say what to set."""
    proc = _ember("rerank", QUERY, "--docs", "-", "-m", str(tiny_llama3), stdin='"fine"\n[1, 2]\n')
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        'error: -:2: expected a JSON string, {"text": ...} or {"title": ..., "abstract": ...}')
    proc = _ember("rerank", QUERY, TEXT[:3000], "-m", str(tiny_llama3), "--max-model-len", "256")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "do not fit" in last and "max_tokens_per_doc" in last
    proc = _ember("rerank", QUERY, TEXT[:3000], "-m", str(tiny_llama3), "--max-model-len", "256",
                  "--max-tokens-per-doc", "64")
    assert proc.returncode == 0, proc.stderr
    assert "1 cut to 64 tokens" in proc.stderr


@pytest.mark.slow
def test_icr_with_the_default_model_finds_the_answer(default_gguf: Path, capsys: pytest.CaptureFixture) -> None:
    docs = ["The stock market fell sharply on Tuesday after the announcement.",
            "Bananas are rich in potassium and grow in tropical climates.",
            "Paris is the capital and largest city of France, on the river Seine."]
    out = _json(capsys, ["rerank", "What is the capital of France?", *docs, "-m", str(default_gguf), "--json"])
    assert out["results"][0]["index"] == 2
