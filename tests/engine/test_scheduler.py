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


def test_step_cost_recovers_a_line_and_inverts_it() -> None:
    cost = StepCost()
    assert cost.line() is None and cost.max_tokens(1.0) is None
    for n in (40, 200, 72, 150, 18, 256):
        cost.observe(n, 0, 0.010 + 0.002 * n)
    a, b = cost.line()
    assert a == pytest.approx(0.010, rel=1e-6) and b == pytest.approx(0.002, rel=1e-6)
    assert cost.max_tokens(0.050) == 20
    assert cost.max_tokens(0.005) == 0


def test_step_cost_needs_spread_and_keeps_decode_steps_apart() -> None:
    cost = StepCost()
    for _ in range(10):
        cost.observe(64, 0, 0.1)
    assert cost.line() is None  # one size only: the slope is unknown
    cost.observe(8, 8, 0.030)
    cost.observe(8, 8, 0.040)
    assert cost.decode_seconds(8) == pytest.approx(0.032)
    assert cost.decode_seconds(4) == pytest.approx(0.032)  # nearest size seen, not scaled down
    assert cost.decode_seconds(16) == pytest.approx(0.064)  # larger: scaled by batch size
    assert cost.line() is None  # decode steps do not enter the fit


def test_step_cost_prefers_steps_that_carry_decodes() -> None:
    cost = StepCost()
    for n in (300, 900, 2000):  # prompt-only steps: another code path, another line
        cost.observe(n, 0, 0.100 + 0.003 * n)
    assert cost.line() == pytest.approx((0.100, 0.003))
    for n in (20, 40, 30):
        cost.observe(n, 8, 0.020 + 0.001 * n)
    assert cost.line() == pytest.approx((0.020, 0.001))


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
    (0.030, 20 - 4),  # explicit: the curve's tokens for 30 ms, minus the decodes
    ("auto", round(AUTO_ITL_FACTOR * 20 - 10) - 4),  # auto: twice the measured plain decode step
    ("1.5x", round(1.5 * 20 - 10) - 4),  # N times it
    ("1x", round(1 * 20 - 10) - 4),  # as long as the plain step: what the curve says fits beside it
])
def test_splitfuse_chunk_follows_the_latency_target(itl_target: float | str | None, expect: int) -> None:
    sched = Scheduler(SchedulerConfig(8, 512, "splitfuse", itl_target), BlockManager(400, 16))
    decoders = _running(sched, 4)
    for n in (30, 300, 120, 500):
        sched.cost.observe(n, 0, 0.010 + 0.001 * n)
    sched.cost.observe(4, 4, 0.020)
    long = _seq(3000, "long")
    sched.add(long)
    batch = sched.schedule()
    assert all(batch[s] == 1 for s in decoders)  # decodes are never held back
    assert batch[long] == expect


def test_without_a_curve_a_small_chunk_goes_with_the_decodes() -> None:
    sched = Scheduler(SchedulerConfig(8, 512, "splitfuse", "auto"), BlockManager(400, 16))
    _running(sched, 2)
    long = _seq(3000, "long")
    sched.add(long)
    assert sched.schedule()[long] == sched.config.min_chunk


def test_a_slow_machine_still_moves_prompts_forward() -> None:
    sched = Scheduler(SchedulerConfig(8, 512, "splitfuse", 0.001), BlockManager(400, 16))
    _running(sched, 2)
    for n in (30, 300):
        sched.cost.observe(n, 0, 0.010 + 0.001 * n)
    long = _seq(3000, "long")
    sched.add(long)
    assert sched.schedule()[long] == sched.config.min_chunk  # target unreachable: the minimum, not zero


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
            if target and any(n == 1 for n in batch.values()):
                mixed.append(sum(n for n in batch.values() if n > 1))
            return batch

        sched.schedule = spy
        outs[target] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert outs[None] == outs[1e-6]
    assert max(mixed) == sched.config.min_chunk  # prompts did join decoding steps, capped
