"""`ember bench latency`: llama-bench-style pp/tg tok/s plus achieved weight-read bandwidth (roofline)."""
from __future__ import annotations

import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ember.bench.common import machine
from ember.errors import InvalidParameterError
from ember.ops.quant import QuantLinear


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: everything but the embedding table (one row is read),
    which counts in full when it doubles as the LM head."""
    total = 0
    for name, p in model.named_parameters():
        if name.startswith("embed_tokens.") and model.lm_head is not None:
            continue
        total += p.numel() * p.element_size()
    # Packed quantized weights live in buffers.
    return total + sum(m.nbytes() for m in model.modules() if isinstance(m, QuantLinear))


def measure_read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """The machine's streaming read bandwidth in GB/s (best of a few sums over a large tensor)."""
    x = torch.ones(int(gib * (1 << 30)) // 4)
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        best = max(best, x.numel() * 4 / (time.perf_counter() - start) / 1e9)
    return best


def check_latency_args(pp: int, tg: int, depth: int, repetitions: int) -> None:
    """Counts a latency run can use, or an error that says which is wrong."""
    if pp < 0 or tg < 0 or not (pp or tg):
        raise InvalidParameterError(f"--pp {pp} --tg {tg}: token counts must be >= 0 and not both 0 "
                                    "(0 skips that measurement)")
    if depth < 0 or repetitions < 1:
        raise InvalidParameterError(f"--depth {depth} --repetitions {repetitions}: need depth >= 0 and "
                                    "at least one repetition")


def latency_tokens(pp: int, tg: int, depth: int) -> int:
    """The most tokens one sequence of run_latency holds (the warm-up's 12, a pp run, a tg run at depth)."""
    return max(12, pp + 1, max(1, depth) + tg + 1)


def run_latency(llm: Any, pp: int, tg: int, repetitions: int = 3, seed: int = 0,
                membw: bool = True, depth: int = 0, progress: bool = False) -> dict[str, Any]:
    """pp: prompt tok/s; tg: decode tok/s after a prompt of `depth` tokens (llama-bench's -d), timed from the
    first generated token on. A count of 0 skips that measurement (llama-bench's -p 0 / -n 0). progress: a bar
    over the runs on stderr (where it is a terminal)."""
    from ember import SamplingParams

    check_latency_args(pp, tg, depth, repetitions)
    rng = random.Random(seed)
    vocab = llm.engine.config.vocab_size
    low = min(256, vocab // 2)
    rand = lambda n: [rng.randrange(low, vocab) for _ in range(n)]  # noqa: E731
    runs = repetitions * (bool(pp) + bool(tg))
    bar = tqdm(total=1 + runs + (membw and bool(tg)), desc="warm-up", unit="run", leave=False, file=sys.stderr,
               disable=None if progress else True)
    llm.generate({"prompt_token_ids": rand(8)}, SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
    bar.update()
    pp_rates, tg_rates = [], []
    for r in range(repetitions):
        if pp:
            bar.set_description(f"pp{pp} {r + 1}/{repetitions}")
            start = time.perf_counter()
            llm.generate({"prompt_token_ids": rand(pp)}, SamplingParams(max_tokens=1))
            pp_rates.append(pp / (time.perf_counter() - start))
            bar.update()
        if tg:
            bar.set_description(f"tg{tg} {r + 1}/{repetitions}")
            stamps: list[float] = []  # when each token arrived (a long prompt also reports its chunks: skip them)
            llm.generate({"prompt_token_ids": rand(max(1, depth))}, SamplingParams(max_tokens=tg + 1, ignore_eos=True),
                         on_output=lambda out: out.outputs[0].token_ids and stamps.append(time.perf_counter()))
            tg_rates.append(tg / (stamps[-1] - stamps[0]))  # from the first token on: decode only
            bar.update()
    bar.set_description("memory bandwidth")
    weights = weight_bytes_per_token(llm.engine.loaded.model)
    result: dict[str, Any] = {"benchmark": "latency", "machine": machine(),
                              "dtype": llm.engine.args.dtype}
    if pp:
        result.update({f"pp{pp}_tok_s": statistics.mean(pp_rates), f"pp{pp}_tok_s_std": _std(pp_rates)})
    if tg:
        result.update({f"tg{tg}_tok_s": statistics.mean(tg_rates), f"tg{tg}_tok_s_std": _std(tg_rates)})
    result.update({"depth": depth, "kv_cache_dtype": llm.engine.args.kv_cache_dtype, "weight_bytes_per_token": weights})
    if tg:
        result["achieved_bandwidth_gb_s"] = weights * result[f"tg{tg}_tok_s"] / 1e9
    result.update(memory_usage())
    if llm.engine.speculator is not None:  # random tokens: prompt lookup rarely finds anything to draft
        result.update({f"spec_{k}": v for k, v in llm.engine.speculator.summary().items()})
    if membw and tg:
        bw = measure_read_bandwidth()
        bar.update()
        result["machine_read_bandwidth_gb_s"] = bw
        result["bandwidth_fraction"] = result["achieved_bandwidth_gb_s"] / bw
    bar.close()
    return result


def memory_usage() -> dict[str, float]:
    """This process's resident memory now and at its peak, in MiB (Linux; empty elsewhere)."""
    try:
        import resource

        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return {"resident_mib": pages * resource.getpagesize() / 2**20,
                "peak_resident_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    except (ImportError, OSError, ValueError, IndexError):
        return {}


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0
