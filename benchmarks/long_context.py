"""Long-context modes: decode tok/s and KV bytes held against prompt length N, and the per-token cost of the
three ways to give keys a position other than the one they were written at.

    python benchmarks/long_context.py TEXT [--mode streaming] [--window 512] [--lengths 512,2048,8192,32768]

1. For each N: one request of N tokens of TEXT, 128 greedy tokens; decode tok/s (after the first token) and
   the most KV cache blocks held at once.
2. Position costs per decoded token, all layers of the model, measured here:
   - sinks (ember): re-rotate the sink keys of each decoding sequence, every step (ModelRunner._refresh_sinks);
   - K-shift (llama.cpp's context shift): re-rotate every key of the window when a block is evicted, i.e.
     once per block_size tokens;
   - pre-RoPE cache (StreamingLLM's reference): rotate every key of the window at its cache position, every step.
"""
from __future__ import annotations

import argparse
import time

import torch

from ember.bench.perplexity import read_text
from ember.engine.engine import LLMEngine
from ember.engine.sampling_params import SamplingParams
from ember.ops.kernels import cpu_kernels


def decode_rate(engine: LLMEngine, ids: list[int], tokens: int = 128) -> tuple[float, float, int]:
    """Prompt tok/s (to the first token), decode tok/s after it, and the most blocks held, for one request."""
    engine.blocks.peak_used = 0
    began = time.perf_counter()
    engine.add_request("r", {"prompt_token_ids": ids}, SamplingParams(max_tokens=tokens, temperature=0,
                                                                      ignore_eos=True))
    first = None
    while engine.has_unfinished_requests():
        outs = engine.step()
        if first is None and outs and outs[0].outputs[0].token_ids:
            first = time.perf_counter()
    assert first is not None
    return len(ids) / (first - began), (tokens - 1) / (time.perf_counter() - first), engine.blocks.peak_used


def best_of(fn, reps: int = 20) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def position_costs(engine: LLMEngine, window: int) -> dict[str, float]:
    """Milliseconds per decoded token of each way to re-position keys, for one sequence."""
    long = engine.long
    assert long is not None
    cfg, bs = engine.config, engine.blocks.block_size
    layers_keys = cfg.num_layers * cfg.num_kv_heads
    backend = engine.runner.backend
    k = long.sink_blocks(bs)
    src, dst = list(range(k)), list(range(k, 2 * k))
    shifts = long.key_shift(torch.tensor([window + 1000]))
    sinks = best_of(lambda: backend.refresh_sinks(src, dst, shifts, long)) if k else 0.0  # type: ignore[attr-defined]
    keys = torch.randn(window, layers_keys, cfg.head_dim)
    cos, sin = long.rotation(torch.full((window,), -bs))
    kern = cpu_kernels()  # the rotary kernel the model itself runs (as llama.cpp's K-shift runs its own)
    rotate_window = best_of(lambda: kern.rope_(keys, cos, sin) if kern else long.rotate(keys, cos[:, 0]))
    return {"sinks_ms": sinks * 1e3, "kshift_ms": rotate_window / bs * 1e3, "pre_rope_ms": rotate_window * 1e3}


def table(engine: LLMEngine, ids: list[int], lengths: list[int], title: str) -> None:
    per_block = engine.blocks.block_size * engine.runner.backend.bytes_per_token(  # type: ignore[attr-defined]
        engine.config.num_layers, engine.config.num_kv_heads, engine.config.head_dim, engine.dtype)
    decode_rate(engine, ids[:min(lengths) + 64], 64)  # warm up (kernels, allocator, the paths past the window)
    print(title)
    print(f"{'N':>7} {'prompt tok/s':>13} {'decode tok/s':>13} {'peak KV MiB':>12}")
    for n in lengths:
        prompt, rate, peak = decode_rate(engine, ids[:n])
        print(f"{n:>7} {prompt:>13.1f} {rate:>13.1f} {peak * per_block / 2**20:>12.1f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("text")
    ap.add_argument("--model", default=None)
    ap.add_argument("--mode", default="streaming", choices=["streaming", "lm-infinite"])
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--lengths", default="512,2048,8192,32768")
    ap.add_argument("--plain", action="store_true", help="also plain attention, at the lengths within the context")
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    engine = LLMEngine(model=args.model, long_context=args.mode, attention_window=args.window, max_num_seqs=1,
                       enable_prefix_caching=False, max_model_len=max(lengths) + 256)
    ids = engine.tokenizer.encode(read_text(args.text))
    table(engine, ids, lengths, f"--long-context {args.mode}, window {args.window}, {engine.long.sinks} sinks")
    if args.plain:
        plain = LLMEngine(model=args.model, max_num_seqs=1, enable_prefix_caching=False)
        table(plain, ids, [n for n in lengths if n + 128 <= plain.max_model_len], "plain attention")
    trained = engine.config.max_position_embeddings - engine.long.sinks  # type: ignore[union-attr]
    for window in sorted({args.window, trained}):
        costs = position_costs(engine, window)
        print(f"re-positioning keys, ms per decoded token (one sequence, {engine.config.num_layers} layers, window "
              f"{window}): sinks re-rotated {costs['sinks_ms']:.3f}, K-shift {costs['kshift_ms']:.3f}, "
              f"pre-RoPE cache {costs['pre_rope_ms']:.3f}")


if __name__ == "__main__":
    main()
