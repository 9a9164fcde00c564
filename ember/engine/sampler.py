"""Vectorised sampling over the batch: penalties, greedy, temperature, top-k/top-p/min-p, seeds, logprobs."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ember.engine.sampling_params import SamplingParams


@dataclass
class SamplingRow:
    params: SamplingParams
    generator: torch.Generator | None
    prompt_ids: list[int]
    output_ids: list[int]


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[dict[int, float] | None]


def compute_logprobs(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1)


def top_logprobs(row: torch.Tensor, k: int, include: int) -> dict[int, float]:
    out: dict[int, float] = {}
    if k > 0:
        vals, idx = row.topk(k)
        out = dict(zip(idx.tolist(), vals.tolist()))
    out[include] = float(row[include])
    return out


class Sampler:
    def sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SampleResult:
        logits = logits.float()
        raw = logits
        if any(_has_penalty(r.params) for r in rows):
            logits = apply_penalties(logits.clone(), rows)
        greedy = [r.params.greedy for r in rows]
        tokens = logits.argmax(dim=-1)
        if not all(greedy):
            tokens = torch.where(torch.tensor(greedy), tokens, self._random(logits, rows))
        ids = tokens.tolist()
        lps: list[dict[int, float] | None] = [None] * len(rows)
        if any(r.params.logprobs is not None for r in rows):
            all_lp = compute_logprobs(raw)
            for i, r in enumerate(rows):
                if r.params.logprobs is not None:
                    lps[i] = top_logprobs(all_lp[i], r.params.logprobs, ids[i])
        return SampleResult(ids, lps)

    @staticmethod
    def _random(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        temp = torch.tensor([max(r.params.temperature, 1e-5) for r in rows]).unsqueeze(1)
        logits = logits / temp
        top_k = [r.params.top_k for r in rows]
        if any(k > 0 for k in top_k):
            vocab = logits.shape[1]
            k = torch.tensor([k if k > 0 else vocab for k in top_k]).clamp(max=vocab)
            kth = logits.sort(dim=-1, descending=True).values.gather(1, (k - 1).unsqueeze(1))
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = logits.softmax(dim=-1)
        top_p = torch.tensor([r.params.top_p for r in rows])
        if (top_p < 1).any():
            sorted_p, order = probs.sort(dim=-1, descending=True)
            drop = (sorted_p.cumsum(-1) - sorted_p) > top_p.unsqueeze(1)
            probs = probs.masked_fill(drop.scatter(1, order, drop), 0.0)
        min_p = torch.tensor([r.params.min_p for r in rows])
        if (min_p > 0).any():
            probs = probs.masked_fill(probs < min_p.unsqueeze(1) * probs.max(-1, keepdim=True).values, 0.0)
        q = torch.empty_like(probs)
        for i, r in enumerate(rows):
            q[i].exponential_(generator=r.generator)
        return (probs / q).argmax(dim=-1)


def _has_penalty(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    for i, r in enumerate(rows):
        p = r.params
        if not _has_penalty(p):
            continue
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(r.prompt_ids) | set(r.output_ids)), dtype=torch.long)
            vals = logits[i, seen]
            logits[i, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if r.output_ids and (p.presence_penalty or p.frequency_penalty):
            counts = torch.bincount(torch.tensor(r.output_ids), minlength=logits.shape[1]).float()
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
    return logits
