"""Turns a schedule into batch tensors, owns the KV cache tensors, and runs the model forward."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from itertools import groupby

import torch

from ember.engine.kv_cache import BlockManager
from ember.engine.sequence import Sequence
from ember.models.llama import LlamaModel
from ember.ops.attention import AttentionMetadata, PrefillChunk, paged_rows_kernel
from ember.ops.kv_quant import KVQuantMeta, QuantKVCache


# With a float cache, prompt chunks run as one-query rows over the paged cache, as decodes do (row i of a
# chunk attends up to its own position), and a step of decodes plus chunks runs whole in the fused C++
# decoder stack. Where the C++ kernel reads that cache, chunks of any size do: it attends a chunk's rows in
# runs that read each key and value once for all their queries, faster than SDPA over a gathered copy at
# every size measured (SmolLM2 int8, one step: 16 tokens at position 700 and a 1500-token prompt alike).
# Without it, chunks of up to this many tokens do (the gather + SDPA twin pads every row to the longest
# context) and larger ones go to SDPA.
CHUNK_AS_DECODE_ROWS = 32


@dataclass
class PromptLogprobRows:
    """Logit rows [row, row + count) score prompt tokens first_token .. first_token + count - 1."""

    seq: Sequence
    first_token: int
    row: int
    count: int


@dataclass
class StepResult:
    logits: torch.Tensor  # [R, vocab] float32: the rows we asked for, in the order below
    sample_rows: dict[Sequence, int] = field(default_factory=dict)  # seq -> logits row to sample from
    prompt_rows: list[PromptLogprobRows] = field(default_factory=list)
    forward_s: float = 0.0  # time in the model (forward + logits), to separate the engine's own overhead


def kv_bytes_per_token(model: LlamaModel, dtype: torch.dtype, kv_bits: int | None = None,
                       block_size: int = 16) -> float:
    """Cache bytes per token over all layers: dtype elements, or KIVI codes plus their parameters."""
    cfg = model.config
    if kv_bits is not None:
        per_layer = QuantKVCache.bytes_per_token(cfg.num_kv_heads, cfg.head_dim, kv_bits, block_size)
        return cfg.num_layers * per_layer
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * torch.empty((), dtype=dtype).element_size()


class ModelRunner:
    def __init__(self, model: LlamaModel, blocks: BlockManager, dtype: torch.dtype,
                 kv_bits: int | None = None) -> None:
        cfg = model.config
        self.model = model
        self.blocks = blocks
        self.block_size = bs = blocks.block_size
        self.kv_bits = kv_bits
        # Most prompt tokens a chunk may have to run as one-query rows (see CHUNK_AS_DECODE_ROWS).
        self.chunk_rows: float = 0 if kv_bits is not None else CHUNK_AS_DECODE_ROWS
        if kv_bits is None and cfg.head_dim % 16 == 0 and paged_rows_kernel(model.embed_tokens.weight.dtype, dtype):
            self.chunk_rows = math.inf
        self.kv_caches: list[torch.Tensor] | list[QuantKVCache]
        if kv_bits is None:
            shape = (2, blocks.num_blocks, bs, cfg.num_kv_heads, cfg.head_dim)
            self.kv_caches = [torch.zeros(shape, dtype=dtype) for _ in range(cfg.num_layers)]
        else:
            self.kv_caches = [QuantKVCache(blocks.num_blocks, bs, cfg.num_kv_heads, cfg.head_dim, kv_bits,
                                           blocks.num_residual) for _ in range(cfg.num_layers)]

    def copy_block(self, src: int, dst: int) -> None:
        """Give dst the contents of src (a partly filled block being forked)."""
        for cache in self.kv_caches:
            if isinstance(cache, QuantKVCache):  # an incomplete block lives in its residual slot
                cache.ensure_residual(self.blocks.num_residual)
                cache.copy_residual(self.blocks.residual_of[src], self.blocks.residual_of[dst])
            else:
                cache[:, dst] = cache[:, src]

    @torch.inference_mode()
    def run(self, batch: dict[Sequence, int]) -> StepResult:
        tokens: list[int] = []
        positions: list[torch.Tensor] = []
        slots: list[torch.Tensor] = []
        meta = AttentionMetadata(slot_mapping=torch.empty(0, dtype=torch.long))
        decode_rows: list[int] = []
        decode_seqs: list[Sequence] = []
        decode_ctx: list[int] = []
        spans: list[tuple[Sequence, int, int, int]] = []  # (seq, first position, tokens, first row)
        logit_rows: list[int] = []
        result = StepResult(logits=torch.empty(0))
        bs = self.block_size
        for seq, n in batch.items():
            start, row0 = seq.num_computed, len(tokens)
            tokens.extend(seq.token_ids[start:start + n])
            spans.append((seq, start, n, row0))
            pos = torch.arange(start, start + n)
            table = torch.tensor(seq.block_table, dtype=torch.long)
            positions.append(pos)
            slots.append(table[pos // bs] * bs + pos % bs)
            if n == 1 and start > 0 or n <= self.chunk_rows:
                decode_rows.extend(range(row0, row0 + n))
                decode_seqs.extend([seq] * n)
                decode_ctx.extend(range(start + 1, start + n + 1))
            else:
                ctx = start + n
                mask = None if start == 0 else torch.arange(ctx)[None, :] <= pos[:, None]
                meta.prefills.append(PrefillChunk(row0, n, ctx, table[: -(-ctx // bs)], mask))
            self._request_rows(seq, start, n, row0, logit_rows, result)
        meta.slot_mapping = torch.cat(slots)
        if decode_rows:
            self._decode_meta(meta, decode_rows, decode_seqs, decode_ctx)
        if self.kv_bits is not None:
            meta.kv_quant = self._kv_quant_meta(spans, decode_seqs)
        start = time.perf_counter()
        hidden = self.model(torch.tensor(tokens), torch.cat(positions), self.kv_caches, meta)
        result.logits = self.model.compute_logits(hidden[torch.tensor(logit_rows, dtype=torch.long)])
        result.forward_s = time.perf_counter() - start
        return result

    @staticmethod
    def _request_rows(seq: Sequence, start: int, n: int, row0: int, logit_rows: list[int],
                      result: StepResult) -> None:
        """Note which hidden rows need logits: prompt-logprob rows, then the sampling row."""
        if seq.wants_prompt_logprobs:
            # Row for position p scores token p + 1; only prompt tokens are scored here.
            last = min(start + n, len(seq.prompt_ids) - 1)
            if last > start:
                result.prompt_rows.append(PromptLogprobRows(seq, start + 1, len(logit_rows), last - start))
                logit_rows.extend(range(row0, row0 + last - start))
        if start + n == len(seq):
            result.sample_rows[seq] = len(logit_rows)
            logit_rows.append(row0 + n - 1)

    def _decode_meta(self, meta: AttentionMetadata, rows: list[int], seqs: list[Sequence], ctx_lens: list[int]
                     ) -> None:
        """Rows that attend one query each over their sequence's paged cache: decodes, and the tokens of
        prompt chunks (row i of a chunk sees the cache up to its own position)."""
        ctx = torch.tensor(ctx_lens)
        meta.decode_rows = torch.tensor(rows, dtype=torch.long)
        meta.decode_ctx_lens = ctx
        if self.kv_bits is not None:  # a KIVI cache reads its own tables and mask (_quant_decode_meta)
            return
        width = max(len(s.block_table) for s in seqs)
        tables = torch.zeros(len(seqs), width, dtype=torch.long)
        i = 0
        for s, rows_of_s in groupby(seqs):  # a chunk's rows are consecutive and share their sequence's table
            j = i + len(list(rows_of_s))
            tables[i:j, : len(s.block_table)] = torch.tensor(s.block_table)
            i = j
        meta.decode_block_tables = tables

    def _kv_quant_meta(self, spans: list[tuple[Sequence, int, int, int]],
                       decode_seqs: list[Sequence]) -> KVQuantMeta:
        """Where each new token goes in a KIVI cache and where each sequence's earlier tokens are."""
        bs, slot_of = self.block_size, self.blocks.residual_of
        for cache in self.kv_caches:
            cache.ensure_residual(self.blocks.num_residual)
        idx: dict[str, list[int]] = {k: [] for k in ("res_rows", "res_slots", "done_blocks", "pos_res",
                                                     "res", "pos_new", "rows")}
        chunk_context: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        for seq, start, n, row0 in spans:
            table, end = seq.block_table, start + n
            decode = n == 1 and start > 0
            # A decoding token goes to its block's residual slot before attention reads the slot; a prompt
            # chunk's tokens are read as they are and only the ones in a block still filling are kept.
            res_from = start if decode else max(start, end // bs * bs)
            for i in range(start // bs, end // bs):  # blocks this step fills
                base = len(idx["done_blocks"]) * bs
                first_new = (i + 1) * bs if decode else max(start, i * bs)  # before it: from the residual
                idx["done_blocks"].append(table[i])
                if first_new > i * bs:  # these tokens are in the block's residual slot
                    slot = slot_of[table[i]] * bs
                    idx["pos_res"].extend(range(base, base + first_new - i * bs))
                    idx["res"].extend(range(slot, slot + first_new - i * bs))
                idx["pos_new"].extend(range(base + first_new - i * bs, base + bs))
                idx["rows"].extend(range(row0 + first_new - start, row0 + (i + 1) * bs - start))
            if res_from < end:
                slot = slot_of[table[res_from // bs]] * bs
                idx["res_rows"].extend(range(row0 + res_from - start, row0 + n))
                idx["res_slots"].extend(range(slot + res_from % bs, slot + res_from % bs + end - res_from))
            if not decode:
                chunk_context.append(None if start == 0 else self._cached_context(table, start))
        t = {k: torch.tensor(v, dtype=torch.long) for k, v in idx.items()}
        qm = KVQuantMeta(t["res_rows"], t["res_slots"], t["done_blocks"], t["pos_res"], t["res"],
                         t["pos_new"], t["rows"], chunk_context)
        if decode_seqs:
            self._quant_decode_meta(qm, decode_seqs)
        return qm

    def _cached_context(self, table: list[int], start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Full blocks and residual indices holding positions [0, start) of a sequence."""
        bs = self.block_size
        full = torch.tensor(table[: start // bs], dtype=torch.long)
        if start % bs == 0:
            return full, torch.empty(0, dtype=torch.long)
        slot = self.blocks.residual_of[table[start // bs]]
        return full, torch.arange(slot * bs, slot * bs + start % bs)

    def _quant_decode_meta(self, qm: KVQuantMeta, seqs: list[Sequence]) -> None:
        bs, slot_of = self.block_size, self.blocks.residual_of
        pos = [s.num_computed for s in seqs]
        width = max(p // bs for p in pos)
        full = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, (s, p) in enumerate(zip(seqs, pos)):
            full[i, : p // bs] = torch.tensor(s.block_table[: p // bs], dtype=torch.long)
        qm.decode_residual = torch.tensor([slot_of[s.block_table[p // bs]] for s, p in zip(seqs, pos)])
        p = torch.tensor(pos)
        full_ok = torch.arange(width * bs)[None, :] < (p // bs * bs)[:, None]
        res_ok = torch.arange(bs)[None, :] <= (p % bs)[:, None]  # the token itself is in the residual
        qm.decode_mask = torch.cat([full_ok, res_ok], dim=1)[:, None, None, :]
        qm.decode_full = full
