"""A streamed event stays one line for readers that split lines as Python's str.splitlines does (httpx's
iter_lines): a generated token holding U+2028, U+2029 or NEL must not cut the JSON in two."""
from __future__ import annotations

import json

from httpx._decoders import LineDecoder

from ember.server.app import sse_data


def test_an_event_with_unicode_line_breaks_is_one_line() -> None:
    event = {"choices": [{"index": 0, "text": "a\u2028b\x85c\u2029d\r\ne \u00e9\u4e2d"}]}
    lines = [line for line in LineDecoder().decode(sse_data(event)) if line]
    assert len(lines) == 1 and lines[0].startswith("data: ")
    assert json.loads(lines[0][len("data: "):]) == event
    assert "\u00e9\u4e2d" in lines[0]  # other non-ASCII text stays UTF-8
