"""KIVI cache pieces: code packing, per-channel / per-token quantization bounds, block storage."""
from __future__ import annotations

import pytest
import torch

from ember.ops.kv_quant import BlockFill, QuantKVCache, dequantize, pack_codes, quantize, unpack_codes


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_pack_roundtrip(bits: int) -> None:
    codes = torch.randint(0, 1 << bits, (3, 5, 64), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape == (3, 5, 64 * bits // 8)
    assert torch.equal(unpack_codes(packed, bits), codes)


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("dim", [1, 3])
def test_quantize_error_within_half_a_step(bits: int, dim: int) -> None:
    g = torch.Generator().manual_seed(bits * 10 + dim)
    x = torch.randn(4, 16, 3, 64, generator=g) * torch.rand(1, 1, 3, 64, generator=g) * 5
    codes, scale, lo = quantize(x, dim, bits)
    assert codes.max() <= (1 << bits) - 1 and scale.dtype == lo.dtype == torch.float16
    back = dequantize(codes, scale.unsqueeze(dim), lo.unsqueeze(dim))
    step = scale.float().unsqueeze(dim)
    # Half a step, plus what float16 parameters can cost at the top of the range.
    slack = 1e-3 * x.abs().amax(dim=dim, keepdim=True)
    assert ((back - x).abs() <= step / 2 + slack).all()


def test_constant_groups_come_back_exactly() -> None:
    x = torch.full((1, 16, 2, 8), 0.75)
    codes, scale, lo = quantize(x, 1, 2)
    assert torch.equal(dequantize(codes, scale[:, None], lo[:, None]), x)


def test_full_blocks_are_quantized_and_the_rest_kept_in_float() -> None:
    bs, n_kv, hd = 4, 2, 8
    cache = QuantKVCache(num_blocks=3, block_size=bs, n_kv=n_kv, head_dim=hd, bits=4, num_residual=2)
    k, v = torch.randn(6, n_kv, hd), torch.randn(6, n_kv, hd)
    # Six new tokens of one sequence from position 0: block 2 fills (rows 0-3), block 0 keeps rows 4-5 in
    # residual slot 1.
    fill = BlockFill(blocks=torch.tensor([2]), pos_res=torch.tensor([], dtype=torch.long),
                     res=torch.tensor([], dtype=torch.long), pos_new=torch.arange(4), rows=torch.arange(4))
    cache.write_residual(k, v, torch.tensor([4, 5]), torch.tensor([4, 5]))
    cache.quantize_filled(k, v, fill)
    assert torch.equal(cache.residual[0, 1, :2], k[4:]) and torch.equal(cache.residual[1, 1, :2], v[4:])
    keys, vals = cache.keys(torch.tensor([2]))[0], cache.values(torch.tensor([2]))[0]
    k_step = cache.k_scale[2].float()  # per channel: [n_kv, hd]
    v_step = cache.v_scale[2].float()  # per token: [bs, n_kv]
    assert ((keys - k[:4]).abs() <= k_step / 2 + 1e-2).all()
    assert ((vals - v[:4]).abs() <= v_step[..., None] / 2 + 1e-2).all()
    assert not torch.equal(keys, k[:4])  # 4 bits do lose something


def test_quantized_tokens_take_less_memory() -> None:
    full = 2 * 3 * 64 * 4  # float32 keys and values, 3 KV heads of 64
    sizes = {b: QuantKVCache.bytes_per_token(3, 64, b, 16) for b in (8, 4, 2)}
    assert full / sizes[8] > 3.4 and full / sizes[4] > 6 and full / sizes[2] > 9.5
