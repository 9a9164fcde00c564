"""KIVI KV cache inside the engine: the same semantics whatever the schedule, forks, no leaks, capacity."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ember import LLM, SamplingParams
from ember.bench.perplexity import _window_nll, _window_nll_cached
from ember.errors import InvalidParameterError
from ember.models.llama import LlamaModel
from ember.models.loader import load_model
from tests.conftest import TEXT
from tests.engine.test_batching import assert_no_leaks

GREEDY = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, logprobs=0)


def _run(llm: LLM, prompt: list[int], params: SamplingParams = GREEDY) -> tuple[list[int], list[float]]:
    out = llm.generate([{"prompt_token_ids": prompt}], params)[0].outputs[0]
    return out.token_ids, [lp[t].logprob for lp, t in zip(out.logprobs, out.token_ids)]


@pytest.mark.parametrize("kv", ["int4", "int2"])
def test_block_chunks_equal_token_by_token(tiny_llama3: Path, kv: str) -> None:
    """A token sees earlier full blocks quantized and its own block in float, so a prompt run one block
    per step and one token per step must agree (this exercises residual writes, block fills and reads)."""
    prompt = LLM(tiny_llama3).get_tokenizer().encode(TEXT)[:45]  # ends mid-block
    by_block = LLM(tiny_llama3, kv_cache_dtype=kv, max_num_batched_tokens=16, block_size=16)
    by_token = LLM(tiny_llama3, kv_cache_dtype=kv, max_num_batched_tokens=1, block_size=16)
    a, b = _run(by_block, prompt), _run(by_token, prompt)
    assert a[0] == b[0]
    assert max(abs(x - y) for x, y in zip(a[1], b[1])) < 1e-3
    for llm in (by_block, by_token):
        assert_no_leaks(llm.engine)
        assert not llm.engine.runner.backend.residual_of


def test_quantization_error_grows_as_bits_shrink(tiny_llama3: Path) -> None:
    loaded = load_model(tiny_llama3, torch.float32)
    ids = torch.tensor(loaded.tokenizer.encode(TEXT)[:96])
    dense = _window_nll(loaded, ids, 1)
    # The paged path with a float cache reproduces the dense forward: the harness itself is exact.
    assert torch.allclose(_window_nll_cached(loaded, ids, 1, "auto", 16), dense, atol=1e-4)
    err = {kv: float((_window_nll_cached(loaded, ids, 1, kv, 16) - dense).abs().mean())
           for kv in ("float16", "int8", "int4", "int2")}
    assert 0 < err["float16"] < err["int8"] < err["int4"] < err["int2"], err


def test_forks_share_the_quantized_prompt(tiny_llama3: Path) -> None:
    # No prefix caching: a cache hit would change what the second run reads (quantized blocks instead of
    # its own exact prompt).
    llm = LLM(tiny_llama3, kv_cache_dtype="int4", enable_prefix_caching=False)
    prompt = llm.get_tokenizer().encode(TEXT)[:37]  # the last block is partial: forks copy its residual
    alone = _run(llm, prompt)[0]
    outs = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(n=3, max_tokens=20, temperature=0,
                                                                       ignore_eos=True))[0].outputs
    assert [o.token_ids for o in outs] == [alone] * 3
    assert_no_leaks(llm.engine)
    assert not llm.engine.runner.backend.residual_of


def test_prefix_cache_reuses_quantized_blocks(tiny_llama3: Path) -> None:
    llm = LLM(tiny_llama3, kv_cache_dtype="int8", max_num_batched_tokens=16)
    prompt = llm.get_tokenizer().encode(TEXT)[:70]
    first = _run(llm, prompt)
    again = llm.generate([{"prompt_token_ids": prompt}], GREEDY)[0]
    assert again.num_cached_tokens == 64
    assert again.outputs[0].token_ids == first[0]


def test_concurrent_requests_finish_and_free_everything(tiny_llama3: Path) -> None:
    llm = LLM(tiny_llama3, kv_cache_dtype="int4", max_num_batched_tokens=40, kv_cache_memory=0.002)
    ids = llm.get_tokenizer().encode(TEXT)
    prompts = [{"prompt_token_ids": ids[5 * i: 5 * i + 10 + 7 * i]} for i in range(10)]
    outs = llm.generate(prompts, SamplingParams(max_tokens=30, temperature=0.8, seed=1, ignore_eos=True))
    assert all(len(o.outputs[0].token_ids) == 30 for o in outs)
    assert_no_leaks(llm.engine)
    blocks = llm.engine.blocks
    kivi = llm.engine.runner.backend
    assert not kivi.residual_of and len(kivi.free_slots) == kivi.num_residual


def test_more_tokens_fit_in_the_same_memory(tiny_llama3: Path) -> None:
    tokens = {kv: LLM(tiny_llama3, kv_cache_dtype=kv, kv_cache_memory=0.05, max_num_seqs=4).engine.num_cache_tokens
              for kv in ("auto", "float16", "int8", "int4", "int2")}
    assert tokens["float16"] == pytest.approx(2 * tokens["auto"], rel=0.01)
    assert tokens["auto"] * 3 < tokens["int8"] < tokens["int4"] < tokens["int2"]


def test_unknown_kv_dtype_is_a_clear_error(tiny_llama3: Path) -> None:
    with pytest.raises(InvalidParameterError, match="kv_cache_dtype must be one of auto, float16, int8, int4, int2"):
        LLM(tiny_llama3, kv_cache_dtype="fp8")


def test_concurrent_sequences_read_their_own_residuals(tiny_llama3: Path) -> None:
    """prefill-first runs each whole prompt exactly, then decodes: per sequence, the same reads as alone."""
    llm = LLM(tiny_llama3, kv_cache_dtype="int4", scheduler="prefill-first", enable_prefix_caching=False)
    ids = llm.get_tokenizer().encode(TEXT)
    prompts = [ids[9 * i: 9 * i + 5 + 6 * i] for i in range(5)]
    together = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY)
    assert [o.outputs[0].token_ids for o in together] == [_run(llm, p)[0] for p in prompts]
    assert_no_leaks(llm.engine)


def test_block_size_one_cannot_group_keys(tiny_llama3: Path) -> None:
    with pytest.raises(InvalidParameterError, match="block_size must be >= 2 with a quantized KV cache"):
        LLM(tiny_llama3, kv_cache_dtype="int8", block_size=1)


def test_preemption_releases_residual_slots(tiny_llama3: Path) -> None:
    """Too few blocks for every sequence at once: preempted sequences give back blocks and residual
    slots, are recomputed later, and everything finishes with nothing leaked."""
    from ember.ops.backends import KVSpec

    probe = LLM(tiny_llama3, kv_cache_dtype="int4")
    cfg = probe.engine.config
    residual = 2 * 4 * 16 * KVSpec(cfg, "auto", torch.float32, 16).bytes_per_token()  # max_num_seqs=4: 8 blocks
    memory = (residual + 14 * 16 * KVSpec(cfg, "int4", torch.float32, 16).bytes_per_token()) / 2**30
    llm = LLM(tiny_llama3, kv_cache_dtype="int4", max_num_seqs=4, max_model_len=128, kv_cache_memory=memory)
    assert llm.engine.blocks.num_blocks == 14
    ids = llm.get_tokenizer().encode(TEXT)
    prompts = [{"prompt_token_ids": ids[5 * i: 5 * i + 30 + 5 * i]} for i in range(6)]
    outs = llm.generate(prompts, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    assert all(len(o.outputs[0].token_ids) == 40 for o in outs)
    assert llm.engine.scheduler.num_preemptions > 0
    assert_no_leaks(llm.engine)
    kivi = llm.engine.runner.backend
    assert not kivi.residual_of and sorted(kivi.free_slots) == list(range(kivi.num_residual))


def test_bfloat16_model_with_a_quantized_cache(tiny_llama3: Path) -> None:
    """The module path (no fused float32 stack) reads and writes the KIVI cache for a bfloat16 model."""
    prompt = LLM(tiny_llama3).get_tokenizer().encode(TEXT)[:40]
    runs = {kv: _run(LLM(tiny_llama3, dtype="bfloat16", kv_cache_dtype=kv, max_num_batched_tokens=16), prompt)
            for kv in ("auto", "int8")}
    assert len(runs["int8"][0]) == 20
    # int8 keys and values are within bfloat16's own rounding: the two caches agree closely.
    assert sum(a == b for a, b in zip(runs["auto"][0], runs["int8"][0])) >= 15


@pytest.mark.parametrize("fail_at", [3, 8, 13, 21])
def test_a_failed_step_is_replayed_exactly(tiny_llama3: Path, monkeypatch, fail_at: int) -> None:
    """A forward that fails part-way (some layers have written and quantized) is run again request by request:
    planning a step must not change what its replay reads (residual slots of the blocks it fills)."""
    def run(fail: int | None) -> dict[str, list[int]]:
        llm = LLM(tiny_llama3, kv_cache_dtype="int4", block_size=4, kv_cache_memory=0.004)
        backend = llm.engine.runner.backend
        calls, forward = [0], backend.forward

        def flaky(*args):
            calls[0] += 1
            if calls[0] == fail:
                raise RuntimeError("boom")
            return forward(*args)

        monkeypatch.setattr(backend, "forward", flaky)
        monkeypatch.setattr(LlamaModel, "_fused_decoder", lambda *a: None)  # every layer through forward
        outs = llm.generate([{"prompt_token_ids": list(range(10, 17))}, {"prompt_token_ids": list(range(30, 41))}],
                            SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
        assert_no_leaks(llm.engine)
        assert not backend.residual_of and sorted(backend.free_slots) == list(range(backend.num_residual))
        return {o.request_id: o.outputs[0].token_ids for o in outs}

    assert run(fail_at) == run(None)
