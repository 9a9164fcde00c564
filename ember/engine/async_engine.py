"""AsyncEngine: the LLMEngine stepping in its own thread, with requests streamed to asyncio callers."""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from ember.engine.engine import LLMEngine, Prompt
from ember.engine.outputs import RequestOutput
from ember.engine.sampling_params import SamplingParams

log = logging.getLogger("ember")


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    arrival: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    last_token: float | None = None
    tokens: int = 0


class EngineDeadError(RuntimeError):
    """The engine thread hit an unexpected error while running a request."""


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
        self.num_running = 0
        self.num_waiting = 0

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

    @property
    def num_requests(self) -> int:
        return len(self._streams)

    async def generate(self, request_id: str, prompt: Prompt, params: SamplingParams
                       ) -> AsyncIterator[RequestOutput]:
        """Yield the request's output after every step that advanced it; the last one is finished.

        Validation errors raise before anything is queued. Leaving the iteration early (a client
        disconnecting cancels it) aborts the request and frees its blocks.
        """
        req = self.engine.prepare(request_id, prompt, params)
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._streams[request_id] = stream
        self._send("add", req)
        finished = False
        try:
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._send("abort", request_id)

    def _send(self, kind: str, payload: Any) -> None:
        self._inbox.put((kind, payload))
        self._wake.set()

    # -- engine thread ----------------------------------------------------------------------

    def _loop(self) -> None:
        engine = self.engine
        while not self._stop.is_set():
            self._drain()
            if not engine.has_unfinished_requests():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                outputs = engine.step()
            except Exception as e:  # never leave callers hanging: fail what was running
                log.exception("engine step failed")
                self._fail_all(EngineDeadError(f"internal engine error: {type(e).__name__}: {e}"))
                continue
            for out in outputs:
                self._deliver(out)
            self._refresh_counts()

    def _drain(self) -> None:
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                if payload.request_id in self._streams:
                    self.engine.admit(payload)
            else:
                self.engine.abort_request(payload)
                if self.observer:
                    self.observer.on_abort()
        self._refresh_counts()  # an abort can be the last event before going idle

    def _refresh_counts(self) -> None:
        self.num_running = len(self.engine.scheduler.running)
        self.num_waiting = len(self.engine.scheduler.waiting)

    def _deliver(self, out: RequestOutput) -> None:
        stream = self._streams.get(out.request_id)
        if stream is None:  # the caller went away between steps
            if not out.finished:
                self.engine.abort_request(out.request_id)
            return
        now = time.monotonic()
        tokens = sum(len(c.token_ids) for c in out.outputs)
        if self.observer and tokens > stream.tokens:
            if stream.last_token is None:
                stream.first_token = now
                self.observer.on_first_token(now - stream.arrival)
            else:
                self.observer.on_token(now - stream.last_token)
            stream.last_token, stream.tokens = now, tokens
        if out.finished and self.observer:
            self.observer.on_finish(out, now - stream.arrival,
                                    None if stream.first_token is None else stream.first_token - stream.arrival)
        stream.loop.call_soon_threadsafe(stream.queue.put_nowait, out)

    def _fail_all(self, error: Exception) -> None:
        for rid in list(self.engine.requests):
            self.engine.abort_request(rid)
        for stream in list(self._streams.values()):
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, error)
