"""AsyncEngine: the LLMEngine stepping in its own thread, with requests streamed to asyncio callers."""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, TypeVar

from ember.engine.engine import LLMEngine, Prompt, Request
from ember.engine.outputs import EngineState, RequestOutput
from ember.engine.sampling_params import SamplingParams

log = logging.getLogger("ember")
T = TypeVar("T")
# Consecutive failures of the loop itself (outside the per-request isolation of LLMEngine.step) after which
# every request in flight is failed, so the engine starts again from a clean state instead of spinning.
LOOP_FAILURES_BEFORE_RESET = 3


class RequestFailedError(RuntimeError):
    """The engine failed this request (the others ran on), or stopped before it finished."""


@dataclass
class _Stream:
    """Where the engine thread leaves a request's newest output for its asyncio consumer."""

    loop: asyncio.AbstractEventLoop
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    latest: RequestOutput | BaseException | None = None
    arrival: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    last_token: float | None = None
    tokens: int = 0
    ended: bool = False  # an error was put: later outputs (an abort racing a step) are dropped

    def put(self, item: RequestOutput | BaseException) -> None:  # on the consumer's loop
        if self.ended:
            return
        if isinstance(item, BaseException) and isinstance(self.latest, RequestOutput) and self.latest.finished:
            self.ended = True  # finished before the error (a shutdown's cut, say): its client gets the result
            return
        self.ended = isinstance(item, BaseException)
        self.latest = item
        self.ready.set()


class RequestStream:
    """A request's outputs, as an async iterator ending with the finished one.

    Each RequestOutput holds everything generated so far, so a consumer that falls behind gets the newest
    one and skips the rest: nothing is lost and nothing piles up. Closing the stream early aborts the
    request and frees its blocks.
    """

    def __init__(self, engine: "AsyncEngine", request_id: str, stream: _Stream) -> None:
        self.request_id = request_id
        self._engine, self._stream, self._done = engine, stream, False

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        await self._stream.ready.wait()
        self._stream.ready.clear()
        item, self._stream.latest = self._stream.latest, None
        if isinstance(item, BaseException):
            self._close()
            raise item
        assert item is not None
        if item.finished:
            self._close()
        return item

    async def aclose(self) -> None:
        """Abort the request if it has not finished (safe to call any number of times)."""
        self.abort()

    def abort(self, error: BaseException | None = None) -> None:
        """Abort the request if it has not finished; the stream's consumer then raises `error`, or, without
        one, the stream ends."""
        if not self._done:
            self._engine.abort(self.request_id, error)
            self._done = error is None

    def _close(self) -> None:
        self._done = True
        self._engine._streams.pop(self.request_id, None)


class AsyncEngine:
    """Only the engine thread touches LLMEngine state; other threads talk to it through an inbox."""

    def __init__(self, engine: LLMEngine, observer: Any = None) -> None:
        self._setup(engine, observer)
        self._thread = threading.Thread(target=self._loop, name="ember-engine", daemon=True)

    def _setup(self, engine: LLMEngine, observer: Any) -> None:
        self.engine = engine
        self.observer = observer  # gets on_first_token / on_token / on_finish callbacks (metrics)
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        # Tokenizing and templating run here, off the event loop: a long prompt must not stall other clients.
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ember-prepare")
        self.state: EngineState = engine.state()  # replaced (never mutated) by the engine thread; read by any thread

    @classmethod
    def load(cls, factory: Callable[[], LLMEngine], observer: Any = None) -> "AsyncEngine":
        """Build the LLMEngine inside the engine thread, which then steps it (already started);
        errors while loading are raised here.

        All of torch's OpenMP work then runs on one thread. Loading on the caller's thread would leave
        a second OpenMP team behind, and with more OpenMP threads than cores libgomp stops spin-waiting:
        every parallel region then puts its workers to sleep and wakes them (measured: a decode token
        12 ms when loaded in the stepping thread, 19 ms otherwise, 200x the context switches)."""
        self = cls.__new__(cls)
        ready, errors = threading.Event(), []

        def run() -> None:
            try:
                self._setup(factory(), observer)
            except BaseException as e:  # handed to the caller
                errors.append(e)
                return
            finally:
                ready.set()
            self._loop()

        self._thread = threading.Thread(target=run, name="ember-engine", daemon=True)
        self._thread.start()
        ready.wait()
        if errors:
            raise errors[0]
        return self

    def start(self) -> None:
        """Start stepping (engines made by `load` are already running)."""
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)
        self._pool.shutdown(wait=False, cancel_futures=True)
        for stream in list(self._streams.values()):
            self._put(stream, RequestFailedError("the engine stopped before this request finished"))

    @property
    def num_requests(self) -> int:
        return len(self._streams)

    async def run_blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) on the preparation threads (tokenizing, chat templates), not on the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def prepare(self, items: list[tuple[str, Prompt, SamplingParams]]) -> list[Request]:
        """Validate and tokenize requests off the event loop; raises the first request's error, if any."""
        return await self.run_blocking(lambda: [self.engine.prepare(*item) for item in items])

    def submit(self, reqs: list[Request]) -> list[RequestStream]:
        """Queue prepared requests, all in the same engine step."""
        loop = asyncio.get_running_loop()
        streams = []
        for req in reqs:
            self._streams[req.request_id] = stream = _Stream(loop)
            streams.append(RequestStream(self, req.request_id, stream))
        self._send("add", reqs)
        return streams

    async def add_request(self, request_id: str, prompt: Prompt, params: SamplingParams) -> RequestStream:
        """Validate (raising before anything is queued) and queue one request."""
        return self.submit(await self.prepare([(request_id, prompt, params)]))[0]

    def abort(self, request_id: str, error: BaseException | None = None) -> None:
        """Abort a request in flight; its consumer, if waiting, raises `error`."""
        stream = self._streams.pop(request_id, None)
        if stream is None:
            return
        self._send("abort", request_id)
        if error is not None:
            self._put(stream, error)

    def abort_all(self, error: BaseException) -> None:
        """Abort every request in flight, each consumer raising `error` (a server shutting down)."""
        for request_id in list(self._streams):
            self.abort(request_id, error)

    async def generate(self, request_id: str, prompt: Prompt, params: SamplingParams
                       ) -> AsyncIterator[RequestOutput]:
        """Yield the request's output as it advances; the last one is finished. Leaving early aborts it."""
        stream = await self.add_request(request_id, prompt, params)
        try:
            async for out in stream:
                yield out
        finally:
            await stream.aclose()

    def _send(self, kind: str, payload: Any) -> None:
        self._inbox.put((kind, payload))
        self._wake.set()

    # -- engine thread ----------------------------------------------------------------------

    def _loop(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                self._tick()
                failures = 0
            except Exception as e:  # outside LLMEngine.step's per-request isolation: a bug in the loop itself
                failures += 1
                log.exception("engine loop error (%d in a row)", failures)
                if failures >= LOOP_FAILURES_BEFORE_RESET:
                    self._fail_all(RequestFailedError(f"internal engine error: {type(e).__name__}: {e}"))
                    failures = 0

    def _tick(self) -> None:
        self._drain()
        if not self.engine.has_unfinished_requests():
            self._wake.wait(timeout=0.5)
            self._wake.clear()
            return
        for out in self.engine.step():
            self._deliver(out)
        self._refresh_counts()

    def _drain(self) -> None:
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                for req in payload:
                    self._admit(req)
            else:
                self.engine.abort_request(payload)
                self._observe("on_abort")
        self._refresh_counts()  # an abort can be the last event before going idle

    def _admit(self, req: Request) -> None:
        stream = self._streams.get(req.request_id)
        if stream is None:  # the caller left before its request got here
            return
        try:
            self.engine.admit(req)
        except Exception as e:  # e.g. a request id already in use: this request's error alone
            self._put(stream, e)

    def _refresh_counts(self) -> None:
        self.state = self.engine.state()

    def _deliver(self, out: RequestOutput) -> None:
        stream = self._streams.get(out.request_id)
        if stream is None:  # the caller went away between steps
            if not out.finished:
                self.engine.abort_request(out.request_id)
            return
        now = time.monotonic()
        tokens = sum(len(c.token_ids) for c in out.outputs)
        if tokens > stream.tokens:
            if stream.last_token is None:
                stream.first_token = now
                self._observe("on_first_token", now - stream.arrival)
            else:
                self._observe("on_token", now - stream.last_token)
            stream.last_token, stream.tokens = now, tokens
        if out.finished:
            ttft = None if stream.first_token is None else stream.first_token - stream.arrival
            self._observe("on_finish", out, now - stream.arrival, ttft)
        self._put(stream, RequestFailedError(f"the engine failed this request ({out.error}); other requests "
                                             "were not affected") if out.error else out)

    def _observe(self, event: str, *args: Any) -> None:
        if self.observer is None:
            return
        try:
            getattr(self.observer, event)(*args)
        except Exception:  # metrics must never take the engine down
            log.exception("metrics observer failed on %s", event)

    @staticmethod
    def _put(stream: _Stream, item: RequestOutput | BaseException) -> None:
        try:
            stream.loop.call_soon_threadsafe(stream.put, item)
        except RuntimeError:  # the consumer's event loop is closed: nobody is listening
            pass

    def _fail_all(self, error: Exception) -> None:
        for rid in list(self.engine.requests):
            self.engine.abort_request(rid)
        for stream in list(self._streams.values()):
            self._put(stream, error)
