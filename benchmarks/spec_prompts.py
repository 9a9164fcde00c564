"""Builds the two prompt sets `ember bench spec` measures speculative decoding on, from a public-domain text:
input-grounded (repeat a passage, fix typos in a paragraph, quote the sentence that answers a question, edit
code) and open-ended (free questions). One JSONL line per prompt: {"id", "kind", "messages", "max_tokens"}.

    python benchmarks/spec_prompts.py --text ../shared/data/austen/emma.txt --out bench-prompts
"""
from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

OPEN_ENDED = [
    "What makes a good friend?", "Give me three ideas for a rainy Sunday afternoon.",
    "Why do people enjoy reading novels?", "Write a short poem about the sea.",
    "How can I get better at cooking?", "What is the best way to learn a new language?",
    "Describe your ideal holiday.", "Tell me a short story about a lost dog.",
    "What should I consider before adopting a cat?", "Why is sleep important?",
    "Suggest a name for a small bakery and explain it.", "What are some good habits for a healthy life?",
    "How would you explain the seasons to a child?", "Write a letter inviting a neighbour to tea.",
    "What do you think makes a city pleasant to live in?", "Give advice to someone starting their first job.",
]

CODE = [
    "def total_price(items):\n    t = 0\n    for item in items:\n        t = t + item.price * item.count\n"
    "    return t\n",
    "def count_words(text):\n    counts = {}\n    for w in text.split():\n        w = w.lower()\n"
    "        counts[w] = counts.get(w, 0) + 1\n    return counts\n",
    "def average(values):\n    if not values:\n        return 0\n    s = 0\n    for v in values:\n        s += v\n"
    "    return s / len(values)\n",
    "def longest_line(path):\n    best = ''\n    with open(path) as f:\n        for line in f:\n"
    "            if len(line) > len(best):\n                best = line\n    return best\n",
]
_RENAMES = [("t", "total"), ("counts", "frequency"), ("s", "running_sum"), ("best", "longest")]


def paragraphs(text: str, lo: int = 60, hi: int = 140) -> list[str]:
    """Paragraphs of lo..hi words, whitespace collapsed."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        p = " ".join(block.split())
        if lo <= len(p.split()) <= hi:
            out.append(p)
    return out


def typos(paragraph: str, rng: random.Random, share: float = 0.08) -> str:
    """Swap two inner letters in about `share` of the longer words."""
    words = paragraph.split()
    for i, w in enumerate(words):
        if len(w) > 4 and w.isalpha() and rng.random() < share:
            j = rng.randrange(1, len(w) - 2)
            words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2:]
    return " ".join(words)


def sentences(paragraph: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", paragraph) if len(s.split()) >= 6]


def grounded(paras: list[str], n: int, rng: random.Random) -> list[dict]:
    rows = []
    for i in range(n):
        kind = ("repeat", "typos", "quote", "code")[i % 4]
        p = paras[i]
        if kind == "repeat":
            msg = f"Repeat the following passage exactly, word for word:\n\n{p}"
        elif kind == "typos":
            msg = f"Fix the spelling mistakes in this paragraph and write out the whole corrected paragraph:\n\n" \
                  f"{typos(p, rng)}"
        elif kind == "quote":
            s = rng.choice(sentences(p) or [p])
            word = max(re.findall(r"[A-Za-z]+", s), key=len)
            msg = f"{p}\n\nQuote, word for word, the sentence from the text above that contains the word \"{word}\"."
        else:
            j = (i // 4) % len(CODE)
            old, new = _RENAMES[j]
            msg = f"Rename the variable `{old}` to `{new}` in this Python function and return the whole " \
                  f"function:\n\n```python\n{CODE[j]}```"
        rows.append({"id": f"grounded-{i}", "kind": kind, "messages": [{"role": "user", "content": msg}]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--text", required=True, help="a UTF-8 public-domain text (paragraphs split by blank lines)")
    ap.add_argument("--out", required=True, help="folder for input_grounded.jsonl and open_ended.jsonl")
    ap.add_argument("--n", type=int, default=16, help="prompts per set (default 16)")
    ap.add_argument("--max-tokens", type=int, default=192)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    paras = paragraphs(Path(a.text).read_text(encoding="utf-8"))
    rng.shuffle(paras)
    if len(paras) < a.n:
        raise SystemExit(f"{a.text} has only {len(paras)} paragraphs of 60-140 words; need {a.n}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    sets = {"input_grounded": grounded(paras, a.n, rng),
            "open_ended": [{"id": f"open-{i}", "kind": "open", "messages": [{"role": "user", "content": q}]}
                           for i, q in enumerate((OPEN_ENDED * (1 + a.n // len(OPEN_ENDED)))[: a.n])]}
    for name, rows in sets.items():
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps({**row, "max_tokens": a.max_tokens}) + "\n")
        print(f"{out / name}.jsonl: {len(rows)} prompts")


if __name__ == "__main__":
    main()
