"""LangChain's OpenAI integration, unchanged, against a live `ember serve`: ChatOpenAI invoke and stream (the same
text as the `openai` client), with_structured_output on a pydantic model, and OpenAIEmbeddings."""
from __future__ import annotations

from typing import Literal

import openai
import pytest
from pydantic import BaseModel, Field

from tests.server.conftest import start_server, stop_server

lc = pytest.importorskip("langchain_openai")


@pytest.fixture(scope="module")
def server(tiny_llama3, tmp_path_factory):
    """The whole 1,024-token context of the tiny model: its small vocabulary spends ~450 tokens on one tool."""
    srv = start_server(tiny_llama3, tmp_path_factory.mktemp("langchain"), "--max-model-len", "1024")
    yield srv
    stop_server(srv)


class Pick(BaseModel):
    colour: Literal["red", "green", "blue"]
    count: int = Field(ge=0, le=99)


def chat_model(server, **kw) -> "lc.ChatOpenAI":
    return lc.ChatOpenAI(model=server.model, base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                         temperature=0, **kw)


def test_invoke_and_stream_give_the_servers_greedy_text(server) -> None:
    prompt = "It is a truth universally acknowledged"
    direct = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused").chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": prompt}], max_tokens=12, temperature=0)
    llm = chat_model(server, max_tokens=12)
    assert llm.invoke(prompt).content == direct.choices[0].message.content
    assert "".join(chunk.content for chunk in llm.stream(prompt)) == direct.choices[0].message.content


def test_with_structured_output_returns_the_model(server) -> None:
    structured = chat_model(server, max_tokens=200).with_structured_output(Pick, method="json_schema", strict=True)
    pick = structured.invoke("Pick a colour and a count.")
    assert isinstance(pick, Pick)


def test_openai_embeddings(server) -> None:
    # check_embedding_ctx_length=False: LangChain would otherwise count tokens with tiktoken's OpenAI vocabularies,
    # which it downloads (and which are not this model's); ember counts and checks lengths itself.
    emb = lc.OpenAIEmbeddings(model=server.model, base_url=f"{server.url}/v1", api_key="unused",
                              check_embedding_ctx_length=False)
    docs = emb.embed_documents(["the cat sat", "a dog ran"])
    query = emb.embed_query("the cat sat")
    assert len(docs) == 2 and len(docs[0]) == len(query) == 64
    assert query == pytest.approx(docs[0], abs=1e-5)


def test_bind_tools_required(server) -> None:
    from langchain_core.tools import tool

    @tool
    def shout(word: Literal["hi", "yo"]) -> str:
        """Shout a word."""
        return word.upper()

    reply = chat_model(server, max_tokens=200).bind_tools([shout], tool_choice="required", strict=True).invoke("Shout!")
    assert reply.tool_calls and reply.tool_calls[0]["name"] == "shout"
    assert reply.tool_calls[0]["args"]["word"] in ("hi", "yo")
