"""Tool (function) calls: tools rendered through the model's chat template (or, where it has no place for them,
a system prompt in the Hermes format), the model's `<tool_call>{"name", "arguments"}</tool_call>` blocks parsed
into OpenAI `tool_calls`, and `tool_choice` required / a named function enforced by a grammar."""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from ember.engine.structured import StructuredOutputsParams, bounded_integers

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')  # a call, up to its arguments


@dataclass
class ToolPlan:
    """A request's tools (OpenAI's dicts), its choice ("auto", "required" or a function's name) and whether
    several calls may come in one reply."""

    tools: list[dict[str, Any]]
    choice: str = "auto"
    parallel: bool = True

    @property
    def names(self) -> set[str]:
        return {t["function"]["name"] for t in self.tools}

    def constraint(self) -> StructuredOutputsParams | None:
        """required / named: the reply must be tool calls (valid arguments included); auto: free."""
        if self.choice == "auto":
            return None
        chosen = [t["function"] for t in self.tools if self.choice in ("required", t["function"]["name"])]
        # One line of JSON, as the Hermes format writes it: at most a space between tokens.
        calls = {"x-guidance": {"whitespace_pattern": "[\\x20]?"},
                 "anyOf": [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                            "properties": {"name": {"const": f["name"]},
                                           "arguments": bounded_integers(f.get("parameters") or {"type": "object"})}}
                           for f in chosen]}
        repeat = "+" if self.parallel and self.choice == "required" else ""
        return StructuredOutputsParams(grammar=f'start: call{repeat}\ncall: "{OPEN}\\n" %json {json.dumps(calls)} '
                                               f'"\\n{CLOSE}"\n')

    def system_prompt(self) -> str:
        """For templates without a place for tools (Hermes' wording, which Qwen2.5's template also uses)."""
        listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in self.tools)
        return ("You may call one or more functions to assist with the user query. The functions are described "
                f"by these JSON schemas:\n<tools>\n{listed}\n</tools>\nTo call a function, reply with a JSON object "
                f'of its name and arguments within {OPEN}{CLOSE} tags:\n{OPEN}\n{{"name": <function-name>, '
                f'"arguments": <args-json-object>}}\n{CLOSE}')


def as_text(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Assistant tool calls and tool results as plain text, for templates that know neither."""
    out = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = "\n".join(_block(c["function"]["name"], c["function"]["arguments"]) for c in m["tool_calls"])
            out.append({"role": "assistant", "content": "\n".join(x for x in (m["content"], calls) if x)})
        elif m["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"})
        else:
            out.append({k: v for k, v in m.items() if k not in ("tool_calls", "tool_call_id")})
    return out


def _block(name: str, arguments: Any) -> str:
    return f"{OPEN}\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n{CLOSE}"


def with_system(messages: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": f"{messages[0]['content']}\n\n{text}"}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def parse(text: str, names: set[str], parallel: bool = True) -> tuple[str | None, list[dict[str, Any]]]:
    """The reply's content (tool-call blocks removed; None if nothing else) and its calls of known tools (only
    the first unless `parallel`); a call's arguments are the JSON text the model wrote."""
    calls = [call for _, call in _calls(text, names)][:None if parallel else 1]
    if not calls:
        return text, []
    rest = _BLOCK.sub("", text).strip()
    return rest or None, calls


def _calls(text: str, names: set[str]) -> list[tuple[int, dict[str, Any]]]:
    """(block index, OpenAI tool call) for each closed block that is valid JSON naming a known function."""
    calls = []
    for k, (inner, closed) in enumerate(_blocks(text)):
        try:
            call = json.loads(inner) if closed else None
        except ValueError:
            continue
        if isinstance(call, dict) and call.get("name") in names:
            calls.append((k, _call(call["name"], _arguments_text(inner, call.get("arguments", {})))))
    return calls


def _call(name: str, arguments: str) -> dict[str, Any]:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": name,
                                                                                      "arguments": arguments}}


def _arguments_text(inner: str, args: Any) -> str:
    """The arguments as written (so a streamed call's pieces add up to them), else as JSON."""
    if isinstance(args, str):
        return args
    head = _HEAD.match(inner)
    end = _value_end(inner[head.end():]) if head else None
    if head and end is not None and json.loads(inner[head.end():head.end() + end]) == args:
        return inner[head.end():head.end() + end]
    return json.dumps(args, ensure_ascii=False)


def _blocks(text: str) -> list[tuple[str, bool]]:
    """Each tool-call block's inner text, in order, and whether it is closed yet."""
    blocks, pos = [], 0
    while (start := text.find(OPEN, pos)) >= 0:
        end = text.find(CLOSE, start)
        if end < 0:
            blocks.append((text[start + len(OPEN):], False))
            break
        blocks.append((text[start + len(OPEN):end], True))
        pos = end + len(CLOSE)
    return blocks


def _value_end(s: str) -> int | None:
    """The length of the JSON object or array that `s` starts with, or None while it is unfinished (or `s`
    starts with something else)."""
    if not s.startswith(("{", "[")):
        return None
    depth, in_string, escaped = 0, False, False
    for i, ch in enumerate(s):
        if in_string:
            escaped, in_string = (False, True) if escaped else (ch == "\\", ch != '"')
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


class CallStream:
    """One streamed choice's tool calls as OpenAI sends them: a call's id, type and name (with arguments "") as
    soon as its name is written, then its arguments' JSON text piece by piece as the model writes it."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.sent: list[int] = []  # per call streamed: the characters of its arguments sent
        self.count = 0  # the calls sent in all, once finished

    def deltas(self, text: str) -> list[dict[str, Any]]:
        """The tool_calls deltas that the reply so far adds."""
        out = []
        for k, (inner, _) in enumerate(_blocks(text)[:None if self.plan.parallel else 1]):
            head = _HEAD.match(inner)
            name = _string(head.group(1)) if head else None
            if name not in self.plan.names or not inner[head.end():].startswith(("{", "[")):  # type: ignore[union-attr]
                break  # not (yet) a call this can stream: the calls from here on go whole at the end
            if k == len(self.sent):
                self.sent.append(0)
                out.append({"index": k, **_call(name, "")})  # type: ignore[arg-type]
            args = inner[head.end():]  # type: ignore[union-attr]
            end = _value_end(args)
            upto = len(args) if end is None else end
            if upto > self.sent[k]:
                out.append({"index": k, "function": {"arguments": args[self.sent[k]:upto]}})
                self.sent[k] = upto
        return out

    def finish(self, text: str) -> list[dict[str, Any]]:
        """The last deltas of a finished reply: what the streamed calls still lack, then the valid calls that
        could not be streamed (say, arguments before the name) whole."""
        out = self.deltas(text)
        calls = [call for k, call in _calls(text, self.plan.names) if k >= len(self.sent)]
        limit = None if self.plan.parallel else max(0, 1 - len(self.sent))
        out += [{"index": len(self.sent) + i, **call} for i, call in enumerate(calls[:limit])]
        self.count = len(self.sent) + len(calls[:limit])
        return out


def outside(text: str) -> str | None:
    """A reply's content besides its tool calls: closed blocks removed, an unclosed one cut off; None if empty."""
    text = _BLOCK.sub("", text)
    return text.split(OPEN, 1)[0].strip() or None


def _string(body: str) -> str | None:
    try:
        return json.loads(f'"{body}"')
    except ValueError:
        return None


def visible(text: str) -> str:
    """What of a reply still being generated may be streamed as content: everything before a tool-call block
    (or before what may yet become its opening tag)."""
    cut = text.find(OPEN)
    if cut >= 0:
        return text[:cut]
    for k in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-k:]):
            return text[:-k]
    return text
