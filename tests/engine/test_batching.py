"""Continuous batching is invisible in the outputs: batch invariance, preemption, aborts, no leaks."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ember import LLM, SamplingParams
from ember.ops import paged_float as RUNNER
from ember.engine.engine import LLMEngine
from tests.conftest import TEXT

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def _prompts(llm: LLM, count: int = 16) -> list[list[int]]:
    ids = llm.get_tokenizer().encode(TEXT)
    # Different lengths (3..78 tokens) and different starting points.
    return [ids[7 * i: 7 * i + 3 + 5 * i] for i in range(count)]


def _tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def assert_no_leaks(engine: LLMEngine) -> None:
    blocks = engine.blocks
    assert not engine.has_unfinished_requests()
    assert not engine.scheduler.running and not engine.scheduler.waiting
    assert blocks.num_free_blocks == blocks.num_blocks
    assert all(r == 0 for r in blocks.ref_count)


@pytest.fixture(scope="module")
def alone(tiny_llama3: Path) -> list[list[int]]:
    llm = LLM(tiny_llama3, max_num_batched_tokens=512, kv_cache_memory=0.01, enable_prefix_caching=False)
    return [_tokens(llm.generate([{"prompt_token_ids": p}], GREEDY))[0] for p in _prompts(llm)]


@pytest.mark.parametrize("prefix_caching", [True, False])
@pytest.mark.parametrize("scheduler", ["splitfuse", "prefill-first"])
def test_batch_invariance(tiny_llama3: Path, alone: list[list[int]], prefix_caching: bool,
                          scheduler: str) -> None:
    llm = LLM(tiny_llama3, max_num_batched_tokens=16, kv_cache_memory=0.01,
              enable_prefix_caching=prefix_caching, scheduler=scheduler)
    prompts = [{"prompt_token_ids": p} for p in _prompts(llm)]
    assert _tokens(llm.generate(prompts, GREEDY)) == alone
    # Again: with prefix caching the second pass is served partly from cached blocks.
    assert _tokens(llm.generate(prompts, GREEDY)) == alone
    assert_no_leaks(llm.engine)


def test_shared_prefix_reuses_blocks_and_matches(tiny_llama3: Path) -> None:
    llm = LLM(tiny_llama3, max_num_batched_tokens=32, kv_cache_memory=0.01)
    ids = llm.get_tokenizer().encode(TEXT)
    common = ids[:100]
    a, b = common + ids[200:210], common + ids[300:305]
    ref = LLM(tiny_llama3, kv_cache_memory=0.01, enable_prefix_caching=False)
    expected = _tokens(ref.generate([{"prompt_token_ids": a}, {"prompt_token_ids": b}], GREEDY))
    first = llm.generate([{"prompt_token_ids": a}], GREEDY)[0]
    second = llm.generate([{"prompt_token_ids": b}], GREEDY)[0]
    assert [first.outputs[0].token_ids, second.outputs[0].token_ids] == expected
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == 96  # six full blocks of 16 from the shared 100 tokens
    # Both at once, too.
    assert _tokens(llm.generate([{"prompt_token_ids": a}, {"prompt_token_ids": b}], GREEDY)) == expected
    assert_no_leaks(llm.engine)


def test_preemption_when_cache_is_too_small(tiny_llama3: Path, alone: list[list[int]]) -> None:
    # 12 blocks of 16 = 192 tokens for 16 requests needing ~800: they must take turns.
    bytes_per_block = 2 * 2 * 2 * 16 * 16 * 4
    llm = LLM(tiny_llama3, max_num_batched_tokens=64, max_model_len=128,
              kv_cache_memory=12 * bytes_per_block / (1 << 30))
    assert llm.engine.blocks.num_blocks == 12
    prompts = [{"prompt_token_ids": p} for p in _prompts(llm)]
    assert _tokens(llm.generate(prompts, GREEDY)) == alone
    assert llm.engine.scheduler.num_preemptions > 0
    assert_no_leaks(llm.engine)


@pytest.mark.parametrize("scheduler", ["splitfuse", "prefill-first"])
def test_long_prompts_in_a_tiny_cache_all_finish(tiny_llama3: Path, scheduler: str) -> None:
    # Prompts of 100-170 tokens, 12 blocks (192 tokens): at most one fits at a time, and
    # chunked prompts compete with decodes for blocks.
    bytes_per_block = 2 * 2 * 2 * 16 * 16 * 4
    ids = LLM(tiny_llama3, kv_cache_memory=0.01).get_tokenizer().encode(TEXT)
    prompts = [{"prompt_token_ids": ids[40 * i: 40 * i + 100 + 10 * i]} for i in range(8)]
    ref = LLM(tiny_llama3, kv_cache_memory=0.01, enable_prefix_caching=False)
    expected = [_tokens(ref.generate([p], GREEDY))[0] for p in prompts]
    llm = LLM(tiny_llama3, max_num_batched_tokens=48, max_model_len=190, scheduler=scheduler,
              kv_cache_memory=12 * bytes_per_block / (1 << 30))
    assert _tokens(llm.generate(prompts, GREEDY)) == expected
    assert_no_leaks(llm.engine)


def test_abort_frees_everything(tiny_llama3: Path) -> None:
    llm = LLM(tiny_llama3, max_num_batched_tokens=16, kv_cache_memory=0.01)
    engine = llm.engine
    prompts = _prompts(llm)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()  # the first prompts are mid-prefill now
    assert engine.blocks.num_free_blocks < engine.blocks.num_blocks
    engine.abort_request("15")  # still waiting
    engine.abort_request("1")  # mid-prompt
    for _ in range(8):
        engine.step()
    for i in range(16):
        engine.abort_request(str(i))
    assert_no_leaks(engine)


def test_n_completions_share_prompt_blocks(tiny_llama3: Path) -> None:
    llm = LLM(tiny_llama3, kv_cache_memory=0.01, enable_prefix_caching=False)
    engine = llm.engine
    prompt = llm.get_tokenizer().encode(TEXT)[:70]  # 4 full blocks + a partial one
    engine.add_request("r", prompt, SamplingParams(n=3, max_tokens=8, temperature=1.0, seed=1))
    engine.step()
    seqs = engine.requests["r"].seqs
    assert all(len(s.output_ids) == 1 for s in seqs)
    assert seqs[0].block_table[:4] == seqs[1].block_table[:4] == seqs[2].block_table[:4]
    assert len({s.block_table[4] for s in seqs}) == 3  # the partial block was copied
    while engine.has_unfinished_requests():
        out = engine.step()
    assert len(out[0].outputs) == 3 and all(len(c.token_ids) == 8 for c in out[0].outputs)
    assert_no_leaks(engine)


def test_seeded_sampling_is_batch_independent(tiny_llama3: Path) -> None:
    llm = LLM(tiny_llama3, kv_cache_memory=0.01)
    prompts = [{"prompt_token_ids": p} for p in _prompts(llm, 6)]
    seeded = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    other = SamplingParams(max_tokens=10, temperature=1.2, ignore_eos=True)
    alone_out = _tokens(llm.generate(prompts[:1], seeded))
    mixed = _tokens(llm.generate(prompts, [seeded] + [other] * 5))
    assert mixed[0] == alone_out[0]
    assert _tokens(llm.generate(prompts[:1], seeded)) == alone_out


def test_stop_strings_and_max_tokens(tiny_llama3: Path) -> None:
    llm = LLM(tiny_llama3, kv_cache_memory=0.01)
    prompt = {"prompt_token_ids": _prompts(llm)[5]}
    full = llm.generate(prompt, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0].outputs[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 20
    stop = full.text[len(full.text) // 2: len(full.text) // 2 + 3]
    cut = llm.generate(prompt, SamplingParams(max_tokens=20, temperature=0, stop=[stop],
                                              ignore_eos=True))[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == full.text[: full.text.index(stop)]
    assert_no_leaks(llm.engine)


def test_prompt_chunks_attend_as_decode_rows_exactly(tiny_llama3: Path, monkeypatch) -> None:
    # With the C++ kernels, prompt chunks of any size run as one-query rows over the paged cache (the fused
    # decode path); without them only chunks of <= 32 tokens do, larger ones go through SDPA. Every way
    # must score every prompt token the same.
    def scores(budget: int) -> torch.Tensor:
        llm = LLM(tiny_llama3, max_num_batched_tokens=budget, kv_cache_memory=0.01)
        ids = llm.get_tokenizer().encode(TEXT)[:150]
        out = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
        return torch.tensor([out.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))])

    small, whole = scores(7), scores(512)
    torch.testing.assert_close(small, whole, rtol=0, atol=2e-4)
    assert RUNNER.CHUNK_AS_DECODE_ROWS < 150
    monkeypatch.setattr(RUNNER, "rows_kernel", lambda *_: None)  # the 150 tokens go to SDPA
    torch.testing.assert_close(scores(512), whole, rtol=0, atol=2e-4)
