"""Long inputs past the trained context: StreamingLLM (attention sinks + a recent window, positions counted in
the cache) and LM-Infinite (Λ-shaped mask, distance to the global tokens capped), as one mask variant.

Both are a KeyWindow (the first `sinks` tokens plus the last `window`) and a rule for the distance a query
sees to a sink key outside its window:
- streaming: the distance in StreamingLLM's cache, where sinks sit at 0 .. sinks-1 and the query at
  min(p, sinks + window - 1): min(p, sinks + window - 1) - s;
- lm-infinite: `window` for every global token (the reference rotates the query to the capped distance and
  reads the global keys unrotated).
Keys in the cache stay rotated at their own positions: a RoPE score depends only on the distance between
query and key, so every key of the recent window is already right, and only the sink keys need another
distance. Chunks score them with a second rotation of the query (or, LM-Infinite, of the few sink keys);
decode rows, which run through the C++ kernels, read private copies of the sink blocks whose keys are
re-rotated before each step (see docs/architecture.md, "Long inputs").
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ember.ops.attention import KeyWindow
from ember.ops.rope import cos_sin, rotate

MODES = ("streaming", "lm-infinite")
DEFAULT_SINKS = {"streaming": 4, "lm-infinite": 10}


@dataclass(frozen=True)
class LongContext:
    """A long-context mode over a model whose rotary inverse frequencies are `inv_freq`."""

    mode: str
    sinks: int
    window: int
    inv_freq: torch.Tensor  # [head_dim // 2], float32

    @property
    def key_window(self) -> KeyWindow:
        return KeyWindow(self.sinks, self.window)

    def sink_blocks(self, block_size: int) -> int:
        """Blocks holding the sink tokens (kept for a sequence's life; decode rows read private copies)."""
        return -(-self.sinks // block_size)

    def outside(self, positions: torch.Tensor) -> torch.Tensor:
        """[n, sinks] bool: which sink keys lie outside the window of a query at each (absolute) position."""
        s = torch.arange(self.sinks)
        return positions[:, None] - s[None, :] >= self.window

    def query_shift(self, positions: torch.Tensor) -> torch.Tensor:
        """[n]: how far to rotate a query at each position so that its score with an outside sink key reads
        the capped distance (with the sink keys as stored for streaming, unrotated for LM-Infinite: ChunkSinks)."""
        if self.mode == "streaming":
            return positions.clamp(max=self.sinks + self.window - 1) - positions
        return self.window - positions

    def key_shift(self, positions: torch.Tensor) -> torch.Tensor:
        """[n, sinks]: how far to rotate each stored sink key so that a query at each position, rotated as
        usual, reads its capped distance where the key is outside the window (0 where it is inside)."""
        s = torch.arange(self.sinks)[None, :]
        p = positions[:, None]
        if self.mode == "streaming":
            shift = (p - (self.sinks + self.window - 1)).clamp(min=0).expand(-1, self.sinks)
        else:
            shift = p - self.window - s
        return torch.where(self.outside(positions), shift, torch.zeros_like(shift))

    def rotation(self, by: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [n, D] (float32) turning vectors by `by` [n] positions (RoPE's half-split layout)."""
        cos, sin = cos_sin(by, self.inv_freq)
        return cos.float(), sin.float()

    def rotate(self, x: torch.Tensor, by: torch.Tensor) -> torch.Tensor:
        """x [n, heads, D] rotated by `by` [n] positions."""
        return rotate(x, *self.rotation(by))


@dataclass
class ChunkSinks:
    """What every layer needs to score a chunk's queries against its sink keys, computed once per step: which
    sinks lie outside each query's window, the rotation that takes each query to its capped distance, and
    (LM-Infinite) the one that takes each sink key back to position 0."""

    outside: torch.Tensor  # [n, sinks] bool
    query_turn: tuple[torch.Tensor, torch.Tensor]
    key_turn: tuple[torch.Tensor, torch.Tensor] | None
    base: torch.Tensor  # [n, ctx] float: 0 where the KeyWindow shows a key, -inf elsewhere

    @classmethod
    def plan(cls, lc: LongContext, positions: torch.Tensor, mask: torch.Tensor) -> "ChunkSinks":
        sinks = min(lc.sinks, mask.shape[1])
        key_turn = None if lc.mode == "streaming" else lc.rotation(-torch.arange(sinks))
        base = torch.zeros(mask.shape).masked_fill_(~mask, -math.inf)
        return cls(lc.outside(positions)[:, :sinks], lc.rotation(lc.query_shift(positions)), key_turn, base)


def sink_bias(q: torch.Tensor, k_sinks: torch.Tensor, sinks: ChunkSinks, scale: float) -> torch.Tensor:
    """[H, n, sinks]: what to add to the usual scores of queries q [n, H, D] with the sink keys k_sinks
    [sinks, KVH, D] (cache order) so that those outside each query's window read the capped distance."""
    group = q.shape[1] // k_sinks.shape[1]
    qf, kf = q.float().transpose(0, 1), k_sinks.float()
    ka = kf if sinks.key_turn is None else rotate(kf, *sinks.key_turn)
    qa = rotate(q.float(), *sinks.query_turn).transpose(0, 1)
    true = torch.bmm(qf, kf.repeat_interleave(group, dim=1).permute(1, 2, 0))
    alt = torch.bmm(qa, ka.repeat_interleave(group, dim=1).permute(1, 2, 0))
    return (alt - true).mul_(scale).masked_fill_(~sinks.outside[None], 0.0)


def long_chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: ChunkSinks,
                         scale: float) -> torch.Tensor:
    """A chunk's attention [n, H, D] over its context k, v [ctx, KVH, D] (cache order, sinks first) under a
    long-context mode: SDPA with the KeyWindow's mask and the sink keys' score corrections added."""
    h, n_sink = q.shape[1], sinks.outside.shape[1]
    if n_sink and bool(sinks.outside.any()):
        bias = sinks.base.to(q.dtype).expand(h, -1, -1).clone()
        bias[:, :, :n_sink] += sink_bias(q, k[:n_sink], sinks, scale).to(q.dtype)
    else:
        bias = sinks.base.to(q.dtype)[None]
    o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                       attn_mask=bias[None], scale=scale, enable_gqa=True)
    return o[0].transpose(0, 1)
