"""Issue 5's KV-cache rows: perplexity at a long context, tokens that fit in 1 GiB, decode tok/s at depth.

Every figure comes from the real commands, each in its own process: `ember eval ppl --kv-cache-dtype`,
the engine's own cache sizing (`LLM(kv_cache_memory=1)`), `ember bench latency --depth`.

usage: python benchmarks/kv_cache_table.py --eval EVAL.txt [--model M] [--ctx 2048] [--windows 5]
       [--depth 2048] [--quantization int8] [--dtypes auto,int8,int4,int2] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys


def run_json(cmd: list[str]) -> dict:
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out[out.index("{"):])


def tokens_in(model: str | None, kv: str, gib: float) -> int:
    code = ("import sys; from ember import LLM; "
            f"print(LLM({model!r}, kv_cache_dtype={kv!r}, kv_cache_memory={gib}).engine.num_cache_tokens)")
    return int(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
               .stdout.split()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--eval", required=True, help="text to score")
    p.add_argument("--model", default=None)
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--windows", type=int, default=5)
    p.add_argument("--depth", type=int, default=2048, help="context before the decode-speed run")
    p.add_argument("--quantization", default="int8", help="weights for the decode-speed run")
    p.add_argument("--dtypes", default="auto,int8,int4,int2")
    p.add_argument("--out", default=None, help="also write the rows here as JSON")
    a = p.parse_args()
    model = [a.model] if a.model else []
    rows = []
    # Timed runs first, all together (keep the machine quiet for them), then the perplexities.
    for kv in a.dtypes.split(","):
        lat = run_json(["ember", "bench", "latency", *(["--model", a.model] if a.model else []), "--pp", "64",
                        "--tg", "128", "-r", "2", "--depth", str(a.depth), "-q", a.quantization,
                        "--kv-cache-dtype", kv, "--no-membw", "--json"])
        rows.append({"kv_cache_dtype": kv, "tokens_in_1gib": tokens_in(a.model, kv, 1.0),
                     "tg128_tok_s": lat["tg128_tok_s"], "depth": a.depth, "weights": a.quantization})
        print(json.dumps(rows[-1]), flush=True)
    print("timed runs done", flush=True)
    for r in rows:
        ppl = run_json(["ember", "eval", "ppl", *model, "--text", a.eval, "--ctx", str(a.ctx), "--windows",
                        str(a.windows), "--kv-cache-dtype", r["kv_cache_dtype"], "--json"])
        r.update(ppl=ppl["ppl"], tokens_scored=ppl["tokens"])
        print(json.dumps(r), flush=True)
    base = rows[0]
    print(f"\n| KV cache | perplexity (ctx {a.ctx}, {a.windows} windows) | tokens in 1 GiB | "
          f"tg128 @ depth {a.depth} tok/s ({a.quantization} weights) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['kv_cache_dtype']} | {r['ppl']:.3f} ({100 * (r['ppl'] / base['ppl'] - 1):+.2f}%) | "
              f"{r['tokens_in_1gib']:,} ({r['tokens_in_1gib'] / base['tokens_in_1gib']:.1f}x) | "
              f"{r['tg128_tok_s']:.1f} |")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
