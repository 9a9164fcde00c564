"""Pooling requests: pooled hidden states and span attention capture, against transformers' eager forward
(hidden states, and softmax(QK^T / sqrt(d)) per head and layer), chunked at every budget, batched with
decodes, after prefix-cache hits, over float and KIVI caches."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ember import LLM, SamplingParams
from ember.engine.engine import LLMEngine
from ember.engine.pooling_params import PoolingParams
from ember.errors import InvalidParameterError
from tests.conftest import TEXT
from tests.engine.test_batching import assert_no_leaks


def eager_reference(path: Path | str, ids: list[int], gguf: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """transformers' final (normed) hidden states [T, hidden] and attention probabilities per layer [H, T, T]."""
    import transformers as tf

    kwargs = {"gguf_file": Path(path).name} if gguf else {}
    folder = Path(path).parent if gguf else path
    model = tf.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32, attn_implementation="eager",
                                                    **kwargs)
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_hidden_states=True, output_attentions=True)
    return out.hidden_states[-1][0], [a[0] for a in out.attentions]


def _run(engine: LLMEngine, prompt: list[int], params: PoolingParams, beside: list[int] | None = None):
    """A pooling request, optionally while another request decodes."""
    if beside is not None:
        engine.add_request("gen", {"prompt_token_ids": beside}, SamplingParams(max_tokens=30, ignore_eos=True))
        while not engine.requests["gen"].seqs[0].output_ids:
            engine.step()
    engine.add_request("pool", {"prompt_token_ids": prompt}, params)
    result = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == "pool" and out.finished:
                result = out
    assert result is not None and result.outputs == []
    assert_no_leaks(engine)
    return result.pooled


@pytest.fixture(scope="module")
def case(tiny_llama3: Path) -> tuple[list[int], torch.Tensor, list[torch.Tensor]]:
    ids = LLM(tiny_llama3).get_tokenizer().encode(TEXT)[:70]
    hidden, attentions = eager_reference(tiny_llama3, ids)
    return ids, hidden, attentions


SPAN = (52, 70)  # the "query" span: its attention over every earlier token


def _expected(attentions: list[torch.Tensor], layers: list[int]) -> torch.Tensor:
    return sum(attentions[i].sum(0) for i in layers)[SPAN[0]:SPAN[1], :SPAN[1]]


@pytest.mark.parametrize("budget", [1, 5, 16, 33, 512])
@pytest.mark.parametrize("kv", ["auto", "float16"])
def test_pooling_and_attention_match_the_eager_reference(tiny_llama3: Path, case, budget: int, kv: str) -> None:
    ids, hidden, attentions = case
    engine = LLM(tiny_llama3, kv_cache_dtype=kv, max_num_batched_tokens=budget, block_size=8).engine
    tol = 1e-4 if kv == "auto" else 3e-3
    for layers in ([0, 1], [1]):
        pooled = _run(engine, ids, PoolingParams("last", attention_span=SPAN, attention_layers=layers),
                      beside=ids[3:20] if budget > 1 else None)
        torch.testing.assert_close(pooled.data, hidden[-1], rtol=0, atol=tol)
        torch.testing.assert_close(pooled.attention, _expected(attentions, layers), rtol=0, atol=tol)
    mean = _run(engine, ids, PoolingParams("mean", normalize=True), beside=ids[:9])
    torch.testing.assert_close(mean.data, torch.nn.functional.normalize(hidden.mean(0), dim=0), rtol=0, atol=tol)
    assert mean.attention is None


def test_attention_after_a_prefix_cache_hit(tiny_llama3: Path, case) -> None:
    """ICR's second pass: the documents' KV comes from the prefix cache, only the query span is computed."""
    ids, _, attentions = case
    engine = LLM(tiny_llama3, block_size=8).engine
    engine.add_request("warm", {"prompt_token_ids": ids[:60]}, SamplingParams(max_tokens=1))
    while engine.has_unfinished_requests():
        engine.step()
    engine.add_request("pool", {"prompt_token_ids": ids}, PoolingParams(None, attention_span=SPAN))
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert outs[-1].num_cached_tokens == 48  # whole blocks before the span
    torch.testing.assert_close(outs[-1].pooled.attention, _expected(attentions, [0, 1]), rtol=0, atol=1e-4)


@pytest.mark.parametrize("kv", ["int8", "int4"])
def test_attention_over_a_kivi_cache(tiny_llama3: Path, case, kv: str) -> None:
    """In one chunk KIVI attends the prompt in float (its prefill), so the capture is exact; chunked, earlier
    blocks are read back quantized, so it moves by the quantization error only (and sums stay 1 per head)."""
    ids, _, attentions = case
    expected = _expected(attentions, [0, 1])
    whole = _run(LLM(tiny_llama3, kv_cache_dtype=kv, block_size=8).engine, ids,
                 PoolingParams(None, attention_span=SPAN))
    torch.testing.assert_close(whole.attention, expected, rtol=0, atol=1e-4)
    chunked = _run(LLM(tiny_llama3, kv_cache_dtype=kv, block_size=8, max_num_batched_tokens=16).engine, ids,
                   PoolingParams(None, attention_span=SPAN))
    heads_layers = 2 * 4
    torch.testing.assert_close(chunked.attention.sum(-1), torch.full((SPAN[1] - SPAN[0],), float(heads_layers)))
    err = (chunked.attention - expected).abs().max()
    assert 0 < err < (0.05 if kv == "int8" else 0.5)


def test_bad_pooling_requests_are_refused(tiny_llama3: Path) -> None:
    engine = LLM(tiny_llama3).engine
    for params, match in ((lambda: PoolingParams("max"), "pooling must be"),
                          (lambda: PoolingParams(None), "needs pooling or attention_span"),
                          (lambda: PoolingParams(attention_span=(5, 5)), "attention_span"),
                          (lambda: engine.add_request("x", [1, 2, 3], PoolingParams(attention_span=(0, 9))),
                           "past the prompt"),
                          (lambda: engine.add_request("x", [1, 2, 3], PoolingParams(attention_layers=[7])),
                           "attention_layers")):
        with pytest.raises(InvalidParameterError, match=match):
            params()
    assert not engine.has_unfinished_requests()


def test_default_model_attention_and_pooling(default_gguf: Path) -> None:
    """The same on SmolLM2 (30 layers, 9 heads on 3 KV heads), float32, chunked, over float and int8 caches."""
    llm = LLM(default_gguf, dtype="float32", max_num_batched_tokens=24)
    ids = llm.get_tokenizer().encode(TEXT[:400])[:80]
    hidden, attentions = eager_reference(default_gguf, ids, gguf=True)
    span, layers = (60, 80), [3, 10, 11, 12, 29]
    expected = sum(attentions[i].sum(0) for i in layers)[span[0]:span[1], :span[1]]
    pooled = _run(llm.engine, ids, PoolingParams("last", attention_span=span, attention_layers=layers))
    torch.testing.assert_close(pooled.data, hidden[-1], rtol=0, atol=1e-3)
    torch.testing.assert_close(pooled.attention, expected, rtol=0, atol=1e-3)
    kivi = LLM(default_gguf, dtype="float32", kv_cache_dtype="int8", max_num_batched_tokens=24).engine
    err = (_run(kivi, ids, PoolingParams(None, attention_span=span, attention_layers=layers)).attention
           - expected).abs().max()
    assert err < 0.1


def test_llm_encode(tiny_llama3: Path, case) -> None:
    """vLLM's offline shape: LLM.encode(prompts, PoolingParams) -> outputs with .pooled, in prompt order."""
    from ember import LLM as PublicLLM, PoolingParams as PublicPoolingParams

    ids, hidden, _ = case
    llm = PublicLLM(tiny_llama3)
    outs = llm.encode([{"prompt_token_ids": ids}, {"prompt_token_ids": ids[:9]}], PublicPoolingParams("last"))
    torch.testing.assert_close(outs[0].pooled.data, hidden[-1], rtol=0, atol=1e-4)
    assert outs[1].pooled.data.shape == hidden[0].shape and outs[0].outputs == []


def test_a_pooling_prompt_may_fill_the_context(tiny_llama3: Path) -> None:
    """Nothing is generated, so the prompt may take every position (a generating request may not)."""
    from ember.errors import PromptTooLongError

    engine = LLM(tiny_llama3, max_model_len=32).engine
    ids = list(range(10, 42))
    assert _run(engine, ids, PoolingParams("mean")).data.shape == (64,)
    with pytest.raises(PromptTooLongError):
        engine.add_request("g", {"prompt_token_ids": ids}, SamplingParams(max_tokens=1))
