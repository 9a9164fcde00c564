"""Multi-token steps: a decoding sequence carries candidate tokens, every row is scored, a prefix is kept and
the rest of the KV rolled back (the seam speculative decoding plugs into; tests drive it directly)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch

from ember import LLM, SamplingParams
from ember.engine.engine import LLMEngine
from ember.engine.sequence import Sequence
from ember.models.llama import LlamaModel
from ember.ops import paged_float, paged_kivi
from tests.conftest import TEXT
from tests.engine.test_batching import assert_no_leaks

MAX_TOKENS = 40


def _no_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """The PyTorch twins everywhere attention is concerned (and no fused C++ decoder stack)."""
    monkeypatch.setattr(paged_float, "cpu_kernels", lambda: None)
    monkeypatch.setattr(paged_kivi, "cpu_kernels", lambda: None)
    monkeypatch.setattr(LlamaModel, "_fused_decoder", lambda *a: None)


def _engine(path: Path, kv: str) -> LLMEngine:
    # Blocks of 4 tokens: candidate runs cross block boundaries often (KIVI quantizes at each).
    return LLM(path, kv_cache_dtype=kv, block_size=4, kv_cache_memory=0.004).engine


def _generate(engine: LLMEngine, prompt: list[int], params: SamplingParams,
              propose: Callable[[Sequence, int], list[int]] | None = None) -> tuple[list[int], list[float]]:
    """Run one request to the end; before each step `propose(seq, step)` may give the sequence candidates."""
    engine.add_request("r", {"prompt_token_ids": prompt}, params)
    step, out = 0, None
    while engine.has_unfinished_requests():
        seq = engine.requests["r"].seqs[0]
        if propose is not None and seq.output_ids and not seq.finished:
            engine.set_candidates("r", propose(seq, step))
        for o in engine.step():
            out = o
        _check_hashed_blocks(engine)
        step += 1
    c = out.outputs[0]
    return c.token_ids, [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)]


def _check_hashed_blocks(engine: LLMEngine) -> None:
    """Every hashed block of a live sequence holds exactly that sequence's accepted tokens."""
    bs = engine.blocks.block_size
    for seq in engine.scheduler.running:
        assert seq.num_computed <= len(seq)
        for i, h in enumerate(seq.block_hashes):
            key = engine.blocks.block_key[seq.block_table[i]]
            assert key is None or key[1] == tuple(seq.token_ids[i * bs:(i + 1) * bs])


GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, logprobs=2)


@pytest.fixture(scope="module")
def prompt(tiny_llama3: Path) -> list[int]:
    return LLM(tiny_llama3).get_tokenizer().encode(TEXT)[:21]


@pytest.mark.parametrize("kernels", [True, False])
@pytest.mark.parametrize("kv", ["auto", "float16", "int8", "int4"])
def test_candidates_score_as_single_steps(tiny_llama3: Path, prompt: list[int], kv: str, kernels: bool,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Feeding the sequence's true next tokens as candidates (1 to 6 at a time) gives the tokens and logprobs
    of one-token steps: every row scores as if decoded alone."""
    if not kernels:
        _no_kernels(monkeypatch)
    ref_tokens, ref_lps = _generate(_engine(tiny_llama3, kv), prompt, GREEDY)
    engine = _engine(tiny_llama3, kv)

    def truth(seq: Sequence, step: int) -> list[int]:
        n = len(seq.output_ids)
        return ref_tokens[n:n + 1 + step % 6]

    tokens, lps = _generate(engine, prompt, GREEDY, truth)
    assert tokens == ref_tokens
    torch.testing.assert_close(torch.tensor(lps), torch.tensor(ref_lps), rtol=0, atol=2e-4)
    assert engine.stats["spec_accepted_tokens"] == engine.stats["spec_draft_tokens"] > MAX_TOKENS // 2
    assert engine.stats["steps"] < MAX_TOKENS  # several tokens per step
    assert_no_leaks(engine)


@pytest.mark.parametrize("kv", ["auto", "int4"])
def test_rejected_candidates_roll_back(tiny_llama3: Path, prompt: list[int], kv: str) -> None:
    """Candidates whose tail is wrong: the right prefix is kept, the model's own token replaces the first
    wrong one, the KV of the rest is rolled back, and the output is exactly as without candidates; no block
    leaks, and no hashed (prefix-cached) block ever holds a rejected token."""
    ref_tokens, ref_lps = _generate(_engine(tiny_llama3, kv), prompt, GREEDY)
    engine = _engine(tiny_llama3, kv)
    vocab = engine.config.vocab_size

    def half_right(seq: Sequence, step: int) -> list[int]:
        n, right = len(seq.output_ids), step % 4
        wrong = [(t + 1 + step) % vocab for t in ref_tokens[n + right:n + right + 1 + step % 5]]
        return ref_tokens[n:n + right] + wrong

    tokens, lps = _generate(engine, prompt, GREEDY, half_right)
    assert tokens == ref_tokens
    torch.testing.assert_close(torch.tensor(lps), torch.tensor(ref_lps), rtol=0, atol=2e-4)
    assert 0 < engine.stats["spec_accepted_tokens"] < engine.stats["spec_draft_tokens"]
    assert_no_leaks(engine)
    # Everything the prefix cache still knows is a prefix of the true sequence.
    full = prompt + ref_tokens
    bs = engine.blocks.block_size
    for key in engine.blocks.block_key:
        if key is not None:
            assert any(key[1] == tuple(full[i * bs:(i + 1) * bs]) for i in range(len(full) // bs))


def test_seeded_sampling_and_stops_are_unchanged(tiny_llama3: Path, prompt: list[int]) -> None:
    """Sampling with a seed and a stop token: the same completion with candidates as without (each row draws
    from the generator as a one-token step would, and a stop ends the step's verification)."""
    llm = LLM(tiny_llama3)
    params = SamplingParams(max_tokens=30, temperature=0.9, seed=7, logprobs=1, min_tokens=3,
                            stop_token_ids=[5, 9, 17])
    ref_tokens, ref_lps = _generate(llm.engine, prompt, params)
    engine = LLM(tiny_llama3).engine

    def guess(seq: Sequence, step: int) -> list[int]:  # right tokens for a while, then noise
        n = len(seq.output_ids)
        return ref_tokens[n:n + 3] + [11, 12]

    tokens, lps = _generate(engine, prompt, params, guess)
    assert tokens == ref_tokens
    torch.testing.assert_close(torch.tensor(lps), torch.tensor(ref_lps), rtol=0, atol=2e-4)
    assert_no_leaks(engine)


def test_candidates_are_trimmed_and_checked(tiny_llama3: Path, prompt: list[int]) -> None:
    engine = LLM(tiny_llama3).engine
    engine.add_request("r", {"prompt_token_ids": prompt}, SamplingParams(max_tokens=4, temperature=0))
    with pytest.raises(Exception, match="no decoding completion"):
        engine.set_candidates("r", [1, 2])  # still waiting for its prompt
    engine.step()
    with pytest.raises(Exception, match="token ids"):
        engine.set_candidates("r", [engine.config.vocab_size])
    engine.set_candidates("r", list(range(10)))
    assert engine.requests["r"].seqs[0].spec_tokens == [0, 1]  # max_tokens 4: one out, the last is sampled
    while engine.has_unfinished_requests():
        engine.step()
    assert_no_leaks(engine)


def test_truncate_frees_blocks_but_never_hashed_ones(tiny_llama3: Path) -> None:
    from ember.engine.kv_cache import BlockManager

    bm = BlockManager(8, 4)
    seq = Sequence("r", 0, list(range(10)), SamplingParams(), 0.0)
    bm.allocate(seq, 10)
    seq.num_computed = 6
    bm.commit(seq)  # one full block hashed
    seq.num_computed = 10
    bm.truncate(seq, 5)
    assert len(seq.block_table) == 2 and seq.num_computed == 5 and bm.num_free_blocks == 6
    with pytest.raises(ValueError, match="roll back"):
        bm.truncate(seq, 3)
    bm.free_seq(seq)
    assert bm.num_free_blocks == 8


def test_candidates_never_cost_another_decode_its_token() -> None:
    """Every decoding sequence gets its one token first; candidates take only the budget and blocks left."""
    from ember.engine.kv_cache import BlockManager
    from ember.engine.scheduler import Scheduler, SchedulerConfig
    from ember.engine.sequence import Status

    def decoding(blocks: BlockManager, sched: Scheduler, n: int) -> Sequence:
        seq = Sequence(f"r{n}", 0, list(range(n)), SamplingParams(), 0.0)
        blocks.allocate(seq, n)
        seq.num_computed, seq.output_ids = n, [1]
        sched.add_running(seq)
        return seq

    blocks = BlockManager(4, 4)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64), blocks)
    a, b = decoding(blocks, sched, 3), decoding(blocks, sched, 8)  # a: 1 block, b: 2 (+1 for its next token)
    a.spec_tokens = [5, 6]
    batch = sched.schedule()
    assert batch == {a: 1, b: 1} and sched.num_preemptions == 0  # no block left for a's candidates
    assert all(s.status is Status.RUNNING for s in (a, b))

    blocks = BlockManager(64, 4)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=8), blocks)
    seqs = [decoding(blocks, sched, 5 + i) for i in range(4)]
    seqs[0].spec_tokens = list(range(7))
    assert list(sched.schedule().values()) == [5, 1, 1, 1]  # the budget's 4 spare tokens go to candidates


def test_candidates_wait_for_the_first_token_and_the_forks(tiny_llama3: Path, prompt: list[int]) -> None:
    """n > 1 completions are forked when the prompt's first token is sampled: candidates before that (the
    prompt's last token still to compute) are refused, not allowed to skip the fork."""
    engine = LLM(tiny_llama3, max_num_batched_tokens=len(prompt) - 1).engine
    engine.add_request("r", {"prompt_token_ids": prompt}, SamplingParams(n=2, max_tokens=6, temperature=0))
    engine.step()
    seq = engine.requests["r"].seqs[0]
    assert seq.num_remaining == 1 and not seq.in_prefill
    with pytest.raises(Exception, match="no decoding completion"):
        engine.set_candidates("r", [1, 2])
    engine.step()
    engine.set_candidates("r", [1, 2], index=1)
    out = None
    while engine.has_unfinished_requests():
        out = engine.step()[-1]
    assert [len(c.token_ids) for c in out.outputs] == [6, 6] and out.outputs[0].token_ids == out.outputs[1].token_ids
    assert_no_leaks(engine)
