"""Passkey retrieval (as LM-Infinite and Landmark Attention evaluate it): a random number hidden at a depth of a
long filler text, asked for at the end; accuracy by prompt length and depth, for a long-context mode or plain
attention."""
from __future__ import annotations

import random
import re
import time
from typing import Any

from ember.engine.engine import LLMEngine
from ember.engine.sampling_params import SamplingParams

TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
        "I will quiz you about the important information there.")
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUESTION = " What is the pass key? The pass key is"


def passkey_prompt(tokenizer: Any, length: int, depth: float, key: str) -> list[int]:
    """Token ids of about `length` tokens: the task, filler with the key's sentence at `depth` (0: start,
    1: end of the filler), the question."""
    needle = f" The pass key is {key}. Remember it. {key} is the pass key."
    fixed = len(tokenizer.encode(TASK + needle + QUESTION))
    per = len(tokenizer.encode(FILLER * 20)) / 20
    repeats = max(1, round((length - fixed) / per))
    before = round(repeats * depth)
    text = TASK + FILLER * before + needle + FILLER * (repeats - before) + QUESTION
    return tokenizer.encode(text)


def run_passkey(engine: LLMEngine, lengths: list[int], depths: list[float], trials: int,
                seed: int = 0) -> dict[str, Any]:
    """Accuracy (the key's digits in the greedy reply) per (length, depth), `trials` keys each; requests of one
    length run together."""
    rng = random.Random(seed)
    params = SamplingParams(max_tokens=8, temperature=0)
    cells: list[dict[str, Any]] = []
    began = time.perf_counter()
    for length in lengths:
        jobs = []
        for depth in depths:
            for _ in range(trials):
                key = str(rng.randint(10000, 99999))
                ids = passkey_prompt(engine.tokenizer, length, depth, key)
                jobs.append((depth, key, ids))
        replies = _generate(engine, [ids for _, _, ids in jobs], params)
        for depth in depths:
            got = [(key, reply) for (d, key, _), reply in zip(jobs, replies) if d == depth]
            hits = sum(key in re.sub(r"\D", "", reply)[: len(key) + 2] for key, reply in got)
            cells.append({"length": length, "tokens": len(jobs[0][2]), "depth": depth, "trials": len(got),
                          "accuracy": hits / len(got)})
    return {"cells": cells, "seconds": time.perf_counter() - began}


def _generate(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> list[str]:
    for i, ids in enumerate(prompts):
        engine.add_request(str(i), {"prompt_token_ids": ids}, params)
    texts: dict[int, str] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                texts[int(out.request_id)] = out.outputs[0].text
    return [texts[i] for i in range(len(prompts))]


def table(result: dict[str, Any]) -> str:
    """Accuracy as rows of lengths by columns of depths."""
    depths = sorted({c["depth"] for c in result["cells"]})
    lengths = sorted({c["length"] for c in result["cells"]})
    lines = ["tokens  " + "".join(f"depth {d:<5g}" for d in depths)]
    for n in lengths:
        row = {c["depth"]: c for c in result["cells"] if c["length"] == n}
        tokens = next(iter(row.values()))["tokens"]
        lines.append(f"{tokens:<8d}" + "".join(f"{row[d]['accuracy']:<11.2f}" for d in depths))
    return "\n".join(lines)
