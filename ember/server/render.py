"""Turning RequestOutputs into OpenAI response bodies and streaming deltas (text, logprobs, usage)."""
from __future__ import annotations

from typing import Any, Iterator

from ember.engine.outputs import CompletionOutput, LogprobDict, RequestOutput
from ember.loading.tokenizer import Tokenizer
from ember.server import protocol as P


class ChoiceState:
    """What has been sent so far for each of one request's n choices."""

    def __init__(self, tok: Tokenizer, n: int, offset: int = 0, top_logprobs: int = 0) -> None:
        self.tok, self.n, self.offset, self.top_logprobs = tok, n, offset, top_logprobs
        self.text_sent = [0] * n
        self.tokens_sent = [0] * n
        self.finished = [False] * n
        self.echoed = False

    @staticmethod
    def completion_tokens(out: RequestOutput) -> int:
        return sum(len(c.token_ids) for c in out.outputs)

    def _advance(self, c: CompletionOutput) -> tuple[str, int, int, bool] | None:
        i = c.index
        delta = c.text[self.text_sent[i]:]
        start, end = self.tokens_sent[i], len(c.token_ids)
        newly_done = c.finish_reason is not None and not self.finished[i]
        if not delta and not newly_done:
            return None
        self.text_sent[i] = len(c.text)
        self.tokens_sent[i] = end
        self.finished[i] = self.finished[i] or newly_done
        return delta, start, end, newly_done

    def chat_deltas(self, rid: str, model: str, out: RequestOutput, logprobs: bool,
                    include_usage: bool) -> Iterator[dict[str, Any]]:
        for c in out.outputs:
            step = self._advance(c)
            if step is None:
                continue
            delta, start, end, done = step
            lp = {"content": chat_logprobs(self.tok, c, start, end, self.top_logprobs)} if logprobs and c.logprobs is not None else None
            yield chat_chunk(rid, model, c.index, {"content": delta} if delta else {},
                             lp, c.finish_reason if done else None, include_usage)

    def completion_deltas(self, rid: str, model: str, out: RequestOutput, echo: bool, logprobs: int | None,
                          include_usage: bool) -> Iterator[dict[str, Any]]:
        prefix = ""
        if echo and not self.echoed:
            self.echoed = True
            prefix = prompt_text(self.tok, out)
        for c in out.outputs:
            step = self._advance(c)
            if step is None and not prefix:
                continue
            delta, start, end, done = step or ("", 0, 0, False)
            lp = completion_logprobs(self.tok, c, start, end) if logprobs is not None and c.logprobs else None
            yield completion_chunk(rid, model, self.offset + c.index, prefix + delta, lp,
                                   c.finish_reason if done else None, include_usage)
        if prefix and not out.outputs:
            yield completion_chunk(rid, model, self.offset, prefix, None, None, include_usage)


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


def completion_logprobs(tok: Tokenizer, c: CompletionOutput, start: int, end: int,
                        text_offset: int = 0) -> dict[str, Any]:
    tokens, token_lps, tops, offsets = [], [], [], []
    pos = text_offset
    for t, lps in zip(c.token_ids[start:end], (c.logprobs or [])[start:end]):
        s = _token_str(tok, t)
        tokens.append(s)
        token_lps.append(lps[t].logprob)
        tops.append({_token_str(tok, k): v.logprob for k, v in lps.items()})
        offsets.append(pos)
        pos += len(s)
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
    choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                "logprobs": {"content": chat_logprobs(state.tok, c, 0, len(c.token_ids), state.top_logprobs)}
                if logprobs and c.logprobs is not None else None,
                "finish_reason": c.finish_reason} for c in out.outputs]
    return P.envelope("chat.completion", rid, model, choices,
                      usage=P.usage(len(out.prompt_token_ids), state.completion_tokens(out)))


def completion_final(rid: str, model: str, outs: list[RequestOutput], states: list[ChoiceState], echo: bool,
                     logprobs: int | None) -> dict[str, Any]:
    choices = []
    for out, state in zip(outs, states):
        prefix = prompt_text(state.tok, out) if echo else ""
        for c in out.outputs:
            lp = completion_logprobs(state.tok, c, 0, len(c.token_ids), len(prefix)) \
                if logprobs is not None and c.logprobs is not None else None
            choices.append({"index": state.offset + c.index, "text": prefix + c.text, "logprobs": lp,
                            "finish_reason": c.finish_reason})
    prompt = sum(len(o.prompt_token_ids) for o in outs)
    completion = sum(ChoiceState.completion_tokens(o) for o in outs)
    return P.envelope("text_completion", rid, model, choices, usage=P.usage(prompt, completion))
