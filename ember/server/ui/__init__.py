"""The chat page served at `GET /`: one HTML document with its scripts inlined (nothing fetched from elsewhere)."""
from __future__ import annotations

from functools import lru_cache
from importlib import resources
from importlib.resources.abc import Traversable

from fastapi import FastAPI, Response

VENDOR_SCRIPTS = ("vendor/marked.umd.js", "vendor/purify.min.js")
# The page loads nothing but itself and talks only to this server; inline scripts and styles are its own.
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                           "connect-src 'self'; img-src 'self' data: blob:; base-uri 'none'; form-action 'none'")


@lru_cache(maxsize=1)
def chat_page() -> bytes:
    """The assembled page: chat.html with the vendored libraries and chat.js inlined."""
    folder = resources.files(__name__)
    html = (folder / "chat.html").read_text("utf-8")
    vendor = "\n".join(f"<script>\n{_script(folder / name)}\n</script>" for name in VENDOR_SCRIPTS)
    html = html.replace("<!-- ember:vendor -->", vendor, 1).replace("/* ember:app */", _script(folder / "chat.js"), 1)
    return html.encode("utf-8")


def _script(path: Traversable) -> str:
    text = path.read_text("utf-8")
    if "</script" in text.lower():  # would end the inline <script> element early
        raise ValueError(f"{path} contains '</script' and cannot be inlined")
    return text


def add_chat_page(app: FastAPI) -> None:
    """Serve the page at `GET /` (open without the API key: the page asks for it and sends it itself)."""

    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        return Response(chat_page(), media_type="text/html; charset=utf-8",
                        headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY, "Cache-Control": "no-cache",
                                 "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})
