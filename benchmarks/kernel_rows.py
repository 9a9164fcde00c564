"""The packed integer kernels at M activation rows: one decode step's projections of SmolLM2-135M (30 layers
of qkv, o, gate_up and down, random weights) timed for each M, so batch sizes that do not fill the 4-row
tiles show their cost. Row counts are interleaved rep by rep; median and minimum are printed.

usage: python benchmarks/kernel_rows.py [--bits 8|4] [--group 0 (per channel) | 32 | 64 ...]
       [--rows 1,2,3,4,5,6,7,8,9,10,11,12,16] [--reps 9]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from ember.ops.quant import QuantLinear

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # [N, K]: qkv, o, gate_up, down
LAYERS = 30


def step_s(layers: list[list[QuantLinear]], xs: dict[int, torch.Tensor]) -> float:
    """Seconds of one pass over every layer's projections."""
    start = time.perf_counter()
    for layer in layers:
        for q, (_, k) in zip(layer, SHAPES):
            q.matmul(xs[k])
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, default=8, choices=[8, 4])
    ap.add_argument("--group", type=int, default=0, help="weight group; 0 = one per output channel")
    ap.add_argument("--rows", default="1,2,3,4,5,6,7,8,9,10,11,12,16")
    ap.add_argument("--reps", type=int, default=9)
    a = ap.parse_args()
    torch.manual_seed(0)
    layers = [[QuantLinear.from_float(torch.randn(n, k) * 0.05, bits=a.bits, group=a.group or k) for n, k in SHAPES]
              for _ in range(LAYERS)]
    print(f"int{a.bits}, group {a.group or 'per channel'}, {torch.get_num_threads()} threads")
    rows = [int(r) for r in a.rows.split(",")]
    xs = {m: {k: torch.randn(m, k) for _, k in SHAPES} for m in rows}
    times: dict[int, list[float]] = {m: [] for m in rows}
    for _ in range(a.reps):  # row counts interleaved, so the VM's slow spells fall on all of them alike
        for m in rows:
            times[m].append(step_s(layers, xs[m]))
    for m in rows:
        print(f"{m:4d} rows  median {1000 * statistics.median(times[m]):7.2f} ms  min {1000 * min(times[m]):7.2f} ms")


if __name__ == "__main__":
    main()
