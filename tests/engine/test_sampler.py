"""Sampler: greedy, filters and penalties follow their formulas; seeds are per request; logprobs are raw."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ember.engine import sampler as sampler_module
from ember.engine.sampler import (Sampler, SamplingRow, apply_penalties, compute_logprobs,
                                  top_logprobs)
from ember.engine.sampling_params import SamplingParams

V = 8
LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
PROBS = torch.softmax(LOGITS, -1)  # 0.39, 0.24, 0.14, 0.09, 0.05, 0.03, 0.02, 0.002
DRAWS = 20000
TOL = 0.015  # ~4 standard deviations of a frequency near 0.4 over 20000 draws


def _row(seed: int | None = None, prompt: list[int] | None = None, output: list[int] | None = None,
         **kw) -> SamplingRow:
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return SamplingRow(SamplingParams(**kw), gen, list(prompt or []), list(output or []))


def _freqs(seeded: bool, draws: int = DRAWS, **kw) -> torch.Tensor:
    """Empirical token frequencies of LOGITS over `draws` rows of one batch, seeded or global-RNG."""
    gen = torch.Generator().manual_seed(0) if seeded else None
    rows = [SamplingRow(SamplingParams(**kw), gen, [], []) for _ in range(draws)]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        ids = Sampler().sample(LOGITS.repeat(draws, 1), rows).token_ids
    return torch.bincount(torch.tensor(ids), minlength=V).float() / draws


def _renormalised(keep: torch.Tensor, probs: torch.Tensor = PROBS) -> torch.Tensor:
    kept = torch.where(keep, probs, torch.zeros_like(probs))
    return kept / kept.sum()


def _seq(logits: torch.Tensor, rows: list[SamplingRow], position: int, steps: int = 6) -> list[int]:
    """The tokens drawn for `rows[position]` over `steps` calls."""
    sampler = Sampler()
    return [sampler.sample(logits, rows).token_ids[position] for _ in range(steps)]


# --- greedy -------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_all_greedy_batch_is_argmax_and_leaves_the_global_rng_alone(dtype: torch.dtype) -> None:
    logits = torch.randn(16, 1000, generator=torch.Generator().manual_seed(1)).to(dtype)
    state = torch.get_rng_state()
    res = Sampler().sample(logits, [_row(temperature=0) for _ in range(16)])
    assert res.token_ids == logits.float().argmax(-1).tolist()
    assert res.logprobs == [None] * 16
    assert torch.equal(torch.get_rng_state(), state)


def test_mixed_batch_greedy_rows_are_argmax_random_rows_are_sampled() -> None:
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(2))
    rows = [_row(temperature=0) if i % 2 == 0 else _row(seed=i, temperature=5.0) for i in range(8)]
    draws = [Sampler().sample(logits, rows).token_ids for _ in range(5)]
    argmax = logits.argmax(-1).tolist()
    for ids in draws:
        assert [ids[i] for i in (0, 2, 4, 6)] == [argmax[i] for i in (0, 2, 4, 6)]
    # At temperature 5 over 50 tokens the random rows almost never land on the argmax every time.
    assert any(ids[i] != argmax[i] for ids in draws for i in (1, 3, 5, 7))


def test_greedy_takes_the_argmax_of_the_penalised_logits() -> None:
    logits = torch.tensor([[3.0, 2.9, 0.0, -1.0]])
    plain = Sampler().sample(logits, [_row(temperature=0, prompt=[0])]).token_ids
    penalised = Sampler().sample(logits, [_row(temperature=0, prompt=[0], repetition_penalty=1.2)]).token_ids
    assert plain == [0] and penalised == [1]  # 3.0 / 1.2 = 2.5 < 2.9


def test_does_not_modify_the_callers_logits() -> None:
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(3))
    before = logits.clone()
    rows = [_row(temperature=0, output=[1, 2], repetition_penalty=2.0),
            _row(seed=1, output=[1, 1], frequency_penalty=1.0, top_k=3, top_p=0.5, min_p=0.1),
            _row(seed=2)]
    Sampler().sample(logits, rows)
    assert torch.equal(logits, before)


# --- seeds --------------------------------------------------------------------------------------

def test_seeded_row_is_reproducible_and_independent_of_its_batch() -> None:
    logits = torch.randn(8, 200, generator=torch.Generator().manual_seed(4))
    target = logits[0]

    def others() -> list[SamplingRow]:  # random rows of every kind, plus a greedy one
        return [_row(seed=100 + i, temperature=0.8, top_k=20) if i % 3 == 0 else
                _row(temperature=1.3, top_p=0.9, output=[5, 5], frequency_penalty=0.5) if i % 3 == 1 else
                _row(temperature=0) for i in range(8)]

    def in_batch(position: int) -> list[int]:
        rows = others()
        rows[position] = _row(seed=7, temperature=0.9)
        batch = logits.clone()
        batch[position] = target
        return _seq(batch, rows, position)

    alone = _seq(target.unsqueeze(0), [_row(seed=7, temperature=0.9)], 0)
    assert alone == _seq(target.unsqueeze(0), [_row(seed=7, temperature=0.9)], 0)
    assert in_batch(0) == alone
    assert in_batch(5) == alone
    assert len(set(alone)) > 1  # it really samples: six draws at T=0.9 over 200 tokens vary


def test_different_seeds_give_different_draws() -> None:
    logits = torch.randn(1, 200, generator=torch.Generator().manual_seed(5))
    seqs = {tuple(_seq(logits, [_row(seed=s)], 0, steps=3)) for s in range(10)}
    assert len(seqs) > 5


def test_unseeded_rows_follow_the_global_rng() -> None:
    logits = torch.randn(4, 200, generator=torch.Generator().manual_seed(6))
    rows = [_row(), _row(seed=3), _row(), _row(temperature=0)]

    def run() -> list[list[int]]:
        with torch.random.fork_rng():
            torch.manual_seed(11)
            return [Sampler().sample(logits, rows).token_ids for _ in range(4)]

    first = run()
    rows[1] = _row(seed=3)  # a fresh generator: the seeded row repeats too
    assert run() == first
    assert len({ids[0] for ids in first}) > 1


# --- filters ------------------------------------------------------------------------------------

def test_top_k_1_and_tiny_top_p_are_greedy() -> None:
    logits = torch.randn(32, 300, generator=torch.Generator().manual_seed(7))
    argmax = logits.argmax(-1).tolist()
    assert Sampler().sample(logits, [_row(seed=i, temperature=2.0, top_k=1) for i in range(32)]).token_ids == argmax
    assert Sampler().sample(logits, [_row(seed=i, temperature=2.0, top_p=1e-6) for i in range(32)]).token_ids == argmax


def test_min_p_never_draws_below_the_floor() -> None:
    logits = torch.randn(64, 300, generator=torch.Generator().manual_seed(8)) * 3
    rows = [_row(seed=i, temperature=1.5, min_p=0.2) for i in range(64)]
    probs = torch.softmax(logits / 1.5, -1)
    floor = 0.2 * probs.max(-1).values
    for _ in range(5):
        ids = torch.tensor(Sampler().sample(logits, rows).token_ids)
        assert (probs[torch.arange(64), ids] >= floor).all()


def test_draws_at_the_ends_of_the_unit_interval_land_on_kept_tokens() -> None:
    # Masked tokens (zero mass) at both ends and between: u = 0 takes the first kept token, u just below 1
    # (u * total may round up to the total) the last or the likeliest kept one, never a masked one.
    probs = torch.tensor([[0.0, 0.3, 0.0, 0.7, 0.0]] * 3)
    u = torch.tensor([[0.0], [1.0 - 2**-53], [1.0]], dtype=torch.float64)
    tokens = sampler_module._inverse_cdf(probs, u).tolist()
    assert tokens[0] == 1 and tokens[1] in (1, 3) and tokens[2] == 3


@pytest.mark.parametrize("seeded", [False, True])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_frequencies_match_softmax(seeded: bool, temperature: float) -> None:
    expected = torch.softmax(LOGITS / temperature, -1)
    assert (_freqs(seeded, temperature=temperature) - expected).abs().max() < TOL


@pytest.mark.parametrize("seeded", [False, True])
def test_top_k_top_p_min_p_frequencies_match_the_renormalised_kept_set(seeded: bool) -> None:
    ranks = torch.arange(V)
    assert (_freqs(seeded, top_k=3) - _renormalised(ranks < 3)).abs().max() < TOL
    # top_p=0.6: the smallest prefix whose mass reaches 0.6 is tokens 0 and 1 (0.39 + 0.24 = 0.63).
    assert PROBS[:1].sum() < 0.6 <= PROBS[:2].sum()
    assert (_freqs(seeded, top_p=0.6) - _renormalised(ranks < 2)).abs().max() < TOL
    assert (_freqs(seeded, min_p=0.3) - _renormalised(PROBS >= 0.3 * PROBS.max())).abs().max() < TOL


def test_top_p_applies_to_the_top_k_renormalised_distribution() -> None:
    # Top-3 renormalised is 0.51, 0.31, 0.19: p=0.7 keeps two tokens (on the full distribution it would keep 3).
    top3 = _renormalised(torch.arange(V) < 3)
    assert top3[0] < 0.7 <= top3[:2].sum() and PROBS[:2].sum() < 0.7
    assert (_freqs(False, top_k=3, top_p=0.7) - _renormalised(torch.arange(V) < 2)).abs().max() < TOL


def _naive_top_p(probs: torch.Tensor, p: float) -> set[int]:
    """Token by token: walk down the sorted row, keeping each token while the mass kept so far is below p."""
    kept, mass = set(), 0.0
    for t in probs.argsort(descending=True).tolist():
        if mass >= p:
            break
        kept.add(t)
        mass += probs[t].item()
    return kept


def test_top_p_on_a_large_vocabulary_matches_a_full_sort() -> None:
    # Peaked rows fit their nucleus in the top-k candidates; flat rows need more and fall back to a full sort.
    gen = torch.Generator().manual_seed(12)
    scale = torch.tensor([8.0, 0.1, 4.0, 0.0, 6.0, 0.5]).unsqueeze(1)
    probs = torch.softmax(torch.randn(6, 2000, generator=gen) * scale, -1)
    ps = [0.9, 0.95, 0.5, 0.3, 0.99, 0.8]
    expected = [_naive_top_p(probs[i], p) for i, p in enumerate(ps)]
    sizes = [len(e) for e in expected]
    assert min(sizes) < sampler_module._TOP_P_CANDIDATES < max(sizes)
    got = sampler_module._top_p(probs.clone(), ps)
    assert [set(torch.nonzero(got[i]).flatten().tolist()) for i in range(6)] == expected
    torch.testing.assert_close(got[got > 0], probs[got > 0])


def test_temperature_applies_before_top_p() -> None:
    # At T=0.25 token 0 alone has 0.86 of the mass, so top_p=0.8 keeps only it; at T=1 it would keep 4 tokens.
    sharp = torch.softmax(LOGITS / 0.25, -1)
    assert sharp[0] >= 0.8
    assert _freqs(False, draws=2000, temperature=0.25, top_p=0.8)[0] == 1.0


# --- penalties ----------------------------------------------------------------------------------

def _naive_penalties(logits: torch.Tensor, row: SamplingRow) -> torch.Tensor:
    """Token-by-token reference: repetition over prompt+output, then frequency and presence over output."""
    out = logits.clone()
    p = row.params
    for t in set(row.prompt_ids) | set(row.output_ids):
        out[t] = out[t] / p.repetition_penalty if out[t] > 0 else out[t] * p.repetition_penalty
    for t in set(row.output_ids):
        out[t] = out[t] - p.frequency_penalty * row.output_ids.count(t) - p.presence_penalty
    return out


_penalty = st.one_of(st.just(0.0), st.floats(-2, 2, allow_nan=False))
_rows = st.lists(st.fixed_dictionaries({
    "prompt": st.lists(st.integers(0, 29), max_size=12),
    "output": st.lists(st.integers(0, 29), max_size=12),
    "repetition_penalty": st.one_of(st.just(1.0), st.floats(0.2, 3.0)),
    "presence_penalty": _penalty,
    "frequency_penalty": _penalty,
}), min_size=1, max_size=6)


@settings(max_examples=200, deadline=None)
@given(specs=_rows, seed=st.integers(0, 2**31 - 1))
def test_penalties_match_the_naive_reference(specs: list[dict], seed: int) -> None:
    logits = torch.randn(len(specs), 30, generator=torch.Generator().manual_seed(seed)) * 3
    rows = [_row(**spec) for spec in specs]
    before = logits.clone()
    got = apply_penalties(logits, rows)
    assert torch.equal(logits, before)  # the input is never written
    for i, r in enumerate(rows):
        torch.testing.assert_close(got[i], _naive_penalties(logits[i], r))


def test_each_penalty_by_hand() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])

    def pen(**kw) -> list[float]:
        return apply_penalties(logits, [_row(prompt=[0], output=[1, 2, 2], **kw)])[0].tolist()

    assert pen(repetition_penalty=2.0) == [1.0, -4.0, 0.5, 0.5]  # prompt token 0 counts too; 3 unseen
    assert pen(presence_penalty=0.5) == [2.0, -2.5, 0.5, 0.5]  # output only: token 0 untouched
    assert pen(frequency_penalty=0.5) == [2.0, -2.5, 0.0, 0.5]  # token 2 twice


def test_no_penalties_is_a_no_op_returning_the_same_tensor() -> None:
    logits = torch.randn(3, 10)
    rows = [_row(prompt=[1, 2], output=[3, 3]), _row(output=[]), _row(output=[], presence_penalty=1.0)]
    assert apply_penalties(logits, rows) is logits


# --- logprobs -----------------------------------------------------------------------------------

def test_logprobs_are_raw_and_include_the_sampled_token() -> None:
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(9))
    rows = [_row(seed=1, temperature=2.0, top_k=30, output=[0, 1], frequency_penalty=1.0, logprobs=4),
            _row(temperature=0),
            _row(seed=2, logprobs=0)]
    res = Sampler().sample(logits, rows)
    raw = torch.log_softmax(logits, -1)
    lp = res.logprobs[0]
    assert res.token_ids[0] in lp and res.logprobs[1] is None
    assert list(lp)[:4] == raw[0].topk(4).indices.tolist() and len(lp) <= 5
    assert res.logprobs[2] == {res.token_ids[2]: pytest.approx(raw[2, res.token_ids[2]].item(), abs=1e-6)}
    for i in (0, 2):
        for t, v in res.logprobs[i].items():
            assert math.isclose(v, raw[i, t].item(), abs_tol=1e-6)


def test_logprobs_of_a_penalised_pick_outside_the_top_k() -> None:
    # The penalty moves the greedy pick to token 2, but the reported logprobs stay those of the raw logits.
    logits = torch.tensor([[3.0, 2.5, 2.0, -1.0]], dtype=torch.bfloat16)
    res = Sampler().sample(logits, [_row(temperature=0, output=[0, 1], presence_penalty=2.0, logprobs=1)])
    raw = torch.log_softmax(logits.float(), -1)[0]
    assert res.token_ids == [2]
    assert res.logprobs[0] == {0: pytest.approx(raw[0].item()), 2: pytest.approx(raw[2].item())}


def test_top_logprobs_helper() -> None:
    row = compute_logprobs(torch.tensor([0.0, 3.0, 1.0, 2.0], dtype=torch.float16))
    assert row.dtype == torch.float32
    assert list(top_logprobs(row, 2, 3)) == [1, 3]  # the included token is already in the top 2
    assert list(top_logprobs(row, 2, 0)) == [1, 3, 0]
    assert list(top_logprobs(row, 10, 0)) == [1, 3, 2, 0]  # k larger than the vocabulary
    assert top_logprobs(row, 0, 2) == {2: row[2].item()}


def test_rejects_mismatched_rows() -> None:
    with pytest.raises(ValueError):
        Sampler().sample(torch.zeros(2, 5), [_row()])
    assert Sampler().sample(torch.zeros(0, 5), []).token_ids == []


def test_a_top_p_too_small_for_float32_still_keeps_the_top_token() -> None:
    """5e-324 (found by schemathesis) is 0 in float32: the nucleus was empty and token 0 came out."""
    logits = torch.full((2, 50), -5.0)
    logits[:, 7] = 3.0
    logits[:, 0] = float("-inf")  # as a structured-output mask leaves it
    rows = [_row(seed=s, top_p=5e-324, temperature=1.0) for s in (1, 2)]
    assert Sampler().sample(logits, rows).token_ids == [7, 7]
