"""`ember serve`: load the model, start the engine thread and run uvicorn; SIGTERM drains, a second signal
(or the end of the grace period) ends what is left with an error the clients can read."""
from __future__ import annotations

import asyncio
import errno
import logging
import socket
from pathlib import Path
from typing import Any

from ember.engine.async_engine import AsyncEngine
from ember.engine.outputs import RequestOutput
from ember.errors import EmberError
from ember.server.app import ServerLimits, ServerShuttingDown, build_app
from ember.server.metrics import Metrics

log = logging.getLogger("ember")


def serve(engine_kwargs: dict[str, Any], model: str | None, host: str, port: int, api_key: str | None,
          served_name: str | None = None, limits: ServerLimits | None = None, shutdown_grace: float = 60.0,
          pooling: str = "last", memory_db: str | None = None, ui: bool = True,
          memory_embedder: str | None = None) -> None:
    """Load the model, start the engine thread and run uvicorn until SIGINT/SIGTERM. `pooling`: the default
    pooling of /v1/embeddings (last or mean); `memory_db`: the memory sessions' SQLite file; `ui`: the chat
    page at GET /; `memory_embedder`: --memory-embedder (loaded when memory is first used)."""
    import uvicorn

    from ember.engine.engine import EngineArgs, LLMEngine
    from ember.loading.registry import DEFAULT_MODEL

    name = served_name or default_name(model or DEFAULT_MODEL)
    metrics = Metrics()
    sock = bind(host, port)  # before the model loads: a busy port fails at once, not after the load
    try:
        engine = AsyncEngine.load(lambda: LLMEngine(EngineArgs(model=model, **engine_kwargs)),
                                  observer=RequestLog(metrics))
    except BaseException:
        sock.close()
        raise
    app = build_app(engine, name, metrics, api_key, limits, pooling, memory_db, ui, memory_embedder)
    log.info("serving %s on http://%s:%d/v1 (OpenAI-compatible)%s%s", name, host, port,
             " with an API key" if api_key else "", f"; chat page at http://{host}:{port}/" if ui else "")
    # uvicorn's own deadline only backs ours up: at shutdown_grace the requests still running end with an
    # error event or a 503, which lets their connections close before uvicorn would cancel them.
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=shutdown_grace + 5)
    try:
        _server(config, engine, shutdown_grace).run(sockets=[sock])
    finally:
        engine.stop()
        sock.close()
    log.info("server stopped")


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (uvicorn listens on it), or an EmberError naming the port."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise EmberError(f"cannot listen on {host}:{port}: {e.strerror or e}; check --host") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise EmberError(f"port {port} on {host} is already in use (another server?); choose another with "
                             "--port") from None
        raise EmberError(f"cannot listen on {host}:{port}: {e.strerror or e}; check --host and --port") from None
    return sock


def _server(config: Any, engine: AsyncEngine, grace: float) -> Any:
    """uvicorn's Server, with ember's shutdown.

    The first SIGTERM/SIGINT stops accepting and lets requests in flight finish for `grace` seconds; then
    (or at once, on a second signal) each one still running ends with an error its client can read, and the
    process exits 0. (uvicorn alone ignores a second SIGTERM, cuts streams without a word after its timeout,
    and re-raises the signal after draining, which makes the exit status 143.)"""
    import contextlib

    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Any:
            with super().capture_signals():
                yield
                getattr(self, "_captured_signals", []).clear()

        def handle_exit(self, sig: int, frame: Any) -> None:
            loop = asyncio.get_running_loop()
            if not self.should_exit:
                log.info("shutting down: finishing requests in flight (at most %.0f s; signal again to stop now)",
                         grace)
                loop.call_later(grace, self._cut, f"the server shut down before this request finished "
                                                  f"(grace period of {grace:.0f} s)")
                super().handle_exit(sig, frame)
                return
            log.info("second signal: ending requests in flight now")
            # Not inline: the handler may have interrupted this thread inside the engine's non-reentrant locks.
            loop.call_soon_threadsafe(self._cut, "the server was shut down (a second signal) before this request "
                                                 "finished")
            loop.call_later(0.2, setattr, self, "force_exit", True)  # time for the error events to go out

        def _cut(self, why: str) -> None:
            engine.abort_all(ServerShuttingDown(why))

    return Server(config)


def default_name(model: str) -> str:
    path = Path(model)
    return path.stem if path.suffix == ".gguf" else path.name


class RequestLog:
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
                 "error" if out.error else ",".join(sorted({c.finish_reason or "?" for c in out.outputs})))
