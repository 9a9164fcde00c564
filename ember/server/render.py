"""Turning RequestOutputs into OpenAI response bodies and streaming deltas (text, logprobs, usage)."""
from __future__ import annotations

from typing import Any, Iterator

from ember.engine.outputs import CompletionOutput, LogprobDict, RequestOutput
from ember.loading.tokenizer import Tokenizer
from ember.server import protocol as P
from ember.server.tools import CallStream, ToolPlan, outside, parse, visible


class ChoiceState:
    """What has been sent so far for each of one request's n choices, and how completions are rendered: `echo`
    puts the prompt (and with `logprobs`, its logprobs) first; `score_only` (max_tokens 0) shows no tokens."""

    def __init__(self, tok: Tokenizer, n: int, offset: int = 0, top_logprobs: int = 0, echo: bool = False,
                 logprobs: int | None = None, score_only: bool = False, tools: ToolPlan | None = None) -> None:
        self.tok, self.n, self.offset, self.top_logprobs = tok, n, offset, top_logprobs
        self.tools = tools  # chat with tools: tool-call blocks are held back from content and sent as tool_calls
        self.calls = [CallStream(tools) for _ in range(n)] if tools is not None else []
        self.echo, self.logprobs, self.score_only = echo, logprobs, score_only
        self.text_sent = [0] * n
        self.tokens_sent = [0] * n
        self.finished = [False] * n
        self.echoed = [False] * n
        self.text_offset = [0] * n  # completion logprobs' text_offset goes on from chunk to chunk

    def completion_tokens(self, out: RequestOutput) -> int:
        return 0 if self.score_only else sum(len(c.token_ids) for c in out.outputs)

    def _tool_deltas(self, c: CompletionOutput) -> list[dict[str, Any]]:
        """The tool_calls deltas this output adds to a choice (streamed as the model writes them)."""
        if self.tools is None or self.finished[c.index]:
            return []
        stream = self.calls[c.index]
        return stream.finish(c.text) if c.finish_reason is not None else stream.deltas(c.text)

    def _content(self, c: CompletionOutput) -> str:
        """What of the choice's text goes out as content: with tools, not the tool-call blocks (nor, while it
        streams, what may become one); a finished reply without valid calls is all content."""
        if self.tools is None:
            return c.text
        if c.finish_reason is None:
            return visible(c.text)
        text = (outside(c.text) or "") if self.calls[c.index].count else c.text
        sent = c.text[:self.text_sent[c.index]]
        return text if text.startswith(sent) else sent

    def _advance(self, c: CompletionOutput, force: bool = False) -> tuple[str, int, int, bool] | None:
        i = c.index
        text = self._content(c)
        delta = text[self.text_sent[i]:]
        start, end = self.tokens_sent[i], len(c.token_ids)
        newly_done = c.finish_reason is not None and not self.finished[i]
        if not delta and not newly_done and not force:
            return None
        self.text_sent[i] = len(text)
        self.tokens_sent[i] = end
        self.finished[i] = self.finished[i] or newly_done
        return delta, start, end, newly_done

    def chat_deltas(self, rid: str, model: str, out: RequestOutput, logprobs: bool,
                    include_usage: bool) -> Iterator[dict[str, Any]]:
        for c in out.outputs:
            calls = self._tool_deltas(c)
            step = self._advance(c, force=bool(calls))
            if step is None:
                continue
            delta, start, end, done = step
            lp = {"content": chat_logprobs(self.tok, c, start, end, self.top_logprobs)} if logprobs and c.logprobs is not None else None
            body: dict[str, Any] = {"content": delta} if delta else {}
            if calls:
                body["tool_calls"] = calls
            finish = _finish(c, bool(self.calls and self.calls[c.index].count)) if done else None
            yield chat_chunk(rid, model, c.index, body, lp, finish, include_usage)

    def completion_deltas(self, rid: str, model: str, out: RequestOutput,
                          include_usage: bool) -> Iterator[dict[str, Any]]:
        for c in out.outputs:
            # The prompt is echoed once its prefill is done (its logprobs complete): with the first token.
            prefix = self.echo and not self.echoed[c.index] and bool(c.token_ids or c.finish_reason)
            step = self._advance(c)
            if step is None and not prefix:
                continue
            delta, start, end, done = step or ("", 0, 0, False)
            if self.score_only:
                delta, start = "", end
            self.echoed[c.index] = self.echoed[c.index] or prefix
            ids, lps = self._tokens(out, c, start, end, prefix)
            lp = None
            if self.logprobs is not None:
                lp = completion_logprobs(self.tok, ids, lps, self.text_offset[c.index])
                self.text_offset[c.index] += sum(len(t) for t in lp["tokens"])
            text = (prompt_text(self.tok, out) if prefix else "") + delta
            yield completion_chunk(rid, model, self.offset + c.index, text, lp, c.finish_reason if done else None,
                                   include_usage)

    def _tokens(self, out: RequestOutput, c: CompletionOutput, start: int, end: int,
                prefix: bool) -> tuple[list[int], list[LogprobDict | None]]:
        """The token ids, and their logprobs (None: the first prompt token's), that a completion chunk covers."""
        ids, lps = list(c.token_ids[start:end]), list((c.logprobs or [])[start:end])
        if prefix:
            prompt_lps = out.prompt_logprobs or [None] * len(out.prompt_token_ids)
            ids, lps = list(out.prompt_token_ids) + ids, list(prompt_lps) + lps
        return ids, lps

    def completion_choices(self, out: RequestOutput) -> list[dict[str, Any]]:
        """The final choices of one prompt."""
        choices = []
        for c in out.outputs:
            end = 0 if self.score_only else len(c.token_ids)
            ids, lps = self._tokens(out, c, 0, end, self.echo)
            lp = completion_logprobs(self.tok, ids, lps, 0) if self.logprobs is not None else None
            text = (prompt_text(self.tok, out) if self.echo else "") + ("" if self.score_only else c.text)
            choices.append({"index": self.offset + c.index, "text": text, "logprobs": lp,
                            "finish_reason": c.finish_reason})
        return choices


def prompt_text(tok: Tokenizer, out: RequestOutput) -> str:
    return out.prompt if out.prompt is not None else tok.decode(out.prompt_token_ids, skip_special_tokens=False)


def _token_str(tok: Tokenizer, t: int) -> str:
    return tok.id_to_bytes(t).decode("utf-8", errors="replace")


def chat_logprobs(tok: Tokenizer, c: CompletionOutput, start: int, end: int, top: int) -> list[dict[str, Any]]:
    items = []
    for t, lps in zip(c.token_ids[start:end], (c.logprobs or [])[start:end]):
        # The engine's dict holds the top-`top` tokens (ranks 1..top) plus the chosen one.
        tops = sorted((kv for kv in lps.items() if kv[1].rank and kv[1].rank <= top), key=lambda kv: kv[1].rank)
        items.append({"token": _token_str(tok, t), "logprob": lps[t].logprob, "bytes": list(tok.id_to_bytes(t)),
                      "top_logprobs": [{"token": _token_str(tok, k), "logprob": v.logprob,
                                        "bytes": list(tok.id_to_bytes(k))} for k, v in tops]})
    return items


def completion_logprobs(tok: Tokenizer, ids: list[int], lps: list[LogprobDict | None],
                        text_offset: int) -> dict[str, Any]:
    """The legacy API's logprobs (vLLM's shape): a token without logprobs (the prompt's first) has nulls;
    text_offset counts the token strings' characters from `text_offset`; -inf is sent as -9999.0."""
    tokens, token_lps, tops, offsets = [], [], [], []
    pos = text_offset
    for t, lp in zip(ids, lps):
        s = _token_str(tok, t)
        tokens.append(s)
        offsets.append(pos)
        pos += len(s)
        token_lps.append(None if lp is None else max(lp[t].logprob, -9999.0))
        tops.append(None if lp is None else {_token_str(tok, k): max(v.logprob, -9999.0) for k, v in lp.items()})
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def chat_chunk(rid: str, model: str, index: int, delta: dict[str, Any], logprobs: Any, finish: str | None,
               include_usage: bool) -> dict[str, Any]:
    extra = {"usage": None} if include_usage else {}
    return P.envelope("chat.completion.chunk", rid, model,
                      [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}], **extra)


def completion_chunk(rid: str, model: str, index: int, text: str, logprobs: Any, finish: str | None,
                     include_usage: bool) -> dict[str, Any]:
    extra = {"usage": None} if include_usage else {}
    return P.envelope("text_completion", rid, model,
                      [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}], **extra)


def chat_final(rid: str, model: str, out: RequestOutput, state: ChoiceState, logprobs: bool) -> dict[str, Any]:
    choices = []
    for c in out.outputs:
        content, calls = parse(c.text, state.tools.names, state.tools.parallel) if state.tools else (c.text, [])
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = calls
        choices.append({"index": c.index, "message": message,
                        "logprobs": {"content": chat_logprobs(state.tok, c, 0, len(c.token_ids), state.top_logprobs)}
                        if logprobs and c.logprobs is not None else None,
                        "finish_reason": _finish(c, bool(calls))})
    return P.envelope("chat.completion", rid, model, choices,
                      usage=P.usage(len(out.prompt_token_ids), state.completion_tokens(out), out.num_cached_tokens))


def _finish(c: CompletionOutput, calls: bool) -> str | None:
    """OpenAI's finish_reason "tool_calls" for a reply that ended by itself with calls; "length" stays (a call
    that max_tokens cut short is incomplete)."""
    return "tool_calls" if calls and c.finish_reason == "stop" else c.finish_reason


def completion_final(rid: str, model: str, outs: list[RequestOutput], states: list[ChoiceState]) -> dict[str, Any]:
    choices = [choice for out, state in zip(outs, states) for choice in state.completion_choices(out)]
    prompt = sum(len(o.prompt_token_ids) for o in outs)
    completion = sum(state.completion_tokens(o) for o, state in zip(outs, states))
    cached = sum(o.num_cached_tokens for o in outs)
    return P.envelope("text_completion", rid, model, choices, usage=P.usage(prompt, completion, cached))
