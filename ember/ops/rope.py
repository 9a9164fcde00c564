"""Rotary position embeddings (half-split layout, as Hugging Face), with Llama-3 / linear scaling."""
from __future__ import annotations

import math
from typing import Any

import torch

from ember.ops.kernels import cpu_kernels


def inv_frequencies(head_dim: int, theta: float, scaling: dict[str, Any] | None,
                    freq_factors: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pair inverse frequencies, after any rope scaling (float32, [head_dim // 2])."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if freq_factors is not None:  # llama.cpp stores Llama-3 scaling as a rope_freqs tensor
        return inv / freq_factors.float()
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type"))
    if kind == "linear":
        return inv / float(scaling["factor"])
    if kind == "llama3":
        return _llama3(inv, scaling)
    return inv


def _llama3(inv: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_ctx = float(s["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(torch.nn.Module):
    """Precomputed cos/sin tables indexed by absolute position; positions past them (long-context modes) are
    computed when asked, in float64."""

    def __init__(self, inv_freq: torch.Tensor, max_positions: int) -> None:
        super().__init__()
        self.inv_freq = inv_freq
        t = torch.arange(max_positions, dtype=torch.int64).float()
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for these positions, [T, D]: looked up once per step, shared by all layers."""
        if len(positions) and int(positions.max()) >= self.cos.shape[0]:
            cos, sin = cos_sin(positions, self.inv_freq)
            return cos.to(dtype), sin.to(dtype)
        return self.cos[positions].to(dtype), self.sin[positions].to(dtype)


def cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [n, D] (float64) of `positions` [n] (any integers, negative included); angles in float64 so that
    positions in the millions keep their precision."""
    freqs = torch.outer(positions.double(), inv_freq.double())
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [n, heads, D] rotated by the angles of cos, sin [n, D] (PyTorch; the kernels have their own)."""
    return x * cos[:, None, :].to(x.dtype) + _rotate_half(x) * sin[:, None, :].to(x.dtype)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [T, H, D], k: [T, KVH, D]; cos, sin: [T, D]."""
    kern = cpu_kernels() if q.dtype == torch.float32 else None
    if kern is not None:
        q, k = q.contiguous(), k.contiguous()
        kern.rope_(q, cos, sin)
        kern.rope_(k, cos, sin)
        return q, k
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
