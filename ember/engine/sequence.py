"""One sequence's state: its tokens, KV blocks, sampling params, progress and outputs."""
from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Any

import torch

from ember.engine.pooling_params import PoolingParams
from ember.engine.sampling_params import SamplingParams

_ids = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    """A prompt plus the tokens generated so far; one of the `n` completions of a request."""

    request_id: str
    index: int  # which of the request's n completions
    prompt_ids: list[int]
    params: SamplingParams
    arrival: float
    seq_id: int = field(default_factory=lambda: next(_ids))
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    num_computed: int = 0  # tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # hashes of the full blocks, in order
    # Long-context modes (ember.ops.long_context): blocks past the sinks that no query will see again are freed
    # (their block_table entries become EVICTED; they are always the `evicted_blocks` entries after the sink
    # blocks), and decode rows read `sink_blocks`, private copies of the sink blocks with re-rotated keys.
    evicted_blocks: int = 0
    sink_blocks: list[int] = field(default_factory=list)
    sinks_copied: bool = False  # sink_blocks hold the sink blocks' contents (then each step rewrites the keys)
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    generator: torch.Generator | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    cumulative_logprob: float = 0.0
    logprobs: list[dict[int, float]] = field(default_factory=list)
    prompt_logprobs: list[dict[int, float] | None] = field(default_factory=list)
    text: str = ""
    first_token_time: float | None = None
    # Children waiting for this sequence's prompt to finish so they can share its blocks (n > 1).
    fork_children: list["Sequence"] = field(default_factory=list)
    # Candidate tokens after the last one (speculative drafts) for the next step to score and verify; the
    # engine trims them to what fits and clears them after the step.
    spec_tokens: list[int] = field(default_factory=list)
    grammar: Any = None  # structured outputs: its llguidance matcher (fed every token appended)
    pooling: PoolingParams | None = None  # set: read the prompt's hidden states / attention, generate nothing
    # Layers its steps must run (None: all): a request reading attention from early layers stops there.
    depth: int | None = None
    pooled: "torch.Tensor | None" = None  # the running sum (mean) or the last hidden row
    attention: "torch.Tensor | None" = None  # captured attention, [span, span end]

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def tokens(self, start: int, end: int) -> list[int]:
        """token_ids[start:end] without building the whole list (a long sequence's steps read a few)."""
        p = len(self.prompt_ids)
        if end <= p:
            return self.prompt_ids[start:end]
        if start >= p:
            return self.output_ids[start - p:end - p]
        return self.prompt_ids[start:] + self.output_ids[:end - p]

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_remaining(self) -> int:
        """Tokens not yet in the cache (1 for a decoding sequence)."""
        return len(self) - self.num_computed

    @property
    def in_prefill(self) -> bool:
        return self.num_remaining > 1

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.params.prompt_logprobs is not None and len(self.output_ids) == 0

    @property
    def first_computed(self) -> int:
        """The first position whose rows this sequence needs computed rather than served from the prefix cache
        (prompt logprobs and mean pooling need them all; the last token is always computed)."""
        if self.wants_prompt_logprobs:
            return 0
        if self.pooling is not None:
            return self.pooling.first_computed(len(self))
        return len(self) - 1

    @property
    def cache_salt(self) -> int | None:
        """Seeds the hashes of its blocks: blocks computed through fewer layers only match requests that stop
        at the same layer (their later layers' KV was never written)."""
        return None if self.depth is None else hash(("depth", self.depth))

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def __hash__(self) -> int:
        return self.seq_id

    def __eq__(self, other: object) -> bool:
        return self is other
