"""int8/int4 group quantization: error bounds, packing, the AVX2 kernels equal their PyTorch twin, models agree."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from ember import LLM, SamplingParams
from ember.ops import quant as Q
from ember.ops.kernels import cpu_kernels
from tests.conftest import TEXT

HAS_AVX2 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512", "AVX512_VNNI", "AVX512_BF16")


def test_int8_error_is_at_most_half_a_step() -> None:
    w = torch.randn(64, 256) * torch.logspace(-2, 1, 64).unsqueeze(1)  # rows of very different scales
    for group in (32, 128, 256):  # 256 = per output channel
        q, s = Q.quantize_int8(w, group)
        assert q.dtype == torch.int8 and s.shape == (64, 256 // group)
        err = (Q.dequantize(q, s, None, 8) - w).abs().reshape(64, -1, group)
        assert (err <= s.unsqueeze(-1) / 2 + 1e-6).all()


def test_int4_error_is_at_most_half_a_step_and_packing_round_trips() -> None:
    w = torch.randn(48, 256) * torch.logspace(-2, 1, 48).unsqueeze(1) + 0.3  # off-centre groups
    for group in (32, 64, 128):
        q, s, m = Q.quantize_int4(w, group)
        assert int(q.max()) <= 15 and torch.equal(Q.unpack_int4(Q.pack_int4(q)), q)
        layer = Q.QuantLinear.from_float(w, bits=4, group=group)
        assert layer.qweight.shape == (48, 128)
        assert layer.nbytes() == w.numel() // 2 + 2 * 2 * w.numel() // group  # codes + float16 scale, min
        err = (layer.dequantized() - w).abs().reshape(48, -1, group)
        assert (err <= s.unsqueeze(-1) / 2 + 1e-5).all()
        assert torch.equal(layer.dequantized(), Q.dequantize(Q.pack_int4(q), s, m, 4))


@pytest.mark.parametrize("bits,group,k", [(4, 32, 128), (4, 32, 320)])
def test_pack_layout_is_llama_cpp_q4(bits: int, group: int, k: int) -> None:
    q = torch.randint(0, 16, (3, k), dtype=torch.uint8)
    packed = Q.pack_int4(q)
    assert torch.equal(packed[:, 0] & 0xF, q[:, 0]) and torch.equal(packed[:, 0] >> 4, q[:, 16])
    assert torch.equal(packed[:, 16] & 0xF, q[:, 32])


@pytest.mark.skipif(not HAS_AVX2 or shutil.which("c++") is None, reason="needs AVX2 and a C++ compiler")
@pytest.mark.parametrize("bits,group,params", [(8, 32, "f32"), (8, 320, "f32"), (8, 64, "f16"), (4, 32, "f16"),
                                               (4, 64, "f16"), (4, 160, "f16"), (4, 32, "f32")])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 6, 7, 16, 32])  # 5-7: 1-3 rows after a tile
def test_kernel_matches_the_pytorch_twin(bits: int, group: int, params: str, rows: int) -> None:
    _check_kernel(bits, group, params, rows, 320)


@pytest.mark.skipif(not HAS_AVX2 or shutil.which("c++") is None, reason="needs AVX2 and a C++ compiler")
@pytest.mark.parametrize("rows", [1, 3, 6])
def test_kernel_on_long_rows(rows: int) -> None:
    # 73 blocks of 32: the few-rows path stages scale products 64 blocks at a time, and 73 % 8 == 1
    # leaves a tail after the eight-lane mins.
    _check_kernel(4, 32, "f16", rows, 73 * 32)


def _check_kernel(bits: int, group: int, params: str, rows: int, k_in: int) -> None:
    k = cpu_kernels()
    assert k is not None, "the kernels failed to build on an AVX2 machine with a compiler"
    gen = torch.Generator().manual_seed(rows)
    w, x = torch.randn(201, k_in, generator=gen), torch.randn(rows, k_in, generator=gen)  # odd N: tile edge
    layer = Q.QuantLinear.from_float(w, bits=bits, group=group)
    dtype = torch.float16 if params == "f16" else torch.float32  # group parameters of either width
    mins = None if layer.mins is None else layer.mins.to(dtype)
    layer = Q.QuantLinear(layer.qweight, layer.scales.to(dtype), mins, bits=bits)
    assert layer.scales.dtype == dtype
    ref = Q.wxa8_reference(x, layer.qweight, layer.scales, layer.mins, bits)
    torch.testing.assert_close(layer.matmul(x), ref, rtol=1e-5, atol=1e-4)
    # ...and both are the float product up to the activations' int8 rounding.
    exact = x @ layer.dequantized().T
    assert (ref - exact).norm() / exact.norm() < 0.01
    # A row's result does not depend on the rows beside it (tiles and single rows do the same sums).
    alone = torch.cat([layer.matmul(x[i:i + 1]) for i in range(rows)])
    assert torch.equal(layer.matmul(x), alone)


@pytest.mark.skipif(not HAS_AVX2 or shutil.which("c++") is None, reason="needs AVX2 and a C++ compiler")
@pytest.mark.parametrize("bits,group,params", [(8, 320, "f32"), (8, 64, "f16"), (4, 32, "f16"), (4, 160, "f32")])
def test_kernel_dequantize_equals_the_pytorch_one(bits: int, group: int, params: str) -> None:
    # Long prompt chunks multiply by the dequantized matrix; the kernel writes it into a reused buffer.
    w = torch.randn(67, 320, generator=torch.Generator().manual_seed(bits + group))
    layer = Q.QuantLinear.from_float(w, bits=bits, group=group)
    dtype = torch.float16 if params == "f16" else torch.float32
    layer = Q.QuantLinear(layer.qweight, layer.scales.to(dtype),
                          None if layer.mins is None else layer.mins.to(dtype), bits=bits)
    assert torch.equal(layer._dequantized_scratch(), layer.dequantized())


@pytest.mark.parametrize("bits", [8, 4])
def test_quant_linear_paths_agree_with_float(bits: int) -> None:
    w, b = torch.randn(96, 128), torch.randn(96)
    layer = Q.QuantLinear.from_float(w, b, bits=bits)
    ref = torch.nn.functional.linear
    for rows in (1, 8, Q.KERNEL_MAX_ROWS + 5):  # kernel (or twin) path, then the dequantize path
        x = torch.randn(rows, 128)
        y = layer(x)
        assert y.shape == (rows, 96)
        rel = (y - ref(x, w, b)).norm() / ref(x, w, b).norm()
        assert rel < (0.02 if bits == 8 else 0.15)


def test_bad_formats_are_refused() -> None:
    w = torch.randn(8, 96)
    for bits, group in ((3, 32), (4, 48), (8, 64), (4, 0)):
        with pytest.raises(ValueError, match="not supported|multiple of 32"):
            Q.QuantLinear.from_float(w, bits=bits, group=group)


def test_quantized_models_stay_close_to_float(tiny_qwen2: Path) -> None:
    fp = LLM(tiny_qwen2, kv_cache_memory=0.01)
    ids = fp.get_tokenizer().encode(TEXT)[:200]

    def lps(llm: LLM) -> torch.Tensor:
        out = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
        return torch.tensor([out.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))])

    ref, diffs = lps(fp), {}
    for method in ("int8", "int4"):
        q = LLM(tiny_qwen2, kv_cache_memory=0.01, quantization=method)
        layers = [m for m in q.engine.loaded.model.modules() if isinstance(m, Q.QuantLinear)]
        assert {m.bits for m in layers} == {int(method[3:]), 8}  # the LM head stays int8
        diffs[method] = (lps(q) - ref).abs().mean()
        # Decoding (the kernel path, one row at a time) runs and stops where asked.
        out = q.generate({"prompt_token_ids": ids[:20]}, SamplingParams(max_tokens=8, temperature=0,
                                                                        ignore_eos=True))
        assert len(out[0].outputs[0].token_ids) == 8
    # Random weights with std 0.25 make a peaky model, hence loose bounds; 16x finer steps must show.
    assert diffs["int8"] < 0.1 and diffs["int4"] < 1.0 and diffs["int8"] * 4 < diffs["int4"], diffs
