"""FastAPI app: OpenAI-compatible chat/completions (streaming too), models, tokenize, health, metrics."""
from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from ember.engine.async_engine import AsyncEngine, EngineDeadError
from ember.engine.outputs import RequestOutput
from ember.engine.sampling_params import SamplingParams
from ember.errors import EmberError, InvalidParameterError
from ember.server import protocol as P
from ember.server.metrics import Metrics
from ember.server.render import ChoiceState, chat_chunk, chat_final, completion_chunk, completion_final

log = logging.getLogger("ember")


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type_: str = "invalid_request_error",
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code


def build_app(engine: AsyncEngine, served_name: str, metrics: Metrics, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="ember", description="OpenAI-compatible LLM server")
    tok = engine.engine.tokenizer
    max_len = engine.engine.max_model_len

    def error(status: int, message: str, param: str | None = None, type_: str = "invalid_request_error",
              code: str | None = None) -> JSONResponse:
        return JSONResponse(P.error_body(message, type_, param, code), status_code=status)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return error(e.status, e.message, e.param, e.type, e.code)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        if first.get("type") == "json_invalid":
            return error(400, f"malformed JSON body: {first.get('ctx', {}).get('error', 'cannot parse')}")
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        return error(400, f"{param or 'body'}: {first.get('msg', 'invalid value')}", param)

    @app.exception_handler(EmberError)
    async def _ember_error(_: Request, e: EmberError) -> JSONResponse:
        return error(400, str(e), getattr(e, "param", None))

    @app.exception_handler(EngineDeadError)
    async def _engine_error(_: Request, e: EngineDeadError) -> JSONResponse:
        return error(500, str(e), type_="internal_server_error")

    @app.middleware("http")
    async def _auth(request: Request, call_next: Any) -> Any:
        if api_key and request.url.path.startswith("/v1"):
            header = request.headers.get("authorization", "")
            if header != f"Bearer {api_key}":
                return error(401, "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                             code="invalid_api_key")
        return await call_next(request)

    def check_model(name: str | None) -> None:
        if name not in (None, served_name):
            raise APIError(404, f"the model {name!r} does not exist; this server serves {served_name!r}",
                           "model", "NotFoundError", "model_not_found")

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [P.ModelCard(id=served_name, max_model_len=max_len).model_dump()]}

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(engine.engine, engine.num_running, engine.num_waiting),
                                 media_type="text/plain; version=0.0.4")

    @app.post("/tokenize")
    async def tokenize(req: P.TokenizeRequest) -> dict[str, Any]:
        check_model(req.model)
        if req.messages is not None:
            ids = tok.apply_chat_template(_messages(req.messages), req.add_generation_prompt, tokenize=True)
        elif req.prompt is not None:
            ids = tok.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        else:
            raise APIError(400, "give 'prompt' or 'messages'", "prompt")
        return {"tokens": ids, "count": len(ids), "max_model_len": max_len}

    @app.post("/detokenize")
    async def detokenize(req: P.DetokenizeRequest) -> dict[str, Any]:
        check_model(req.model)
        bad = [t for t in req.tokens if not 0 <= t < tok.vocab_size]
        if bad:
            raise APIError(400, f"token ids {bad[:5]} are outside the vocabulary [0, {tok.vocab_size})", "tokens")
        return {"prompt": tok.decode(req.tokens, skip_special_tokens=False)}

    @app.post("/v1/chat/completions")
    async def chat(req: P.ChatCompletionRequest, raw: Request) -> Any:
        check_model(req.model)
        if not req.messages:
            raise APIError(400, "messages must be a non-empty list", "messages")
        ids = tok.apply_chat_template(_messages(req.messages), req.add_generation_prompt, tokenize=True)
        top = req.top_logprobs if req.logprobs else None
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        params = _params(req, req.max_completion_tokens or req.max_tokens,
                         (top or 0) if req.logprobs else None)
        rid = P.new_id("chatcmpl")
        gen = engine.generate(rid, {"prompt_token_ids": ids}, params)
        first = await _first(gen)  # validation errors surface here, before any byte is sent
        state = ChoiceState(tok, params.n, top_logprobs=top or 0)
        if req.stream:
            return _sse(_chat_stream(rid, served_name, first, gen, state, req), rid)
        out = await _last(first, gen, raw)
        return chat_final(rid, served_name, out, state, bool(req.logprobs))

    @app.post("/v1/completions")
    async def completions(req: P.CompletionRequest, raw: Request) -> Any:
        check_model(req.model)
        if req.suffix:
            raise APIError(400, "suffix is not supported by this server", "suffix")
        if req.best_of not in (None, req.n):
            raise APIError(400, "best_of other than n is not supported", "best_of")
        prompts = _completion_prompts(req.prompt)
        params = _params(req, req.max_tokens, req.logprobs)
        if req.echo and req.logprobs is not None:
            params.prompt_logprobs = req.logprobs
        rid = P.new_id("cmpl")
        gens = [engine.generate(f"{rid}-{i}", p, params) for i, p in enumerate(prompts)]
        firsts = []
        try:
            for g in gens:
                firsts.append(await _first(g))
        except BaseException:
            for g in gens[len(firsts):] + gens[:len(firsts)]:
                await g.aclose()
            raise
        states = [ChoiceState(tok, params.n, offset=i * params.n) for i in range(len(prompts))]
        if req.stream:
            return _sse(_completion_stream(rid, served_name, firsts, gens, states, req), rid)
        outs = [await _last(f, g, raw) for f, g in zip(firsts, gens)]
        return completion_final(rid, served_name, outs, states, req.echo, req.logprobs)

    return app


def _messages(messages: list[P.ChatMessage]) -> list[dict[str, str]]:
    return [{"role": m.role if m.role != "developer" else "system", "content": m.text()} for m in messages]


def _params(req: P._Sampling, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
    try:
        return SamplingParams(
            n=req.n, temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k if req.top_k is not None else -1,
            min_p=req.min_p or 0.0, repetition_penalty=req.repetition_penalty or 1.0,
            presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty, seed=req.seed,
            max_tokens=max_tokens, min_tokens=req.min_tokens, stop=req.stop, stop_token_ids=req.stop_token_ids,
            ignore_eos=req.ignore_eos, logprobs=logprobs, skip_special_tokens=req.skip_special_tokens,
            include_stop_str_in_output=req.include_stop_str_in_output)
    except InvalidParameterError as e:
        raise APIError(400, str(e), e.param) from None


def _completion_prompts(prompt: Any) -> list[Any]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError(400, "prompt must not be empty", "prompt")
    if all(isinstance(p, int) for p in prompt):
        return [{"prompt_token_ids": list(prompt)}]
    return [p if isinstance(p, str) else {"prompt_token_ids": p} for p in prompt]


async def _first(gen: AsyncIterator[RequestOutput]) -> RequestOutput:
    return await gen.__anext__()


async def _last(first: RequestOutput, gen: Any, raw: Request) -> RequestOutput:
    """Run a non-streaming request to the end, aborting it if the client goes away."""
    out = first
    try:
        while not out.finished:
            if await raw.is_disconnected():
                raise asyncio.CancelledError
            out = await gen.__anext__()
    finally:
        await gen.aclose()
    return out


def _sse(events: AsyncIterator[dict[str, Any]], rid: str) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
        except EmberError as e:
            yield f"data: {json.dumps(P.error_body(str(e)))}\n\n"
        except EngineDeadError as e:
            yield f"data: {json.dumps(P.error_body(str(e), 'internal_server_error'))}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _chat_stream(rid: str, model: str, first: RequestOutput, gen: Any, state: ChoiceState,
                       req: P.ChatCompletionRequest) -> AsyncIterator[dict[str, Any]]:
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    try:
        out = first
        for i in range(state.n):
            yield chat_chunk(rid, model, i, {"role": "assistant", "content": ""}, None, None, include_usage)
        while True:
            for event in state.chat_deltas(rid, model, out, bool(req.logprobs), include_usage):
                yield event
            if out.finished:
                break
            out = await gen.__anext__()
        if include_usage:
            yield P.envelope("chat.completion.chunk", rid, model, [],
                             usage=P.usage(len(out.prompt_token_ids), state.completion_tokens(out)))
    finally:
        await gen.aclose()


async def _completion_stream(rid: str, model: str, firsts: list[RequestOutput], gens: list[Any],
                             states: list[ChoiceState], req: P.CompletionRequest) -> AsyncIterator[dict[str, Any]]:
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int) -> None:
        try:
            out = firsts[i]
            await queue.put((i, out))
            while not out.finished:
                out = await gens[i].__anext__()
                await queue.put((i, out))
        except BaseException as e:  # hand errors to the consumer
            await queue.put((i, e))

    tasks = [asyncio.create_task(pump(i)) for i in range(len(gens))]
    last: dict[int, RequestOutput] = {}
    try:
        while len(last) < len(gens):
            i, item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            for event in states[i].completion_deltas(rid, model, item, req.echo, req.logprobs, include_usage):
                yield event
            if item.finished:
                last[i] = item
        if include_usage:
            prompt = sum(len(o.prompt_token_ids) for o in last.values())
            completion = sum(states[i].completion_tokens(o) for i, o in last.items())
            yield P.envelope("text_completion", rid, model, [], usage=P.usage(prompt, completion))
    finally:
        for t in tasks:
            t.cancel()
        # Let the pumps unwind first: a generator still running inside one cannot be closed.
        await asyncio.gather(*tasks, return_exceptions=True)
        for g in gens:
            await g.aclose()


def serve(engine_kwargs: dict[str, Any], model: str | None, host: str, port: int, api_key: str | None,
          served_name: str | None = None) -> None:
    """Load the model, start the engine thread and run uvicorn until SIGINT/SIGTERM."""
    import uvicorn

    from ember.engine.engine import EngineArgs, LLMEngine
    from ember.loading.registry import DEFAULT_MODEL

    name = served_name or _default_name(model or DEFAULT_MODEL)
    metrics = Metrics()
    engine = AsyncEngine.load(lambda: LLMEngine(EngineArgs(model=model, **engine_kwargs)),
                              observer=_RequestLog(metrics))
    app = build_app(engine, name, metrics, api_key)
    log.info("serving %s on http://%s:%d/v1 (OpenAI-compatible)%s", name, host, port,
             " with an API key" if api_key else "")
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=60)
    try:
        # uvicorn handles SIGTERM/SIGINT: it stops accepting, lets in-flight responses finish
        # (up to the grace period), then returns.
        _Server(config).run()
    finally:
        engine.stop()
    log.info("server stopped")


class _Server:
    """uvicorn's Server, except that a clean shutdown on SIGTERM/SIGINT exits 0.

    (uvicorn re-raises the signal after draining, which makes the exit status 143.)
    """

    def __new__(cls, config: Any) -> Any:
        import contextlib

        import uvicorn

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self) -> Any:
                with super().capture_signals():
                    yield
                    getattr(self, "_captured_signals", []).clear()

        return Server(config)


def _default_name(model: str) -> str:
    from pathlib import Path

    path = Path(model)
    return path.stem if path.suffix == ".gguf" else path.name


class _RequestLog:
    """Metrics observer that also writes one INFO line per finished request."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.on_first_token = metrics.on_first_token
        self.on_token = metrics.on_token
        self.on_abort = metrics.on_abort

    def on_finish(self, out: RequestOutput, seconds: float, ttft: float | None) -> None:
        self.metrics.on_finish(out, seconds, ttft)
        gen = sum(len(c.token_ids) for c in out.outputs)
        log.info("%s: %d prompt tokens (%d cached), %d generated, TTFT %s, total %.2f s, finish %s",
                 out.request_id, len(out.prompt_token_ids), out.num_cached_tokens, gen,
                 "-" if ttft is None else f"{ttft * 1000:.0f} ms", seconds,
                 ",".join(sorted({c.finish_reason or "?" for c in out.outputs})))
