"""Long-context modes (StreamingLLM, LM-Infinite) through the engine equal a dense reference built on Hugging
Face transformers' model with the papers' positions: StreamingLLM re-indexes the kept tokens inside its cache
(sinks at 0 .. n_sink - 1, the recent window after them), LM-Infinite reads the global tokens outside the window
with unrotated keys and the query rotated to the capped distance. Prompts run in chunks and decodes through the
C++ kernels and their PyTorch twins; blocks behind the window are freed and never leak."""
from __future__ import annotations

import math

import pytest
import torch

from ember import LLM, SamplingParams
from ember.errors import InvalidParameterError
from ember.ops import paged_float
from ember.ops.kernels import cpu_kernels


def _positions(mode: str, sinks: int, window: int, n: int) -> tuple[torch.Tensor, ...]:
    """[n, n] visible mask and the (query, key) positions each pair is scored at, as the papers define them."""
    p, t = torch.arange(n)[:, None], torch.arange(n)[None, :]
    in_window = p - t < window
    visible = (t <= p) & ((t < sinks) | in_window)
    if mode == "streaming":
        whole = p < sinks + window  # the cache still holds every token: true positions
        recent = sinks + t - (p - window + 1)  # index in the cache of a recent token
        pos_k = torch.where(whole | (t < sinks), t, recent)
        pos_q = torch.where(whole, p, sinks + window - 1).expand(n, n)
    else:
        pos_q = torch.where(in_window, p, window)
        pos_k = torch.where(in_window, t, 0)
    return visible, pos_q, pos_k


def _rotate(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """x [..., D] rotated to positions `pos` (broadcast to x's leading dims)."""
    ang = pos.double()[..., None] * inv_freq.double()
    emb = torch.cat((ang, ang), dim=-1)
    half = x.shape[-1] // 2
    turned = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x.double() * emb.cos() + turned.double() * emb.sin()).float()


def reference_logprobs(folder, ids: list[int], mode: str, sinks: int, window: int) -> torch.Tensor:
    """[n, vocab] log-softmax of Hugging Face's model over `ids` under the mode's mask and positions."""
    import transformers as tf
    from transformers import AttentionInterface

    model = tf.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    inv_freq = model.model.rotary_emb.inv_freq
    n = len(ids)
    visible, pos_q, pos_k = _positions(mode, sinks, window, n)

    def attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        true = torch.arange(n)
        q_raw = _rotate(query, -true, inv_freq)  # [B, H, n, D], unrotated
        k_raw = _rotate(key, -true, inv_freq)
        group = query.shape[1] // key.shape[1]
        k_raw = k_raw.repeat_interleave(group, dim=1)
        v = value.repeat_interleave(group, dim=1)
        qq = _rotate(q_raw[:, :, :, None, :], pos_q, inv_freq)  # [B, H, n, n, D]: query p as paired with key t
        kk = _rotate(k_raw[:, :, None, :, :], pos_k, inv_freq)
        scores = (qq * kk).sum(-1) * scaling
        scores = scores.masked_fill(~visible, -math.inf)
        out = scores.softmax(-1) @ v
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register("ember_long_reference", attention)
    model.config._attn_implementation = "ember_long_reference"
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    return logits.log_softmax(-1)


CASES = [("streaming", 4, 24), ("lm-infinite", 6, 24), ("streaming", 0, 20)]  # 0 sinks: a sliding window


@pytest.mark.parametrize("mode,sinks,window", CASES)
@pytest.mark.parametrize("kernels", [True, False])
def test_long_context_equals_the_dense_reference(tiny_llama3, monkeypatch, mode: str, sinks: int, window: int,
                                                 kernels: bool) -> None:
    if kernels and cpu_kernels() is None:
        pytest.skip("the C++ kernels are not available here")
    if not kernels:
        monkeypatch.setattr(paged_float, "cpu_kernels", lambda: None)
        monkeypatch.setattr("ember.models.llama.cpu_kernels", lambda: None, raising=False)
    llm = LLM(str(tiny_llama3), long_context=mode, attention_window=window, attention_sinks=sinks, block_size=4,
              max_num_batched_tokens=20, max_model_len=4096)
    torch.manual_seed(1)
    prompts = [torch.randint(3, 300, (70,)).tolist(), torch.randint(3, 300, (9,)).tolist()]
    params = SamplingParams(max_tokens=90, temperature=0, logprobs=0, prompt_logprobs=0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)  # batched: chunks beside decodes
    for prompt, out in zip(prompts, outs):
        gen = out.outputs[0].token_ids
        ids = prompt + gen
        ref = reference_logprobs(tiny_llama3, ids[:-1], mode, sinks, window)
        got_prompt = torch.tensor([out.prompt_logprobs[i][prompt[i]].logprob for i in range(1, len(prompt))])
        want_prompt = ref[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
        torch.testing.assert_close(got_prompt, want_prompt, rtol=0, atol=2e-4)
        got = torch.tensor([lp[t].logprob for lp, t in zip(out.outputs[0].logprobs, gen)])
        rows = torch.arange(len(prompt) - 1, len(ids) - 1)
        torch.testing.assert_close(got, ref[rows, torch.tensor(gen)], rtol=0, atol=2e-4)
        # Greedy: each generated token is the reference's argmax (up to ties within the tolerance).
        best = ref[rows].max(-1).values
        assert (ref[rows, torch.tensor(gen)] >= best - 2e-4).all()
    assert llm.engine.blocks.num_used_blocks == 0  # every block back, sinks and their copies included


def test_streaming_generation_keeps_constant_blocks(tiny_llama3) -> None:
    """Ten times the window: the blocks a sequence holds stop growing once the window is full."""
    window, bs = 32, 4
    llm = LLM(str(tiny_llama3), long_context="streaming", attention_window=window, block_size=bs,
              max_model_len=100_000, enable_prefix_caching=False)
    engine = llm.engine
    engine.add_request("r", {"prompt_token_ids": [5, 6, 7, 8, 9]},
                       SamplingParams(max_tokens=10 * window, temperature=0, ignore_eos=True))
    held = []
    while engine.has_unfinished_requests():
        engine.step()
        held.append(engine.blocks.num_used_blocks)
    most = (window // bs + 1) + 2 * 1 + 1  # window + the block being written, sinks and their copy, slack
    assert max(held) <= most, max(held)
    assert max(held[-5 * window:]) == max(held[2 * window:])  # constant after the window filled
    assert engine.blocks.num_used_blocks == 0


def test_long_context_lets_a_prompt_exceed_the_trained_context(tiny_llama3) -> None:
    llm = LLM(str(tiny_llama3), long_context="lm-infinite", attention_window=64, block_size=16,
              max_model_len=3000, max_num_batched_tokens=256)
    ids = torch.randint(3, 300, (2000,), generator=torch.Generator().manual_seed(0)).tolist()  # > 1024 trained
    out = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 4
    plain = LLM(str(tiny_llama3), block_size=16)
    with pytest.raises(InvalidParameterError, match="context"):
        plain.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=4))


@pytest.mark.parametrize("kwargs,match", [
    (dict(long_context="sliding"), "long_context must be one of"),
    (dict(attention_window=64), "needs a long-context mode"),
    (dict(long_context="streaming", kv_cache_dtype="int8"), "quantized"),
    (dict(long_context="streaming", speculative_config={"method": "ngram", "num_speculative_tokens": 2,
                                                        "prompt_lookup_max": 2}), "speculative"),
    (dict(long_context="streaming", attention_window=8, block_size=16), "attention_window 8 must be between"),
    (dict(long_context="lm-infinite", attention_window=5000), "trained context of 1024"),
])
def test_long_context_refuses_what_it_cannot_do(tiny_llama3, kwargs: dict, match: str) -> None:
    with pytest.raises(InvalidParameterError, match=match):
        LLM(str(tiny_llama3), **kwargs)


def test_prefix_cache_serves_a_long_prompt_under_a_mode(tiny_llama3) -> None:
    """A second request with the same long prompt reuses its cached blocks (only those its window and sinks
    need) and computes exactly what a cold engine computes."""
    kwargs = dict(long_context="streaming", attention_window=24, block_size=4, max_num_batched_tokens=16,
                  max_model_len=4096)
    ids = torch.randint(3, 300, (150,), generator=torch.Generator().manual_seed(3)).tolist()
    params = SamplingParams(max_tokens=30, temperature=0, logprobs=0, ignore_eos=True)
    cold = LLM(str(tiny_llama3), enable_prefix_caching=False, **kwargs)
    want = cold.generate({"prompt_token_ids": ids}, params)[0].outputs[0]
    warm = LLM(str(tiny_llama3), **kwargs)
    warm.generate({"prompt_token_ids": ids}, params)
    engine = warm.engine
    engine.add_request("again", {"prompt_token_ids": ids}, params)
    engine.step()
    seq = engine.requests["again"].seqs[0]
    assert seq.num_cached_tokens >= 140 and seq.evicted_blocks > 0
    assert engine.blocks.num_used_blocks <= 24 // 4 + 6  # the window's blocks, not the prompt's 38
    got = None
    while engine.has_unfinished_requests():
        got = next((o for o in engine.step() if o.finished), got)
    assert got is not None and got.outputs[0].token_ids == want.token_ids
    lp = [d[t].logprob for d, t in zip(got.outputs[0].logprobs, want.token_ids)]
    torch.testing.assert_close(torch.tensor(lp), torch.tensor([d[t].logprob for d, t in
                                                                zip(want.logprobs, want.token_ids)]),
                               rtol=0, atol=1e-4)


def test_attention_capture_is_refused_under_a_mode(tiny_llama3) -> None:
    llm = LLM(str(tiny_llama3), long_context="streaming", attention_window=64)
    with pytest.raises(InvalidParameterError, match="ICR"):
        llm.rerank("a query", ["one document", "another document"], method="icr")
    assert llm.engine.blocks.num_used_blocks == 0
    assert llm.rerank("a query", ["one document", "another"], method="embedding").results  # pooling still works


def test_completions_forked_past_the_window_equal_the_reference(tiny_llama3) -> None:
    """n = 2 on a prompt longer than the window: the second completion shares the prompt's blocks (evicted
    entries included) and gets its own sink copies; both read what the dense reference reads."""
    mode, sinks, window = "streaming", 4, 24
    llm = LLM(str(tiny_llama3), long_context=mode, attention_window=window, attention_sinks=sinks, block_size=4,
              max_num_batched_tokens=20, max_model_len=4096)
    prompt = torch.randint(3, 300, (50,), generator=torch.Generator().manual_seed(5)).tolist()
    params = SamplingParams(n=2, max_tokens=40, temperature=1.0, seed=7, logprobs=0, ignore_eos=True)
    out = llm.generate({"prompt_token_ids": prompt}, params)[0]
    assert len(out.outputs) == 2 and out.outputs[0].token_ids != out.outputs[1].token_ids
    for comp in out.outputs:
        ids = prompt + comp.token_ids
        ref = reference_logprobs(tiny_llama3, ids[:-1], mode, sinks, window)
        rows = torch.arange(len(prompt) - 1, len(ids) - 1)
        got = torch.tensor([lp[t].logprob for lp, t in zip(comp.logprobs, comp.token_ids)])
        torch.testing.assert_close(got, ref[rows, torch.tensor(comp.token_ids)], rtol=0, atol=2e-4)
    assert llm.engine.blocks.num_used_blocks == 0
