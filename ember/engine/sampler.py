"""Vectorised batch sampling: logit bias, penalties, greedy, temperature, top-k/top-p/min-p, per-request seeds, raw logprobs."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain

import torch

from ember.engine.sampling_params import SamplingParams

_TOP_P_CANDIDATES = 256  # top-p first looks among this many tokens (a topk), not a full-vocabulary sort


@dataclass
class SamplingRow:
    """One row of the batch: its params, its seeded generator (or None: global RNG) and its token history."""

    params: SamplingParams
    generator: torch.Generator | None
    prompt_ids: list[int]
    output_ids: list[int]


@dataclass
class SampleResult:
    """Sampled token per row and, for rows that asked, the raw top logprobs plus the sampled token."""

    token_ids: list[int]
    logprobs: list[dict[int, float] | None]


def compute_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax over the last dim, in float32."""
    return torch.log_softmax(logits.float(), dim=-1)


def top_logprobs(logprobs_row: torch.Tensor, k: int, include: int) -> dict[int, float]:
    """The `k` most likely tokens of one row (best first) plus `include`, mapped to their logprobs."""
    out: dict[int, float] = {}
    k = min(k, logprobs_row.shape[-1])
    if k > 0:
        vals, idx = logprobs_row.topk(k)
        out = dict(zip(idx.tolist(), vals.tolist()))
    if include not in out:
        out[include] = float(logprobs_row[include])
    return out


class Sampler:
    """Picks one token per row; every step works on the whole batch, or on just the rows that need it."""

    def sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SampleResult:
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits {tuple(logits.shape)} do not match {len(rows)} rows")
        if not rows:
            return SampleResult([], [])
        raw = logits.float()
        ids = _choose(apply_penalties(apply_logit_bias(raw, rows), rows), rows).tolist()
        return SampleResult(ids, _row_logprobs(raw, rows, ids))


def _choose(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """argmax for greedy rows, a random draw for the others."""
    random = [i for i, r in enumerate(rows) if not r.params.greedy]
    if not random:
        return logits.argmax(dim=-1)
    if len(random) == len(rows):
        return _draw(logits, rows)
    tokens = logits.argmax(dim=-1)
    idx = torch.tensor(random, device=logits.device)
    tokens[idx] = _draw(logits[idx], [rows[i] for i in random])
    return tokens


def _draw(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p, then one uniform draw per row through the cumulative distribution."""
    temps = _column([r.params.temperature for r in rows], logits)
    logits = _top_k(logits / temps, [r.params.top_k for r in rows])
    probs = logits.softmax(dim=-1)
    probs = _top_p(probs, [r.params.top_p for r in rows])
    probs = _min_p(probs, [r.params.min_p for r in rows])
    return _inverse_cdf(probs, _uniforms(rows).to(probs.device))


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row, the first token whose cumulative mass exceeds u times the row's (unnormalised) total: a
    token of zero mass never is. One cumsum per row; Exp(1) noise over the whole vocabulary (the
    exponential race) cost ~1 ms a row on CPU, more than a 135M model's decode step."""
    cdf = probs.cumsum(dim=-1, dtype=torch.float64)  # float64: no drift over 150k-token vocabularies
    tokens = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(1)
    over = tokens >= probs.shape[1]  # u * total rounded up to the total itself
    if over.any():
        tokens[over] = probs[over].argmax(dim=-1)
    return tokens


def _uniforms(rows: list[SamplingRow]) -> torch.Tensor:
    """[n, 1] float64 draws from U[0, 1): a seeded row's from its own generator, so batch-independent."""
    u = torch.rand(len(rows), 1, dtype=torch.float64)
    for i, r in enumerate(rows):
        if r.generator is not None:
            u[i] = torch.rand(1, dtype=torch.float64, generator=r.generator, device=r.generator.device)
    return u


def _top_k(logits: torch.Tensor, ks: list[int]) -> torch.Tensor:
    """Mask every logit below the row's k-th largest (ties with it are kept)."""
    vocab = logits.shape[1]
    need = [i for i, k in enumerate(ks) if 0 < k < vocab]

    def cut(sub: torch.Tensor) -> torch.Tensor:
        k = torch.tensor([ks[i] for i in need], device=sub.device)
        kth = sub.topk(int(k.max()), dim=-1).values.gather(1, (k - 1).unsqueeze(1))
        return sub.masked_fill(sub < kth, float("-inf"))

    return _on_rows(logits, need, cut)


def _top_p(probs: torch.Tensor, ps: list[float]) -> torch.Tensor:
    """Keep the smallest most-likely set whose mass reaches p (always at least the top token)."""
    need = [i for i, p in enumerate(ps) if p < 1.0]

    def cut(sub: torch.Tensor) -> torch.Tensor:
        p = _column([ps[i] for i in need], sub)
        return sub.masked_fill(~_nucleus(sub, p, min(_TOP_P_CANDIDATES, sub.shape[1])), 0.0)

    return _on_rows(probs, need, cut)


def _nucleus(probs: torch.Tensor, p: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of each row's top-p set, found among its `k` likeliest tokens (a full sort for rows they can't fill)."""
    vocab = probs.shape[1]
    vals, order = probs.topk(k, dim=-1) if k < vocab else probs.sort(dim=-1, descending=True)
    mass = vals.cumsum(dim=-1)
    keep_sorted = (mass - vals) < p  # a token stays while the mass ranked above it is short of p
    keep_sorted[:, 0] = True  # the top token always (a p below float32's range, 5e-324, is 0 here)
    keep = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, order, keep_sorted)
    short = mass[:, -1] < p[:, 0]
    if k < vocab and short.any():
        keep[short] = _nucleus(probs[short], p[short], vocab)
    return keep


def _min_p(probs: torch.Tensor, mins: list[float]) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the row's top probability."""
    need = [i for i, m in enumerate(mins) if m > 0.0]

    def cut(sub: torch.Tensor) -> torch.Tensor:
        floor = _column([mins[i] for i in need], sub) * sub.max(dim=-1, keepdim=True).values
        return sub.masked_fill(sub < floor, 0.0)

    return _on_rows(probs, need, cut)


def _has_penalty(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def apply_logit_bias(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Each row's logit_bias (token id -> value) added to its logits, as OpenAI's; `logits` itself if none."""
    entries = [(i, t, v) for i, r in enumerate(rows) if r.params.logit_bias for t, v in r.params.logit_bias.items()]
    if not entries:
        return logits
    row, token, value = zip(*entries)
    logits = logits.clone()
    index = (torch.tensor(row, device=logits.device), torch.tensor(token, device=logits.device))
    return logits.index_put_(index, torch.tensor(value, dtype=logits.dtype, device=logits.device), accumulate=True)


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Repetition (prompt+output), then frequency and presence (output) penalties; `logits` itself if none apply."""
    rep = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0]
    additive = [i for i, r in enumerate(rows) if r.output_ids
                and (r.params.frequency_penalty != 0.0 or r.params.presence_penalty != 0.0)]
    if not rep and not additive:
        return logits
    if len(rep or additive) < len(rows):  # the first pass writes rows in place: never into the caller's tensor
        logits = logits.clone()
    vocab = logits.shape[1]

    def repetition(sub: torch.Tensor) -> torch.Tensor:
        seen = _token_counts([rows[i].prompt_ids + rows[i].output_ids for i in rep], vocab, sub.device) > 0
        pen = _column([rows[i].params.repetition_penalty for i in rep], sub)
        return torch.where(seen, torch.where(sub > 0, sub / pen, sub * pen), sub)

    def frequency_presence(sub: torch.Tensor) -> torch.Tensor:
        counts = _token_counts([rows[i].output_ids for i in additive], vocab, sub.device)
        freq = _column([rows[i].params.frequency_penalty for i in additive], sub)
        pres = _column([rows[i].params.presence_penalty for i in additive], sub)
        return sub - freq * counts - pres * (counts > 0).to(sub.dtype)

    logits = _on_rows(logits, rep, repetition)
    return _on_rows(logits, additive, frequency_presence)


def _token_counts(id_lists: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[len(id_lists), vocab] float32 counts of each token id per list, in one bincount."""
    lengths = torch.tensor([len(ids) for ids in id_lists], device=device)
    flat = torch.tensor(list(chain.from_iterable(id_lists)), dtype=torch.long, device=device)
    row = torch.repeat_interleave(torch.arange(len(id_lists), device=device), lengths)
    return torch.bincount(row * vocab + flat, minlength=len(id_lists) * vocab).view(-1, vocab).float()


def _row_logprobs(raw: torch.Tensor, rows: list[SamplingRow], ids: list[int]) -> list[dict[int, float] | None]:
    """Raw-distribution top logprobs (plus the sampled token) for the rows that asked for them."""
    out: list[dict[int, float] | None] = [None] * len(rows)
    want = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    if want:
        lps = compute_logprobs(raw if len(want) == len(rows) else raw[torch.tensor(want, device=raw.device)])
        for j, i in enumerate(want):
            out[i] = top_logprobs(lps[j], rows[i].params.logprobs, ids[i])
    return out


def _on_rows(x: torch.Tensor, idx: list[int], fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """`x` with rows `idx` replaced by `fn(those rows)`; no gather/scatter when `idx` is every row."""
    if not idx:
        return x
    if len(idx) == x.shape[0]:
        return fn(x)
    sel = torch.tensor(idx, device=x.device)
    x[sel] = fn(x[sel])
    return x


def _column(values: list[float], like: torch.Tensor) -> torch.Tensor:
    """Per-row scalars as a [n, 1] float32 column on `like`'s device."""
    return torch.tensor(values, dtype=torch.float32, device=like.device).unsqueeze(1)
