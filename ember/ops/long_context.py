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

from ember.ops.attention import KeyWindow

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
        the capped distance (keys as alt_keys gives them)."""
        if self.mode == "streaming":
            return positions.clamp(max=self.sinks + self.window - 1) - positions
        return self.window - positions

    def alt_keys(self, k: torch.Tensor) -> torch.Tensor:
        """The sink keys [sinks, KVH, D] (rotated at their positions) as the capped scores read them: as stored
        (streaming) or unrotated (LM-Infinite)."""
        if self.mode == "streaming":
            return k
        return self.rotate(k, -torch.arange(k.shape[0]))

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

    def rotate(self, x: torch.Tensor, by: torch.Tensor) -> torch.Tensor:
        """x [n, heads, D] rotated by `by` [n] positions (RoPE's half-split layout); angles in float64 so that
        shifts of millions of positions keep their precision."""
        angles = by.double()[:, None] * self.inv_freq.double()[None, :]
        emb = torch.cat((angles, angles), dim=-1)
        cos, sin = emb.cos().to(x.dtype)[:, None, :], emb.sin().to(x.dtype)[:, None, :]
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin


def chunk_scores(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, lc: LongContext,
                 scale: float) -> torch.Tensor:
    """Scores [H, n, ctx] of queries q [n, H, D] at absolute `positions` over keys k [ctx, KVH, D] (cache order,
    sinks first), with the capped distance for sink keys outside each query's window."""
    h, kvh = q.shape[1], k.shape[1]
    kk = k.repeat_interleave(h // kvh, dim=1)
    scores = torch.einsum("nhd,thd->hnt", q, kk) * scale
    n_sink = min(lc.sinks, k.shape[0])
    out = lc.outside(positions)[:, :n_sink]
    if bool(out.any()):
        qa = lc.rotate(q, lc.query_shift(positions))
        ka = lc.alt_keys(k[:n_sink]).repeat_interleave(h // kvh, dim=1)
        alt = torch.einsum("nhd,thd->hnt", qa, ka) * scale
        scores[:, :, :n_sink] = torch.where(out[None], alt, scores[:, :, :n_sink])
    return scores


def long_chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                         positions: torch.Tensor, lc: LongContext, scale: float) -> torch.Tensor:
    """A chunk's attention [n, H, D] over its context k, v [ctx, KVH, D] under a long-context mode (mask [n, ctx]:
    the KeyWindow's, in cache order)."""
    h, kvh = q.shape[1], k.shape[1]
    scores = chunk_scores(q.float(), k.float(), positions, lc, scale)
    scores.masked_fill_(~mask[None], -math.inf)
    probs = scores.softmax(dim=-1)
    vv = v.float().repeat_interleave(h // kvh, dim=1)
    return torch.einsum("hnt,thd->nhd", probs, vv).to(q.dtype)
