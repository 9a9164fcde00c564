"""Quantized linear layers: int8 (symmetric) and int4 (asymmetric) group-wise weights, run by AVX2
kernels with on-the-fly int8 activations, or by PyTorch twins that compute the same thing."""
from __future__ import annotations

import threading

import torch
from torch import nn

from ember.ops.kernels import cpu_kernels

# Activations are quantized in blocks of 32 (as llama.cpp's q8_0): weight groups are multiples of it.
BLOCK = 32
GROUP = BLOCK  # default weight group
BITS = (4, 8)
# Up to this many rows (decode batches, mixed steps, prompt chunks) the kernels quantize the activations
# to int8 per block and run integer dots; above it (long prompt chunks) the module dequantizes the whole
# matrix for MKL's float GEMM. Measured per matrix: the integer tiles win below ~128 rows (dequantizing
# alone costs ~1 ms); at 512 rows int8 tiles only tie with dequantize + MKL and int4 tiles trail it 1.4x.
KERNEL_MAX_ROWS = 256
_SCRATCH = threading.local()  # per thread: QuantLinear._dequantized_scratch's buffer


def check_group(k: int, group: int) -> None:
    """Weight groups must tile the input dimension and be whole activation blocks."""
    if group <= 0 or group % BLOCK or k % group:
        raise ValueError(f"group size {group} must be a multiple of {BLOCK} that divides the input "
                         f"dimension {k}")


def quantize_int8(w: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric round-to-nearest per group along K: (int8 [N, K], float32 scales [N, K/group]).

    group == K gives one scale per output channel."""
    n, k = w.shape
    g = w.float().reshape(n, k // group, group)
    scales = g.abs().amax(-1) / 127.0
    q = torch.round(g / torch.where(scales > 0, scales, 1.0).unsqueeze(-1)).clamp(-127, 127)
    return q.to(torch.int8).reshape(n, k), scales


def quantize_int4(w: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric round-to-nearest per group: w ~ q * scale + min with q in 0..15.

    Returns (uint8 codes [N, K] unpacked, float16 scales [N, K/group], float16 mins [N, K/group]): as
    llama.cpp's q4_1, 5 bits per weight at groups of 32. Codes are rounded against the float16
    parameters, so the error bound holds for what is stored."""
    n, k = w.shape
    g = w.float().reshape(n, k // group, group)
    lo, hi = g.amin(-1).half(), g.amax(-1)
    scales = ((hi - lo.float()) / 15.0).half()
    s = scales.float()
    q = torch.round((g - lo.float().unsqueeze(-1)) / torch.where(s > 0, s, 1.0).unsqueeze(-1)).clamp(0, 15)
    return q.to(torch.uint8).reshape(n, k), scales, lo


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, K] -> [N, K/2]: in each block of 32, byte j holds code j (low) and j+16 (high)."""
    n, k = q.shape
    b = q.reshape(n, k // BLOCK, 2, BLOCK // 2)
    return (b[:, :, 0] | (b[:, :, 1] << 4)).reshape(n, k // 2)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    n, half = p.shape
    b = p.reshape(n, half // (BLOCK // 2), 1, BLOCK // 2)
    return torch.cat([b & 0xF, b >> 4], dim=2).reshape(n, half * 2)


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Float32 weights [N, K] from a packed layer's buffers."""
    q = unpack_int4(qweight) if bits == 4 else qweight
    n, k = q.shape
    groups = scales.shape[1]
    w = q.float().reshape(n, groups, k // groups) * scales.float().unsqueeze(-1)
    if mins is not None:
        w = w + mins.float().unsqueeze(-1)
    return w.reshape(n, k)


def wxa8_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
                   bits: int) -> torch.Tensor:
    """Pure-PyTorch twin of the kernels: int8 activations per block of 32 and exact integer dots."""
    m, k = x.shape
    nb = k // BLOCK
    xq, xs = quantize_int8(x, BLOCK)
    q = (unpack_int4(qweight) if bits == 4 else qweight).float()
    n = q.shape[0]
    per = nb // scales.shape[1]  # activation blocks per weight group
    ws = scales.float().repeat_interleave(per, dim=1)  # [N, nb]
    dots = torch.einsum("mbg,nbg->mnb", xq.float().reshape(m, nb, BLOCK), q.reshape(n, nb, BLOCK))
    y = (dots * xs.unsqueeze(1) * ws.unsqueeze(0)).sum(-1)
    if mins is not None:  # sum_j m * x_j over each block, with x as the kernel sees it (dequantized int8)
        xsum = xq.float().reshape(m, nb, BLOCK).sum(-1) * xs  # [M, nb]
        y = y + xsum @ mins.float().repeat_interleave(per, dim=1).T
    return y


class QuantLinear(nn.Module):
    """Drop-in for a linear layer with packed group-quantized weights.

    bits=8: int8 codes [N, K], symmetric (scales only); bits=4: two codes per byte [N, K/2] (see
    pack_int4) with scales and mins, w = q * scale + min. Groups run along K, `group` inputs each.
    Group parameters are float32 or float16 (int4 RTN/AWQ use float16; an integer zero point, which
    must dequantize pruned weights to exactly 0, keeps float32)."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None, bits: int = 8) -> None:
        super().__init__()
        if bits not in BITS:
            raise ValueError(f"{bits}-bit weights are not supported; choose one of {BITS}")
        self.bits = bits
        self.out_features = qweight.shape[0]
        self.in_features = qweight.shape[1] * (2 if bits == 4 else 1)
        self.group = self.in_features // scales.shape[1]
        check_group(self.in_features, self.group)
        if (bits == 4) != (mins is not None):
            raise ValueError("int4 layers need mins (asymmetric); int8 layers are symmetric")
        self.register_buffer("qweight", qweight.contiguous())
        pdtype = torch.float16 if scales.dtype == torch.float16 else torch.float32
        self.register_buffer("scales", scales.to(pdtype).contiguous())
        self.register_buffer("mins", None if mins is None else mins.to(pdtype).contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, bits: int = 8,
                   group: int = GROUP) -> "QuantLinear":
        """Round-to-nearest quantization of a float weight [N, K]."""
        check_group(weight.shape[1], group)
        if bits == 8:
            return cls(*quantize_int8(weight, group), None, bias, 8)
        if bits == 4:
            q, scales, mins = quantize_int4(weight, group)
            return cls(pack_int4(q), scales, mins, bias, 4)
        raise ValueError(f"{bits}-bit weights are not supported; choose one of {BITS}")

    def dequantized(self) -> torch.Tensor:
        return dequantize(self.qweight, self.scales, self.mins, self.bits)

    def _dequantized_scratch(self) -> torch.Tensor:
        """dequantized(), written by the kernels into this thread's reused buffer (valid until the next
        call): a fresh float32 matrix per call cost more in page faults than the conversion itself."""
        k = cpu_kernels()
        if k is None:
            return self.dequantized()
        size = self.out_features * self.in_features
        buf = getattr(_SCRATCH, "buf", None)
        if buf is None or buf.numel() < size:
            buf = _SCRATCH.buf = torch.empty(size)
        w = buf[:size].view(self.out_features, self.in_features)
        k.dequantize_into(self.qweight, self.scales, torch.empty(0) if self.mins is None else self.mins, self.bits, w)
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        if x2.shape[0] > KERNEL_MAX_ROWS:
            y = nn.functional.linear(x2, self._dequantized_scratch(), self.bias)
        else:
            y = self.matmul(x2)
            if self.bias is not None:
                y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] float32 through the packed kernel (or its twin), without bias."""
        k = cpu_kernels()
        if k is None:
            return wxa8_reference(x, self.qweight, self.scales, self.mins, self.bits)
        if self.bits == 8:
            return k.w8a8_linear(x, self.qweight, self.scales)
        return k.w4a8_linear(x, self.qweight, self.scales, self.mins)

    def nbytes(self) -> int:
        """Bytes of the packed weights and their group parameters."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.mins) if t is not None)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int{self.bits} g{self.group}"
