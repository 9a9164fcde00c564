"""Single-stream and batched greedy decode tok/s: ember vs transformers' generate, same model, same run.

usage: python benchmarks/decode_throughput.py [--model PATH] [--threads 2] [--tokens 128] [--batch 16]
       [--skip-transformers] [--dtype float32|bfloat16] [--quantization none|int8|int4]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

PROMPT = "Once upon a time in a small village, there lived an old clockmaker who"


def ember_rates(model: Path, dtype: str, tokens: int, batch: int, quantization: str) -> dict[str, float]:
    from ember import LLM, SamplingParams

    llm = LLM(model, dtype=dtype, kv_cache_memory=1.0, quantization=quantization)
    ids = llm.get_tokenizer().encode(PROMPT)
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=8, ignore_eos=True))  # warm-up
    rates = {}
    for n in (1, batch):
        # Distinct prompts so the prefix cache cannot share them (and decode is what is timed).
        prompts = [{"prompt_token_ids": [i + 10] + ids} for i in range(n)]
        start = time.perf_counter()
        outs = llm.generate(prompts, params)
        rates[f"ember_bs{n}"] = sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - start)
    return rates


def transformers_rates(model: Path, dtype: str, tokens: int, batch: int) -> dict[str, float]:
    import transformers as tf

    hf = tf.AutoModelForCausalLM.from_pretrained(model.parent, gguf_file=model.name,
                                                 dtype=getattr(torch, dtype)).eval()
    tok = tf.AutoTokenizer.from_pretrained(model.parent, gguf_file=model.name)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    rates = {}
    for n in (1, batch):
        x = ids.repeat(n, 1)
        kw = dict(do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(x))
        hf.generate(x, max_new_tokens=4, min_new_tokens=4, **kw)
        start = time.perf_counter()
        hf.generate(x, max_new_tokens=tokens, min_new_tokens=tokens, **kw)
        rates[f"transformers_bs{n}"] = n * tokens / (time.perf_counter() - start)
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help=".gguf file (default: the pulled default model)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--quantization", default="none", choices=["none", "int8", "int4"], help="ember's weights")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.model is None:
        from ember.loading.registry import pull

        a.model = pull()
    result = {"machine": f"{os.cpu_count()} cpus, {platform.processor() or platform.machine()}",
              "threads": a.threads, "dtype": a.dtype, "tokens": a.tokens, "ember_quantization": a.quantization}
    result.update(ember_rates(a.model, a.dtype, a.tokens, a.batch, a.quantization))
    if not a.skip_transformers:
        result.update(transformers_rates(a.model, a.dtype, a.tokens, a.batch))
    print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()}, indent=1))


if __name__ == "__main__":
    main()
