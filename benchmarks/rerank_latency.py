"""Seconds and forward passes to re-rank N documents for one query, per method (ICR vs the generative
baselines), N = 5, 10, 20, 40 by default: `python benchmarks/rerank_latency.py --data papers.jsonl`."""
from __future__ import annotations

import argparse
import json
import statistics
import time

from ember import LLM
from ember.bench.rerank import load_dataset, parse_layers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", required=True, help="JSONL of {id, title, abstract, query} (the papers set's format)")
    ap.add_argument("--model", default=None)
    ap.add_argument("--ns", default="5,10,20,40", help="document counts")
    ap.add_argument("--methods", default="icr,listwise")
    ap.add_argument("--layers", default=None, help="ICR layers, e.g. 0-14,20 or all (default: the method's default band)")
    ap.add_argument("--max-tokens-per-doc", type=int, default=None)
    ap.add_argument("--queries", type=int, default=2, help="queries timed per cell (each a different one)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    data = load_dataset(a.data)
    llm = LLM(a.model)
    layers = parse_layers(a.layers)
    rows = []
    for method in a.methods.split(","):
        opts = {"max_tokens_per_doc": a.max_tokens_per_doc, **({"layers": layers} if method == "icr" else {})}
        llm.rerank("warm-up", ["a warm-up document", "another one"], method=method, **opts)
        for n in (int(x) for x in a.ns.split(",")):
            times, passes, windows, tokens = [], [], [], []
            for q in range(a.queries):
                # Query q's own document among n - 1 others; a fresh set per query so no prefix is cached.
                start = (q * 97) % len(data)
                docs = [data[(start + k) % len(data)].text for k in range(n)]
                t = time.perf_counter()
                out = llm.rerank(data[start].query, docs, method=method, **opts)
                times.append(time.perf_counter() - t)
                passes.append(out.usage.forward_passes)
                windows.append(out.ranking.windows)
                tokens.append(out.usage.computed_tokens)
            rows.append({"method": method, "n": n, "seconds": statistics.median(times),
                         "forward_passes": max(passes), "windows": max(windows),
                         "computed_tokens": statistics.median(tokens)})
            if not a.json:
                r = rows[-1]
                print(f"{method:9s} N={n:3d}  {r['seconds']:7.2f} s  passes {r['forward_passes']:4d}  windows "
                      f"{r['windows']}  computed tokens {r['computed_tokens']:.0f}", flush=True)
    if a.json:
        print(json.dumps({"layers": a.layers, "max_tokens_per_doc": a.max_tokens_per_doc, "rows": rows}))


if __name__ == "__main__":
    main()
