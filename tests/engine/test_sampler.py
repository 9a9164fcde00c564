"""Sampler: each filter and penalty does what its formula says; seeds are per request; logprobs are raw."""
from __future__ import annotations

import torch

from ember.engine.sampler import Sampler, SamplingRow, apply_penalties, compute_logprobs
from ember.engine.sampling_params import SamplingParams

V = 8
LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])


def _row(seed: int | None = None, prompt: list[int] | None = None, output: list[int] | None = None,
         **kw) -> SamplingRow:
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return SamplingRow(SamplingParams(**kw), gen, prompt or [], output or [])


def _freqs(draws: int = 20000, **kw) -> torch.Tensor:
    """Empirical token frequencies from one seeded row sampled `draws` times in one batch."""
    gen = torch.Generator().manual_seed(0)
    rows = [SamplingRow(SamplingParams(**kw), gen, [], []) for _ in range(draws)]
    ids = Sampler().sample(LOGITS.repeat(draws, 1), rows).token_ids
    return torch.bincount(torch.tensor(ids), minlength=V).float() / draws


def test_greedy_is_argmax_and_mixes_with_random_rows() -> None:
    logits = torch.randn(6, 50)
    rows = [_row(temperature=0) if i % 2 == 0 else _row(seed=i, temperature=1.0) for i in range(6)]
    ids = Sampler().sample(logits, rows).token_ids
    assert [ids[i] for i in (0, 2, 4)] == logits.argmax(-1)[[0, 2, 4]].tolist()


def test_temperature_matches_softmax() -> None:
    for t in (0.5, 1.0, 2.0):
        expected = torch.softmax(LOGITS / t, -1)
        assert (_freqs(temperature=t) - expected).abs().max() < 0.015


def test_top_k_top_p_min_p_renormalise_the_kept_set() -> None:
    probs = torch.softmax(LOGITS, -1)
    top3 = torch.zeros(V)
    top3[:3] = probs[:3] / probs[:3].sum()
    assert (_freqs(top_k=3) - top3).abs().max() < 0.015
    # top_p=0.6: the smallest prefix whose mass reaches 0.6 is tokens 0 and 1 (0.39 + 0.24 = 0.63).
    assert probs[:1].sum() < 0.6 <= probs[:2].sum()
    top2 = torch.zeros(V)
    top2[:2] = probs[:2] / probs[:2].sum()
    assert (_freqs(top_p=0.6) - top2).abs().max() < 0.015
    kept = probs >= 0.3 * probs.max()
    expected = torch.where(kept, probs, torch.zeros(V))
    assert (_freqs(min_p=0.3) - expected / expected.sum()).abs().max() < 0.015
    assert _freqs(top_k=1)[0] == 1.0 and _freqs(top_p=1e-6)[0] == 1.0


def test_seeded_row_is_independent_of_its_batch() -> None:
    logits = torch.randn(8, 100)

    def draw(position: int) -> list[int]:
        rows = [_row(seed=100 + i, temperature=1.0) for i in range(8)]
        rows[position] = _row(seed=7, temperature=1.0)
        batch = logits.clone()
        batch[position] = logits[0]
        return [Sampler().sample(batch, rows).token_ids[position] for _ in range(1)]

    alone = Sampler().sample(logits[:1], [_row(seed=7, temperature=1.0)]).token_ids
    assert draw(0) == draw(5) == alone
    many = [Sampler().sample(logits[:1], [_row(seed=s, temperature=1.0)]).token_ids[0] for s in range(20)]
    assert len(set(many)) > 1


def _naive_penalties(logits: torch.Tensor, row: SamplingRow) -> torch.Tensor:
    out = logits.clone()
    p = row.params
    for t in set(row.prompt_ids) | set(row.output_ids):
        out[t] = out[t] / p.repetition_penalty if out[t] > 0 else out[t] * p.repetition_penalty
    for t in set(row.output_ids):
        out[t] -= p.frequency_penalty * row.output_ids.count(t) + p.presence_penalty
    return out


def test_penalties_follow_their_formulas() -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        logits = torch.randn(3, 30, generator=gen)
        rows = [_row(prompt=torch.randint(0, 30, (5,), generator=gen).tolist(),
                     output=torch.randint(0, 30, (9,), generator=gen).tolist(),
                     repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25),
                _row(output=[1, 1, 2], presence_penalty=-1.0),
                _row(output=[3, 4])]  # no penalties: untouched
        got = apply_penalties(logits.clone(), rows)
        for i, r in enumerate(rows):
            torch.testing.assert_close(got[i], _naive_penalties(logits[i], r))


def test_logprobs_are_raw_and_include_the_sampled_token() -> None:
    logits = torch.randn(2, 40)
    rows = [_row(seed=1, temperature=2.0, top_k=30, logprobs=4), _row(temperature=0)]
    res = Sampler().sample(logits, rows)
    raw = compute_logprobs(logits)
    lp = res.logprobs[0]
    assert res.token_ids[0] in lp and res.logprobs[1] is None
    top4 = raw[0].topk(4).indices.tolist()
    assert set(top4) <= set(lp) and len(lp) <= 5
    for t, v in lp.items():
        assert abs(v - raw[0, t].item()) < 1e-6
