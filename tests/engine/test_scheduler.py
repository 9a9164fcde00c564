"""SplitFuse's latency-aware budget: the step-cost curve and how much prompt a step with decodes takes."""
from __future__ import annotations

from pathlib import Path

import pytest

from ember import LLM, SamplingParams
from ember.engine.engine import EngineArgs
from ember.engine.kv_cache import BlockManager
from ember.engine.sampling_params import SamplingParams
from ember.engine.scheduler import AUTO_ITL_FACTOR, Scheduler, SchedulerConfig, StepCost
from ember.engine.sequence import Sequence
from ember.errors import InvalidParameterError
from tests.conftest import TEXT


def _seq(n: int, rid: str = "r") -> Sequence:
    return Sequence(rid, 0, list(range(1, n + 1)), SamplingParams(max_tokens=8), 0.0)


def test_step_cost_prices_prompt_tokens_beside_the_plain_decode_step() -> None:
    cost = StepCost()
    assert cost.token_seconds() is None and cost.max_chunk(8, 1.0) is None
    cost.observe(8, 8, 0.020)
    assert cost.max_chunk(8, 1.0) is None  # the price of a prompt token is not known yet
    for c in (2, 5, 1, 3):
        cost.observe(8 + c, 8, 0.020 + 0.003 * c)
    assert cost.token_seconds() == pytest.approx(0.003)
    assert cost.max_chunk(8, 0.029) == 3
    assert cost.max_chunk(8, 0.019) == 0  # not even the decodes fit
    assert cost.max_chunk(4, 1.0) is None  # four decodes were never measured


def test_prompt_only_steps_stand_in_until_steps_with_decodes_are_seen() -> None:
    cost = StepCost()
    for n in (300, 2000):
        cost.observe(n, 0, 0.003 * n)
    assert cost.token_seconds() == pytest.approx(0.003)
    cost.observe(1, 1, 0.009)
    cost.observe(5, 1, 0.013)  # one decode and four prompt tokens: 1 ms each beside it
    cost.observe(3, 2, 0.030)  # two decodes never ran alone: no price can be read off this step
    assert cost.token_seconds() == pytest.approx(0.001)


def test_decode_steps_are_kept_per_batch_size_and_go_stale() -> None:
    cost = StepCost(fresh_steps=3)
    cost.observe(8, 8, 0.030)
    cost.observe(8, 8, 0.040)
    assert cost.decode_seconds(8) == pytest.approx(0.032)
    assert cost.decode_seconds(4) is None  # not guessed from another batch size
    for _ in range(3):
        cost.observe(100, 0, 0.3)
    assert cost.decode_seconds(8) == pytest.approx(0.032)
    cost.observe(100, 0, 0.3)
    assert cost.decode_seconds(8) is None  # contexts have grown since: measure it again
    cost.observe(8, 8, 0.050)
    assert cost.decode_seconds(8) == pytest.approx(0.050)  # the new measurement, not averaged with the old


def _running(sched: Scheduler, decoders: int) -> list[Sequence]:
    """`decoders` sequences past their prompts, then a long prompt waiting."""
    seqs = [_seq(4, f"d{i}") for i in range(decoders)]
    for s in seqs:
        sched.add(s)
    assert sched.schedule() == {s: 4 for s in seqs}  # their prompts, one step
    for s in seqs:
        s.num_computed = 4
        s.output_ids.append(7)
    return seqs


@pytest.mark.parametrize("itl_target, expect", [
    (None, 512 - 4),  # off: fill the budget
    (0.030, 10),  # explicit: (30 ms - the 20 ms plain step) / 1 ms a prompt token
    ("auto", round((AUTO_ITL_FACTOR - 1) * 20)),  # auto: twice the measured plain decode step
    ("1.5x", 10),  # N times it
    ("1x", 1),  # as long as the plain step: nothing fits, so the minimum
])
def test_splitfuse_chunk_follows_the_latency_target(itl_target: float | str | None, expect: int) -> None:
    sched = Scheduler(SchedulerConfig(8, 512, "splitfuse", itl_target), BlockManager(400, 16))
    decoders = _running(sched, 4)
    sched.cost.observe(4, 4, 0.020)
    for c in (3, 30, 12):
        sched.cost.observe(4 + c, 4, 0.020 + 0.001 * c)
    long = _seq(3000, "long")
    sched.add(long)
    batch = sched.schedule()
    assert all(batch[s] == 1 for s in decoders)  # decodes are never held back
    assert batch[long] == expect


def test_the_plain_decode_step_is_measured_before_prompts_join_it() -> None:
    sched = Scheduler(SchedulerConfig(8, 512, "splitfuse", "auto"), BlockManager(400, 16))
    decoders = _running(sched, 2)
    long = _seq(3000, "long")
    sched.add(long)
    batch = sched.schedule()
    assert batch == {s: 1 for s in decoders}  # decodes alone: the step the target is relative to
    for s in decoders:
        s.num_computed += 1
        s.output_ids.append(7)
    sched.observe(batch, 0.020)
    assert sched.cost.decode_seconds(2) == pytest.approx(0.020)
    batch = sched.schedule()
    assert batch[long] == sched.config.min_chunk  # no price per prompt token yet: a small chunk measures it


def test_a_slow_machine_still_moves_prompts_forward() -> None:
    sched = Scheduler(SchedulerConfig(8, 512, "splitfuse", 0.001), BlockManager(400, 16))
    _running(sched, 2)
    sched.cost.observe(2, 2, 0.010)
    sched.cost.observe(12, 2, 0.020)
    long = _seq(3000, "long")
    sched.add(long)
    assert sched.schedule()[long] == sched.config.min_chunk  # target unreachable: the minimum, not zero


def test_a_one_token_prompt_chunk_is_not_counted_as_a_decode() -> None:
    sched = Scheduler(SchedulerConfig(8, 512, "splitfuse", 1e-6), BlockManager(400, 16))
    decoders = _running(sched, 2)
    sched.cost.observe(2, 2, 0.010)
    sched.cost.observe(12, 2, 0.020)
    long = _seq(3000, "long")
    sched.add(long)
    batch = sched.schedule()
    assert batch[long] == 1 and len(batch) == 3
    sched.observe(batch, 0.013)
    assert sched.cost.decode_seconds(3) is None  # two decodes and a prompt token, not three decodes
    # ...it priced one prompt token at 3 ms, after the 10-token step at 1 ms (sums decayed by 0.9)
    assert sched.cost.token_seconds() == pytest.approx((0.9 * 10 * 0.010 + 1 * 0.003) / (0.9 * 100 + 1))


def test_prompts_alone_fill_the_whole_budget() -> None:
    sched = Scheduler(SchedulerConfig(8, 512, "splitfuse", 0.001), BlockManager(400, 16))
    long = _seq(3000, "long")
    sched.add(long)
    assert sched.schedule()[long] == 512  # no decode to protect


@pytest.mark.parametrize("bad", [-1.0, 0.0, float("inf"), "fast", "0.9x", "x", "nanx", True])
def test_bad_itl_targets_are_refused(bad: object) -> None:
    with pytest.raises(InvalidParameterError, match="itl_target"):
        EngineArgs(itl_target=bad).validate()
    for good in (None, "auto", 0.05, "1x", "1.25x"):
        EngineArgs(itl_target=good).validate()


def test_a_latency_capped_engine_gives_the_same_tokens(tiny_llama3: Path) -> None:
    # Two sequence slots, so later prompts are admitted while others decode; a 1 us target (out of reach
    # even for a tiny model) then holds every such step to min_chunk prompt tokens.
    ids = LLM(tiny_llama3).get_tokenizer().encode(TEXT)
    prompts = [{"prompt_token_ids": ids[9 * i: 9 * i + 20 + 7 * i]} for i in range(6)]
    params = [SamplingParams(max_tokens=4 + 3 * i, temperature=0, ignore_eos=True) for i in range(6)]
    outs, mixed = {}, []
    for target in (None, 1e-6):
        llm = LLM(tiny_llama3, itl_target=target, kv_cache_memory=0.01, max_num_seqs=2)
        sched = llm.engine.scheduler
        schedule = sched.schedule

        def spy() -> dict:
            batch = schedule()
            if target and any(not s.in_prefill for s in batch):
                mixed.append(sum(n for s, n in batch.items() if s.in_prefill))
            return batch

        sched.schedule = spy
        outs[target] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert outs[None] == outs[1e-6]
    assert max(mixed) == sched.config.min_chunk  # prompts did join decoding steps, capped


def test_long_prefill_token_threshold_caps_each_prompt_per_step() -> None:
    """vLLM's long_prefill_token_threshold: a sequence takes at most that many prompt tokens a step, so the
    budget is shared out (a block of every window per step in eval ppl's quantized-cache harness)."""
    blocks = BlockManager(64, 4)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=12, long_prefill_token_threshold=4), blocks)
    seqs = [_seq(10, f"r{i}") for i in range(4)]
    for s in seqs:
        sched.add(s)
    batch = sched.schedule()
    assert list(batch.values()) == [4, 4, 4]
    for s, n in batch.items():
        s.num_computed += n
    assert list(sched.schedule().values()) == [4, 4, 4]  # the three running first, then the fourth waits
