"""Time the engine's decode steps of 16 sequences in process (model vs engine overhead), for A/B runs of two
checkouts: run it from each checkout's root, alternately.
    usage: python benchmarks/decode_step_time.py LABEL"""
from __future__ import annotations

import sys
import time

import torch

from ember import LLM, SamplingParams

torch.set_num_threads(2)
llm = LLM("smollm2-135m-instruct", max_num_seqs=16, kv_cache_memory=0.5)
eng = llm.engine
text = "It is a truth universally acknowledged, that a single man in possession of a good fortune " * 12
ids = llm.get_tokenizer().encode(text)[:250]
for i in range(16):
    eng.add_request(str(i), {"prompt_token_ids": ids[i:] + ids[:i]},
                    SamplingParams(max_tokens=200, ignore_eos=True, temperature=0))
while any(s.in_prefill or s.status.value != "running" for r in eng.requests.values() for s in r.seqs):
    eng.step()
for _ in range(5):
    eng.step()
before, start, steps = dict(eng.stats), time.perf_counter(), 60
for _ in range(steps):
    eng.step()
wall = time.perf_counter() - start
model = eng.stats["forward_s"] - before["forward_s"]
print(f"{sys.argv[1] if len(sys.argv) > 1 else 'run'}: step {1000 * wall / steps:.2f} ms, model "
      f"{1000 * model / steps:.2f} ms, overhead {1000 * (wall - model) / steps:.2f} ms")
