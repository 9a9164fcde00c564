"""The retrieval endpoints on a live server: /v1/embeddings (the official openai client, float and base64),
/v1/rerank, /rerank, /v2/rerank (Jina, Cohere and TEI shapes, every method), /v1/score (1:1, 1:N, N:N); bad
input answered with a 400 naming the field; a rerank sharing the engine with a streaming chat."""
from __future__ import annotations

import base64
import threading
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from ember.server.app import _vector
from tests.conftest import TEXT
from tests.server.conftest import start_server, stop_server

METHODS = ["icr", "listwise", "pairwise", "pointwise", "embedding"]
# A prompt met again is read from the prefix cache: its last row is then computed alone, whose float32 sums
# round differently (~1e-7) from the whole prompt's forward. Vectors computed the same way are bit-identical.
SAME = dict(rtol=0, atol=2e-6)
QUERY = "Who has taken Netherfield Park?"
DOCS = ["Netherfield is taken by a young man of large fortune from the north of England.",
        "Mr. Bennet replied that he had not.",
        "A single man of large fortune; four or five thousand a year.",
        "Mr. Bennet made no answer."]
# Paragraphs of the test text, 40-90 words each: the "longer documents".
PARAGRAPHS = [p.replace("\n", " ") for p in TEXT.split("\n\n") if 40 <= len(p.split()) <= 90]


@pytest.fixture(scope="module")
def server(tiny_llama3: Path, tmp_path_factory: pytest.TempPathFactory):
    """The tiny model's whole context: its 400-token vocabulary makes RankGPT's prompt long."""
    srv = start_server(tiny_llama3, tmp_path_factory.mktemp("retrieval"), "--max-model-len", "1024")
    yield srv
    stop_server(srv)


def _post(server, path: str, body: dict, timeout: float = 120) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=timeout)


def _ok(server, path: str, body: dict):
    resp = _post(server, path, body)
    assert resp.status_code == 200, resp.text
    return resp.json()


def _embed(server, inputs, **extra) -> np.ndarray:
    data = _ok(server, "/v1/embeddings", {"input": inputs, **extra})["data"]
    assert [d["index"] for d in data] == list(range(len(data)))
    return np.array([d["embedding"] for d in data], dtype=np.float32)


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")


# -- embeddings -----------------------------------------------------------------------------------

def test_embeddings_with_the_openai_client_float_and_base64(server) -> None:
    client = _client(server)
    texts = ["It is a truth universally acknowledged", "Netherfield Park is let at last"]
    default = client.embeddings.create(model=server.model, input=texts)  # the client asks for base64
    floats = client.embeddings.create(model=server.model, input=texts, encoding_format="float")
    assert default.object == "list" and default.model == server.model
    assert [d.index for d in default.data] == [0, 1] and all(d.object == "embedding" for d in default.data)
    a = np.array([d.embedding for d in default.data], dtype=np.float32)
    b = np.array([d.embedding for d in floats.data], dtype=np.float32)
    assert a.shape == (2, 64)  # the tiny model's hidden size
    assert np.allclose(a, b, **SAME)  # base64 decodes to the same vectors
    assert np.allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)  # L2-normalised
    assert not np.allclose(a[0], a[1])
    counts = [httpx.post(f"{server.url}/tokenize", json={"prompt": t}).json()["count"] for t in texts]
    assert default.usage.prompt_tokens == default.usage.total_tokens == sum(counts)
    raw = _ok(server, "/v1/embeddings", {"input": texts[0], "encoding_format": "base64"})["data"][0]["embedding"]
    assert isinstance(raw, str) and np.allclose(np.frombuffer(base64.b64decode(raw), "<f4"), a[0], **SAME)


def test_base64_is_little_endian_float32_of_the_same_values() -> None:
    import torch

    v = torch.tensor([0.1, -2.5, 3.0e-8, 1.0], dtype=torch.float32)
    raw = base64.b64decode(_vector(v, "base64"))
    assert raw[:4] == np.float32(0.1).astype("<f4").tobytes() and len(raw) == 16
    assert np.frombuffer(raw, "<f4").tolist() == _vector(v, "float") == v.tolist()


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_identical_inputs_give_identical_vectors_alone_or_batched(server, pooling: str) -> None:
    text = "It is a truth universally acknowledged"
    alone = _embed(server, text, pooling=pooling)[0]
    batch = _embed(server, ["Netherfield Park", text, "a single man of large fortune", text], pooling=pooling)
    assert np.array_equal(batch[1], batch[3])  # one batch
    assert np.allclose(batch[1], alone, **SAME)  # alone then batched
    assert not np.allclose(batch[0], alone, atol=1e-3)


def test_token_id_inputs_match_text(server) -> None:
    texts = ["It is a truth", "My dear Mr. Bennet"]
    ids = [httpx.post(f"{server.url}/tokenize", json={"prompt": t}).json()["tokens"] for t in texts]
    by_text = _embed(server, texts)
    assert np.allclose(_embed(server, ids[0])[0], by_text[0], **SAME)  # one list of ids
    assert np.allclose(_embed(server, ids), by_text, **SAME)  # a list of lists
    assert not np.allclose(by_text[0], by_text[1], atol=1e-3)


def test_pooling_mean_and_last_differ(server) -> None:
    text = "My dear Mr. Bennet, have you heard that Netherfield Park is let at last?"
    last, mean = _embed(server, text, pooling="last")[0], _embed(server, text, pooling="mean")[0]
    assert np.allclose(_embed(server, text)[0], last, **SAME)  # the server's default (--pooling last)
    assert np.allclose(np.linalg.norm(mean), 1.0, atol=1e-5)
    assert not np.allclose(last, mean, atol=1e-3)


def test_dimensions_only_the_hidden_size(server) -> None:
    client = _client(server)
    full = client.embeddings.create(model=server.model, input="hello", dimensions=64)
    assert len(full.data[0].embedding) == 64
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=server.model, input="hello", dimensions=32)
    assert e.value.body["param"] == "dimensions" and "64" in e.value.body["message"]


def test_pooling_flag_sets_the_server_default(server, tiny_llama3: Path, tmp_path: Path) -> None:
    text = "My dear Mr. Bennet"
    other = start_server(tiny_llama3, tmp_path, "--pooling", "mean")
    try:
        default = _embed(other, text)[0]
        assert np.allclose(default, _embed(other, text, pooling="mean")[0], **SAME)
        assert not np.allclose(default, _embed(other, text, pooling="last")[0], atol=1e-3)
    finally:
        assert stop_server(other) == 0
    assert np.allclose(default, _embed(server, text, pooling="mean")[0], **SAME)


# -- rerank ---------------------------------------------------------------------------------------

def _check_results(results: list[dict], n: int, key: str = "relevance_score") -> list[int]:
    scores = [r[key] for r in results]
    assert scores == sorted(scores, reverse=True)
    return [r["index"] for r in results]


def test_rerank_jina_and_cohere_shapes(server) -> None:
    jina = _ok(server, "/v1/rerank", {"model": server.model, "query": QUERY, "documents": DOCS})
    assert set(jina) == {"id", "model", "usage", "results", "meta"} and jina["model"] == server.model
    assert jina["id"].startswith("rerank-")
    order = _check_results(jina["results"], len(DOCS))
    assert sorted(order) == list(range(len(DOCS)))
    assert all(r["document"] == {"text": DOCS[r["index"]]} for r in jina["results"])
    assert 0 < jina["usage"]["prompt_tokens"] == jina["usage"]["total_tokens"]  # icr generates nothing
    meta = jina["meta"]
    assert meta["method"] == "icr" and meta["requests"] == 2 and meta["warnings"] == []
    assert meta["billed_units"] == {"input_tokens": jina["usage"]["prompt_tokens"], "output_tokens": 0}
    assert meta["cached_tokens"] > 0  # the N/A pass reads the documents from the prefix cache
    # Cohere's route and top_n; documents as {"text": ...} objects; the /rerank alias.
    cohere = _ok(server, "/v2/rerank", {"query": QUERY, "documents": [{"text": d} for d in DOCS], "top_n": 2})
    assert [r["index"] for r in cohere["results"]] == order[:2]
    assert [r["relevance_score"] for r in cohere["results"]] == pytest.approx(
        [r["relevance_score"] for r in jina["results"][:2]], rel=1e-4)
    alias = _ok(server, "/rerank", {"query": QUERY, "documents": DOCS, "return_documents": False})
    assert [r["index"] for r in alias["results"]] == order
    assert all(set(r) == {"index", "relevance_score"} for r in alias["results"])


def test_rerank_tei_shape(server) -> None:
    jina = _ok(server, "/v1/rerank", {"query": QUERY, "documents": DOCS})
    tei = _ok(server, "/rerank", {"query": QUERY, "texts": DOCS})
    assert isinstance(tei, list) and all(set(r) == {"index", "score"} for r in tei)
    assert [r["index"] for r in tei] == [r["index"] for r in jina["results"]]
    assert [r["score"] for r in tei] == pytest.approx([r["relevance_score"] for r in jina["results"]], rel=1e-4)
    with_text = _ok(server, "/rerank", {"query": QUERY, "texts": DOCS, "return_text": True})
    assert all(r["text"] == DOCS[r["index"]] for r in with_text)


@pytest.mark.parametrize("method", METHODS)
def test_each_method_ranks_every_document_once(server, method: str) -> None:
    out = _ok(server, "/v1/rerank", {"query": QUERY, "documents": DOCS, "method": method})
    order = _check_results(out["results"], len(DOCS))
    assert sorted(order) == list(range(len(DOCS)))
    assert out["meta"]["method"] == method
    generates = method in ("listwise", "pairwise", "pointwise")
    assert (out["meta"]["billed_units"]["output_tokens"] > 0) == generates
    # listwise: one generation per window (the tiny vocabulary makes its long prompt hold few documents)
    expected = {"icr": 2, "listwise": out["meta"]["windows"], "pairwise": 12, "pointwise": 4, "embedding": 5}
    assert out["meta"]["requests"] == expected[method]


def test_max_tokens_per_doc_cuts_and_reports(server) -> None:
    docs = [PARAGRAPHS[0], "Mr. Bennet made no answer.", PARAGRAPHS[1]]
    out = _ok(server, "/v1/rerank", {"query": QUERY, "documents": docs, "max_tokens_per_doc": 12})
    meta = out["meta"]
    assert meta["truncated_documents"] == [0, 2]
    assert meta["warnings"] == ["documents 0, 2 were cut to 12 tokens (max_tokens_per_doc)"]
    full = _ok(server, "/v1/rerank", {"query": QUERY, "documents": docs})
    assert full["meta"]["truncated_documents"] == [] and full["meta"]["warnings"] == []
    assert out["usage"]["prompt_tokens"] < full["usage"]["prompt_tokens"]
    assert [r["document"]["text"] for r in out["results"]] == [docs[r["index"]] for r in out["results"]]


# -- score ----------------------------------------------------------------------------------------

def _scores(out: dict) -> list[float]:
    assert out["object"] == "list" and out["id"].startswith("score-")
    assert [d["index"] for d in out["data"]] == list(range(len(out["data"])))
    assert all(d["object"] == "score" for d in out["data"])
    return [d["score"] for d in out["data"]]


def test_score_1_1_is_the_cosine_of_the_embeddings(server) -> None:
    a, b = "Who has taken Netherfield?", "A young man of large fortune."
    out = _ok(server, "/v1/score", {"model": server.model, "text_1": a, "text_2": b})
    vecs = _embed(server, [a, b])
    assert _scores(out) == pytest.approx([float(vecs[0] @ vecs[1])], abs=1e-5)
    assert out["usage"]["prompt_tokens"] > 0 and out["usage"]["completion_tokens"] == 0
    mean = _ok(server, "/score", {"text_1": a, "text_2": b, "pooling": "mean"})
    vecs = _embed(server, [a, b], pooling="mean")
    assert _scores(mean) == pytest.approx([float(vecs[0] @ vecs[1])], abs=1e-5)


@pytest.mark.parametrize("method", ["embedding", "icr", "pointwise"])
def test_score_1_n_and_n_n(server, method: str) -> None:
    one_n = _scores(_ok(server, "/v1/score", {"text_1": QUERY, "text_2": DOCS, "method": method}))
    assert len(one_n) == len(DOCS) and len(set(one_n)) > 1
    if method == "icr":  # the rerank's scores, in input order
        rr = _ok(server, "/v1/rerank", {"query": QUERY, "documents": DOCS})["results"]
        assert one_n == pytest.approx([r["relevance_score"] for r in sorted(rr, key=lambda r: r["index"])],
                                      rel=1e-4)
        every = _ok(server, "/v1/rerank", {"query": QUERY, "documents": DOCS, "layers": "all"})["results"]
        assert [r["relevance_score"] for r in every] != [r["relevance_score"] for r in rr]
    queries = [QUERY, "What did Mr. Bennet say?", "How rich is he?"]
    n_n = _scores(_ok(server, "/v1/score", {"queries": queries, "documents": DOCS[:3], "method": method}))
    singles = [_scores(_ok(server, "/v1/score", {"text_1": q, "text_2": d, "method": method}))[0]
               for q, d in zip(queries, DOCS[:3])]
    assert n_n == pytest.approx(singles, rel=1e-4, abs=1e-6)
    if method != "icr":  # pointwise and embedding score each pair alone: 1:N is N times 1:1
        assert one_n[1] == pytest.approx(
            _scores(_ok(server, "/v1/score", {"text_1": [QUERY], "text_2": [DOCS[1]], "method": method}))[0],
            rel=1e-4, abs=1e-6)


# -- bad input --------------------------------------------------------------------------------------

EMB, RR, SC = "/v1/embeddings", "/v1/rerank", "/v1/score"
LONG = "word " * 1200  # more tokens than the test server's context (1024)
BAD = [
    ("empty-input", EMB, {"input": ""}, "input", "input"),
    ("empty-input-list", EMB, {"input": []}, "input", "input"),
    ("empty-input-item", EMB, {"input": ["a", ""]}, "input.1", "input"),
    ("long-input", EMB, {"input": ["short", LONG]}, "input", "input 1"),
    ("bad-token-id", EMB, {"input": [5, 10 ** 6]}, "input", "vocabulary"),
    ("encoding-format", EMB, {"input": "a", "encoding_format": "int8"}, "encoding_format", "base64"),
    ("pooling", EMB, {"input": "a", "pooling": "cls"}, "pooling", "mean"),
    ("embed-unsupported", EMB, {"input": "a", "truncate_prompt_tokens": 5}, "truncate_prompt_tokens",
     "not supported"),
    ("no-documents", RR, {"query": "q"}, "documents", "required"),
    ("empty-documents", RR, {"query": "q", "documents": []}, "documents", "documents"),
    ("empty-document", RR, {"query": "q", "documents": ["a", " "]}, "documents", "document 1 is empty"),
    ("empty-text", RR, {"query": "q", "texts": ["a", ""]}, "texts", "document 1 is empty"),
    ("no-query", RR, {"documents": ["a"]}, "query", "required"),
    ("empty-query", RR, {"query": "", "documents": ["a"]}, "query", "query"),
    ("unknown-method", RR, {"query": "q", "documents": ["a"], "method": "bm25"}, "method", "pointwise"),
    ("negative-top-n", RR, {"query": "q", "documents": ["a"], "top_n": -1}, "top_n", "top_n"),
    ("document-too-long", RR, {"query": "q", "documents": ["a", LONG]}, "documents", "max_tokens_per_doc"),
    ("too-long-pointwise", RR, {"query": "q", "documents": [LONG], "method": "pointwise"}, "documents",
     "max_tokens_per_doc"),
    ("bad-layers", RR, {"query": "q", "documents": ["a"], "layers": [7]}, "layers", "layers"),
    ("layers-word", RR, {"query": "q", "documents": ["a"], "layers": "most"}, "layers", "all"),
    ("layers-not-icr", RR, {"query": "q", "documents": ["a"], "method": "pointwise", "layers": [0]}, "layers",
     "icr"),
    ("pooling-not-embedding", RR, {"query": "q", "documents": ["a"], "pooling": "mean"}, "pooling", "embedding"),
    ("max-tokens-per-doc", RR, {"query": "q", "documents": ["a"], "max_tokens_per_doc": 0}, "max_tokens_per_doc",
     "max_tokens_per_doc"),
    ("both-documents-and-texts", RR, {"query": "q", "documents": ["a"], "texts": ["a"]}, "texts", "not both"),
    ("score-mismatch", SC, {"text_1": ["a", "b"], "text_2": ["c", "d", "e"]}, "text_2", "N:N"),
    ("score-missing", SC, {"text_1": "a"}, "text_2", "required"),
    ("score-empty", SC, {"queries": ["a", " "], "documents": ["b", "c"]}, "queries", "item 1 is empty"),
    ("score-mixed-names", SC, {"text_1": "a", "documents": ["b"]}, "documents", "not both"),
    ("score-pairwise-1-1", SC, {"text_1": "a", "text_2": "b", "method": "pairwise"}, "method", "pointwise"),
    ("score-too-long", SC, {"text_1": "a", "text_2": LONG}, "text_2", "does not fit"),
]


@pytest.mark.parametrize("path,body,param,words", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_a_400_naming_the_field(server, path: str, body: dict, param: str, words: str) -> None:
    resp = _post(server, path, body)
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["param"] == param and words in err["message"], err
    assert err["type"] == "invalid_request_error"
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_unknown_model_is_a_404(server) -> None:
    for path, body in ((EMB, {"input": "a"}), (RR, {"query": "q", "documents": ["a"]}),
                       (SC, {"text_1": "a", "text_2": "b"})):
        resp = _post(server, path, {"model": "gpt-4", **body})
        assert resp.status_code == 404 and resp.json()["error"]["param"] == "model"


# -- sharing the engine ------------------------------------------------------------------------------

def _chat_beside_rerank(server) -> tuple[list[float], float, float, int]:
    """A streaming chat; once it decodes, a pairwise rerank of 10 paragraphs (90 prompts, ~30k tokens). The
    chat's chunk arrival times, the rerank's start and end, and the chat's completion tokens."""
    rerank: dict = {}

    def run_rerank() -> None:
        rerank["start"] = time.monotonic()
        query = f"{QUERY} ({uuid.uuid4().hex[:8]})"  # the prompts start with it: none is in the prefix cache
        rerank["resp"] = _post(server, RR, {"query": query, "documents": PARAGRAPHS[:10], "method": "pairwise",
                                          "max_tokens_per_doc": 150})
        rerank["end"] = time.monotonic()

    thread = threading.Thread(target=run_rerank)
    arrivals: list[float] = []
    tokens = 0
    # The tiny model decodes 40 tokens in less time than a rerank takes to reach the engine: the chat is made
    # long enough to outlast the rerank, so that every step of the rerank has the chat decoding beside it.
    stream = _client(server).chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": "Tell me about Netherfield."}], max_tokens=300,
        temperature=0, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    for chunk in stream:
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic())
            if len(arrivals) == 1:  # the chat is decoding: start the rerank
                thread.start()
    thread.join(timeout=120)
    assert rerank["resp"].status_code == 200, rerank["resp"].text
    out = rerank["resp"].json()
    assert sorted(r["index"] for r in out["results"]) == list(range(10)) and out["meta"]["requests"] == 90
    return arrivals, rerank["start"], rerank["end"], tokens


def test_rerank_runs_beside_a_streaming_chat(server) -> None:
    """The chat keeps streaming while a rerank is in flight: its decode steps are not held up behind the
    rerank's prompts, which the engine cuts into chunks under one token budget beside the decodes (SplitFuse).
    A prefill-first engine would stall the chat for the whole rerank."""
    arrivals, start, end, tokens = _chat_beside_rerank(server)
    assert tokens == 300  # the chat completed
    assert arrivals[0] < start and arrivals[-1] > end, "the rerank did not run wholly inside the chat"
    during = [t for t in arrivals if start < t < end]
    longest_stall = float(np.diff([start, *during, end]).max())
    assert len(during) >= 5 and longest_stall < 0.5 * (end - start), (len(during), longest_stall, end - start)


def test_a_client_that_leaves_aborts_the_rerank(server) -> None:
    """The rerank's engine requests are aborted when its client hangs up, as a completion's are."""
    aborted = server.metric("ember_request_aborted_total")
    query = f"{QUERY} ({uuid.uuid4().hex[:8]})"
    body = {"query": query, "documents": PARAGRAPHS[:20], "method": "pairwise", "max_tokens_per_doc": 150}
    with pytest.raises(httpx.ReadTimeout):  # 380 prompts: about a second of work on this machine, or more
        _post(server, RR, body, timeout=0.3)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (server.metric("ember_num_requests_running") > 0 or
                                           server.metric("ember_num_requests_waiting") > 0):
        time.sleep(0.05)
    assert server.metric("ember_num_requests_running") == server.metric("ember_num_requests_waiting") == 0
    assert server.metric("ember_kv_cache_usage_perc") == 0
    assert server.metric("ember_request_aborted_total") - aborted > 0
