"""`ember serve --replicas N`: engine replicas as Ray Serve deployments behind one OpenAI API.

EmberIngress (the HTTP ingress) checks the API key and the body size, reads each request's prompt prefix and
hands the request, unchanged, to an EmberEngine replica through a deployment handle, whose request router picks
the replica (prefix-aware by default). Each EmberEngine replica runs ember's whole server app in-process on its
own engine, so every endpoint behaves as in one process; its response comes back as a stream of ASGI messages
with an `X-Ember-Replica` header. Replicas push their /metrics text to the ingress, which serves them merged
and labelled by replica. Ray is an optional extra: nothing else imports this module."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response, StreamingResponse

from ember.errors import EmberError
from ember.server import protocol as P
from ember.server.app import ServerLimits
from ember.server.routing import ROUTING_IMBALANCE, block_hashes, session_hashes

log = logging.getLogger("ember")
APP_NAME = "ember"
ENGINE = "EmberEngine"
INGRESS = "EmberIngress"
REPLICA_HEADER = "x-ember-replica"
RAY_PREFIX_ROUTER = ("ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router:"
                     "PrefixCacheAffinityRouter")
METRICS_PUSH_S = 1.0  # how often a replica sends its metrics to the ingress
METRICS_STALE_S = 5.0  # a replica silent this long (dead, or being replaced) leaves /metrics
ROUTING_CHARS = 1 << 16  # only a prompt's head decides its route: a huge prompt is not tokenized twice in full
HOP_HEADERS = {b"connection", b"transfer-encoding", b"keep-alive"}
QUIET = {"enable_access_log": False}  # Serve logs every call (metrics pushes too); replicas log finished requests
INSTALL_HINT = "--replicas needs Ray Serve, an optional extra: pip install 'ember[ray]'"


@dataclass
class Forwarded:
    """One HTTP request on its way to an engine replica, with what the routers read: `prefix_ids` and
    `session` (ember's router), `prompt` (Ray's PrefixCacheAffinityRouter reads an argument's .prompt)."""

    method: str
    path: str
    query: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    prefix_ids: list[int] | None = None
    session: str | None = None
    prompt: str = ""
    route_reason: str = ""  # set by ember's router in the ingress process (the object is not copied there)
    _hashes: list[int] | None = field(default=None, repr=False)

    def hashes(self, block_size: int) -> list[int]:
        if self._hashes is None:
            self._hashes = (session_hashes(self.session) if self.session is not None else
                            block_hashes(self.prefix_ids or [], block_size))
        return self._hashes


@dataclass
class ReplicaSpec:
    """What each engine replica loads and how it serves (the single-process server's settings)."""

    model: str | None
    engine_kwargs: dict[str, Any]
    served_name: str
    limits: ServerLimits
    pooling: str = "last"
    memory_db: str | None = None
    threads: int = 1
    ui: bool = True  # the chat page at GET / (served by the ingress)
    memory_embedder: str | None = None


@dataclass
class ClusterSpec:
    replicas: int
    threads: int
    cpus_per_replica: float
    router: str = "prefix"
    imbalance: int = ROUTING_IMBALANCE
    block_size: int = 16  # the engine's (EngineArgs.block_size): the router hashes blocks as its prefix cache does
    shutdown_grace: float = 60.0


def plan_cpus(replicas: int, threads: int | None, cores: int) -> tuple[int, float]:
    """Torch threads per replica and the CPUs each reserves from Ray: by default the cores split evenly; asked
    for more threads than that, the reservation shrinks so that all N replicas still fit the cores."""
    if replicas < 1:
        raise EmberError(f"--replicas must be at least 1, got {replicas}")
    threads = threads or max(1, cores // replicas)
    return threads, min(float(threads), cores / replicas)


# -- the engine replica --------------------------------------------------------------------------------------

class EmberEngine:
    """One engine replica: ember's server app over its own AsyncEngine, called in-process with ASGI."""

    def __init__(self, spec: ReplicaSpec) -> None:
        import torch
        from ray import serve

        from ember.engine.async_engine import AsyncEngine
        from ember.engine.engine import EngineArgs, LLMEngine
        from ember.server.app import build_app
        from ember.server.metrics import Metrics
        from ember.server.serve import RequestLog

        _log_to_stderr()
        ctx = serve.get_replica_context()
        self.name = f"{ctx.deployment}#{ctx.replica_id.unique_id}"
        self.app_name = ctx.app_name

        def load() -> LLMEngine:
            torch.set_num_threads(spec.threads)  # Ray sets OMP_NUM_THREADS=1 in its workers
            return LLMEngine(EngineArgs(model=spec.model, **spec.engine_kwargs))

        self.metrics = Metrics()
        self.engine = AsyncEngine.load(load, observer=RequestLog(self.metrics))
        # The ingress checked the API key and the body size already.
        self.app = build_app(self.engine, spec.served_name, self.metrics, None, spec.limits, spec.pooling,
                             spec.memory_db, ui=False,  # the ingress serves the page
                             memory_embedder=spec.memory_embedder)
        self._stopping = threading.Event()
        threading.Thread(target=self._push_metrics, name="ember-metrics-push", daemon=True).start()
        log.info("replica %s ready (%d torch threads, pid %d)", self.name, spec.threads, os.getpid())

    async def forward(self, req: Forwarded) -> AsyncIterator[dict[str, Any] | bytes]:
        """Run the request through the app; yields the response head ({status, headers}), then body chunks.
        Cancelled (the client left, or the ingress gave up), the app sees a disconnect and aborts the work."""
        sent: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        gone = asyncio.Event()
        body: list[bytes] = [req.body]

        async def receive() -> dict[str, Any]:
            if body:
                return {"type": "http.request", "body": body.pop(), "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            await sent.put(message)

        async def run() -> None:
            try:
                await self.app(_scope(req), receive, send)
            finally:
                await sent.put(None)

        task = asyncio.create_task(run())
        try:
            while (message := await sent.get()) is not None:
                if message["type"] == "http.response.start":
                    headers = [(k, v) for k, v in message.get("headers", []) if k.lower() not in HOP_HEADERS]
                    yield {"status": message["status"], "headers": headers + [(REPLICA_HEADER.encode(),
                                                                               self.name.encode())]}
                elif message["type"] == "http.response.body":
                    if message.get("body"):
                        yield message["body"]
                    if not message.get("more_body"):
                        break
        finally:
            gone.set()
            if not task.done():
                await asyncio.wait([task], timeout=5)

    def metrics_text(self) -> str:
        return self.metrics.render(self.engine.state)

    def _push_metrics(self) -> None:
        """Send this replica's metrics to the ingress every METRICS_PUSH_S (a handle can reach one replica of a
        deployment, not all of them, so the ingress cannot ask)."""
        from ray import serve

        handle = None
        while not self._stopping.wait(METRICS_PUSH_S):
            try:
                handle = handle or serve.get_deployment_handle(INGRESS, self.app_name)
                handle.report.remote(self.name, self.metrics_text()).result(timeout_s=10)
            except Exception as e:  # the ingress is starting, restarting or gone: try again next time
                log.debug("replica %s: metrics not delivered (%s)", self.name, e)
                handle = None

    def __del__(self) -> None:  # Ray Serve calls it when the replica shuts down (after draining)
        if hasattr(self, "_stopping"):
            self._stopping.set()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.stop()


def _log_to_stderr() -> None:
    """ember's INFO lines (one per finished request) from a replica reach the `ember serve` terminal, where Ray
    forwards every replica's stderr, as in one process."""
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("ember: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def _scope(req: Forwarded) -> dict[str, Any]:
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "method": req.method, "scheme": "http", "path": req.path, "raw_path": req.path.encode(),
            "query_string": req.query, "root_path": "", "headers": req.headers, "client": None,
            "server": None, "state": {}}


# -- routing -------------------------------------------------------------------------------------------------

def router_config(cluster: ClusterSpec) -> Any:
    """The engine deployment's request-router config for --router (None: Ray's default, power of two)."""
    from ray.serve.config import RequestRouterConfig

    if cluster.router == "pow2":
        return None
    if cluster.router == "ray-prefix":
        return RequestRouterConfig(request_router_class=RAY_PREFIX_ROUTER,
                                   request_router_kwargs={"imbalanced_threshold": cluster.imbalance})
    return RequestRouterConfig(request_router_class="ember.server.ray_router:EmberPrefixRouter",
                               request_router_kwargs={"block_size": cluster.block_size,
                                                      "imbalance": cluster.imbalance, "mode": cluster.router})


# -- the ingress ---------------------------------------------------------------------------------------------

class RouteKeys:
    """Reads the prompt prefix of a request as the engine will see it (chat template applied, tokenized)."""

    def __init__(self, model: str | None) -> None:
        from ember.models.loader import load_tokenizer

        self.tok = load_tokenizer(model)

    def fill(self, req: Forwarded) -> None:
        """Sets req.prefix_ids / session / prompt for the body of a generation or embedding request; a body
        that cannot be read is left without a route (the replica answers it with the proper 400)."""
        req.prompt = f"{req.method} {req.path}"
        if req.method != "POST" or not req.body:
            return
        try:
            body = json.loads(req.body)
            text, ids, session = self._prompt(req.path, body)
        except Exception:  # noqa: BLE001 - a malformed body only loses its route
            return
        if session is not None:
            req.session, req.prompt = str(session), f"session:{session}"
        elif ids is not None:
            req.prefix_ids, req.prompt = ids, text or req.prompt
        elif text:
            req.prompt = text
            req.prefix_ids = self.tok.encode(text[:ROUTING_CHARS])

    def _prompt(self, path: str, body: dict[str, Any]) -> tuple[str, list[int] | None, str | None]:
        """(text, token ids or None, session or None) of the request's first prompt."""
        if path.endswith("/chat/completions"):
            if body.get("session") is not None:
                return "", None, body["session"]
            messages = [{"role": m["role"], "content": _text(m.get("content"))} for m in body["messages"]]
            ids = self.tok.apply_chat_template(messages, body.get("add_generation_prompt", True), tokenize=True)
            return "".join(m["content"] for m in messages), ids, None
        value = body.get("prompt") if path.endswith("/completions") else body.get("input")
        if path.endswith("/embeddings") or path.endswith("/completions"):
            if isinstance(value, list) and value and not isinstance(value[0], int):
                value = value[0]
            if isinstance(value, list):
                return "", [int(t) for t in value], None
            return (value if isinstance(value, str) else ""), None, None
        return "", None, None


def _text(content: Any) -> str:
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


def merge_metrics(reports: dict[str, str], routed: dict[tuple[str, str], int]) -> str:
    """The replicas' Prometheus texts as one, each sample labelled replica="...", with the ingress's own
    counts: live replicas and requests routed (by replica and why)."""
    from prometheus_client.metrics_core import Metric
    from prometheus_client.parser import text_string_to_metric_families
    from prometheus_client.samples import Sample

    families: dict[str, Metric] = {}
    for replica, text in sorted(reports.items()):
        for fam in text_string_to_metric_families(text):
            merged = families.setdefault(fam.name, Metric(fam.name, fam.documentation, fam.type, fam.unit))
            merged.samples += [Sample(s.name, {**s.labels, "replica": replica}, s.value, s.timestamp, s.exemplar)
                               for s in fam.samples]
    lines = ["# HELP ember_replicas Engine replicas reporting metrics.", "# TYPE ember_replicas gauge",
             f"ember_replicas {len(reports)}",
             "# HELP ember_routed_requests_total Requests the ingress sent to each replica, by routing reason.",
             "# TYPE ember_routed_requests_total counter"]
    lines += [f'ember_routed_requests_total{{replica="{r}",reason="{why}"}} {n}'
              for (r, why), n in sorted(routed.items())]
    return "\n".join(lines) + "\n" + _render(list(families.values()))


def _render(families: Any) -> str:
    from prometheus_client.exposition import generate_latest
    from prometheus_client.registry import CollectorRegistry

    class Fixed:
        def collect(self) -> Any:
            return list(families)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Fixed())  # type: ignore[arg-type]
    return generate_latest(registry).decode()


def _is_replica_failure(e: BaseException) -> bool:
    """The replica died or became unreachable (as opposed to an error of the request itself)."""
    import ray.exceptions as rex

    return isinstance(e, (rex.RayActorError, rex.ActorUnavailableError))


def build_application(spec: ReplicaSpec, cluster: ClusterSpec, api_key: str | None) -> Any:
    """The Ray Serve application: EmberIngress bound to N EmberEngine replicas."""
    from ray import serve

    engine_options: dict[str, Any] = dict(
        name=ENGINE, num_replicas=cluster.replicas, max_ongoing_requests=1024,
        ray_actor_options={"num_cpus": cluster.cpus_per_replica},
        graceful_shutdown_timeout_s=cluster.shutdown_grace, graceful_shutdown_wait_loop_s=0.5,
        health_check_period_s=2, health_check_timeout_s=30, logging_config=QUIET)
    config = router_config(cluster)
    if config is not None:
        engine_options["request_router_config"] = config
    engine = serve.deployment(EmberEngine).options(**engine_options)
    # The ASGI app is built in the replica (__serve_build_asgi_app__): a FastAPI app does not survive pickling.
    ingress = serve.deployment(serve.ingress()(EmberIngress)).options(
        name=INGRESS, num_replicas=1, max_ongoing_requests=4096, ray_actor_options={"num_cpus": 0},
        graceful_shutdown_timeout_s=cluster.shutdown_grace, graceful_shutdown_wait_loop_s=0.5,
        logging_config=QUIET)
    return ingress.bind(engine.bind(spec), spec, cluster, api_key)


class EmberIngress:
    """The HTTP ingress: API key and body limit, the route key of each request, relaying to an engine replica
    (retried if the replica dies before answering), merged /metrics."""

    def __init__(self, engine: Any, spec: ReplicaSpec, cluster: ClusterSpec, api_key: str | None) -> None:
        self.engine = engine.options(stream=True)
        self.spec, self.cluster, self.api_key = spec, cluster, api_key
        self.keys = RouteKeys(spec.model)
        self.reports: dict[str, tuple[float, str]] = {}
        self.routed: dict[tuple[str, str], int] = {}
        self.draining = False
        self.active = 0  # requests being answered

    def __serve_build_asgi_app__(self) -> Any:
        from ember.server.middleware import ServerGuard
        from ember.server.ui import add_chat_page

        api = FastAPI(title="ember", docs_url=None, redoc_url=None, openapi_url=None)  # the replicas serve docs
        api.add_middleware(ServerGuard, api_key=self.api_key, max_request_bytes=self.spec.limits.max_request_bytes,
                           page=self.spec.ui)
        if self.spec.ui:
            add_chat_page(api)

        @api.get("/metrics")
        async def metrics() -> PlainTextResponse:
            now = time.monotonic()
            live = {r: text for r, (at, text) in self.reports.items() if now - at < METRICS_STALE_S}
            return PlainTextResponse(merge_metrics(live, self.routed), media_type="text/plain; version=0.0.4")

        @api.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"])
        async def forward(request: Request) -> Response:
            req = Forwarded(request.method, request.url.path, request.url.query.encode(),
                            [(k, v) for k, v in request.headers.raw if k.lower() not in HOP_HEADERS],
                            await request.body())
            if self.draining:
                return _unavailable(503, "the server is shutting down and takes no new requests",
                                    "shutting_down")
            self.active += 1  # until the response is sent (a stream: until it ends)
            try:
                await asyncio.to_thread(self.keys.fill, req)
                return await self.relay(req)
            finally:
                self.active -= 1

        return api

    def drain(self) -> int:
        """Refuse new requests (503) from now on; returns how many are still being answered."""
        self.draining = True
        return self.active

    def _stream_ended(self) -> None:
        self.active -= 1

    def report(self, replica: str, text: str) -> None:
        """A replica's metrics (pushed every METRICS_PUSH_S)."""
        self.reports[replica] = (time.monotonic(), text)

    async def relay(self, req: Forwarded, attempts: int = 3) -> Response:
        """Send to a replica; one that dies before answering is retried on another (nothing was sent yet)."""
        for attempt in range(attempts):
            stream = self.engine.forward.remote(req)
            try:
                head = await stream.__anext__()
            except StopAsyncIteration:
                return _unavailable(502, "the replica ended the request without a response; retry it",
                                    "replica_failed")
            except Exception as e:
                if not _is_replica_failure(e):
                    raise
                log.warning("replica failed before answering (%s): %s", type(e).__name__,
                            "retrying" if attempt + 1 < attempts else "giving up")
                continue
            except BaseException:
                stream.cancel()  # the client left: the replica aborts the request
                raise
            replica = dict(head["headers"]).get(REPLICA_HEADER.encode(), b"?").decode()
            key = (replica, req.route_reason or self.cluster.router)
            self.routed[key] = self.routed.get(key, 0) + 1
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in head["headers"]}
            if headers.get("content-type", "").startswith("text/event-stream"):
                self.active += 1
                return StreamingResponse(_relay_stream(stream, replica, self._stream_ended), head["status"], headers)
            try:
                content = b"".join([chunk async for chunk in stream])
            except Exception as e:
                if not _is_replica_failure(e):
                    raise
                return _unavailable(502, f"replica {replica} died while sending the response; retry the request",
                                    "replica_failed")
            except BaseException:
                stream.cancel()
                raise
            return Response(content, head["status"], headers)
        return _unavailable(503, f"no engine replica could take the request after {attempts} tries (replicas "
                                 "dying or restarting); retry shortly", "replica_unavailable")


def _unavailable(status: int, message: str, code: str) -> Response:
    return Response(json.dumps(P.error_body(message, "service_unavailable", code=code)), status,
                    media_type="application/json")


async def _relay_stream(stream: Any, replica: str, ended: Callable[[], None]) -> AsyncIterator[bytes]:
    """A replica's server-sent events; if it dies mid-stream, an error event and [DONE] end the stream cleanly."""

    try:
        async for chunk in stream:
            yield chunk
    except Exception as e:
        if not _is_replica_failure(e):
            raise
        log.warning("replica %s died mid-stream", replica)
        message = f"replica {replica} died while streaming this response; retry the request"
        yield f"data: {json.dumps(P.error_body(message, 'service_unavailable', code='replica_failed'))}\n\n".encode()
        yield b"data: [DONE]\n\n"
    finally:
        stream.cancel()  # a no-op once finished; the client left otherwise
        ended()


# -- the command ---------------------------------------------------------------------------------------------

def serve_replicas(spec: ReplicaSpec, cluster: ClusterSpec, host: str, port: int, api_key: str | None,
                   ray_address: str | None = None) -> None:
    """Start (or join, with `ray_address`) Ray, deploy the application and serve until SIGINT/SIGTERM, which
    drains every replica (requests in flight may run for shutdown_grace seconds); a second signal stops now."""
    # Ray folds similar lines from different processes into one ("[repeated 2x across cluster]"): each replica's
    # request lines and "ready" line would be lost. (Set before Ray is imported, which reads these then.)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if ray_address:
        _use_cluster_token()
    try:
        import ray
        from ray import serve
    except ImportError:
        raise EmberError(INSTALL_HINT) from None
    from ember.server.serve import bind

    bind(host, port).close()  # a busy port fails now, with ember's message, not inside Ray's proxy
    started = time.perf_counter()
    ray.init(address=ray_address, **({} if ray_address else {"num_cpus": os.cpu_count()}),
             logging_level=logging.WARNING, configure_logging=False)
    stop = threading.Event()  # (after ray.init, whose own SIGTERM handler would end the process undrained)
    signals = {s: signal.signal(s, lambda sig, _: _on_signal(stop, sig)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        serve.start(http_options={"host": host, "port": port})
        _deploy(serve, build_application(spec, cluster, api_key))
        log.info("serving %s on http://%s:%d/v1 with %d replicas x %d threads (%s routing, Ray %s) in %.0f s",
                 spec.served_name, host, port, cluster.replicas, cluster.threads, cluster.router,
                 "cluster at " + ray_address if ray_address else "started here", time.perf_counter() - started)
        while not stop.wait(0.5):  # (a bare wait would not let the signal handler run)
            pass
        log.info("shutting down: draining the replicas (at most %.0f s; signal again to stop now)",
                 cluster.shutdown_grace)
        _drain(serve.get_deployment_handle(INGRESS, APP_NAME), cluster.shutdown_grace)
        serve.delete(APP_NAME)
        if not ray_address:
            serve.shutdown()
    except _StopNow:
        pass
    finally:
        for s, handler in signals.items():
            signal.signal(s, handler)
        ray.shutdown()
    log.info("server stopped")


def _use_cluster_token() -> None:
    """Ray 2.59+ `ray start --head` turns token authentication on when a token exists (`~/.ray/auth_token`,
    written by any earlier local Ray), but `ray.init(address=...)` only sends it with RAY_AUTH_MODE=token set
    (ray-project/ray#64755): without it, joining fails with "InvalidAuthToken"."""
    token_file = os.environ.get("RAY_AUTH_TOKEN_PATH", os.path.expanduser("~/.ray/auth_token"))
    if "RAY_AUTH_MODE" not in os.environ and (os.environ.get("RAY_AUTH_TOKEN") or os.path.exists(token_file)):
        os.environ["RAY_AUTH_MODE"] = "token"


def _deploy(serve: Any, app: Any) -> None:
    """serve.run, waiting for every replica; a replica that cannot start (a bad flag, a missing model file)
    fails it with ember's own message rather than Ray's traceback of the replica."""
    try:
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    except RuntimeError as e:
        try:
            status = serve.status().applications[APP_NAME]
            detail = "\n".join([str(e), status.message, *(d.message for d in status.deployments.values())])
        except Exception:  # noqa: BLE001 - the status is only a better message
            detail = str(e)
        found = re.search(r"ember\.errors\.\w+: ([^\n]+)", detail)
        if found is None:
            raise
        raise EmberError(f"the engine replicas could not start: {found.group(1)}") from None


def _drain(ingress: Any, grace: float) -> None:
    """New requests get a 503 while those in flight finish, for at most `grace` seconds; the replicas' own
    graceful shutdown (as long again) then ends what is left, each stream with an error event."""
    deadline = time.monotonic() + grace
    while ingress.drain.remote().result(timeout_s=10) and time.monotonic() < deadline:
        time.sleep(0.2)


class _StopNow(Exception):
    """A second signal: leave the drain; Ray's shutdown then ends every replica at once."""


def _on_signal(stop: threading.Event, sig: int) -> None:
    if stop.is_set():
        log.info("second signal (%s): stopping now", signal.Signals(sig).name)
        raise _StopNow()
    stop.set()
