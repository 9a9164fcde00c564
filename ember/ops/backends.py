"""Which attention backend a KV cache dtype names, what a token costs in it, and building one for a model."""
from __future__ import annotations

import torch

from ember.config import ModelConfig
from ember.ops.attention import AttentionBackend
from ember.ops.formats import KV_CACHE_DTYPES
from ember.ops.kv_quant import float_cache_dtype
from ember.ops.paged_float import FloatPagedBackend
from ember.ops.paged_kivi import KiviBackend


class KVSpec:
    """A KV cache format for one model: `kv_cache_dtype` (ember.ops.formats) over weights in `model_dtype`."""

    def __init__(self, cfg: ModelConfig, kv_cache_dtype: str, model_dtype: torch.dtype, block_size: int) -> None:
        self.cfg, self.block_size, self.model_dtype = cfg, block_size, model_dtype
        self.bits = KV_CACHE_DTYPES[kv_cache_dtype]
        self.dtype = float_cache_dtype(kv_cache_dtype, model_dtype)
        self.name = kv_cache_dtype if self.bits else str(self.dtype).removeprefix("torch.")

    def bytes_per_token(self) -> float:
        """Cache bytes per token over all layers: dtype elements, or KIVI codes plus their parameters."""
        c = self.cfg
        if self.bits is not None:
            return KiviBackend.bytes_per_token(c.num_layers, c.num_kv_heads, c.head_dim, self.bits, self.block_size)
        return FloatPagedBackend.bytes_per_token(c.num_layers, c.num_kv_heads, c.head_dim, self.dtype)

    def residual_slots(self, max_num_seqs: int) -> int:
        """Float blocks a KIVI cache keeps for blocks still filling: two per sequence (an old tail filling
        while a new one starts); none for a float cache."""
        return 0 if self.bits is None else 2 * max_num_seqs

    def reserved_bytes(self, max_num_seqs: int) -> int:
        """Memory the residual slots take, out of the cache's budget."""
        c = self.cfg
        per_token = FloatPagedBackend.bytes_per_token(c.num_layers, c.num_kv_heads, c.head_dim, torch.float32)
        return int(self.residual_slots(max_num_seqs) * self.block_size * per_token)

    def build(self, num_blocks: int, max_num_seqs: int) -> AttentionBackend:
        c = self.cfg
        if self.bits is not None:
            return KiviBackend(c.num_layers, num_blocks, self.block_size, c.num_kv_heads, c.head_dim, self.bits,
                               self.residual_slots(max_num_seqs))
        return FloatPagedBackend(c.num_layers, num_blocks, self.block_size, c.num_kv_heads, c.head_dim, self.dtype,
                                 self.model_dtype)
