"""Turns a schedule into batch tensors, owns the KV cache tensors, and runs the model forward."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ember.engine.sequence import Sequence
from ember.models.llama import LlamaModel
from ember.ops.attention import AttentionMetadata, PrefillChunk


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


def kv_bytes_per_token(model: LlamaModel, dtype: torch.dtype) -> int:
    cfg = model.config
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * torch.empty((), dtype=dtype).element_size()


class ModelRunner:
    def __init__(self, model: LlamaModel, num_blocks: int, block_size: int, dtype: torch.dtype) -> None:
        cfg = model.config
        self.model = model
        self.block_size = block_size
        shape = (2, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=dtype) for _ in range(cfg.num_layers)]

    def copy_block(self, src: int, dst: int) -> None:
        for cache in self.kv_caches:
            cache[:, dst] = cache[:, src]

    @torch.inference_mode()
    def run(self, batch: dict[Sequence, int]) -> StepResult:
        tokens: list[int] = []
        positions: list[torch.Tensor] = []
        slots: list[torch.Tensor] = []
        meta = AttentionMetadata(slot_mapping=torch.empty(0, dtype=torch.long))
        decode_rows: list[int] = []
        decode_seqs: list[Sequence] = []
        logit_rows: list[int] = []
        result = StepResult(logits=torch.empty(0))
        bs = self.block_size
        for seq, n in batch.items():
            start, row0 = seq.num_computed, len(tokens)
            tokens.extend(seq.token_ids[start:start + n])
            pos = torch.arange(start, start + n)
            table = torch.tensor(seq.block_table, dtype=torch.long)
            positions.append(pos)
            slots.append(table[pos // bs] * bs + pos % bs)
            if n == 1 and start > 0:
                decode_rows.append(row0)
                decode_seqs.append(seq)
            else:
                ctx = start + n
                mask = None if start == 0 else torch.arange(ctx)[None, :] <= pos[:, None]
                meta.prefills.append(PrefillChunk(row0, n, ctx, table[: -(-ctx // bs)], mask))
            self._request_rows(seq, start, n, row0, logit_rows, result)
        meta.slot_mapping = torch.cat(slots)
        if decode_rows:
            self._decode_meta(meta, decode_rows, decode_seqs)
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

    def _decode_meta(self, meta: AttentionMetadata, rows: list[int], seqs: list[Sequence]) -> None:
        width = max(len(s.block_table) for s in seqs)
        tables = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, s in enumerate(seqs):
            tables[i, : len(s.block_table)] = torch.tensor(s.block_table)
        ctx = torch.tensor([s.num_computed + 1 for s in seqs])
        meta.decode_rows = torch.tensor(rows, dtype=torch.long)
        meta.decode_block_tables = tables
        meta.decode_ctx_lens = ctx
        meta.decode_mask = (torch.arange(width * self.block_size)[None, :] < ctx[:, None])[:, None, None, :]
