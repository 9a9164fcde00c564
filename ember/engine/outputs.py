"""Results handed back to callers, in vLLM's shapes: RequestOutput > CompletionOutput > Logprob."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


LogprobDict = dict[int, Logprob]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[LogprobDict] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error" | None while running
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class PoolingOutput:
    """What a pooling request reads from the model: its pooled hidden state [hidden] (None if not asked) and
    the attention its span paid to every earlier token [span length, span end] (None if not asked), float32
    torch tensors."""

    data: Any
    attention: Any = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    prompt_logprobs: list[LogprobDict | None] | None = None
    num_cached_tokens: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None  # why the engine failed this request (finish_reason "error"); others ran on
    pooled: PoolingOutput | None = None  # a pooling request's result, once finished


@dataclass(frozen=True)
class EngineState:
    """The engine's counters at one moment, taken on the engine's thread: what other threads (a server's
    /metrics) read instead of the live engine, whose state only its own thread may touch."""

    running: int = 0
    waiting: int = 0
    used_blocks: int = 0
    num_blocks: int = 1
    prefix_queries: int = 0
    prefix_hits: int = 0
    preemptions: int = 0
    stats: dict[str, float] = field(default_factory=dict)  # LLMEngine.stats: tokens, steps, seconds


@dataclass(frozen=True)
class StepShape:
    """What one engine step ran, as scheduled: decode rows, and prompt chunks as (first position, tokens)."""

    decodes: int
    chunks: tuple[tuple[int, int], ...]
    candidates: int = 0  # candidate tokens scored beside the decodes (speculative drafts)

    @property
    def tokens(self) -> int:
        return self.decodes + self.candidates + sum(n for _, n in self.chunks)
