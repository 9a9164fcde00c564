"""What structured outputs cost per decode step: the same greedy requests with and without a JSON-schema
constraint, at 1 and 16 streams, on the default model. The mask time is the engine's own count (grammar_mask_s):
what sampling waited for (the masks are computed on a worker thread during the forward) plus applying them.
    usage: python benchmarks/structured_cost.py [--streams 1,16] [--tokens 128]"""
from __future__ import annotations

import argparse
import time

from ember import LLM, SamplingParams
from ember.engine.structured import StructuredOutputsParams

SCHEMA = {"type": "object", "required": ["title", "story", "tags"], "additionalProperties": False,
          "properties": {"title": {"type": "string", "maxLength": 60}, "story": {"type": "string"},
                         "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}}}}


def run(llm: LLM, streams: int, tokens: int, constrained: bool) -> dict[str, float]:
    so = StructuredOutputsParams(json=SCHEMA) if constrained else None
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=not constrained, structured_outputs=so)
    prompts = [[{"role": "user", "content": f"Write story number {i} about a lighthouse, as JSON."}]
               for i in range(streams)]
    before = dict(llm.engine.stats)
    start = time.perf_counter()
    outs = llm.chat(prompts, params)
    wall = time.perf_counter() - start
    d = {k: llm.engine.stats[k] - before.get(k, 0) for k in llm.engine.stats}
    generated = sum(len(c.token_ids) for o in outs for c in o.outputs)
    return {"steps": d["steps"], "step_ms": 1000 * d["step_s"] / d["steps"],
            "mask_ms_per_step": 1000 * d["grammar_mask_s"] / d["steps"], "tok_s": generated / wall,
            "generated": generated}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", default="1,16")
    ap.add_argument("--tokens", type=int, default=128)
    a = ap.parse_args()
    llm = LLM(None, max_num_seqs=16)
    run(llm, 2, 16, True)  # warm-up: kernels, llguidance's tokenizer view, lexer caches
    print("| streams | plain: step ms, tok/s | json schema: step ms, tok/s | mask ms left on the step's path | share of the step |")
    print("|---|---|---|---|---|")
    for n in (int(x) for x in a.streams.split(",")):
        plain, json_ = run(llm, n, a.tokens, False), run(llm, n, a.tokens, True)
        print(f"| {n} | {plain['step_ms']:.2f}, {plain['tok_s']:.1f} | {json_['step_ms']:.2f}, {json_['tok_s']:.1f} "
              f"| {json_['mask_ms_per_step']:.3f} | {100 * json_['mask_ms_per_step'] / json_['step_ms']:.1f}% |")


if __name__ == "__main__":
    main()
