"""Plans: an application's work as a generator of engine-request batches, run by a synchronous (LLM) or an
asynchronous (server) driver, so one algorithm serves both without knowing which engine it talks to."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Awaitable, Callable, Generator, TypeVar

from ember.engine.outputs import RequestOutput
from ember.engine.pooling_params import PoolingParams
from ember.engine.sampling_params import SamplingParams

T = TypeVar("T")


@dataclass
class Job:
    """One engine request a plan needs: a prompt (token ids) and what to do with it."""

    prompt_ids: list[int]
    params: SamplingParams | PoolingParams


# A plan yields a batch of jobs, receives their outputs (same order) and finally returns its result.
Plan = Generator[list[Job], list[RequestOutput], T]


@dataclass
class Usage:
    """What a plan's requests cost: prompt tokens sent, prompt tokens computed (not served from the prefix
    cache), generated tokens and model forward passes (one per prompt, one more per generated token after
    the first)."""

    requests: int = 0
    prompt_tokens: int = 0
    computed_tokens: int = 0
    generated_tokens: int = 0
    forward_passes: int = 0

    def add(self, outs: list[RequestOutput]) -> None:
        for out in outs:
            generated = sum(len(c.token_ids) for c in out.outputs) if out.pooled is None else 0
            self.requests += 1
            self.prompt_tokens += len(out.prompt_token_ids)
            self.computed_tokens += len(out.prompt_token_ids) - out.num_cached_tokens
            self.generated_tokens += generated
            self.forward_passes += 1 + max(0, generated - 1)


def drive(plan: Plan[T], run: Callable[[list[Job]], list[RequestOutput]], usage: Usage | None = None) -> T:
    """Run a plan to its result, each batch through `run` (which returns the outputs in the jobs' order)."""
    try:
        jobs = next(plan)
        while True:
            outs = run(jobs)
            if usage is not None:
                usage.add(outs)
            jobs = plan.send(outs)
    except StopIteration as done:
        return done.value


async def drive_async(plan: Plan[T], run: Callable[[list[Job]], Awaitable[list[RequestOutput]]],
                      usage: Usage | None = None) -> T:
    """`drive` for an asynchronous engine."""
    try:
        jobs = next(plan)
        while True:
            outs = await run(jobs)
            if usage is not None:
                usage.add(outs)
            jobs = plan.send(outs)
    except StopIteration as done:
        return done.value
