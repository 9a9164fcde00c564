"""The vLLM-shaped API end to end on a tiny model: logprobs, penalties, stop ids, chat, validation."""
from __future__ import annotations

from pathlib import Path

import pytest

from ember import LLM, SamplingParams
from ember.errors import InvalidParameterError, PromptTooLongError
from tests.conftest import TEXT


@pytest.fixture(scope="module")
def llm(tiny_qwen2: Path) -> LLM:
    return LLM(tiny_qwen2, kv_cache_memory=0.01, max_model_len=256)


@pytest.fixture(scope="module")
def prompt(llm: LLM) -> list[int]:
    return llm.get_tokenizer().encode(TEXT)[:30]


def test_logprobs_are_top_k_of_the_raw_distribution(llm: LLM, prompt: list[int]) -> None:
    out = llm.generate({"prompt_token_ids": prompt},
                       SamplingParams(max_tokens=4, temperature=0, logprobs=3, ignore_eos=True))[0].outputs[0]
    assert len(out.logprobs) == 4
    # Recompute step by step with prompt_logprobs: the same distributions.
    full = prompt + out.token_ids
    ref = llm.generate({"prompt_token_ids": full}, SamplingParams(max_tokens=1, prompt_logprobs=5))[0]
    for i, (tok, lps) in enumerate(zip(out.token_ids, out.logprobs)):
        assert tok in lps and lps[tok].rank == 1  # greedy picks the top token
        assert len(lps) == 3
        ranks = sorted(lp.rank for lp in lps.values())
        assert ranks == [1, 2, 3]
        ref_row = ref.prompt_logprobs[len(prompt) + i]
        for t, lp in lps.items():
            assert abs(lp.logprob - ref_row[t].logprob) < 1e-4
    assert abs(out.cumulative_logprob - sum(lps[t].logprob for t, lps in zip(out.token_ids, out.logprobs))) < 1e-4


def test_prompt_logprobs_shape(llm: LLM, prompt: list[int]) -> None:
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=1, prompt_logprobs=2))[0]
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for pos in range(1, len(prompt)):
        entry = out.prompt_logprobs[pos]
        assert prompt[pos] in entry and 2 <= len(entry) <= 3


def test_repetition_penalty_discourages_repeats(llm: LLM, prompt: list[int]) -> None:
    plain = llm.generate({"prompt_token_ids": prompt},
                         SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0].outputs[0].token_ids
    penal = llm.generate({"prompt_token_ids": prompt}, SamplingParams(
        max_tokens=24, temperature=0, ignore_eos=True, repetition_penalty=3.0))[0].outputs[0].token_ids
    seen = set(prompt)
    repeats = lambda toks: sum(1 for i, t in enumerate(toks) if t in seen or t in toks[:i])  # noqa: E731
    assert repeats(penal) < repeats(plain)


def test_stop_token_ids_and_min_tokens(llm: LLM, prompt: list[int]) -> None:
    greedy = llm.generate({"prompt_token_ids": prompt},
                          SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0].outputs[0]
    target = greedy.token_ids[3]
    first = greedy.token_ids.index(target)
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(
        max_tokens=10, temperature=0, stop_token_ids=[target], ignore_eos=True))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == target
    assert out.token_ids == greedy.token_ids[: first + 1]


def test_chat_uses_the_template(llm: LLM) -> None:
    msgs = [{"role": "user", "content": "Hello there"}]
    tok = llm.get_tokenizer()
    ids = tok.apply_chat_template(msgs, tokenize=True)
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    assert llm.chat(msgs, params)[0].outputs[0].token_ids == \
        llm.generate({"prompt_token_ids": ids}, params)[0].outputs[0].token_ids


def test_invalid_requests_are_rejected_and_leave_nothing(llm: LLM, prompt: list[int]) -> None:
    engine = llm.engine
    with pytest.raises(PromptTooLongError, match="300 tokens .* context is 256"):
        llm.generate({"prompt_token_ids": [5] * 300})
    with pytest.raises(PromptTooLongError, match="at most 226 tokens"):
        llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=1000))
    with pytest.raises(InvalidParameterError, match="empty"):
        llm.generate("")
    with pytest.raises(InvalidParameterError, match="outside the vocabulary"):
        llm.generate({"prompt_token_ids": [10 ** 6]})
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(max_tokens=0), dict(n=0),
                dict(top_k=-5), dict(min_p=2)):
        with pytest.raises(InvalidParameterError):
            SamplingParams(**bad)
    # A batch where the second prompt is bad: the first must not stay queued.
    with pytest.raises(PromptTooLongError):
        llm.generate([{"prompt_token_ids": prompt}, {"prompt_token_ids": [5] * 300}])
    assert not engine.has_unfinished_requests()
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_greedy_ignores_seed_and_seeds_reproduce(llm: LLM, prompt: list[int]) -> None:
    p = {"prompt_token_ids": prompt}
    a = llm.generate(p, SamplingParams(max_tokens=8, temperature=0.9, seed=3, ignore_eos=True))[0]
    b = llm.generate(p, SamplingParams(max_tokens=8, temperature=0.9, seed=3, ignore_eos=True))[0]
    c = llm.generate(p, SamplingParams(max_tokens=8, temperature=0.9, seed=4, ignore_eos=True))[0]
    assert a.outputs[0].token_ids == b.outputs[0].token_ids != c.outputs[0].token_ids


def test_min_tokens_blocks_stop_tokens_until_reached(llm: LLM, prompt: list[int]) -> None:
    greedy = llm.generate({"prompt_token_ids": prompt},
                          SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0].outputs[0]
    target = greedy.token_ids[0]
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(
        max_tokens=6, temperature=0, stop_token_ids=[target], min_tokens=3, ignore_eos=True))[0].outputs[0]
    assert target not in out.token_ids[:3] and len(out.token_ids) >= 3
    assert out.token_ids[0] != greedy.token_ids[0]  # the greedy choice was masked, not just not stopped on


def test_last_step_says_what_the_step_scheduled(tiny_llama3) -> None:
    from ember.engine.engine import LLMEngine

    engine = LLMEngine(model=tiny_llama3, kv_cache_memory=0.01, max_num_batched_tokens=8)
    engine.add_request("a", {"prompt_token_ids": list(range(5, 17))}, SamplingParams(max_tokens=2, ignore_eos=True))
    engine.step()
    assert engine.last_step.chunks == ((0, 8),) and engine.last_step.decodes == 0 and engine.last_step.tokens == 8
    engine.step()
    assert engine.last_step.chunks == ((8, 4),)
    engine.step()
    assert engine.last_step.chunks == () and engine.last_step.decodes == 1
