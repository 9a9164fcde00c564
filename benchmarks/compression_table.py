"""Issue 5's results table: perplexity, size on disk, resident memory and decode tok/s per compression.

Every row is made with the real commands (`ember compress`, `ember eval ppl`, `ember bench latency`),
each in its own process, calibrated on one text and scored on another with the same windows.

usage: python benchmarks/compression_table.py --calib CALIB.txt --eval EVAL.txt [--out DIR]
       [--ctx 512] [--windows 20] [--calib-tokens 4096] [--rows int8,awq-g128,...] [--peer PATH]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

# label -> `ember compress` arguments (None: the source model as loaded, with the given extra flags)
ROWS: dict[str, list[str] | None] = {
    "float32": None, "bfloat16": None,
    "int8": ["--method", "int8"],
    "int4-g32": ["--method", "int4", "--group-size", "32"],
    # 128 does not divide SmolLM2's hidden size (576): 64 is the coarsest group that tiles every layer.
    "int4-g64": ["--method", "int4", "--group-size", "64"],
    "awq-g32": ["--method", "awq", "--group-size", "32"],
    "awq-g64": ["--method", "awq", "--group-size", "64"],
    **{f"{m}-{s}": ["--method", m, "--sparsity", f"0.{s}"] for m in ("magnitude", "wanda", "dsnot")
       for s in (50, 60, 70)},
    "magnitude-2:4": ["--method", "magnitude", "--pattern", "2:4"],
    "wanda-2:4": ["--method", "wanda", "--pattern", "2:4"],
}
CALIBRATED = ("awq", "wanda", "dsnot")


def run_json(cmd: list[str]) -> dict:
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out[out.index("{"):])


def disk_mib(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2**20


def row(label: str, args: argparse.Namespace, source: Path) -> dict:
    model, extra = source, ["--dtype", "bfloat16"] if label == "bfloat16" else []
    spec = ROWS[label]
    if spec is not None:
        model = args.out / label
        if not (model / "manifest.json").exists():
            calib = ["--calib", args.calib, "--calib-tokens", str(args.calib_tokens)] \
                if any(m in spec[1] for m in CALIBRATED) else []
            subprocess.run(["ember", "compress", str(source), *spec, *calib, "--out", str(model)], check=True)
    ppl = run_json(["ember", "eval", "ppl", str(model), "--text", args.eval, "--ctx", str(args.ctx),
                    "--windows", str(args.windows), "--json", *extra])
    lat = run_json(["ember", "bench", "latency", "--model", str(model), "--pp", "64", "--tg", "64", "-r", "2",
                    "--kv-cache-memory", "0.05", "--json", *extra])
    return {"label": label, "ppl": ppl["ppl"], "tokens": ppl["tokens"], "windows": ppl["windows"],
            "disk_mib": disk_mib(model), "resident_mib": lat.get("resident_mib"),
            "tg64_tok_s": lat["tg64_tok_s"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calib", required=True)
    p.add_argument("--eval", required=True)
    p.add_argument("--out", type=Path, default=Path("bench-results/compression"))
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--windows", type=int, default=20)
    p.add_argument("--calib-tokens", type=int, default=4096)
    p.add_argument("--rows", default=",".join(ROWS))
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    from ember.loading.registry import pull

    source = pull(progress=False)
    results = []
    for label in a.rows.split(","):
        r = row(label, a, source)
        results.append(r)
        print(json.dumps(r), flush=True)
        (a.out / "table.jsonl").open("a").write(json.dumps(r) + "\n")
    print(f"\n| model | ppl ({results[0]['tokens']} tokens, ctx {a.ctx}) | disk MiB | resident MiB | tg64 tok/s |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['label']} | {r['ppl']:.3f} | {r['disk_mib']:.0f} | {r['resident_mib'] or 0:.0f} | "
              f"{r['tg64_tok_s']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
