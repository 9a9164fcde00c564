"""The attention backend seam: how a step's rows are described (RowSpan, KeyWindow, AttentionCapture), the
interface every KV layout implements (AttentionBackend), and the PyTorch pieces the layouts share."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class RowSpan:
    """n consecutive tokens of one sequence in a step: flat rows [row0, row0 + n) at positions
    [start, start + n). Each attends to every earlier position of its sequence (and itself), subject to the
    step's KeyWindow."""

    block_table: list[int]  # the sequence's blocks, covering at least start + n positions
    start: int
    n: int
    row0: int
    candidates: int = 0  # trailing tokens that may be rolled back after the step (speculative drafts): their
    # rows must score as if each had been decoded alone, and their blocks are quantized only once accepted
    shift: int = 0  # tokens evicted from the middle of the sequence (long-context modes): `start` and the block
    # table count cache positions, the rotary position of cache position t is t + shift

    @property
    def decode(self) -> bool:
        """One token continuing a sequence (as opposed to a prompt chunk or a multi-token step). A backend may
        still attend other spans as one-query rows (the float one does chunks), or a decode through its chunk
        path (KIVI does, for a span whose attention is captured)."""
        return self.n == 1 and self.start > 0


@dataclass(frozen=True)
class KeyWindow:
    """A mask variant: the query at position p sees keys t < sink and p - size < t <= p (attention sinks
    plus a recent window); every backend honours it in its C++ and PyTorch paths."""

    sink: int
    size: int

    @property
    def key_window(self) -> "KeyWindow":
        return self

    def starts(self, positions: torch.Tensor) -> torch.Tensor:
        """First key of each query's recent window."""
        return (positions - self.size + 1).clamp(min=0)

    def mask(self, positions: torch.Tensor, ctx: int) -> torch.Tensor:
        """[len(positions), ctx] bool: which keys each query sees (causality included)."""
        t = torch.arange(ctx)[None, :]
        p = positions[:, None]
        return (t <= p) & ((t < self.sink) | (t >= self.starts(positions)[:, None]))


@dataclass
class AttentionCapture:
    """Rows [offset, offset + count) of span `span` want their attention probabilities over all earlier keys,
    summed over heads and over `layers`, in float32 (probs [count, start + offset + count] after the forward;
    row i's keys beyond its own position are 0)."""

    span: int
    offset: int
    count: int
    layers: frozenset[int]
    probs: torch.Tensor | None = None

    def add(self, layer_probs: torch.Tensor) -> None:
        self.probs = layer_probs if self.probs is None else self.probs + layer_probs


@dataclass
class StepPlan:
    """What every layer needs to know about a step, built once by AttentionBackend.plan; each backend adds its
    own metadata in a subclass."""

    spans: list[RowSpan]
    positions: torch.Tensor  # [T] position of every row
    window: KeyWindow | None = None
    captures: list[AttentionCapture] = field(default_factory=list)
    starts: torch.Tensor | None = None  # [B] first key of each one-query row's window (with a KeyWindow)
    # Sub-layers the step leaves out (2i: layer i's attention, 2i + 1: its MLP): a self-speculative draft.
    skip: frozenset[int] | None = None

    def captures_at(self, layer: int) -> list[AttentionCapture]:
        return [c for c in self.captures if layer in c.layers]

    def window_args(self) -> tuple:
        """The C++ kernels' trailing (starts, sink) arguments for one-query rows; none without a window."""
        return () if self.starts is None or self.window is None else (self.starts, self.window.sink)


class AttentionBackend:
    """A KV layout and the attention over it. It owns the cache storage, builds each step's metadata from
    generic row spans (plan), and chooses between its C++ kernel and PyTorch twin; the runner and the model
    never branch on the cache format. Blocks are the BlockManager's ids: the backend only stores their
    contents (and is told when a block is freed or becomes full of accepted tokens)."""

    block_size: int

    def plan(self, spans: list[RowSpan], window: KeyWindow | None = None,
             captures: list[AttentionCapture] | None = None) -> StepPlan:
        raise NotImplementedError

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Any,
                scale: float) -> torch.Tensor:
        """Store the step's k, v [T, KVH, D] in `layer`'s cache and attend q [T, H, D]; returns [T, H, D].
        Adds the layer's attention probabilities to the plan's captures that ask for it."""
        raise NotImplementedError

    def fused_forward(self, fused: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, plan: Any,
                      scale: float) -> torch.Tensor | None:
        """Every layer in the C++ DecodeModel `fused` when the plan allows (one-query rows only), else None."""
        return None

    def finish(self, plan: Any) -> None:
        """The step planned by `plan` ran to the end (a failed one is planned and run again: plan must not
        change what a replay reads)."""

    def copy_block(self, src: int, dst: int) -> None:
        """Give dst the contents of src (a partly filled block being forked)."""
        raise NotImplementedError

    def block_filled(self, block: int) -> None:
        """`block` is full of accepted tokens (the allocator is about to hash it)."""

    def block_freed(self, block: int) -> None:
        """The allocator took `block` back (finished, preempted or rolled back)."""


def chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                    scale: float) -> torch.Tensor:
    """Attention of a chunk's queries [n, H, D] over its context k, v [ctx, KVH, D] (mask [n, ctx], or None
    when the context is the chunk itself, causal)."""
    # 4-D inputs: with 3-D ones torch's CPU SDPA falls back to its much slower math kernel (BENCHMARKS.md).
    o = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        attn_mask=None if mask is None else mask[None, None], is_causal=mask is None, scale=scale, enable_gqa=True)
    return o[0].transpose(0, 1)


def visible(positions: torch.Tensor, ctx: int, window: KeyWindow | None) -> torch.Tensor:
    """[len(positions), ctx] bool: the keys [0, ctx) each query at `positions` sees."""
    if window is not None:
        return window.mask(positions, ctx)
    return torch.arange(ctx)[None, :] <= positions[:, None]


def chunk_mask(positions: torch.Tensor, ctx: int, window: KeyWindow | None) -> torch.Tensor | None:
    """As visible, or None when that is plain causal over the chunk itself (it starts at 0, no window)."""
    if window is None and int(positions[0]) == 0:
        return None
    return visible(positions, ctx, window)


def attention_probs(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) of queries q [n, H, D] over keys k [ctx, KVH, D] (GQA: query head j reads KV
    head j // (H / KVH)), masked (mask [n, ctx] or None = causal with the queries last), summed over heads:
    [n, ctx] float32."""
    n, h, _ = q.shape
    ctx, kvh = k.shape[0], k.shape[1]
    kk = k.float().repeat_interleave(h // kvh, dim=1)  # [ctx, H, D]
    scores = torch.einsum("nhd,thd->hnt", q.float(), kk) * scale
    if mask is None:
        mask = torch.arange(ctx)[None, :] <= torch.arange(ctx - n, ctx)[:, None]
    scores.masked_fill_(~mask[None], float("-inf"))
    return scores.softmax(dim=-1).sum(dim=0)
