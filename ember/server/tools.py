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


def parse(text: str, names: set[str]) -> tuple[str | None, list[dict[str, Any]]]:
    """The reply's content (tool-call blocks removed; None if nothing else) and its calls of known tools."""
    calls = []
    for block in _BLOCK.findall(text):
        try:
            call = json.loads(block)
        except ValueError:
            continue
        if isinstance(call, dict) and call.get("name") in names:
            args = call.get("arguments", {})
            calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                          "function": {"name": call["name"],
                                       "arguments": args if isinstance(args, str) else json.dumps(args,
                                                                                                  ensure_ascii=False)}})
    if not calls:
        return text, []
    rest = _BLOCK.sub("", text).strip()
    return rest or None, calls


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
