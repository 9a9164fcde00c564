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
    for width in (96, 101):  # eight lanes at a time, and a scalar tail
        gu = torch.randn(5, 2 * width) * 4
        gu[0, :6] = torch.tensor([-100.0, -88.5, -30.0, 30.0, 88.5, 100.0])  # exp's clamp and both tails
        gate, up = gu.split(width, dim=-1)
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


@pytest.mark.parametrize("alone", [0, 67, 1500])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hd", [64, 32])
def test_paged_decode_attention_matches_the_gather_path(k, monkeypatch, alone: int, dtype: torch.dtype,
                                                        hd: int) -> None:
    """Several sequences run one (sequence, KV head) per task; one sequence alone (3 KV heads for 2
    threads) has its context split into pieces attended in parallel and merged (flash-decoding), at an
    odd length too: each piece over whole cache rows (every head in one pass) where the head size is a
    multiple of 64, else one head per piece. A float16 cache is read as float32."""
    nb, bs, kvh = 200, 16, 3
    cache = torch.randn(2, nb, bs, kvh, hd).to(dtype)
    if alone:
        tables = torch.randperm(nb)[None, :100]
        lens = torch.tensor([alone])
    else:
        tables = torch.tensor([[3, 5, 7, 0], [1, 2, 0, 0], [9, 10, 11, 12], [4, 0, 0, 0]])
        lens = torch.tensor([40, 20, 64, 1])
    _check_decode_attention(monkeypatch, cache, tables, lens)


@pytest.mark.parametrize("b", [2, 3, 5])
@pytest.mark.parametrize("hd", [64, 32])
def test_few_long_decodes_attention_matches_the_gather_path(k, monkeypatch, b: int, hd: int) -> None:
    """A few decodes of long contexts: split into pieces over whole cache rows and merged where there are
    fewer sequences than two per thread, else one item over whole rows each (head size a multiple of 64);
    one (sequence, head) item each otherwise. Contexts of different lengths."""
    nb, bs, kvh = 8 * b + 10, 16, 3
    cache = torch.randn(2, nb, bs, kvh, hd)
    tables = torch.randperm(nb)[: b * 8].reshape(b, 8)
    lens = torch.tensor([128 - 23 * i for i in range(b)])
    _check_decode_attention(monkeypatch, cache, tables, lens)


@pytest.mark.parametrize("kvh,hd,heads", [(3, 64, 9), (1, 64, 9), (2, 128, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_many_decodes_attention_matches_the_gather_path(k, monkeypatch, kvh: int, hd: int, heads: int,
                                                        dtype: torch.dtype) -> None:
    """With at least four decodes per thread, each runs all its KV heads over whole cache rows (query heads
    scored four at a time, a group split across chunks of four too), prefetching through the block table."""
    b, bs = 4 * torch.get_num_threads() + 3, 16
    nb = 6 * b + 10
    cache = torch.randn(2, nb, bs, kvh, hd).to(dtype)
    tables = torch.randperm(nb)[: b * 6].reshape(b, 6)
    lens = torch.randint(1, 6 * bs + 1, (b,))
    lens[0], lens[1] = 1, 6 * bs
    _check_decode_attention(monkeypatch, cache, tables, lens, heads)


@pytest.mark.parametrize("many", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kvh,hd,heads", [(3, 64, 9), (2, 128, 8), (1, 16, 2)])
def test_chunk_rows_attention_matches_the_gather_path(k, monkeypatch, dtype: torch.dtype, many: bool, kvh: int,
                                                      hd: int, heads: int) -> None:
    """A prompt chunk run as one-query rows (consecutive positions of one sequence, row i seeing one more
    token than row i - 1) is attended as runs that read the context once (queries in vector lanes, values
    in blocks of 64 tokens), between decodes of others (with many decodes, those run over whole cache rows,
    shared out by work with the runs). Runs of 8, 8 and 3 rows: 24, 16 and 6 queries for these head
    layouts, so whole, partial and padded vectors of eight; the contexts cross value blocks."""
    nb, bs = 64, 16
    cache = torch.randn(2, nb, bs, kvh, hd).to(dtype)
    chunk_table = torch.tensor([7, 3, 12, 9, 20, 21, 30, 31, 40, 41, 0, 0])
    rows = [(torch.tensor([1, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]), 20)]  # a decode
    rows += [(chunk_table, 128 + i) for i in range(19)]  # a 19-token chunk at position 127
    rows += [(torch.tensor([5, 6, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0]), 40)]  # another decode
    if many:  # decodes of different lengths (up to the twelve blocks of their tables)
        rows += [((torch.arange(12) + 13 + 3 * i) % nb, 5 + 19 * i % 190) for i in range(4 * torch.get_num_threads())]
    tables = torch.stack([t for t, _ in rows])
    lens = torch.tensor([n for _, n in rows])
    _check_decode_attention(monkeypatch, cache, tables, lens, heads)


def _check_decode_attention(monkeypatch, cache: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor,
                            heads: int = 9) -> None:
    """The kernel's decode attention over `cache` equals the gather + SDPA path (`heads` query heads)."""
    import ember.ops.paged_float as PF

    plan = PF.FloatPlan([], torch.empty(0), tables=tables, lens=lens)
    backend = PF.FloatPagedBackend(0, 1, cache.shape[2], cache.shape[3], cache.shape[4], cache.dtype)
    q = torch.randn(len(lens), heads, cache.shape[-1])
    fast = backend._rows(q, cache, plan, 0.125)
    monkeypatch.setattr(PF, "cpu_kernels", lambda: None)
    torch.testing.assert_close(fast, backend._rows(q, cache, plan, 0.125), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_kivi_decode_attention_matches_the_gather_path(k, monkeypatch, bits: int) -> None:
    import ember.ops.paged_kivi as PK
    from ember.ops.kv_quant import BlockFill

    nb, bs, kvh, hd, heads = 12, 16, 3, 64, 9
    backend = PK.KiviBackend(1, nb, bs, kvh, hd, bits, num_residual=4)
    cache = backend.caches[0]
    cache.residual = torch.randn(2, nb, bs, kvh, hd) * 3  # stage every block's tokens, quantize them all
    cache.quantize_filled(None, None, BlockFill.from_residual(list(range(nb)), list(range(nb)), bs))
    cache.residual = torch.randn(2, 4, bs, kvh, hd)
    full = torch.tensor([[3, 5, 7], [1, 0, 0], [9, 10, 11], [0, 0, 0]])
    lens = torch.tensor([40, 32, 48, 1])  # residual tokens (this one included): 8, 16, 16, 1
    slots = torch.tensor([2, 0, 3, 1])
    plan = PK.KiviPlan([], torch.empty(0), full=full, lens=lens, residual=slots)
    q = torch.randn(4, heads, hd)
    fast = backend._rows(q, cache, plan, 0.125)
    monkeypatch.setattr(PK, "cpu_kernels", lambda: None)
    torch.testing.assert_close(fast, backend._rows(q, cache, plan, 0.125), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits,kv", [(32, "auto"), (8, "auto"), (4, "auto"), (32, "float16"), (4, "float16"),
                                     (32, "int4"), (8, "int2")])
def test_fused_decode_stack_equals_the_module_path(tiny_qwen2, monkeypatch, bits: int, kv: str) -> None:
    """Greedy decoding of a batch through the C++ decoder stack and through the modules gives the same
    tokens and logprobs (q/k/v biases, GQA, quantized projections, float16 and KIVI caches, several
    context lengths)."""
    from ember import LLM, SamplingParams
    from ember.models.llama import LlamaModel
    from ember.ops.quant import QuantLinear
    from tests.conftest import TEXT

    # No prefix caching: quantized layers round differently for chunks of <= 32 rows (int8 activations)
    # and longer ones (dequantized GEMM), so a cache hit would change the prompt's numerics.
    llm = LLM(tiny_qwen2, kv_cache_memory=0.01, enable_prefix_caching=False, kv_cache_dtype=kv)
    model = llm.engine.loaded.model
    if bits != 32:
        for layer in model.layers:
            for parent, name in ((layer.self_attn, "qkv_proj"), (layer.self_attn, "o_proj"),
                                 (layer.mlp, "gate_up_proj"), (layer.mlp, "down_proj")):
                old = getattr(parent, name)
                bias = None if old.bias is None else old.bias.data
                setattr(parent, name, QuantLinear.from_float(old.weight.data, bias, bits=bits))
    ids = llm.get_tokenizer().encode(TEXT)
    prompts = [{"prompt_token_ids": ids[s:s + n]} for s, n in ((0, 5), (40, 37), (100, 70))]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=0)

    def run() -> list:
        outs = llm.generate(prompts, params)
        return [(o.outputs[0].token_ids, [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)])
                for o in outs]

    calls = []
    real = LlamaModel._fused_decoder
    monkeypatch.setattr(LlamaModel, "_fused_decoder", lambda *a: calls.append(1) or real(*a))
    fused = run()
    assert len(calls) > 10 and model._fused is not None and model._fused[1] is not None
    monkeypatch.setattr(LlamaModel, "_fused_decoder", lambda *a: None)
    for (ids_f, lps_f), (ids_m, lps_m) in zip(fused, run()):
        assert ids_f == ids_m
        torch.testing.assert_close(torch.tensor(lps_f), torch.tensor(lps_m), rtol=0, atol=1e-4)


def test_kernel_builds_are_keyed_by_compiler_and_cached_under_ember_home(monkeypatch, tmp_path) -> None:
    from ember.ops import kernels

    monkeypatch.setenv("EMBER_HOME", str(tmp_path))
    a, b = kernels.build_key("g++ 12.2"), kernels.build_key("clang 17")
    assert a != b and len(a) == 16 and kernels.build_key("g++ 12.2") == a
    assert kernels.build_dir(a) == tmp_path / "kernels" / a


def test_no_compiler_means_the_fallbacks_with_a_warning(monkeypatch, caplog) -> None:
    from ember.ops import kernels

    monkeypatch.setenv("CXX", "/nonexistent/c++")
    kernels.cpu_kernels.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="ember"):
            assert kernels.cpu_kernels() is None
        assert "no C++ compiler" in caplog.text and "apt install g++" in caplog.text
    finally:
        monkeypatch.delenv("CXX")
        kernels.cpu_kernels.cache_clear()


def test_a_build_killed_midway_does_not_hang_later_loads(k) -> None:
    """torch's build lock is a plain file: one left by a killed build made every later `ember` wait forever.
    Under ember's own lock (released by the OS with its holder) a leftover one is cleared."""
    import subprocess
    import sys

    from ember.ops.kernels import build_dir, build_key, compiler_version

    (build_dir(build_key(compiler_version())) / "lock").touch()
    code = "from ember.ops.kernels import cpu_kernels; print(cpu_kernels() is not None)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "True", out.stderr
