"""`ember bench throughput`: N requests through the offline engine at once; requests/s and tokens/s."""
from __future__ import annotations

import random
import sys
import time
from typing import Any

from tqdm import tqdm

from ember.bench.common import machine, sample_lengths


def run_throughput(llm: Any, num_prompts: int, input_len: int, output_len: int, range_ratio: float = 0.0,
                   seed: int = 0, progress: bool = False) -> dict[str, Any]:
    """Random-token prompts of ~input_len, exactly output_len tokens out each (ignore_eos). progress: a bar
    over the tokens generated on stderr (where it is a terminal)."""
    from ember import SamplingParams

    rng = random.Random(seed)
    vocab = llm.engine.config.vocab_size
    ins = sample_lengths(rng, num_prompts, input_len, range_ratio)
    outs = sample_lengths(rng, num_prompts, output_len, range_ratio)
    # Random ids (avoiding the first 256, often special or byte tokens) so the prefix cache cannot help.
    prompts = [{"prompt_token_ids": [rng.randrange(min(256, vocab // 2), vocab) for _ in range(n)]} for n in ins]
    params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in outs]
    llm.generate(prompts[:1], SamplingParams(max_tokens=2, ignore_eos=True))  # warm-up
    before = dict(llm.engine.stats)
    shown: dict[str, int] = {}

    def count(out: Any) -> None:
        n = len(out.outputs[0].token_ids)
        bar.update(n - shown.get(out.request_id, 0))
        shown[out.request_id] = n

    with tqdm(total=sum(outs), desc=f"{num_prompts} requests", unit="tok", leave=False, file=sys.stderr,
              disable=None if progress else True) as bar:
        start = time.perf_counter()
        results = llm.generate(prompts, params, on_output=count)
        elapsed = time.perf_counter() - start
    steps = {k: llm.engine.stats[k] - before[k] for k in ("steps", "step_s", "forward_s")}
    gen = sum(len(r.outputs[0].token_ids) for r in results)
    total = gen + sum(ins)
    return {"benchmark": "throughput", "machine": machine(), "num_prompts": num_prompts,
            "input_len": input_len, "output_len": output_len, "elapsed_s": elapsed,
            "requests_per_s": num_prompts / elapsed, "output_tokens_per_s": gen / elapsed,
            "total_tokens_per_s": total / elapsed, "prompt_tokens": sum(ins), "output_tokens": gen,
            "max_num_batched_tokens": llm.engine.args.max_num_batched_tokens,
            "scheduler": llm.engine.args.scheduler, "steps": steps["steps"],
            "mean_step_ms": 1e3 * steps["step_s"] / max(steps["steps"], 1),
            # The engine's own share of a step: scheduling, batch building, sampling, detokenising.
            "engine_overhead_fraction": 1 - steps["forward_s"] / steps["step_s"] if steps["step_s"] else 0.0}
