"""The KIVI KV layout: full blocks as packed 8/4/2-bit codes (ember.ops.kv_quant.QuantKVCache), the tokens of
blocks still filling (or not yet accepted) in float residual slots this backend assigns, and attention over
both: decode rows through the C++ kernel (or a dequantize + SDPA twin), chunks through SDPA."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ember.ops.attention import (AttentionBackend, AttentionCapture, KeyWindow, RowSpan, StepPlan, attention_probs,
                                 chunk_attention, chunk_mask, visible)
from ember.ops.kernels import cpu_kernels
from ember.ops.kv_quant import BlockFill, QuantKVCache, fake_quantize_blocks

EMPTY = torch.empty(0, dtype=torch.long)


@dataclass
class KiviChunk:
    """One span's rows attended through SDPA over [dequantized full blocks, residual tokens, its own k, v].
    A prompt chunk sees its own tokens in float (KIVI's prefill); a span with candidates sees each block it
    completes as quantized from the next block on, as one-token steps would have."""

    span: RowSpan
    index: int  # of the span in the plan
    full: torch.Tensor  # quantized blocks before the span's first block
    res: torch.Tensor  # residual flat indices of that block's tokens before the span
    mask: torch.Tensor | None  # prefill semantics: [n, ctx] or None (plain causal over the chunk)
    by_block: bool  # candidate span: per-block groups (see above)

    @property
    def rows(self) -> slice:
        return slice(self.span.row0, self.span.row0 + self.span.n)


@dataclass
class KiviPlan(StepPlan):
    res_rows: torch.Tensor = EMPTY  # [Tr] new rows kept in float
    res_index: torch.Tensor = EMPTY  # [Tr] residual flat indices they are written to
    fill: BlockFill | None = None  # blocks quantized at the end of each layer's step
    chunks: list[KiviChunk] = field(default_factory=list)
    rows: torch.Tensor | None = None  # [B] decode rows
    full: torch.Tensor | None = None  # [B, W] full blocks of each decoding sequence (padded 0)
    residual: torch.Tensor | None = None  # [B] residual slot of each one's incomplete block
    lens: torch.Tensor | None = None  # [B] keys each sees

    @property
    def all_rows(self) -> bool:
        return not self.chunks and self.rows is not None


class KiviBackend(AttentionBackend):
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, n_kv: int, head_dim: int, bits: int,
                 num_residual: int) -> None:
        self.block_size, self.bits = block_size, bits
        self.caches = [QuantKVCache(num_blocks, block_size, n_kv, head_dim, bits, num_residual)
                       for _ in range(num_layers)]
        # A block not yet quantized keeps its tokens in float in a residual slot. Only a sequence's own tail
        # blocks are (forks copy theirs, prefix hits take full quantized blocks), so slots are never shared.
        self.residual_of: dict[int, int] = {}  # block -> slot
        self.free_residual: list[int] = list(range(num_residual - 1, -1, -1))
        self.num_residual = num_residual

    @staticmethod
    def bytes_per_token(num_layers: int, n_kv: int, head_dim: int, bits: int, block_size: int) -> float:
        return num_layers * QuantKVCache.bytes_per_token(n_kv, head_dim, bits, block_size)

    # -- residual slots ---------------------------------------------------------------------

    @property
    def free_slots(self) -> list[int]:
        """Residual slots no block holds."""
        return list(self.free_residual)

    def _slot(self, block: int) -> int:
        if block not in self.residual_of:
            if not self.free_residual:  # more sequences than planned (forks): grow the pool
                self.free_residual.append(self.num_residual)
                self.num_residual += 1
                for cache in self.caches:
                    cache.ensure_residual(self.num_residual)
            self.residual_of[block] = self.free_residual.pop()
        return self.residual_of[block]

    def block_freed(self, block: int) -> None:
        slot = self.residual_of.pop(block, None)
        if slot is not None:
            self.free_residual.append(slot)

    def block_filled(self, block: int) -> None:
        """A block filled by candidate tokens that were then accepted: quantize it from its residual now."""
        slot = self.residual_of.pop(block, None)
        if slot is None:  # quantized in the step that filled it
            return
        fill = BlockFill.from_residual([block], [slot], self.block_size)
        for cache in self.caches:
            cache.quantize_filled(None, None, fill)
        self.free_residual.append(slot)

    def copy_block(self, src: int, dst: int) -> None:
        s, d = self.residual_of[src], self._slot(dst)
        for cache in self.caches:
            cache.copy_residual(s, d)

    # -- metadata -------------------------------------------------------------------------------

    def plan(self, spans: list[RowSpan], window: KeyWindow | None = None,
             captures: list[AttentionCapture] | None = None) -> KiviPlan:
        captured = {c.span for c in captures or []}
        idx: dict[str, list[int]] = {k: [] for k in ("res_rows", "res", "blocks", "pos_res", "fres",
                                                     "pos_new", "rows")}
        plan = KiviPlan(spans, torch.cat([torch.arange(s.start, s.start + s.n) for s in spans]), window,
                        captures or [])
        decodes: list[RowSpan] = []
        for i, sp in enumerate(spans):
            as_row = sp.decode and not sp.candidates and i not in captured
            self._span_indices(sp, as_row, idx)
            if as_row:
                decodes.append(sp)
            else:
                pos = torch.arange(sp.start, sp.start + sp.n)
                full, res = self._cached_context(sp.block_table, sp.start)
                mask = None if sp.candidates else chunk_mask(pos, sp.start + sp.n, window)
                plan.chunks.append(KiviChunk(sp, i, full, res, mask, sp.candidates > 0))
        t = {k: torch.tensor(v, dtype=torch.long) for k, v in idx.items()}
        plan.res_rows, plan.res_index = t["res_rows"], t["res"]
        plan.fill = BlockFill(t["blocks"], t["pos_res"], t["fres"], t["pos_new"], t["rows"])
        if decodes:
            self._decode_meta(plan, decodes)
        return plan

    def finish(self, plan: KiviPlan) -> None:
        """The blocks the step filled are quantized now: their residual slots are free. (Not earlier, in plan: a
        failed step is replayed, and the replay reads those slots again.)"""
        assert plan.fill is not None
        for block in plan.fill.blocks.tolist():
            self.block_freed(block)

    def _span_indices(self, sp: RowSpan, as_row: bool, idx: dict[str, list[int]]) -> None:
        """Which of the span's tokens go to residual slots, and which blocks fill and are quantized in this step
        (those full of tokens sure to stay; the rest wait in the residual until accepted: block_filled)."""
        bs, table, start, end = self.block_size, sp.block_table, sp.start, sp.start + sp.n
        kept_end = end - sp.candidates
        # A decode row reads its token back from the residual slot (the kernel's layout); a chunk reads its
        # tokens as they are and keeps only those of blocks that are not quantized now.
        res_from = start if as_row else max(start, kept_end // bs * bs)
        for p in range(res_from, end):
            if p == res_from or p % bs == 0:
                slot = self._slot(table[p // bs]) * bs
            idx["res_rows"].append(sp.row0 + p - start)
            idx["res"].append(slot + p % bs)
        for i in range(start // bs, kept_end // bs):  # blocks this step fills
            base = len(idx["blocks"]) * bs
            first_new = (i + 1) * bs if as_row else max(start, i * bs)  # before it: from the residual
            idx["blocks"].append(table[i])
            if first_new > i * bs:
                slot = self.residual_of[table[i]] * bs
                idx["pos_res"].extend(range(base, base + first_new - i * bs))
                idx["fres"].extend(range(slot, slot + first_new - i * bs))
            idx["pos_new"].extend(range(base + first_new - i * bs, base + bs))
            idx["rows"].extend(range(sp.row0 + first_new - start, sp.row0 + (i + 1) * bs - start))

    def _cached_context(self, table: list[int], start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Full (quantized) blocks and residual indices holding positions [0, start) of a sequence."""
        bs = self.block_size
        full = torch.tensor(table[: start // bs], dtype=torch.long)
        if start % bs == 0:
            return full, EMPTY
        slot = self.residual_of[table[start // bs]]
        return full, torch.arange(slot * bs, slot * bs + start % bs)

    def _decode_meta(self, plan: KiviPlan, spans: list[RowSpan]) -> None:
        bs = self.block_size
        pos = [s.start for s in spans]
        width = max(p // bs for p in pos)
        full = torch.zeros(len(spans), width, dtype=torch.long)
        for i, (s, p) in enumerate(zip(spans, pos)):
            full[i, : p // bs] = torch.tensor(s.block_table[: p // bs], dtype=torch.long)
        plan.rows = torch.tensor([s.row0 for s in spans], dtype=torch.long)
        plan.full, plan.lens = full, torch.tensor(pos) + 1
        plan.residual = torch.tensor([self.residual_of[s.block_table[p // bs]] for s, p in zip(spans, pos)])
        if plan.window is not None:
            plan.starts = plan.window.starts(plan.lens - 1)

    # -- attention ------------------------------------------------------------------------------

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: KiviPlan,
                scale: float) -> torch.Tensor:
        cache = self.caches[layer]
        cache.write_residual(k, v, plan.res_rows, plan.res_index)  # decoding tokens are read back from there
        out = torch.empty_like(q)
        captures = {c.span: c for c in plan.captures_at(layer)}
        for chunk in plan.chunks:
            cap = captures.get(chunk.index)
            out[chunk.rows] = self._chunk(q[chunk.rows], k[chunk.rows], v[chunk.rows], cache, chunk, plan.window,
                                          scale, cap)
        if plan.rows is not None:
            out[plan.rows] = self._rows(q[plan.rows], cache, plan, scale)
        cache.quantize_filled(k, v, plan.fill)
        return out

    def _chunk(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: QuantKVCache, chunk: KiviChunk,
               window: KeyWindow | None, scale: float, cap: AttentionCapture | None) -> torch.Tensor:
        kc = torch.cat([cache.keys(chunk.full).flatten(0, 1), cache.residual_rows(0, chunk.res), k.float()])
        vc = torch.cat([cache.values(chunk.full).flatten(0, 1), cache.residual_rows(1, chunk.res), v.float()])
        sp = chunk.span
        if chunk.by_block:
            return self._by_block(q, kc, vc, sp, window, scale, cap)
        if cap is not None:
            mask = visible(torch.arange(sp.start, sp.start + sp.n), sp.start + sp.n, window)
            rows = slice(cap.offset, cap.offset + cap.count)
            cap.add(attention_probs(q[rows], kc[: sp.start + rows.stop], mask[rows, : sp.start + rows.stop], scale))
        return chunk_attention(q, kc.to(q.dtype), vc.to(q.dtype), chunk.mask, scale)

    def _by_block(self, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, sp: RowSpan,
                  window: KeyWindow | None, scale: float, cap: AttentionCapture | None) -> torch.Tensor:
        """A candidate span's rows, grouped by block: rows in block b see the span's earlier blocks as they
        will read back once quantized (as a row decoded alone would), and their own block in float."""
        bs = self.block_size
        first = sp.start // bs * bs
        out = torch.empty_like(q)
        for b0 in range(first, sp.start + sp.n, bs):
            lo, hi = max(b0, sp.start), min(b0 + bs, sp.start + sp.n)  # positions of this group's rows
            keys, vals = kc[:hi].clone(), vc[:hi].clone()
            if b0 > first:  # blocks [first, b0) filled within this span: as quantized
                shape = (-1, bs) + keys.shape[1:]
                fk, fv = fake_quantize_blocks(keys[first:b0].view(shape), vals[first:b0].view(shape), self.bits)
                keys[first:b0], vals[first:b0] = fk.flatten(0, 1), fv.flatten(0, 1)
            mask = visible(torch.arange(lo, hi), hi, window)
            rows = slice(lo - sp.start, hi - sp.start)
            out[rows] = chunk_attention(q[rows], keys.to(q.dtype), vals.to(q.dtype), mask, scale)
            if cap is not None:
                cap.add(_pad(attention_probs(q[rows], keys, mask, scale), cap, rows, sp.start))
        return out

    def _rows(self, q: torch.Tensor, cache: QuantKVCache, plan: KiviPlan, scale: float) -> torch.Tensor:
        kern = cpu_kernels() if q.dtype == torch.float32 else None
        if kern is not None:  # dequantizes block by block into a small buffer instead of the whole context
            return kern.kivi_decode_attention(q, cache.tensors(), plan.full, plan.lens, plan.residual, cache.bits,
                                              scale, *plan.window_args())
        b, h, hd = q.shape
        n_kv, bs = cache.n_kv, self.block_size
        # [B, W*bs + bs, KVH, D]: dequantized full blocks, then the residual block (which holds the token).
        p, width = plan.lens - 1, plan.full.shape[1] * bs
        keys = torch.cat([cache.keys(plan.full.flatten()).view(b, width, n_kv, hd), cache.residual[0][plan.residual]],
                         dim=1)
        vals = torch.cat([cache.values(plan.full.flatten()).view(b, width, n_kv, hd),
                          cache.residual[1][plan.residual]], dim=1)
        t_full, t_res = torch.arange(width)[None, :], (p // bs * bs)[:, None] + torch.arange(bs)[None, :]
        t = torch.cat([t_full.expand(b, -1), t_res], dim=1)  # the position each key column holds
        mask = torch.cat([t_full < (p // bs * bs)[:, None], t_res <= p[:, None]], dim=1)
        if plan.starts is not None:
            mask &= (t < plan.window.sink) | (t >= plan.starts[:, None])
        qg = q.view(b, n_kv, h // n_kv, hd)
        o = F.scaled_dot_product_attention(qg, keys.transpose(1, 2).to(q.dtype), vals.transpose(1, 2).to(q.dtype),
                                           attn_mask=mask[:, None, None, :], scale=scale)
        return o.reshape(b, h, hd)

    def fused_forward(self, fused: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, plan: KiviPlan,
                      scale: float) -> torch.Tensor | None:
        if not plan.all_rows or plan.captures or plan.skip:
            return None
        # Each token goes to its residual slot (rows are the decodes in order, as res_index is).
        hidden = fused.forward_kivi(x, cos, sin, [c.tensors() for c in self.caches], plan.res_index, plan.full,
                                    plan.lens, plan.residual, self.bits, scale, *plan.window_args())
        for cache in self.caches:
            cache.quantize_filled(None, None, plan.fill)
        return hidden


def _pad(probs: torch.Tensor, cap: AttentionCapture, rows: slice, start: int) -> torch.Tensor:
    """A group's captured rows [n, keys] placed in the capture's [count, start + offset + count] frame."""
    out = torch.zeros(cap.count, start + cap.offset + cap.count)
    lo, hi = max(rows.start, cap.offset), min(rows.stop, cap.offset + cap.count)
    if lo < hi:
        part = probs[lo - rows.start: hi - rows.start]
        out[lo - cap.offset: hi - cap.offset, : min(part.shape[1], out.shape[1])] = part[:, : out.shape[1]]
    return out
