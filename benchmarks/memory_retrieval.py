"""Which ranking finds a planted turn: recall@k of the planted turn on `ember eval memory`'s synthetic dialogues for
the retrieval rankings alone (no summaries, no judge, no reply), computed outside the controller so that
variants the controller does not offer can be compared: BM25 over the turns' words (the store's FTS5), a
sentence embedder per turn and per sentence (a turn scored by its best sentence), each alone and fused with BM25
by reciprocal rank as MemoryController does.
    usage: python benchmarks/memory_retrieval.py TEXT [--dialogues 20] [--seed 0] [--embedder minilm|FOLDER] [-k 4]"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from ember.apps.embedder import SentenceEmbedder, resolve_embedder, sentences
from ember.apps.memory import RRF_K, RRF_POOL
from ember.apps.memory_store import MemoryStore, exchange_text
from ember.bench.memory_eval import Dialogue, generate_dialogues


def fused(dense: list[int], words: list[int], k: int) -> list[int]:
    """Reciprocal rank fusion of the two rankings' first RRF_POOL x k, as MemoryController._activation."""
    score: dict[int, float] = {}
    for ranking in (dense[:RRF_POOL * k], words):
        for rank, i in enumerate(ranking):
            score[i] = score.get(i, 0.0) + 1.0 / (RRF_K + rank + 1)
    return sorted(score, key=lambda i: (-score[i], i))


def rankings(embedder: SentenceEmbedder, d: Dialogue, k: int, db: Path) -> dict[str, list[int]]:
    """Each method's ranking of the turns before the previous one (which flash memory always brings)."""
    docs = [exchange_text(u, a) for u, a in d.turns]
    before = len(docs) - 1
    query = embedder.embed([d.asked.question])[0]
    turn_scores = embedder.embed(docs) @ query
    owners, pieces = zip(*[(i, s) for i, doc in enumerate(docs) for s in sentences(doc)])
    best = np.full(len(docs), -np.inf)
    np.maximum.at(best, np.array(owners), embedder.embed(list(pieces)) @ query)
    with MemoryStore(db) as store:
        for u, a in d.turns:
            store.add_turn("s", u, a, u, 1, 1, np.ones(4))
        words = store.search_words("s", d.asked.question, RRF_POOL * k, before=before)
    by_turn = [int(i) for i in np.argsort(-turn_scores, kind="stable") if i < before]
    by_sentence = [int(i) for i in np.argsort(-best, kind="stable") if i < before]
    return {"bm25": words, "turn": by_turn, "turn+bm25": fused(by_turn, words, k), "sentence": by_sentence,
            "sentence+bm25": fused(by_sentence, words, k)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("text")
    ap.add_argument("--dialogues", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--embedder", default="minilm")
    ap.add_argument("-k", type=int, default=4)
    a = ap.parse_args()
    embedder = resolve_embedder(a.embedder)
    if embedder is None:
        raise SystemExit("--embedder must be a sentence embedder (minilm or a folder)")
    dialogues = generate_dialogues(Path(a.text).read_text(encoding="utf-8"), a.dialogues, a.seed)
    hits: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n, d in enumerate(dialogues):
            for method, ranking in rankings(embedder, d, a.k, Path(tmp) / f"{n}.sqlite3").items():
                hits[method] = hits.get(method, 0) + (d.asked.turn in ranking[:a.k])
    print(f"{a.text}, {a.dialogues} dialogues (seed {a.seed}), embedder {embedder.name}: recall@{a.k} of the "
          "planted turn")
    print("| " + " | ".join(hits) + " |\n|" + "---|" * len(hits))
    print("| " + " | ".join(f"{h / len(dialogues):.2f}" for h in hits.values()) + " |")


if __name__ == "__main__":
    main()
