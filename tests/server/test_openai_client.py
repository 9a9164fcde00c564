"""The official openai client (sync, async, streaming) gets the same text as offline LLM.generate."""
from __future__ import annotations

import asyncio
from pathlib import Path

import openai
import pytest

from ember import LLM, SamplingParams

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "It is a truth"}]


@pytest.fixture(scope="module")
def offline(tiny_llama3: Path) -> LLM:
    return LLM(tiny_llama3, kv_cache_memory=0.01, max_model_len=512)


def _expected_chat(llm: LLM, n: int = 16) -> str:
    return llm.chat(MESSAGES, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))[0].outputs[0].text


def _expected_completion(llm: LLM, prompt: str, n: int = 16) -> str:
    return llm.generate(prompt, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))[0].outputs[0].text


def test_sync_chat_and_completion(server, offline: LLM) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == [server.model]
    chat = client.chat.completions.create(model=server.model, messages=MESSAGES, max_tokens=16, temperature=0,
                                          extra_body={"ignore_eos": True})
    assert chat.choices[0].message.content == _expected_chat(offline)
    assert chat.choices[0].finish_reason == "length"
    assert chat.usage.completion_tokens == 16
    comp = client.completions.create(model=server.model, prompt="My dear Mr. Bennet", max_tokens=16,
                                     temperature=0, extra_body={"ignore_eos": True})
    assert comp.choices[0].text == _expected_completion(offline, "My dear Mr. Bennet")


def test_streaming_chat_and_completion(server, offline: LLM) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    stream = client.chat.completions.create(model=server.model, messages=MESSAGES, max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == _expected_chat(offline)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 16 and not chunks[-1].choices
    stream = client.completions.create(model=server.model, prompt="Netherfield Park", max_tokens=16,
                                       temperature=0, stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in stream) == _expected_completion(offline, "Netherfield Park")


def test_async_client(server, offline: LLM) -> None:
    async def run() -> list[str]:
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused")
        prompts = ["My dear Mr. Bennet", "Netherfield Park", "a single man"]
        outs = await asyncio.gather(*[client.completions.create(
            model=server.model, prompt=p, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
            for p in prompts])
        return [o.choices[0].text for o in outs]

    assert asyncio.run(run()) == [_expected_completion(offline, p, 12)
                                  for p in ["My dear Mr. Bennet", "Netherfield Park", "a single man"]]


def test_logprobs_n_and_seed(server) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    chat = client.chat.completions.create(model=server.model, messages=MESSAGES, max_tokens=5, temperature=0,
                                          logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(c.top_logprobs) == 3 and c.top_logprobs[0].logprob >= c.top_logprobs[-1].logprob
               for c in content)
    assert "".join(c.token for c in content) == chat.choices[0].message.content
    kw = dict(model=server.model, prompt="It is", max_tokens=8, temperature=1.0, n=3, seed=11)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert len(a.choices) == 3 and [c.text for c in a.choices] == [c.text for c in b.choices]
    comp = client.completions.create(model=server.model, prompt="It is a truth", max_tokens=3, temperature=0,
                                     logprobs=2, echo=True)
    assert comp.choices[0].text.startswith("It is a truth")
    assert len(comp.choices[0].logprobs.tokens) == comp.usage.prompt_tokens + 3  # echo: the prompt's too


def test_tokenize_detokenize(server, offline: LLM) -> None:
    import httpx

    ids = httpx.post(f"{server.url}/tokenize", json={"prompt": "a single man"}).json()["tokens"]
    assert ids == offline.get_tokenizer().encode("a single man")
    assert httpx.post(f"{server.url}/detokenize", json={"tokens": ids}).json()["prompt"] == "a single man"
    chat_ids = httpx.post(f"{server.url}/tokenize", json={"messages": MESSAGES}).json()["tokens"]
    assert chat_ids == offline.get_tokenizer().apply_chat_template(MESSAGES, tokenize=True)


def test_server_with_a_quantized_kv_cache(tiny_llama3: Path, tmp_path: Path) -> None:
    """`ember serve --kv-cache-dtype int4` streams what LLM(kv_cache_dtype="int4") generates."""
    from tests.server.conftest import start_server, stop_server

    srv = start_server(tiny_llama3, tmp_path, "--kv-cache-dtype", "int4")
    try:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused")
        stream = client.completions.create(model=srv.model, prompt="Netherfield Park", max_tokens=40,
                                           temperature=0, stream=True, extra_body={"ignore_eos": True})
        text = "".join(c.choices[0].text for c in stream)
    finally:
        assert stop_server(srv) == 0
    llm = LLM(tiny_llama3, kv_cache_memory=0.02, max_model_len=512, kv_cache_dtype="int4")
    assert text == _expected_completion(llm, "Netherfield Park", 40)
    assert "int4" in srv.log.read_text()
