"""ember's logits and greedy tokens against Hugging Face transformers on the same weights."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ember import LLM, SamplingParams
from tests.conftest import TEXT


def _hf_model(path: Path, dtype: torch.dtype = torch.float32):
    import transformers as tf

    if path.is_dir():
        model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    else:
        model = tf.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    return model.eval()


def _hf_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, -1)


def _hf_greedy(model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long), pad_token_id=0)
    return out[0, len(ids):].tolist()


def _ember_prompt_logprobs(llm: LLM, ids: list[int]) -> torch.Tensor:
    out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    lps = out.prompt_logprobs
    assert lps is not None and len(lps) == len(ids) and lps[0] is None
    assert all(ids[i] in lps[i] for i in range(1, len(ids)))
    return torch.tensor([lps[i][ids[i]].logprob for i in range(1, len(ids))])


def _check(llm: LLM, hf, ids: list[int], greedy_prompt: list[int], n_greedy: int = 64) -> None:
    ref = _hf_logprobs(hf, ids)
    ref_tokens = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    ours = _ember_prompt_logprobs(llm, ids)
    assert (ours - ref_tokens).abs().max().item() <= 1e-3
    out = llm.generate([{"prompt_token_ids": greedy_prompt}],
                       SamplingParams(max_tokens=n_greedy, temperature=0, ignore_eos=True))[0]
    assert out.outputs[0].token_ids == _hf_greedy(hf, greedy_prompt, n_greedy)


@pytest.mark.slow
def test_default_model_matches_transformers(default_gguf: Path) -> None:
    # A small token budget so the 300-token prompt is computed in several chunks. float32: transformers
    # dequantizes the file as this dtype does (the default, auto, runs it packed with int8 activations;
    # tests/loading/test_gguf_packed.py bounds that path against this one).
    llm = LLM(default_gguf, dtype="float32", max_num_batched_tokens=96, kv_cache_memory=0.1)
    tok = llm.get_tokenizer()
    ids = tok.encode(TEXT)[:300]
    assert len(ids) >= 256
    chat = tok.apply_chat_template([{"role": "user", "content": "Write a short poem about the sea."}],
                                   tokenize=True)
    _check(llm, _hf_model(default_gguf), ids, chat)


@pytest.mark.parametrize("kind", ["tiny_qwen2", "tiny_llama3", "tiny_mistral"])
def test_tiny_models_match_transformers(kind: str, request: pytest.FixtureRequest) -> None:
    folder: Path = request.getfixturevalue(kind)
    llm = LLM(folder, max_num_batched_tokens=40, kv_cache_memory=0.01)
    if kind == "tiny_mistral":
        assert llm.engine.max_model_len == 512  # capped at the sliding window
    ids = llm.get_tokenizer().encode(TEXT)[:300]
    _check(llm, _hf_model(folder), ids, ids[:20])


def test_bfloat16_runtime_stays_close(tiny_llama3: Path) -> None:
    ids = LLM(tiny_llama3, kv_cache_memory=0.01).get_tokenizer().encode(TEXT)[:128]
    fp32 = _ember_prompt_logprobs(LLM(tiny_llama3, kv_cache_memory=0.01), ids)
    bf16_llm = LLM(tiny_llama3, dtype="bfloat16", kv_cache_memory=0.01)
    assert bf16_llm.engine.runner.backend.caches[0].dtype == torch.bfloat16
    bf16 = _ember_prompt_logprobs(bf16_llm, ids)
    assert (bf16 - fp32).abs().mean().item() < 0.05
