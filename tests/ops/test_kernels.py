"""ember's fused CPU kernels give the same results as the PyTorch code they replace."""
from __future__ import annotations

import shutil

import pytest
import torch

from ember.ops.kernels import AVX2_CAPABILITIES, cpu_kernels
from ember.ops.rope import _rotate_half

pytestmark = pytest.mark.skipif(
    torch.backends.cpu.get_cpu_capability() not in AVX2_CAPABILITIES or shutil.which("c++") is None,
    reason="needs AVX2 and a C++ compiler")


@pytest.fixture(scope="module")
def k():
    kern = cpu_kernels()
    assert kern is not None, "the kernels failed to build on an AVX2 machine with a compiler"
    return kern


def test_rms_norm(k) -> None:
    x, w = torch.randn(7, 576) * 3, torch.randn(576)
    ref = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    torch.testing.assert_close(k.rms_norm(x, w, 1e-5), ref, rtol=1e-5, atol=1e-5)


def test_silu_mul(k) -> None:
    gu = torch.randn(5, 2 * 96) * 4
    gate, up = gu.split(96, dim=-1)
    torch.testing.assert_close(k.silu_mul(gu), torch.nn.functional.silu(gate) * up, rtol=1e-5, atol=1e-6)


def test_rope_in_place(k) -> None:
    x = torch.randn(6, 3, 64)
    angles = torch.randn(6, 32)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    ref = x * cos.unsqueeze(1) + _rotate_half(x) * sin.unsqueeze(1)
    out = x.clone()
    k.rope_(out, cos, sin)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_model_with_and_without_kernels_agree(tiny_qwen2, monkeypatch) -> None:
    from ember import LLM, SamplingParams
    from tests.conftest import TEXT

    def lps() -> torch.Tensor:
        llm = LLM(tiny_qwen2, kv_cache_memory=0.01)
        ids = llm.get_tokenizer().encode(TEXT)[:64]
        out = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
        return torch.tensor([out.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))])

    with_kernels = lps()
    cpu_kernels.cache_clear()
    monkeypatch.setenv("EMBER_NO_KERNELS", "1")
    try:
        without = lps()
    finally:
        cpu_kernels.cache_clear()
    torch.testing.assert_close(with_kernels, without, rtol=0, atol=1e-4)


def test_paged_decode_attention_matches_the_gather_path(k, monkeypatch) -> None:
    import ember.ops.attention as A

    nb, bs, kvh, hd, heads = 20, 16, 3, 64, 9
    cache = torch.randn(2, nb, bs, kvh, hd)
    tables = torch.tensor([[3, 5, 7, 0], [1, 2, 0, 0], [9, 10, 11, 12], [4, 0, 0, 0]])
    lens = torch.tensor([40, 20, 64, 1])
    mask = (torch.arange(4 * bs)[None, :] < lens[:, None])[:, None, None, :]
    meta = A.AttentionMetadata(slot_mapping=torch.empty(0, dtype=torch.long), decode_block_tables=tables,
                               decode_mask=mask, decode_ctx_lens=lens)
    q = torch.randn(4, heads, hd)
    fast = A._decode(q, cache, meta, 0.125)
    monkeypatch.setattr(A, "cpu_kernels", lambda: None)
    torch.testing.assert_close(fast, A._decode(q, cache, meta, 0.125), rtol=1e-5, atol=1e-5)
