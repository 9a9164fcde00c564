"""The float paged KV layout (blocks of float32 / bfloat16 / float16 keys and values) and attention over it:
one-query rows through the C++ kernel (or its gather + SDPA twin), larger prompt chunks through SDPA."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ember.ops.attention import (AttentionBackend, AttentionCapture, KeyWindow, RowSpan, StepPlan, attention_probs,
                                 chunk_attention, chunk_mask, visible)
from ember.ops.kernels import cpu_kernels
from ember.ops.long_context import ChunkSinks, LongContext, long_chunk_attention

# With a float cache, prompt chunks run as one-query rows over the paged cache, as decodes do (row i of a
# chunk attends up to its own position), and a step of decodes plus chunks runs whole in the fused C++
# decoder stack. Where the C++ kernel reads that cache, chunks of any size do (it reads each key once for a
# run of rows; faster than SDPA over a gathered copy at every size measured, see BENCHMARKS.md). Without it,
# chunks of up to this many tokens do (the gather + SDPA twin pads every row to the longest context) and
# larger ones go to SDPA.
CHUNK_AS_DECODE_ROWS = 32


def rows_kernel(q_dtype: torch.dtype, cache_dtype: torch.dtype) -> Any | None:
    """The C++ kernels when they attend one-query rows straight from this float cache, else None."""
    return cpu_kernels() if q_dtype == torch.float32 and cache_dtype in (torch.float32, torch.float16) else None


@dataclass
class FloatChunk:
    """Rows attended together through SDPA: one span's queries over its context."""

    rows: slice
    ctx: int  # keys after this step
    blocks: torch.Tensor  # blocks holding them, in order
    mask: torch.Tensor | None  # [n, ctx]; None: plain causal over the chunk itself
    cached: bool  # earlier keys live in the cache (else the context is the chunk's own k, v)
    sinks: ChunkSinks | None = None  # a long-context chunk whose rows read sink keys at capped distances


@dataclass
class FloatPlan(StepPlan):
    slots: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))  # [T] flat slot per row
    chunks: list[FloatChunk] = field(default_factory=list)
    rows: torch.Tensor | None = None  # [B] rows attending one query each over the paged cache
    tables: torch.Tensor | None = None  # [B, W] their block tables, padded with block 0
    lens: torch.Tensor | None = None  # [B] keys each sees (its position + 1)
    capture_keys: list[tuple[slice, torch.Tensor, torch.Tensor]] = field(default_factory=list)  # per capture:
    # (rows, blocks holding its keys, mask)

    @property
    def all_rows(self) -> bool:
        return not self.chunks and self.rows is not None

    @property
    def alone(self) -> bool:
        """One sequence checking candidates: its rows attend as its one-token steps would, bit for bit (the
        kernel splits work by the rows of a call, and the rounding with it). A batch of sequences gets the
        batched split: as without candidates, its rounding depends on its company."""
        return len(self.spans) == 1 and self.spans[0].candidates > 0


class FloatPagedBackend(AttentionBackend):
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, n_kv: int, head_dim: int,
                 dtype: torch.dtype, q_dtype: torch.dtype = torch.float32) -> None:
        self.block_size = block_size
        # One tensor for all layers (sink copies are refreshed in one indexing op), a view per layer.
        self.stack = torch.zeros(num_layers, 2, num_blocks, block_size, n_kv, head_dim, dtype=dtype)
        self.caches = list(self.stack.unbind(0))
        # Most prompt tokens a chunk may have to run as one-query rows (see CHUNK_AS_DECODE_ROWS).
        self.chunk_rows: float = CHUNK_AS_DECODE_ROWS
        if head_dim % 16 == 0 and rows_kernel(q_dtype, dtype) is not None:
            self.chunk_rows = math.inf

    @staticmethod
    def bytes_per_token(num_layers: int, n_kv: int, head_dim: int, dtype: torch.dtype) -> float:
        return 2 * num_layers * n_kv * head_dim * torch.empty((), dtype=dtype).element_size()

    # -- metadata -------------------------------------------------------------------------------

    def plan(self, spans: list[RowSpan], window: KeyWindow | LongContext | None = None,
             captures: list[AttentionCapture] | None = None) -> FloatPlan:
        bs = self.block_size
        positions, slots, rows = [], [], []
        row_spans: list[tuple[RowSpan, torch.Tensor]] = []
        long = window if isinstance(window, LongContext) else None
        window = window.key_window if window is not None else None
        if long is not None and captures:
            raise ValueError("attention capture (ICR re-ranking) is not supported with a long-context mode")
        plan = FloatPlan(spans, torch.empty(0), window, captures or [])
        for sp in spans:
            pos = torch.arange(sp.start, sp.start + sp.n)
            table = torch.tensor(sp.block_table, dtype=torch.long)
            positions.append(pos + sp.shift)
            slots.append(table[pos // bs] * bs + pos % bs)
            if long is not None and sp.n > 1 and sp.start + sp.shift + sp.n > long.window:
                # Its rows read sink keys at capped distances that differ row by row: not the C++ rows' path.
                ctx = sp.start + sp.n
                mask = visible(pos, ctx, window)
                plan.chunks.append(FloatChunk(slice(sp.row0, sp.row0 + sp.n), ctx, table[: -(-ctx // bs)], mask,
                                              sp.start > 0, ChunkSinks.plan(long, pos + sp.shift, mask)))
            elif sp.decode or sp.n <= self.chunk_rows:
                rows.append(torch.arange(sp.row0, sp.row0 + sp.n))
                row_spans.append((sp, table))
            else:
                ctx = sp.start + sp.n
                plan.chunks.append(FloatChunk(slice(sp.row0, sp.row0 + sp.n), ctx, table[: -(-ctx // bs)],
                                              chunk_mask(pos, ctx, window), sp.start > 0))
        plan.positions, plan.slots = torch.cat(positions), torch.cat(slots)
        if rows:
            self._row_meta(plan, torch.cat(rows), row_spans)
        for cap in plan.captures:
            sp = spans[cap.span]
            ctx = sp.start + cap.offset + cap.count
            pos = torch.arange(sp.start + cap.offset, ctx)
            mask = visible(pos, ctx, window)
            table = torch.tensor(sp.block_table[: -(-ctx // bs)], dtype=torch.long)
            plan.capture_keys.append((slice(sp.row0 + cap.offset, sp.row0 + cap.offset + cap.count), table, mask))
        return plan

    def _row_meta(self, plan: FloatPlan, rows: torch.Tensor, spans: list[tuple[RowSpan, torch.Tensor]]) -> None:
        """One-query rows: decodes, and the tokens of spans run as rows (row i sees up to its own position)."""
        width = max(len(t) for _, t in spans)
        tables = torch.zeros(len(rows), width, dtype=torch.long)
        lens = torch.empty(len(rows), dtype=torch.long)
        i = 0
        for sp, table in spans:  # a span's rows are consecutive and share its table
            tables[i:i + sp.n, : len(table)] = table
            lens[i:i + sp.n] = torch.arange(sp.start + 1, sp.start + sp.n + 1)
            i += sp.n
        plan.rows, plan.tables, plan.lens = rows, tables, lens
        if plan.window is not None:
            plan.starts = plan.window.starts(lens - 1)

    # -- attention ------------------------------------------------------------------------------

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: FloatPlan,
                scale: float) -> torch.Tensor:
        cache = self.caches[layer]
        n_kv, hd = k.shape[-2:]
        cache[0].view(-1, n_kv, hd).index_copy_(0, plan.slots, k.to(cache.dtype))
        cache[1].view(-1, n_kv, hd).index_copy_(0, plan.slots, v.to(cache.dtype))
        out = torch.empty_like(q)
        for c in plan.chunks:
            kc, vc = k[c.rows], v[c.rows]
            if c.cached:  # earlier context lives in the cache: read it all back
                kc = cache[0][c.blocks].view(-1, n_kv, hd)[: c.ctx].to(q.dtype)
                vc = cache[1][c.blocks].view(-1, n_kv, hd)[: c.ctx].to(q.dtype)
            if c.sinks is not None:
                out[c.rows] = long_chunk_attention(q[c.rows], kc, vc, c.sinks, scale)
            else:
                out[c.rows] = chunk_attention(q[c.rows], kc, vc, c.mask, scale)
        if plan.rows is not None:
            out[plan.rows] = self._rows(q[plan.rows], cache, plan, scale)
        for cap, (rows, blocks, mask) in zip(plan.captures, plan.capture_keys):
            if layer in cap.layers:
                keys = cache[0][blocks].view(-1, n_kv, hd)[: mask.shape[1]]
                cap.add(attention_probs(q[rows], keys, mask, scale))
        return out

    def _rows(self, q: torch.Tensor, cache: torch.Tensor, plan: FloatPlan, scale: float) -> torch.Tensor:
        kern = rows_kernel(q.dtype, cache.dtype)
        if kern is not None and plan.alone:  # row by row, as its one-token steps ran (see FloatPlan.alone)
            args = plan.window_args()
            return torch.cat([kern.paged_decode_attention(q[i:i + 1], cache[0], cache[1], plan.tables[i:i + 1],
                                                          plan.lens[i:i + 1], scale,
                                                          *((args[0][i:i + 1], args[1]) if args else ()))
                              for i in range(q.shape[0])])
        if kern is not None:  # reads K/V in place from the blocks instead of gathering a padded copy
            return kern.paged_decode_attention(q, cache[0], cache[1], plan.tables, plan.lens, scale,
                                               *plan.window_args())
        b, h, hd = q.shape
        n_kv = cache.shape[-2]
        width = plan.tables.shape[1] * cache.shape[2]
        t = torch.arange(width)[None, :]
        mask = t < plan.lens[:, None]
        if plan.starts is not None:
            mask &= (t < plan.window.sink) | (t >= plan.starts[:, None])
        # [B, max_blocks, block_size, KVH, D] -> [B, KVH, L, D]
        k = cache[0][plan.tables].flatten(1, 2).transpose(1, 2).to(q.dtype)
        v = cache[1][plan.tables].flatten(1, 2).transpose(1, 2).to(q.dtype)
        # Grouped-query trick: the G query heads of one KV head become G query rows.
        qg = q.view(b, n_kv, h // n_kv, hd)
        o = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask[:, None, None, :], scale=scale)
        return o.reshape(b, h, hd)

    def fused_forward(self, fused: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, plan: FloatPlan,
                      scale: float) -> torch.Tensor | None:
        if not plan.all_rows or plan.captures:
            return None
        return fused.forward(x, cos, sin, self.caches, plan.slots, plan.tables, plan.lens, scale,
                             *plan.window_args(), alone=plan.alone, skip=skip_mask(plan.skip, len(self.caches)))

    def copy_block(self, src: int, dst: int) -> None:
        self.copy_blocks([src], [dst])

    def copy_blocks(self, src: list[int], dst: list[int]) -> None:
        """Give blocks dst the contents of blocks src, in every layer, in one indexing op."""
        self.stack[:, :, torch.tensor(dst)] = self.stack[:, :, torch.tensor(src)]

    def refresh_sinks(self, src: list[int], dst: list[int], shifts: torch.Tensor, long: LongContext) -> None:
        """Write into blocks dst the first long.sinks keys of blocks src (k blocks per sequence, S sequences),
        rotated by shifts [S, sinks] positions, in every layer."""
        nl, _, nb, bs, kvh, hd = self.stack.shape
        t = torch.arange(long.sinks)
        n_seq = shifts.shape[0]
        src_slots = (torch.tensor(src).view(n_seq, -1)[:, t // bs] * bs + t % bs).flatten()
        dst_slots = (torch.tensor(dst).view(n_seq, -1)[:, t // bs] * bs + t % bs).flatten()
        keys = self.stack[:, 0].view(nl, nb * bs, kvh, hd)  # a view of every layer's K plane
        flat = keys[:, src_slots].transpose(0, 1).reshape(-1, nl * kvh, hd).float()  # [S * sinks, L * KVH, D]
        turned = long.rotate(flat, shifts.flatten()).view(-1, nl, kvh, hd).transpose(0, 1)
        keys[:, dst_slots] = turned.to(keys.dtype)


def skip_mask(skip: frozenset[int] | None, num_layers: int) -> torch.Tensor | None:
    """The fused kernel's uint8 [2 * layers] of sub-layers to leave out (None: none)."""
    if not skip:
        return None
    mask = torch.zeros(2 * num_layers, dtype=torch.uint8)
    mask[list(skip)] = 1
    return mask


def dense_backend(num_layers: int, n: int, n_kv: int, head_dim: int, dtype: torch.dtype
                  ) -> tuple[FloatPagedBackend, FloatPlan]:
    """Scratch caches (one block of n slots per layer) and the plan for one causal sequence of n tokens: the
    plain, unpaged forward used by perplexity and calibration."""
    backend = FloatPagedBackend.__new__(FloatPagedBackend)
    backend.block_size, backend.chunk_rows = n, 0
    backend.caches = [torch.empty(2, 1, n, n_kv, head_dim, dtype=dtype) for _ in range(num_layers)]
    return backend, backend.plan([RowSpan([0], 0, n, 0)])
