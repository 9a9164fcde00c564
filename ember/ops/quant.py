"""Quantized linear layers: int8 weights in groups of 32, run by an AVX2 kernel or a PyTorch fallback."""
from __future__ import annotations

import torch
from torch import nn

from ember.ops.kernels import cpu_kernels

GROUP = 32
# Above this many rows a step is compute-bound (prefill): dequantize and use the float GEMM instead.
KERNEL_MAX_ROWS = 32


def quantize_int8(w: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric round-to-nearest per group along K: (int8 [N, K], float32 scales [N, K/group])."""
    n, k = w.shape
    g = w.float().reshape(n, k // group, group)
    scales = g.abs().amax(-1) / 127.0
    q = torch.round(g / torch.where(scales > 0, scales, 1.0).unsqueeze(-1)).clamp(-127, 127)
    return q.to(torch.int8).reshape(n, k), scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor, group: int = GROUP) -> torch.Tensor:
    n, k = q.shape
    return (q.float().reshape(n, k // group, group) * scales.unsqueeze(-1)).reshape(n, k)


def w8a8_reference(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, group: int = GROUP) -> torch.Tensor:
    """Pure-PyTorch twin of the kernel: activations quantized per group too, exact integer dots."""
    m, k = x.shape
    xq, xs = quantize_int8(x, group)
    dots = torch.einsum("mbg,nbg->mnb", xq.float().reshape(m, k // group, group),
                        q.float().reshape(q.shape[0], k // group, group))
    return (dots * xs.unsqueeze(1) * scales.unsqueeze(0)).sum(-1)


class QuantLinear(nn.Module):
    """Drop-in for a linear layer with int8 group-quantized weights (4x smaller than float32)."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)
        self.out_features, self.in_features = qweight.shape

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> "QuantLinear":
        return cls(*quantize_int8(weight), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        if x2.shape[0] > KERNEL_MAX_ROWS:
            y = nn.functional.linear(x2, dequantize_int8(self.qweight, self.scales))
        else:
            k = cpu_kernels()
            y = k.w8a8_linear(x2, self.qweight, self.scales) if k else w8a8_reference(x2, self.qweight, self.scales)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int8 g{GROUP}"
