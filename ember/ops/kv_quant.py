"""KV-cache storage types, and KIVI quantization: full blocks stored as packed 8/4/2-bit codes (keys per
channel, values per token, asymmetric), the newest tokens of each sequence kept in a float residual until
their block fills."""
from __future__ import annotations

from dataclasses import dataclass

import torch


def float_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """Element type of a float KV cache named `name` (see ember.ops.formats) for a model in `model_dtype`."""
    return torch.float16 if name == "float16" else model_dtype


PARAM_DTYPE = torch.float16  # scales and minimums, as KIVI keeps them


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., D] -> [..., W = D * bits / 8], planar: bits [i*b, (i+1)*b) of byte j hold code
    i*W + j (so a kernel unpacks W contiguous codes with one shift and mask)."""
    if bits == 8:
        return codes
    per = 8 // bits
    c = codes.view(*codes.shape[:-1], per, -1)
    out = c[..., 0, :].clone()
    for i in range(1, per):
        out |= c[..., i, :] << (bits * i)
    return out


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of pack_codes."""
    if bits == 8:
        return packed
    per, mask = 8 // bits, (1 << bits) - 1
    return torch.cat([(packed >> (bits * i)) & mask for i in range(per)], dim=-1)


def quantize(x: torch.Tensor, dim: int, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric round-to-nearest over `dim`: codes (uint8, same shape as x), scale and min (float16,
    `dim` reduced). Codes are computed from the float16-rounded parameters, so dequantize(...) is what the
    cache holds, to within half a step."""
    x = x.float()
    lo, hi = x.amin(dim=dim, keepdim=True), x.amax(dim=dim, keepdim=True)
    qmax = (1 << bits) - 1
    scale = ((hi - lo) / qmax).to(PARAM_DTYPE)
    lo = lo.to(PARAM_DTYPE)
    s = scale.float()
    # A constant group has scale 0: every code 0 gives back the minimum exactly.
    q = torch.where(s > 0, (x - lo.float()) / torch.where(s > 0, s, 1.0), 0.0)
    codes = q.round_().clamp_(0, qmax).to(torch.uint8)
    return codes, scale.squeeze(dim), lo.squeeze(dim)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    return codes.float() * scale.float() + lo.float()


def fake_quantize_blocks(keys: torch.Tensor, vals: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What full blocks keys, vals [C, bs, n_kv, D] read back as once a QuantKVCache holds them."""
    kc, ks, km = quantize(keys, dim=1, bits=bits)
    vc, vs, vm = quantize(vals, dim=3, bits=bits)
    return dequantize(kc, ks[:, None], km[:, None]), dequantize(vc, vs[..., None], vm[..., None])


@dataclass
class BlockFill:
    """Blocks to quantize and where their tokens are: C blocks' C * bs tokens in block order, positions taken
    from the float residual (flat indices slot * block_size + offset) and from the step's new rows."""

    blocks: torch.Tensor  # [C]
    pos_res: torch.Tensor
    res: torch.Tensor
    pos_new: torch.Tensor
    rows: torch.Tensor

    @staticmethod
    def from_residual(blocks: list[int], slots: list[int], block_size: int) -> "BlockFill":
        """Blocks whose tokens all sit in their residual slots."""
        res = [s * block_size + i for s in slots for i in range(block_size)]
        empty = torch.empty(0, dtype=torch.long)
        return BlockFill(torch.tensor(blocks, dtype=torch.long), torch.arange(len(res)),
                         torch.tensor(res, dtype=torch.long), empty, empty)


class QuantKVCache:
    """One layer's KV cache in KIVI form.

    Keys are quantized per channel over the tokens of a block (block_size is KIVI's group), values per
    token over the head dimension. A block is quantized once it is full; until then its tokens live in
    a float residual slot that the BlockManager assigns to incomplete blocks.
    """

    def __init__(self, num_blocks: int, block_size: int, n_kv: int, head_dim: int, bits: int,
                 num_residual: int) -> None:
        if head_dim * bits % 8:
            raise ValueError(f"head_dim {head_dim} cannot be packed at {bits} bits")
        self.bits, self.block_size, self.n_kv, self.head_dim = bits, block_size, n_kv, head_dim
        width = head_dim * bits // 8
        self.k_codes = torch.zeros(num_blocks, block_size, n_kv, width, dtype=torch.uint8)
        self.k_scale = torch.zeros(num_blocks, n_kv, head_dim, dtype=PARAM_DTYPE)
        self.k_min = torch.zeros(num_blocks, n_kv, head_dim, dtype=PARAM_DTYPE)
        self.v_codes = torch.zeros(num_blocks, block_size, n_kv, width, dtype=torch.uint8)
        self.v_scale = torch.zeros(num_blocks, block_size, n_kv, dtype=PARAM_DTYPE)
        self.v_min = torch.zeros(num_blocks, block_size, n_kv, dtype=PARAM_DTYPE)
        self.residual = torch.zeros(2, num_residual, block_size, n_kv, head_dim)

    @staticmethod
    def bytes_per_token(n_kv: int, head_dim: int, bits: int, block_size: int) -> float:
        """Bytes one token takes in one layer's quantized blocks (codes plus its share of parameters)."""
        p = torch.empty((), dtype=PARAM_DTYPE).element_size()
        codes = 2 * n_kv * head_dim * bits / 8
        return codes + n_kv * 2 * p + n_kv * head_dim * 2 * p / block_size

    def tensors(self) -> list[torch.Tensor]:
        """The storage in the order ember's C++ kernels take it."""
        return [self.k_codes, self.k_scale, self.k_min, self.v_codes, self.v_scale, self.v_min, self.residual]

    @property
    def num_residual(self) -> int:
        return self.residual.shape[1]

    def ensure_residual(self, n: int) -> None:
        """Grow the residual to at least n slots (forked sequences can exceed the initial count)."""
        if n > self.num_residual:
            extra = self.residual.new_zeros(2, n - self.num_residual, *self.residual.shape[2:])
            self.residual = torch.cat([self.residual, extra], dim=1)

    def copy_residual(self, src: int, dst: int) -> None:
        self.residual[:, dst] = self.residual[:, src]

    def residual_rows(self, which: int, index: torch.Tensor) -> torch.Tensor:
        """Float residual tokens at flat indices `index` [n] (which: 0 keys, 1 values) -> [n, n_kv, D]."""
        return self.residual[which].view(-1, self.n_kv, self.head_dim)[index]

    def keys(self, blocks: torch.Tensor) -> torch.Tensor:
        """Dequantized keys of `blocks` [n] -> [n, block_size, n_kv, head_dim] float32."""
        codes = unpack_codes(self.k_codes[blocks], self.bits)
        return dequantize(codes, self.k_scale[blocks][:, None], self.k_min[blocks][:, None])

    def values(self, blocks: torch.Tensor) -> torch.Tensor:
        codes = unpack_codes(self.v_codes[blocks], self.bits)
        return dequantize(codes, self.v_scale[blocks][..., None], self.v_min[blocks][..., None])

    def write_residual(self, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor, index: torch.Tensor) -> None:
        """Keep new tokens k, v [rows] ([T, n_kv, D]) in float at residual flat indices `index`."""
        if rows.numel():
            flat = self.residual.view(2, -1, self.n_kv, self.head_dim)
            flat[0].index_copy_(0, index, k[rows].float())
            flat[1].index_copy_(0, index, v[rows].float())

    def quantize_filled(self, k: torch.Tensor | None, v: torch.Tensor | None, fill: BlockFill) -> None:
        """Quantize the blocks `fill` names, from their residual tokens and the new rows (k, v may be None when
        every token is already in the residual)."""
        if not fill.blocks.numel():
            return
        bs, blocks = self.block_size, fill.blocks
        flat = self.residual.view(2, -1, self.n_kv, self.head_dim)
        shape = (blocks.numel(), bs, self.n_kv, self.head_dim)
        keys, vals = torch.empty(shape), torch.empty(shape)
        for out, res, new in ((keys, flat[0], k), (vals, flat[1], v)):
            out = out.view(-1, self.n_kv, self.head_dim)
            out[fill.pos_res] = res[fill.res]
            if fill.rows.numel():
                assert new is not None
                out[fill.pos_new] = new[fill.rows].float()
        codes, scale, lo = quantize(keys, dim=1, bits=self.bits)  # per channel, over the block's tokens
        self.k_codes[blocks] = pack_codes(codes, self.bits)
        self.k_scale[blocks], self.k_min[blocks] = scale, lo
        codes, scale, lo = quantize(vals, dim=3, bits=self.bits)  # per token, over the head dimension
        self.v_codes[blocks] = pack_codes(codes, self.bits)
        self.v_scale[blocks], self.v_min[blocks] = scale, lo
