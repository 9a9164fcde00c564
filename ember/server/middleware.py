"""ASGI middleware in front of every route: the API key, the request size limit, and a JSON 500 for any
unexpected error that keeps the connection alive."""
from __future__ import annotations

import hmac
import json
import logging
from typing import Any, Awaitable, Callable

from ember.server import protocol as P

log = logging.getLogger("ember")
Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
PUBLIC_PATHS = ("/health",)  # open without the API key, for load balancers' probes
PAGE_PATH = "/"  # the chat page, open when served: it asks for the key and sends it with its own requests


async def send_error(send: Send, status: int, message: str, type_: str = "invalid_request_error",
                     param: str | None = None, code: str | None = None) -> None:
    """An OpenAI-style JSON error response, sent straight on the ASGI channel."""
    body = json.dumps(P.error_body(message, type_, param, code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class ServerGuard:
    """Checks the API key (every path but PUBLIC_PATHS, and the chat page when `page`), refuses bodies over `max_request_bytes` with 413
    before they are parsed, and answers an unexpected exception with a JSON 500 instead of dropping the
    connection (the traceback goes to the log)."""

    def __init__(self, app: Any, api_key: str | None, max_request_bytes: int, page: bool = False) -> None:
        self.app, self.max_request_bytes = app, max_request_bytes
        self.expected = f"Bearer {api_key}".encode() if api_key else None
        self.public = PUBLIC_PATHS + ((PAGE_PATH,) if page else ())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            if not self._authorized(scope):
                return await send_error(send, 401, "missing or incorrect API key: send 'Authorization: Bearer "
                                        "<key>'", code="invalid_api_key")
            replay = await self._read_body(scope, receive, send)
            if replay is not None:
                await self.app(scope, replay, tracked)
        except Exception as e:
            log.exception("internal error on %s %s", scope.get("method"), scope.get("path"))
            if not started:
                await send_error(send, 500, f"internal server error ({type(e).__name__}); the server keeps "
                                 "running, and the log has the details", "internal_server_error")

    def _authorized(self, scope: Scope) -> bool:
        if self.expected is None or scope.get("path") in self.public:
            return True
        given = dict(scope.get("headers") or ()).get(b"authorization", b"")
        return hmac.compare_digest(given, self.expected)

    async def _read_body(self, scope: Scope, receive: Receive, send: Send) -> Receive | None:
        """The whole body, read up to the limit, handed on as one message (later receives go to the client's
        connection, so a disconnect is still seen); None if a 413 was sent or the client left."""
        limit = self.max_request_bytes
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await self._too_large(send, int(length))
            return None
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > limit:
                await self._too_large(send, total)
                return None
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        pending: list[Message] = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay() -> Message:
            return pending.pop() if pending else await receive()

        return replay

    async def _too_large(self, send: Send, size: int) -> None:
        await send_error(send, 413, f"the request body has {size} bytes or more, over this server's limit of "
                         f"{self.max_request_bytes} (--max-request-bytes); send a shorter request",
                         code="request_too_large")
