"""Step trace of the mixed workload, in process: where a scheduling policy spends its steps.

8 streams decode while long prompts arrive every --interval seconds (as `ember bench mixed`), stepping
an engine directly; every step is logged (tokens, decodes, prompt chunks with their start positions,
seconds) and summed by kind: decode-only, prompt-only, and mixed steps.

usage: python benchmarks/mixed_trace.py [--policy prefill-first|splitfuse] [--itl-target auto|Nx|MS|off]
       [--quantization int8] [--budget 2048] [--long-prompts 8] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import random
import time
from typing import Any

from ember import LLM, SamplingParams
from ember.cli import parse_itl_target


def trace(policy: str, itl_target: float | str | None, quantization: str, budget: int, streams: int,
          stream_output: int, long_prompts: int, long_len: int, interval: float) -> list[dict[str, Any]]:
    llm = LLM(None, quantization=quantization, max_num_batched_tokens=budget, scheduler=policy,
              itl_target=itl_target)
    engine = llm.engine
    rng = random.Random(0)

    def prompt(n: int) -> list[int]:
        return [rng.randrange(100, 40000) for _ in range(n)]

    for i in range(streams):
        engine.add_request(f"d{i}", prompt(32), SamplingParams(max_tokens=stream_output, ignore_eos=True,
                                                               temperature=0))
    log: list[dict[str, Any]] = []
    start, added = time.perf_counter(), 0
    while engine.has_unfinished_requests() or added < long_prompts:
        if added < long_prompts and time.perf_counter() - start >= interval * (added + 1):
            engine.add_request(f"long{added}", prompt(long_len), SamplingParams(max_tokens=16, ignore_eos=True,
                                                                               temperature=0))
            added += 1
        if not engine.has_unfinished_requests():
            time.sleep(0.01)
            continue
        t = time.perf_counter()
        engine.step()
        shape = engine.last_step
        log.append({"tokens": shape.tokens, "decodes": shape.decodes, "chunks": list(shape.chunks),
                    "seconds": time.perf_counter() - t})
    return log


def summary(log: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    kinds = {"decode-only": [s for s in log if not s["chunks"]],
             "prompt-only": [s for s in log if s["chunks"] and not s["decodes"]],
             "mixed": [s for s in log if s["chunks"] and s["decodes"]]}
    return {k: {"steps": len(v), "seconds": sum(s["seconds"] for s in v),
                "prompt_tokens": sum(n for s in v for _, n in s["chunks"])} for k, v in kinds.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default="splitfuse", choices=["splitfuse", "prefill-first"])
    ap.add_argument("--itl-target", type=parse_itl_target, default="auto",
                    help="auto, Nx (e.g. 1.25x), milliseconds, or off (as ember's --itl-target)")
    ap.add_argument("--quantization", default="int8", choices=["none", "int8", "int4"])
    ap.add_argument("--budget", type=int, default=2048, help="max_num_batched_tokens")
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--stream-output", type=int, default=128)
    ap.add_argument("--long-prompts", type=int, default=8)
    ap.add_argument("--long-prompt-len", type=int, default=1500)
    ap.add_argument("--interval", type=float, default=2.0)
    ap.add_argument("--json", default=None, metavar="FILE", help="also write every step here")
    a = ap.parse_args()
    log = trace(a.policy, a.itl_target, a.quantization, a.budget, a.streams, a.stream_output, a.long_prompts,
                a.long_prompt_len, a.interval)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(log, f)
    print(json.dumps({"steps": len(log), "seconds": sum(s["seconds"] for s in log), **summary(log)}, indent=1))


if __name__ == "__main__":
    main()
