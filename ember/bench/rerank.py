"""Re-ranking evaluation (`ember eval rerank`): a BM25 first stage (bm25s) over a corpus of documents, each query's
top-k re-ranked by every method with one model, scored with ir-measures (MRR@10, nDCG@10, R@1), beside the cost of
each method (seconds, forward passes, tokens per query) and the share of its generations that were malformed.

Data: JSON lines `{"id", "title", "abstract", "query"}`. The corpus is every line's document; each line's query has
one relevant document, its own line's. A document's text is `title + ". " + abstract` (the title's own final
punctuation kept), so first stage and re-rankers see the same text."""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Hashable, Literal, Sequence, TypeVar

from ember.apps.rerank import METHODS, icr_layers
from ember.bench.common import json_lines, parse_names, read_lines
from ember.errors import EmberError, InvalidParameterError

H = TypeVar("H", bound=Hashable)
EVAL_METHODS = (*METHODS, "bm25")  # what --methods takes; "random" is always reported
RRF_K = 60  # Cormack, Clarke & Buettcher (2009): k = 60
CUTOFF = 10  # MRR@10 and nDCG@10
EXTRA_HINT = "pip install 'ember[eval]'"


class MissingDependencyError(EmberError):
    """An optional package the evaluation needs is not installed."""


@dataclass(frozen=True)
class Example:
    """One line of the data: a document (`text`) and the query whose one relevant document it is."""

    id: str
    text: str
    query: str


def require_eval_deps() -> None:
    """bm25s and ir-measures (the `eval` extra), or an error that says how to install them."""
    missing = []
    for module, package in (("bm25s", "bm25s"), ("ir_measures", "ir-measures")):
        try:
            __import__(module)
        except ImportError:
            missing.append(package)
    if missing:
        raise MissingDependencyError(f"the re-ranking evaluation needs {' and '.join(missing)}: {EXTRA_HINT}")


def document_text(title: str, abstract: str) -> str:
    """`title. abstract` (no second full stop when the title ends in punctuation)."""
    title, abstract = title.strip(), abstract.strip()
    if not title:
        return abstract
    return f"{title}{'' if title[-1] in '.?!' else '.'} {abstract}".strip()


def load_dataset(path: str | Path) -> list[Example]:
    """The data file's lines as examples; a clear error for a missing file, bad JSON, missing fields or a
    repeated id."""
    p = Path(path)
    examples: list[Example] = []
    seen: set[str] = set()
    for n, row in json_lines(read_lines(p, "data file", "data"), p, "data",
                             '; each line is a JSON object {"id", "title", "abstract", "query"}'):
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("id", "title", "abstract",
                                                                                      "query")):
            raise InvalidParameterError(f'{p}:{n}: expected {{"id", "title", "abstract", "query"}} as strings',
                                        "data")
        if row["id"] in seen:
            raise InvalidParameterError(f"{p}:{n}: id {row['id']!r} appears twice", "data")
        text, query = document_text(row["title"], row["abstract"]), row["query"].strip()
        if not text or not query:
            raise InvalidParameterError(f"{p}:{n}: empty document or query", "data")
        seen.add(row["id"])
        examples.append(Example(row["id"], text, query))
    if not examples:
        raise InvalidParameterError(f"data file {p} has no examples", "data")
    return examples


def parse_methods(text: str) -> list[str]:
    """--methods: comma-separated names from EVAL_METHODS, in the order given, each once."""
    return parse_names(text, EVAL_METHODS, "method", "methods")


def parse_layers(text: str | None) -> list[int] | Literal["all"] | None:
    """--layers: comma-separated layer numbers and ranges (`0-7,12`), "all", or None (ICR's default band)."""
    if text is None or text.strip() == "all":
        return None if text is None else "all"
    layers: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            layers += range(int(lo), int(hi) + 1) if hi else [int(lo)]
    except ValueError:
        raise InvalidParameterError(f"layers: expected numbers and ranges such as 0-7,12, got {text!r}",
                                    "layers") from None
    return sorted(set(layers))


def first_stage(corpus: Sequence[str], queries: Sequence[str], k: int) -> list[list[int]]:
    """Each query's top-k corpus indices by BM25 (bm25s: Lucene's BM25, k1 1.5, b 0.75; lower-cased words of two
    or more characters, English stop words removed, no stemming), best first."""
    return _bm25(corpus, queries, k)[0]


def _bm25(corpus: Sequence[str], queries: Sequence[str], k: int) -> tuple[list[list[int]], float]:
    """first_stage, and the seconds its retrieval took (the index built beforehand, not counted)."""
    require_eval_deps()
    import bm25s

    logging.getLogger("bm25s").setLevel(logging.WARNING)  # it sets itself to DEBUG: a line per index built
    k = min(k, len(corpus))
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(list(corpus), stopwords="en", show_progress=False), show_progress=False)
    start = time.perf_counter()
    tokens = bm25s.tokenize(list(queries), stopwords="en", return_ids=False, show_progress=False)
    docs, _ = retriever.retrieve(tokens, k=k, show_progress=False, n_threads=1)
    return [[int(i) for i in row] for row in docs], time.perf_counter() - start


def rrf(rankings: Sequence[Sequence[H]], k: int = RRF_K) -> list[H]:
    """Reciprocal-rank fusion: each item scores sum(1 / (k + rank)) over the rankings (rank 1 = first) that hold
    it; best first, ties in the order of the first ranking (then of the later ones)."""
    scores: dict[H, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, 1):
            scores[item] = scores.get(item, 0.0) + 1.0 / (k + rank)
    first_seen = {item: n for n, item in enumerate(dict.fromkeys(i for r in rankings for i in r))}
    return sorted(scores, key=lambda item: (-scores[item], first_seen[item]))


def metrics(relevant: dict[str, str], runs: dict[str, list[str]]) -> dict[str, float]:
    """MRR@10, nDCG@10 and R@1 (ir-measures over pytrec_eval) of each query's ranking (document ids best first)
    given its one relevant document id, averaged over the queries. The run scores are the ranks (n - position),
    so ties never let trec_eval reorder a ranking."""
    require_eval_deps()
    import ir_measures
    from ir_measures import RR, R, nDCG

    qrels = {q: {doc: 1} for q, doc in relevant.items()}
    run = {q: {doc: float(len(order) - pos) for pos, doc in enumerate(order)} for q, order in runs.items()}
    measures = {"mrr@10": RR @ CUTOFF, "ndcg@10": nDCG @ CUTOFF, "recall@1": R @ 1}
    agg = ir_measures.calc_aggregate(list(measures.values()), qrels, run)
    return {name: float(agg[m]) for name, m in measures.items()}


@dataclass
class _Cost:
    seconds: float = 0.0
    forward_passes: int = 0
    prompt_tokens: int = 0
    computed_tokens: int = 0
    generations: int = 0
    malformed: int = 0
    windows: int = 0


def evaluate(llm: Any, data: Sequence[Example], methods: Sequence[str], top_k: int = 20, shuffle: bool = False,
             seed: int = 0, fuse: bool = False, queries: int | None = None, max_tokens_per_doc: int | None = None,
             layers: list[int] | Literal["all"] | None = None, progress: bool = False) -> dict[str, Any]:
    """Evaluate `methods` (EVAL_METHODS) on `data`'s first `queries` queries over its whole corpus.

    Protocol: BM25 retrieves each query's top_k; a query whose relevant document is not among them scores 0
    for every method (recall is not repaired). The methods re-rank the top_k given best first in BM25's order,
    or with `shuffle` in a seeded random order (so each must use its own signal). Rows: "random" (the seeded
    random order, which is the input order under `shuffle`), "bm25" if asked, each model method, and with
    `fuse` "bm25+M" for each (RRF, k=60, of BM25's order and M's, within the top_k). llm: an ember LLM (only
    used for model methods; None when there are none)."""
    if top_k < 1:
        raise InvalidParameterError(f"top_k must be >= 1, got {top_k}", "top_k")
    if queries is not None and queries < 1:
        raise InvalidParameterError(f"queries must be >= 1, got {queries}", "queries")
    unknown = [m for m in methods if m not in EVAL_METHODS]
    if unknown:
        raise InvalidParameterError(f"unknown method {unknown[0]!r}: choose from {', '.join(EVAL_METHODS)}",
                                    "methods")
    model_methods = [m for m in methods if m in METHODS]
    if model_methods and llm is None:
        raise InvalidParameterError("model methods need a model", "methods")
    evaluated = list(data[:queries] if queries else data)
    ids = [e.id for e in data]
    relevant = {e.id: e.id for e in evaluated}

    topk, bm25_seconds = _bm25([e.text for e in data], [e.query for e in evaluated], top_k)
    rng = random.Random(seed)
    shuffled = [rng.sample(hits, len(hits)) for hits in topk]
    inputs = shuffled if shuffle else topk

    orders: dict[str, dict[str, list[str]]] = {
        "random": {e.id: [ids[i] for i in perm] for e, perm in zip(evaluated, shuffled)},
        "bm25": {e.id: [ids[i] for i in hits] for e, hits in zip(evaluated, topk)}}
    costs: dict[str, _Cost] = {"random": _Cost(), "bm25": _Cost(seconds=bm25_seconds)}
    for method in model_methods:
        orders[method], costs[method] = _rerank_all(llm, method, evaluated, inputs, [e.text for e in data], ids,
                                                    max_tokens_per_doc, layers, progress)
    rows = [_row("random", orders["random"], costs["random"], relevant, len(evaluated))]
    rows += [_row(m, orders[m], costs[m], relevant, len(evaluated)) for m in methods]
    if fuse:
        for m in ["random", *model_methods]:
            fused = {q: rrf([orders["bm25"][q], orders[m][q]]) for q in relevant}
            cost = _Cost(**{**vars(costs[m]), "seconds": costs[m].seconds + bm25_seconds})
            rows.append(_row(f"bm25+{m}", fused, cost, relevant, len(evaluated)))
    recall = sum(e.id in orders["bm25"][e.id] for e in evaluated) / len(evaluated)
    return {"queries": len(evaluated), "corpus": len(data), "first_stage": "bm25", "top_k": min(top_k, len(data)),
            "first_stage_recall": recall, "shuffle": shuffle, "seed": seed, "fuse_k": RRF_K if fuse else None,
            "max_tokens_per_doc": max_tokens_per_doc, "rows": rows,
            "layers": icr_layers(layers, llm.engine.config.num_layers) if "icr" in model_methods else None}



def _rerank_all(llm: Any, method: str, evaluated: Sequence[Example], inputs: list[list[int]], corpus: list[str],
                ids: list[str], max_tokens_per_doc: int | None, layers: list[int] | Literal["all"] | None,
                progress: bool) -> tuple[dict[str, list[str]], _Cost]:
    """One method over every query: each query's order (document ids best first) and the summed cost."""
    from tqdm import tqdm

    options: dict[str, Any] = {"max_tokens_per_doc": max_tokens_per_doc}
    if method == "icr":
        options["layers"] = layers
    llm.rerank("warm-up", ["a warm-up document"], method=method, **options)  # loads kernels; untimed
    orders, cost = {}, _Cost()
    for example, hits in tqdm(list(zip(evaluated, inputs)), desc=method, unit="query", disable=not progress,
                              leave=False):
        start = time.perf_counter()
        out = llm.rerank(example.query, [corpus[i] for i in hits], method=method, return_documents=False,
                         **options)
        cost.seconds += time.perf_counter() - start
        orders[example.id] = [ids[hits[i]] for i in out.ranking.order]
        u, r = out.usage, out.ranking
        cost.forward_passes += u.forward_passes
        cost.prompt_tokens += u.prompt_tokens
        cost.computed_tokens += u.computed_tokens
        cost.generations += r.generations
        cost.malformed += r.malformed
        cost.windows += r.windows
    return orders, cost


def _row(method: str, orders: dict[str, list[str]], cost: _Cost, relevant: dict[str, str], n: int
         ) -> dict[str, Any]:
    """A table row: the metrics, then the cost per query; `malformed` is a share of the method's generations
    (None for methods that generate no rankings)."""
    return {"method": method, **metrics(relevant, orders), "seconds_per_query": cost.seconds / n,
            "forward_passes_per_query": cost.forward_passes / n, "prompt_tokens_per_query": cost.prompt_tokens / n,
            "computed_tokens_per_query": cost.computed_tokens / n, "windows_per_query": cost.windows / n,
            "malformed": cost.malformed / cost.generations if cost.generations else None}


COLUMNS = (("method", "method", "{}"), ("MRR@10", "mrr@10", "{:.3f}"), ("NDCG@10", "ndcg@10", "{:.3f}"),
           ("R@1", "recall@1", "{:.3f}"), ("s/query", "seconds_per_query", "{:.3f}"),
           ("passes/query", "forward_passes_per_query", "{:.1f}"), ("tokens/query", "prompt_tokens_per_query",
                                                                    "{:.0f}"),
           ("computed/query", "computed_tokens_per_query", "{:.0f}"), ("malformed", "malformed", "{:.1%}"))


def format_table(result: dict[str, Any]) -> str:
    """The result as a header and a plain-text table, a row per method."""
    order = f"a random order (seed {result['seed']})" if result["shuffle"] else "BM25's order"
    head = [f"{result['queries']} queries over {result['corpus']} documents; first stage BM25 top-{result['top_k']} "
            f"(recall@{result['top_k']} {result['first_stage_recall']:.3f}), handed to the re-rankers in {order}"]
    if result["fuse_k"]:
        head.append(f"bm25+M: reciprocal-rank fusion (k={result['fuse_k']}) of BM25's order and M's")
    cells = [[name for name, _, _ in COLUMNS]]
    for row in result["rows"]:
        cells.append([("-" if row[key] is None else fmt.format(row[key])) for _, key, fmt in COLUMNS])
    widths = [max(len(r[c]) for r in cells) for c in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(r, widths)))
             for r in cells]
    return "\n".join([*head, "", lines[0], "-" * len(lines[0]), *lines[1:]])
