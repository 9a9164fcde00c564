"""FastAPI app: OpenAI-compatible chat/completions (streaming too), embeddings, rerank (Jina, Cohere, TEI shapes)
and score (vLLM's), models, tokenize, health, metrics."""
from __future__ import annotations

import asyncio
import base64
import itertools
import json
import logging
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Iterator, TypeVar

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from ember.apps.embedder import resolve_embedder
from ember.apps.memory import MemoryController, with_system
from ember.apps.memory_store import MemoryStore, check_session_id
from ember.apps.plan import Job, Plan, Usage, drive_async
from ember.apps.rerank import Ranking, Reranker, RerankOptions, top_results
from ember.engine.async_engine import AsyncEngine, RequestFailedError, RequestStream
from ember.engine.engine import Prompt, Request as EngineRequest
from ember.engine.outputs import RequestOutput
from ember.engine.pooling_params import PoolingParams
from ember.engine.sampling_params import SamplingParams
from ember.engine.structured import StructuredOutputsParams
from ember.errors import EmberError, InvalidParameterError
from ember.server import protocol as P
from ember.server.metrics import Metrics
from ember.server.middleware import ServerGuard
from ember.server.render import ChoiceState, chat_chunk, chat_final, completion_final
from ember.server.tools import ToolPlan, as_text, with_system as with_tools_prompt
from ember.server.ui import add_chat_page

log = logging.getLogger("ember")
T = TypeVar("T")


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type_: str = "invalid_request_error",
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code


class ClientDisconnected(Exception):
    """The client left before its response was ready (its requests were aborted)."""


class ServerShuttingDown(Exception):
    """The server stopped waiting for requests in flight (shutdown grace period over, or a second signal)."""


@dataclass
class ServerLimits:
    """What one request may ask for; beyond it, a 400 (413 for the body) that names the limit."""

    max_request_bytes: int = 4 << 20
    max_n: int = P.MAX_N  # OpenAI's cap on n (and best_of)
    max_prompts: int = P.MAX_PROMPTS  # prompts in one /v1/completions request
    max_choices: int = 256  # n x prompts: sequences one request starts
    max_request_tokens: int = 1 << 18  # over its choices: max_tokens, or what is left of the context

    def check_shape(self, prompts: int, n: int) -> None:
        if n > self.max_n:
            raise APIError(400, f"n may be at most {self.max_n}, got {n}", "n")
        if prompts > self.max_prompts:
            raise APIError(400, f"a request may hold at most {self.max_prompts} prompts, got {prompts}; "
                           "send them in several requests", "prompt")
        if prompts * n > self.max_choices:
            raise APIError(400, f"{prompts} prompts x n={n} asks for {prompts * n} completions, over this "
                           f"server's limit of {self.max_choices} per request; send fewer", "n")

    def check_work(self, reqs: list[EngineRequest], max_model_len: int) -> None:
        total = sum(len(r.seqs) * (r.params.max_tokens or max_model_len - len(r.prompt_ids)) for r in reqs)
        if total > self.max_request_tokens:
            raise APIError(400, f"this request could generate up to {total} tokens (completions x max_tokens, "
                           "or the rest of the context where max_tokens is not set), over this server's limit "
                           f"of {self.max_request_tokens} (--max-request-tokens); set max_tokens or ask for "
                           "fewer completions", "max_tokens")


def build_app(engine: AsyncEngine, served_name: str, metrics: Metrics, api_key: str | None = None,
              limits: ServerLimits | None = None, pooling: str = "last", memory_db: str | None = None,
              ui: bool = True, memory_embedder: str | None = None) -> FastAPI:
    """`ui`: serve the chat page at `GET /`. `memory_embedder`: what embeds memory sessions' turns (see
    ember.apps.embedder.resolve_embedder), loaded off the event loop on first use. `pooling`: how /v1/embeddings (and the embedding method) pool a text's hidden states unless the
    request says: "last" (the final token's, vLLM's default for decoder models) or "mean". `memory_db`: the
    SQLite file of long-term memory sessions (default $EMBER_HOME/memory.sqlite3, opened on first use)."""
    limits = limits or ServerLimits()
    PoolingParams(pooling)  # checked before serving
    app = FastAPI(title="ember", description="OpenAI-compatible LLM server", responses=ERROR_RESPONSES)
    app.add_middleware(ServerGuard, api_key=api_key, max_request_bytes=limits.max_request_bytes, page=ui)
    _error_handlers(app)
    if ui:
        add_chat_page(app)
    _openapi_without_422(app)
    core = engine.engine
    tok, max_len = core.tokenizer, core.max_model_len
    rerankers: list[Reranker] = []  # built on first use: a model without a usable chat template still embeds
    renders_tools: list[bool | None] = [None]  # whether the chat template places tools itself (found on first use)
    memories: list[MemoryController] = []  # opened on first use
    opening = asyncio.Lock()

    async def memory() -> MemoryController:
        async with opening:
            if not memories:
                memories.append(await engine.run_blocking(lambda: MemoryController(
                    MemoryStore(memory_db), tok, max_len, embedder=resolve_embedder(memory_embedder))))
        return memories[0]

    def check_model(name: str | None) -> None:
        if name not in (None, served_name):
            raise APIError(404, f"the model {name!r} does not exist; this server serves {served_name!r}",
                           "model", "NotFoundError", "model_not_found")

    async def chat_ids(messages: list[P.ChatMessage], add_generation_prompt: bool,
                       plan: ToolPlan | None = None) -> list[int]:
        plain = _messages(messages)
        core.check_text("".join(m["content"] for m in plain), "messages")

        def render() -> list[int]:
            named = next((i for i, m in enumerate(messages) if m.name is not None), None)
            if named is not None and tok.apply_chat_template(plain, add_generation_prompt) == \
                    tok.apply_chat_template(_messages(messages, names=False), add_generation_prompt):
                raise APIError(400, "name is not supported by this model's chat template (it would be ignored); "
                               "leave it out", f"messages.{named}.name")
            if renders_tools[0] is None:
                renders_tools[0] = tok.renders_tools()
            if renders_tools[0]:
                return tok.apply_chat_template(plain, add_generation_prompt, True, plan.tools if plan else None)
            ready = as_text(plain)  # this template knows neither tool calls nor tool results: as text
            if plan is not None:
                ready = with_tools_prompt(ready, plan.system_prompt())
            return tok.apply_chat_template(ready, add_generation_prompt, tokenize=True)

        return await engine.run_blocking(render)

    async def submit(items: list[tuple[str, Prompt, SamplingParams]],
                     sent_as: dict[str, str]) -> list[RequestStream]:
        with _named_as_sent(sent_as):
            limits.check_shape(len(items), items[0][2].n)
            reqs = await engine.prepare(items)
            limits.check_work(reqs, max_len)
        return engine.submit(reqs)

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    card = P.ModelCard(id=served_name, max_model_len=max_len)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [card.model_dump()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> P.ModelCard:
        check_model(model_id)
        return card

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(engine.state),
                                 media_type="text/plain; version=0.0.4")

    @app.post("/tokenize")
    async def tokenize(req: P.TokenizeRequest) -> dict[str, Any]:
        check_model(req.model)
        if isinstance(req, P.TokenizeChatRequest):
            tools = ToolPlan(_tool_dicts(req.tools)) if req.tools else None
            ids = await chat_ids(req.messages, req.add_generation_prompt, tools)
        else:
            ids = await engine.run_blocking(tok.encode, req.prompt, req.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": max_len}

    @app.post("/detokenize")
    async def detokenize(req: P.DetokenizeRequest) -> dict[str, Any]:
        check_model(req.model)
        bad = [t for t in req.tokens if not 0 <= t < tok.vocab_size]
        if bad:
            raise APIError(400, f"token ids {bad[:5]} are outside the vocabulary [0, {tok.vocab_size})", "tokens")
        return {"prompt": await engine.run_blocking(lambda: tok.decode(req.tokens, skip_special_tokens=False))}

    @app.post("/v1/chat/completions", responses=GENERATION_RESPONSES)
    async def chat(req: P.ChatCompletionRequest, raw: Request) -> Any:
        check_model(req.model)
        if not req.messages:
            raise APIError(400, "messages must be a non-empty list", "messages")
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        top = req.top_logprobs if req.logprobs else None
        structured, field = _structured(req)
        plan = _tool_plan(req)
        calls = plan.constraint() if plan is not None else None
        if calls is not None:
            if structured is not None:
                raise APIError(400, f"tool_choice {plan.choice} already constrains the reply; leave out {field}",
                               "tool_choice")
            structured, field = calls, "tools"
        # The engine's names for what the request sent under other names.
        sent_as = {"logprobs": "top_logprobs", "prompt": "messages",
                   "max_tokens": "max_completion_tokens" if req.max_completion_tokens else "max_tokens",
                   "structured_outputs": field or "structured_outputs"}
        with _named_as_sent(sent_as):
            params = _params(req, req.max_completion_tokens or req.max_tokens,
                             (top or 0) if req.logprobs else None, structured)
        rid = P.new_id("chatcmpl")
        if req.session is not None:
            if plan is not None:
                raise APIError(400, "tools are not supported with a memory session yet; leave out one of them",
                               "tools")
            return await session_chat(req, raw, rid, params, sent_as)
        ids = await chat_ids(req.messages, req.add_generation_prompt, plan)
        log_user(rid, req)
        streams = await submit([(rid, {"prompt_token_ids": ids}, params)], sent_as)
        state = ChoiceState(tok, params.n, top_logprobs=top or 0, tools=plan)
        if req.stream:
            return _sse(_chat_stream(rid, served_name, streams[0], state, req))
        out = (await _collect(streams, raw))[0]
        return chat_final(rid, served_name, out, state, bool(req.logprobs))

    async def session_chat(req: P.ChatCompletionRequest, raw: Request, rid: str, params: SamplingParams,
                           sent_as: dict[str, str]) -> Any:
        """A turn of a memory session: recall, generate, then store the turn (after the reply, streamed or not)."""
        *head, last = _messages(req.messages)
        if last["role"] != "user" or any(m["role"] != "system" for m in head) or len(head) > 1:
            raise APIError(400, "with session, send only the new user message (after at most one system "
                           "message): memory supplies the earlier turns", "messages")
        if params.n != 1:
            raise APIError(400, "with session, n must be 1 (one reply is stored per turn)", "n")
        ctl, session, message = await memory(), req.session, last["content"]
        core.check_text(message, "messages")
        recall = await run_plan(ctl.recall(session, message, params.max_tokens or max_len // 4), f"{rid}-m", raw,
                                Usage(), {})
        messages = with_system(recall.messages, head[0]["content"] if head else None)
        ids = await engine.run_blocking(tok.apply_chat_template, messages, True, True)
        log_user(rid, req)
        streams = await submit([(rid, {"prompt_token_ids": ids}, params)], sent_as)
        state = ChoiceState(tok, 1, top_logprobs=req.top_logprobs or 0 if req.logprobs else 0)
        info = {"session": session, "turns_used": recall.turns_used, "memory_tokens": recall.memory_tokens}

        async def store(reply: str) -> None:
            info["turn"] = await run_plan(ctl.remember(session, message, reply), f"{rid}-s", raw, Usage(), {})

        if req.stream:
            return _sse(_session_stream(rid, served_name, streams[0], state, req, store, info))
        out = (await _collect(streams, raw))[0]
        await store(out.outputs[0].text)
        return {**chat_final(rid, served_name, out, state, bool(req.logprobs)), "memory": info}

    @app.get("/v1/sessions/{session}")
    async def get_session(session: str) -> dict[str, Any]:
        check_session_id(session)
        turns = await engine.run_blocking((await memory()).store.turns, session)
        if not turns:
            raise APIError(404, f"no memory session {session!r}", "session", "NotFoundError", "session_not_found")
        return {"id": session, "object": "session",
                "turns": [{"index": t.index, "user": t.user, "assistant": t.assistant, "summary": t.summary,
                           "tokens": t.tokens} for t in turns]}

    @app.delete("/v1/sessions/{session}")
    async def delete_session(session: str) -> dict[str, Any]:
        check_session_id(session)
        if not await engine.run_blocking((await memory()).store.delete, session):
            raise APIError(404, f"no memory session {session!r}", "session", "NotFoundError", "session_not_found")
        return {"id": session, "object": "session", "deleted": True}

    @app.post("/v1/completions", responses=GENERATION_RESPONSES)
    async def completions(req: P.CompletionRequest, raw: Request) -> Any:
        check_model(req.model)
        prompts = _completion_prompts(req.prompt)
        # max_tokens 0 (with echo) scores the prompt: as vLLM, one token is generated and not shown.
        structured, field = _structured(req)
        params = _params(req, req.max_tokens or 1, req.logprobs, structured)
        if req.echo and req.logprobs is not None:
            params.prompt_logprobs = req.logprobs
        rid = P.new_id("cmpl")
        log_user(rid, req)
        items = [(f"{rid}-{i}", p, params) for i, p in enumerate(prompts)]
        streams = await submit(items, {"prompt_logprobs": "logprobs",
                                       "structured_outputs": field or "structured_outputs"})
        states = [ChoiceState(tok, params.n, offset=i * params.n, echo=bool(req.echo), logprobs=req.logprobs,
                              score_only=req.max_tokens == 0) for i in range(len(prompts))]
        if req.stream:
            return _sse(_completion_stream(rid, served_name, streams, states, req))
        return completion_final(rid, served_name, await _collect(streams, raw), states)

    # -- retrieval: embeddings, rerank, score ---------------------------------------------------

    def reranker() -> Reranker:
        if not rerankers:
            rerankers.append(Reranker(tok, max_len, core.config.num_layers))
        return rerankers[0]

    def prepare_inputs(items: list[tuple[str, Prompt, PoolingParams]]) -> list[EngineRequest]:
        """The embedding inputs as engine requests; an error names the input (on a preparation thread)."""
        reqs = []
        for i, (rid, prompt, params) in enumerate(items):
            try:
                if isinstance(prompt, str):
                    core.check_text(prompt, "input")
                reqs.append(core.prepare(rid, prompt, params))
            except InvalidParameterError as e:
                where = f"input {i}: " if len(items) > 1 else ""
                raise type(e)(where + str(e).replace("prompt", "input"), "input") from None
        return reqs

    async def run_plan(plan: Plan[T], rid: str, raw: Request, usage: Usage, sent_as: dict[str, str]) -> T:
        """Run an application's plan: each batch of jobs as engine requests f"{rid}-{k}", prepared off the event
        loop and submitted together, all aborted if the client leaves. The plan's first step (tokenizing the
        documents) runs off the event loop too. Errors name the fields as sent (`sent_as`)."""
        ids = itertools.count()

        async def run(jobs: list[Job]) -> list[RequestOutput]:
            items = [(f"{rid}-{next(ids)}", {"prompt_token_ids": j.prompt_ids}, j.params) for j in jobs]
            reqs = await engine.prepare(items)  # type: ignore[arg-type]
            limits.check_work(reqs, max_len)
            return await _collect(engine.submit(reqs), raw)

        with _named_as_sent(sent_as):
            first = await engine.run_blocking(_first_step, plan)
            if isinstance(first, _Done):
                return first.value
            return await drive_async(_resumed(first, plan), run, usage)

    def rerank_options(req: P._RetrievalOptions) -> RerankOptions:
        return RerankOptions(method=req.method or "icr", max_tokens_per_doc=req.max_tokens_per_doc,
                             layers=req.layers, calibration=req.calibration is not False,
                             pooling=req.pooling or pooling)

    @app.post("/v1/embeddings", responses=RETRIEVAL_RESPONSES)
    async def embeddings(req: P.EmbeddingRequest, raw: Request) -> dict[str, Any]:
        check_model(req.model)
        hidden = core.config.hidden_size
        if req.dimensions is not None and req.dimensions != hidden:
            raise APIError(400, f"dimensions: this model's embeddings have {hidden} dimensions and this server "
                           f"does not shorten them; leave dimensions out (or send {hidden})", "dimensions")
        params = PoolingParams(req.pooling or pooling, normalize=True)
        rid = P.new_id("embd")
        log_user(rid, req)
        items = [(f"{rid}-{i}", p, params) for i, p in enumerate(_embedding_inputs(req.input))]
        outs = await _collect(engine.submit(await engine.run_blocking(prepare_inputs, items)), raw)
        data = [{"object": "embedding", "index": i,
                 "embedding": _vector(o.pooled.data, req.encoding_format)}  # type: ignore[union-attr]
                for i, o in enumerate(outs)]
        tokens = sum(len(o.prompt_token_ids) for o in outs)
        return {"object": "list", "data": data, "model": served_name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    @app.post("/v1/rerank", responses=RETRIEVAL_RESPONSES)
    @app.post("/v2/rerank", responses=RETRIEVAL_RESPONSES)
    @app.post("/rerank", include_in_schema=False)
    async def rerank(req: P.RerankRequest, raw: Request) -> Any:
        """Jina's and Cohere's rerank; with `texts` instead of `documents`, TEI's (a list of {index, score,
        text?})."""
        check_model(req.model)
        docs, tei = req.document_texts(), req.texts is not None
        opts = rerank_options(req)
        rid, usage = P.new_id("rerank"), Usage()
        sent_as = {"attention_layers": "layers", **({"documents": "texts"} if tei else {})}
        ranking = await run_plan(reranker().plan(req.query, docs, opts), rid, raw, usage, sent_as)
        results = top_results(ranking, docs, req.top_n)
        if tei:
            return [{"index": r.index, "score": r.relevance_score, **({"text": r.document} if req.return_text
                                                                        else {})} for r in results]
        return {"id": rid, "model": served_name,
                "usage": {"prompt_tokens": usage.prompt_tokens,
                          "total_tokens": usage.prompt_tokens + usage.generated_tokens},
                "results": [{"index": r.index, "relevance_score": r.relevance_score,
                             **({"document": {"text": r.document}} if req.return_documents else {})}
                            for r in results],
                "meta": _rerank_meta(opts, ranking, usage)}

    @app.post("/v1/score", responses=RETRIEVAL_RESPONSES)
    @app.post("/score", include_in_schema=False)
    async def score(req: P.ScoreRequest, raw: Request) -> dict[str, Any]:
        """vLLM's score: 1:1, 1:N (one rerank of the N in input order) or N:N (one per pair, run together)."""
        check_model(req.model)
        first, second = req.pairs()
        names = ("text_1", "text_2") if req.text_1 is not None else ("queries", "documents")
        if (len(second) == 1 or len(first) > 1) and req.method in ("listwise", "pairwise"):
            raise APIError(400, f"method {req.method} compares documents with each other, and here each "
                           f"{names[0]} has one {names[1]} to score; use icr, pointwise or embedding", "method")
        opts = rerank_options(req)
        rid, usage = P.new_id("score"), Usage()
        plans = ([reranker().plan(first[0], second, opts)] if len(first) == 1 else
                 [reranker().plan(q, [d], opts) for q, d in zip(first, second)])
        sent_as = {"attention_layers": "layers", "query": names[0], "documents": names[1]}
        rankings = await run_plan(_together(plans), rid, raw, usage, sent_as)
        scores = rankings[0].scores if len(first) == 1 else [r.scores[0] for r in rankings]
        return {"id": rid, "object": "list", "created": int(time.time()), "model": served_name,
                "data": [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)],
                "usage": P.usage(usage.prompt_tokens, usage.generated_tokens)}

    return app


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "model": P.ErrorResponse}


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _error("Invalid request: the message names the field (`param`) and the accepted values"),
    401: _error("Missing or wrong API key (servers started with --api-key; /health stays open)"),
    404: _error("Unknown model or route"),
    413: _error("Request body over --max-request-bytes"),
    500: _error("The engine failed this request; other requests were not affected"),
}
RETRIEVAL_RESPONSES: dict[int | str, dict[str, Any]] = {
    503: _error("The server is shutting down and ended this request"),
}
GENERATION_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "A JSON response, or with `stream: true` server-sent events ending in `data: [DONE]`",
          "content": {"text/event-stream": {}}},
    503: _error("The server is shutting down and ended this request"),
}


def _openapi_without_422(app: FastAPI) -> None:
    """FastAPI documents 422 for validation errors; ember answers them with 400 (as OpenAI does)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _error_handlers(app: FastAPI) -> None:
    """Every error leaves as OpenAI's {"error": {message, type, param, code}}."""

    def error(status: int, message: str, param: str | None = None, type_: str = "invalid_request_error",
              code: str | None = None) -> JSONResponse:
        return JSONResponse(P.error_body(message, type_, param, code), status_code=status)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return error(e.status, e.message, e.param, e.type, e.code)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        # Of a union's alternatives (a string, or a list of parts), the error our own check raised says most,
        # then one that broke a limit, rather than the alternatives' "should be a valid string".
        ranked = sorted(errors, key=lambda x: (x.get("type") not in ("refused", "value_error"),
                                               str(x.get("type")).endswith("_type")))
        first = ranked[0] if ranked else {}
        if first.get("type") == "json_invalid":
            return error(400, f"malformed JSON body: {first.get('ctx', {}).get('error', 'cannot parse')}")
        loc = [str(x) for x in first.get("loc", ()) if x != "body" and re.fullmatch(r"\w+", str(x))]
        if first.get("type") == "refused":  # a model's check that names one of its fields
            loc.append(first["ctx"]["field"])
        param = ".".join(loc) or None
        msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
        return error(400, f"{param or 'body'}: {msg}", param)

    @app.exception_handler(HTTPException)
    async def _http(_: Request, e: HTTPException) -> JSONResponse:
        cause, message = e.__cause__, str(e.detail)
        if isinstance(cause, UnicodeDecodeError):
            message = "the body is not valid UTF-8; send UTF-8 encoded JSON"
        elif isinstance(cause, RecursionError):
            message = "the JSON body is nested too deeply"
        elif e.status_code == 404:
            message = "no such route; see /docs for the API (e.g. POST /v1/chat/completions)"
        elif e.status_code == 405:
            message = f"method not allowed here ({message})"
        response = error(e.status_code, message, type_="invalid_request_error" if e.status_code < 500 else
                         "internal_server_error", code=str(e.status_code))
        response.headers.update(e.headers or {})  # a 405's Allow
        return response

    @app.exception_handler(EmberError)
    async def _ember_error(_: Request, e: EmberError) -> JSONResponse:
        return error(400, str(e), getattr(e, "param", None))

    @app.exception_handler(RequestFailedError)
    async def _failed(_: Request, e: RequestFailedError) -> JSONResponse:
        return error(500, str(e), type_="internal_server_error")

    @app.exception_handler(ServerShuttingDown)
    async def _shutdown(_: Request, e: ServerShuttingDown) -> JSONResponse:
        return error(503, str(e), type_="service_unavailable", code="shutting_down")

    @app.exception_handler(ClientDisconnected)
    async def _gone(_: Request, e: ClientDisconnected) -> Response:
        return Response(status_code=499)  # nobody reads it; nginx's code for "client closed request"


def _messages(messages: list[P.ChatMessage], names: bool = True) -> list[dict[str, Any]]:
    """The messages as the chat template reads them (a name goes to the template, as in transformers; an
    assistant's tool calls with their arguments as objects, as Hugging Face templates expect)."""
    return [{"role": m.role if m.role != "developer" else "system", "content": m.text(),
             **({"name": m.name} if names and m.name is not None else {}),
             **({"tool_calls": [{"type": "function", "function": {"name": c.function.name,
                                                                   "arguments": _arguments(c.function.arguments)}}
                                for c in m.tool_calls]} if m.tool_calls else {}),
             **({"tool_call_id": m.tool_call_id} if m.tool_call_id is not None else {})} for m in messages]


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _tool_plan(req: P.ChatCompletionRequest) -> ToolPlan | None:
    """The request's tools, unless it has none or chose none."""
    if not req.tools or req.tool_choice == "none":
        return None
    choice = req.tool_choice
    name = choice.function.name if isinstance(choice, P.NamedToolChoice) else choice or "auto"
    return ToolPlan(_tool_dicts(req.tools), name, req.parallel_tool_calls is not False)


def _tool_dicts(tools: list[P.Tool]) -> list[dict[str, Any]]:
    return [t.model_dump(exclude_none=True) for t in tools]


def log_user(rid: str, req: P._Sampling | P.EmbeddingRequest) -> None:
    """OpenAI's `user` (`safety_identifier`) names the end user behind a request, for the operator: logged."""
    who = getattr(req, "safety_identifier", None) or req.user
    if who:
        log.info("%s: user %.200r", rid, who)


@contextmanager
def _named_as_sent(sent_as: dict[str, str]) -> Iterator[None]:
    """Errors name the engine's parameter; the request may have sent it under another name (chat's
    top_logprobs is the engine's logprobs): the 400 names the field sent."""
    try:
        yield
    except (APIError, InvalidParameterError) as e:
        param = getattr(e, "param", None)
        if param not in sent_as:
            raise
        message = re.sub(rf"^{param}\b", sent_as[param], e.message if isinstance(e, APIError) else str(e))
        raise APIError(getattr(e, "status", 400), message, sent_as[param]) from None


def _structured(req: P._Sampling) -> tuple[StructuredOutputsParams | None, str | None]:
    """The request's structured-output constraint and the field that carried it (at most one may)."""
    rf, so = req.response_format, req.structured_outputs
    given = {
        "response_format": (None if rf is None or rf.type == "text" else
                            dict(json_object=True) if rf.type == "json_object" else
                            dict(json=rf.json_schema.schema_)),  # type: ignore[union-attr]
        "guided_json": None if req.guided_json is None else dict(json=req.guided_json),
        "guided_regex": None if req.guided_regex is None else dict(regex=req.guided_regex),
        "guided_choice": None if req.guided_choice is None else dict(choice=tuple(req.guided_choice)),
        "guided_grammar": None if req.guided_grammar is None else dict(grammar=req.guided_grammar),
        "structured_outputs": None if so is None else dict(json=so.json_, regex=so.regex, grammar=so.grammar,
                                                           choice=tuple(so.choice) if so.choice else None,
                                                           json_object=bool(so.json_object)),
    }
    sent = [(field, kw) for field, kw in given.items() if kw is not None]
    if not sent:
        return None, None
    if len(sent) > 1:
        raise APIError(400, f"send one structured-output constraint, not {' and '.join(f for f, _ in sent)}",
                       sent[1][0])
    field, kw = sent[0]
    try:
        return StructuredOutputsParams(**kw), field
    except InvalidParameterError as e:
        raise APIError(400, str(e), field) from None


def _params(req: P._Sampling, max_tokens: int | None, logprobs: int | None,
            structured: StructuredOutputsParams | None = None) -> SamplingParams:
    try:
        return SamplingParams(
            n=req.n, temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k if req.top_k is not None else -1,
            min_p=req.min_p or 0.0, repetition_penalty=req.repetition_penalty or 1.0,
            presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty, seed=req.seed,
            max_tokens=max_tokens, min_tokens=req.min_tokens, stop=req.stop, stop_token_ids=req.stop_token_ids,
            ignore_eos=req.ignore_eos, logprobs=logprobs, skip_special_tokens=req.skip_special_tokens,
            include_stop_str_in_output=req.include_stop_str_in_output, logit_bias=_logit_bias(req.logit_bias),
            structured_outputs=structured)
    except InvalidParameterError as e:
        raise APIError(400, str(e), e.param) from None


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    """OpenAI's logit_bias has token ids as JSON object keys, so strings."""
    if not bias:
        return None
    try:
        return {int(k): v for k, v in bias.items()}
    except ValueError:
        raise APIError(400, "logit_bias keys must be token ids (integers)", "logit_bias") from None


def _completion_prompts(prompt: Any) -> list[Any]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError(400, "prompt must not be empty", "prompt")
    if all(isinstance(p, int) for p in prompt):
        return [{"prompt_token_ids": list(prompt)}]
    return [p if isinstance(p, str) else {"prompt_token_ids": p} for p in prompt]


def _embedding_inputs(value: Any) -> list[Prompt]:
    """OpenAI's `input`: a string, strings, token ids or lists of token ids (pydantic checked which)."""
    if isinstance(value, str):
        return [value]
    if all(isinstance(t, int) for t in value):
        return [{"prompt_token_ids": list(value)}]
    return [v if isinstance(v, str) else {"prompt_token_ids": v} for v in value]


def _vector(v: torch.Tensor, encoding: str | None) -> list[float] | str:
    """An embedding as JSON floats, or (OpenAI's and vLLM's base64) its little-endian float32 bytes."""
    v = v.detach().float().cpu()
    if encoding == "base64":
        return base64.b64encode(v.numpy().astype("<f4").tobytes()).decode("ascii")
    return v.tolist()


def _rerank_meta(opts: RerankOptions, ranking: Ranking, usage: Usage) -> dict[str, Any]:
    """Cohere's meta (billed_units, warnings), and what the ranking cost and did (ember's)."""
    warnings = []
    if ranking.truncated:
        cut = ranking.truncated
        warnings.append(f"document{'s' * (len(cut) > 1)} {', '.join(map(str, cut))} "
                        f"{'were' if len(cut) > 1 else 'was'} cut to {opts.max_tokens_per_doc} tokens "
                        "(max_tokens_per_doc)")
    if ranking.malformed:
        warnings.append(f"{ranking.malformed} of {ranking.generations} generated rankings were not well formed; "
                        "the documents they left out kept their earlier order")
    return {"billed_units": {"input_tokens": usage.prompt_tokens, "output_tokens": usage.generated_tokens},
            "warnings": warnings, "method": opts.method, "truncated_documents": ranking.truncated,
            "windows": ranking.windows, "requests": usage.requests, "forward_passes": usage.forward_passes,
            "cached_tokens": usage.prompt_tokens - usage.computed_tokens}


@dataclass
class _Done:
    value: Any


def _first_step(plan: Plan[Any]) -> list[Job] | _Done:
    """A plan's first batch, or its result if it needs none (a StopIteration cannot cross a future)."""
    try:
        return next(plan)
    except StopIteration as done:
        return _Done(done.value)


def _resumed(first: list[Job], plan: Plan[T]) -> Plan[T]:
    """The rest of a plan whose first batch was taken already."""
    outs = yield first
    while True:
        try:
            jobs = plan.send(outs)
        except StopIteration as done:
            return done.value
        outs = yield jobs


def _together(plans: list[Plan[T]]) -> Plan[list[T]]:
    """Plans side by side: each round is one batch, every unfinished plan's next jobs (so the engine runs
    them in the same steps); the result is their results in order."""
    results: list[Any] = [None] * len(plans)
    batches: dict[int, list[Job]] = {}

    def advance(i: int, outs: list[RequestOutput] | None) -> None:
        try:
            batches[i] = plans[i].send(outs)  # type: ignore[arg-type]  (None starts it)
        except StopIteration as done:
            results[i] = done.value
            batches.pop(i, None)

    for i in range(len(plans)):
        advance(i, None)
    while batches:
        current = list(batches.items())
        outs = yield [job for _, jobs in current for job in jobs]
        pos = 0
        for i, jobs in current:
            advance(i, outs[pos:pos + len(jobs)])
            pos += len(jobs)
    return results


async def _collect(streams: list[RequestStream], raw: Request) -> list[RequestOutput]:
    """Run non-streaming requests to the end; if the client leaves first, all of them are aborted."""

    async def until_disconnected() -> None:
        while (await raw.receive())["type"] != "http.disconnect":
            pass
        for s in streams:
            s.abort(ClientDisconnected())

    watcher = asyncio.create_task(until_disconnected())
    try:
        return [await _last(s) for s in streams]
    finally:
        watcher.cancel()
        for s in streams:
            s.abort()


async def _last(stream: RequestStream) -> RequestOutput:
    out = None
    async for out in stream:
        pass
    assert out is not None and out.finished
    return out


# Characters Python's str.splitlines (and so httpx's iter_lines) breaks lines at, beyond \r and \n, that JSON
# leaves raw outside ASCII: escaped, an event stays one line for every SSE reader (a generated token can hold one).
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse_data(event: dict[str, Any]) -> str:
    """One server-sent event: the JSON on a single line, non-ASCII text kept as UTF-8."""
    return f"data: {json.dumps(event, ensure_ascii=False).translate(_LINE_BREAKS)}\n\n"


def _sse(events: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield sse_data(event)
        except EmberError as e:
            yield f"data: {json.dumps(P.error_body(str(e), param=getattr(e, 'param', None)))}\n\n"
        except RequestFailedError as e:
            yield f"data: {json.dumps(P.error_body(str(e), 'internal_server_error'))}\n\n"
        except ServerShuttingDown as e:
            yield f"data: {json.dumps(P.error_body(str(e), 'service_unavailable', code='shutting_down'))}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _chat_stream(rid: str, model: str, stream: RequestStream, state: ChoiceState,
                       req: P.ChatCompletionRequest) -> AsyncIterator[dict[str, Any]]:
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    try:
        for i in range(state.n):
            yield chat_chunk(rid, model, i, {"role": "assistant", "content": ""}, None, None, include_usage)
        out = None
        async for out in stream:
            for event in state.chat_deltas(rid, model, out, bool(req.logprobs), include_usage):
                yield event
        if include_usage and out is not None:
            yield P.envelope("chat.completion.chunk", rid, model, [],
                             usage=P.usage(len(out.prompt_token_ids), state.completion_tokens(out),
                                           out.num_cached_tokens))
    finally:  # no await here: a cancelled task (the client left) raises again at every await
        stream.abort()


class _Tap:
    """A RequestStream whose last output is kept (the reply a memory session stores once it has streamed)."""

    def __init__(self, stream: RequestStream) -> None:
        self.stream, self.last = stream, None

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        async for out in self.stream:
            self.last = out
            yield out

    def abort(self) -> None:
        self.stream.abort()


async def _session_stream(rid: str, model: str, stream: RequestStream, state: ChoiceState,
                          req: P.ChatCompletionRequest, store: Any, info: dict[str, Any]
                          ) -> AsyncIterator[dict[str, Any]]:
    """_chat_stream, then the turn stored and a last chunk carrying `memory`."""
    tap = _Tap(stream)
    async for event in _chat_stream(rid, model, tap, state, req):  # type: ignore[arg-type]
        yield event
    if tap.last is not None and tap.last.finished:
        await store(tap.last.outputs[0].text)
        yield {**P.envelope("chat.completion.chunk", rid, model, []), "memory": info}


async def _completion_stream(rid: str, model: str, streams: list[RequestStream], states: list[ChoiceState],
                             req: P.CompletionRequest) -> AsyncIterator[dict[str, Any]]:
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    # Bounded: a slow client makes the pumps wait, and then each stream keeps only its newest output.
    queue: asyncio.Queue = asyncio.Queue(maxsize=len(streams))

    async def pump(i: int) -> None:
        try:
            async for out in streams[i]:
                await queue.put((i, out))
        except Exception as e:  # hand errors to the consumer
            await queue.put((i, e))

    tasks = [asyncio.create_task(pump(i)) for i in range(len(streams))]
    last: dict[int, RequestOutput] = {}
    try:
        while len(last) < len(streams):
            i, item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            for event in states[i].completion_deltas(rid, model, item, include_usage):
                yield event
            if item.finished:
                last[i] = item
        if include_usage:
            prompt = sum(len(o.prompt_token_ids) for o in last.values())
            completion = sum(states[i].completion_tokens(o) for i, o in last.items())
            cached = sum(o.num_cached_tokens for o in last.values())
            yield P.envelope("text_completion", rid, model, [], usage=P.usage(prompt, completion, cached))
    finally:  # no await here: a cancelled task (the client left) raises again at every await
        for s in streams:
            s.abort()
        for t in tasks:
            t.cancel()
