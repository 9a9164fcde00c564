"""Structured outputs: a JSON schema, any JSON object, a regex, a choice or a Lark/GBNF grammar, compiled by
llguidance into one matcher per sequence; the engine masks a constrained row's logits to the tokens its matcher
allows before sampling, and feeds the matcher each token it appends."""
from __future__ import annotations

import json
import re
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ember.errors import InvalidParameterError

PARAM = "structured_outputs"
# Between JSON tokens: pretty-printing room (newline and indentation ~10 levels deep), but bounded. Unbounded, a
# small model can emit whitespace until max_tokens (vLLM's disable_any_whitespace answers the same problem).
JSON_WHITESPACE = r"[\x20\x0A\x0D\x09]{0,24}"
INTEGER_BOUND = 10**18 - 1


@dataclass(frozen=True)
class StructuredOutputsParams:
    """vLLM's StructuredOutputsParams: exactly one of json (a JSON schema, as a dict or its text), json_object
    (any JSON object), regex, choice (one of these strings) or grammar (Lark, llguidance's dialect, or GBNF)."""

    json: dict[str, Any] | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | list[str] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        given = [k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise InvalidParameterError(f"structured outputs take exactly one of json, json_object, regex, choice "
                                        f"or grammar; got {', '.join(given) or 'none'}", PARAM)
        if self.choice is not None and (not self.choice or not all(isinstance(c, str) and c for c in self.choice)):
            raise InvalidParameterError("choice must be a non-empty list of non-empty strings", PARAM)

    def grammar_text(self) -> str:
        """The constraint as an llguidance grammar (JSON text of its grammar object)."""
        from llguidance import LLMatcher

        if self.json is not None or self.json_object:
            schema = ({"type": "object"} if self.json_object else
                      json.loads(self.json) if isinstance(self.json, str) else self.json)
            return LLMatcher.grammar_from_json_schema(bounded_integers(schema),
                                                      defaults={"whitespace_pattern": JSON_WHITESPACE})
        if self.regex is not None:
            return LLMatcher.grammar_from_regex(self.regex)
        if self.choice is not None:
            return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in self.choice))
        assert self.grammar is not None
        return LLMatcher.grammar_from_lark(_as_lark(self.grammar))


def bounded_integers(schema: Any) -> Any:
    """The schema with every integer lacking a bound given one of +-(10**18 - 1), inside the 64-bit range JSON
    parsers read: unbounded, a small model's greedy "1111..." runs to max_tokens (seen with the default model)."""
    if isinstance(schema, list):
        return [bounded_integers(x) for x in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: bounded_integers(v) for k, v in schema.items()}
    if out.get("type") == "integer":
        if "maximum" not in out and "exclusiveMaximum" not in out:
            out["maximum"] = INTEGER_BOUND
        if "minimum" not in out and "exclusiveMinimum" not in out:
            out["minimum"] = -INTEGER_BOUND
    return out


def _as_lark(grammar: str) -> str:
    """GBNF (llama.cpp's, `root ::= ...`) converted to Lark; anything else is taken as Lark."""
    if re.search(r"^\s*[\w-]+\s*::=", grammar, re.M):
        from llguidance.gbnf_to_lark import gbnf_to_lark

        return gbnf_to_lark(grammar)
    return grammar


class GrammarCompiler:
    """Matchers for one tokenizer; llguidance's view of the vocabulary is built on first use (~0.4 s)."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self._ll: Any = None

    def matcher(self, params: StructuredOutputsParams) -> Any:
        """A fresh LLMatcher, or an InvalidParameterError naming what is wrong with the constraint."""
        from llguidance import LLMatcher

        try:
            grammar = params.grammar_text()
        except (ValueError, TypeError) as e:  # bad JSON text, a schema llguidance cannot read
            raise InvalidParameterError(f"the structured output constraint is invalid: {e}", PARAM) from None
        is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, self.ll_tokenizer)
        if is_error:
            raise InvalidParameterError(f"the structured output constraint is invalid: {messages[0]}", PARAM)
        if messages:  # a keyword or format the engine would ignore: refused, never silently dropped
            raise InvalidParameterError("the structured output constraint uses what ember's grammar engine "
                                        f"(llguidance) does not support: {'; '.join(messages)}", PARAM)
        matcher = LLMatcher(self.ll_tokenizer, grammar)
        if matcher.is_error():
            raise InvalidParameterError(f"the structured output constraint is invalid: {matcher.get_error()}",
                                        PARAM)
        return matcher

    @property
    def ll_tokenizer(self) -> Any:
        if self._ll is None:
            import llguidance

            self._ll = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Vocabulary(self.tokenizer)),
                                              n_vocab=self.vocab_size)
        return self._ll


class _Vocabulary:
    """What llguidance's TokenizerWrapper reads from a tokenizer: each token's bytes, the special ids, encoding."""

    def __init__(self, tok: Any) -> None:
        self.tok = tok
        self.eos_token_id = tok.eos_token_id
        self.bos_token_id = tok.bos_token_id
        self.tokens = [tok.id_to_bytes(i) for i in range(tok.vocab_size)]
        self.special_token_ids = [i for i in range(tok.vocab_size) if tok.is_special(i)]

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self.tok.encode(text, add_special_tokens=False)


class Masker:
    """Applies the constrained rows' token masks, computed by llguidance's executor (its own threads, the GIL
    released) and unpacked with numpy. `prefetch` starts the masks of the rows a step will sample on a worker
    thread before the model's forward, which then hides most of their cost. (llguidance.torch's apply runs
    torch.compile: seconds on first use, and a compiler at run time.)"""

    def __init__(self) -> None:
        self._executor: Any = None
        self._pool: ThreadPoolExecutor | None = None
        self._pending: tuple[dict[int, int], np.ndarray, Future] | None = None

    def prefetch(self, matchers: list[Any], vocab: int) -> None:
        """Start computing these matchers' next masks (their states must not change before they sample)."""
        self._pending = None
        if not matchers:
            return
        import llguidance.numpy as lln

        self._pool = self._pool or ThreadPoolExecutor(1, thread_name_prefix="ember-grammar")
        bitmask = lln.allocate_token_bitmask(len(matchers), vocab)
        future = self._pool.submit(self._fill, list(enumerate(matchers)), bitmask)
        self._pending = ({id(m): k for k, m in enumerate(matchers)}, bitmask, future)

    def __call__(self, logits: torch.Tensor, matchers: list[tuple[int, Any]]) -> None:
        """Disallowed tokens of each constrained row (row index, matcher) get -inf, in place."""
        import llguidance.numpy as lln

        if not matchers:
            return
        vocab = logits.shape[-1]
        bitmask = lln.allocate_token_bitmask(len(matchers), vocab)
        pending, self._pending = self._pending, None
        todo = list(enumerate(m for _, m in matchers))
        if pending is not None and pending[1].shape[1] == bitmask.shape[1]:
            index, ready, future = pending
            future.result()
            for k, m in list(todo):
                if id(m) in index:
                    bitmask[k] = ready[index[id(m)]]
            todo = [(k, m) for k, m in todo if id(m) not in index]
        self._fill(todo, bitmask)
        banned = torch.from_numpy(np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")[:, :vocab] == 0)
        # In place, row views: gathering the rows and scattering them back cost 4x this at 16 rows (measured).
        if [i for i, _ in matchers] == list(range(logits.shape[0])):
            logits.masked_fill_(banned, float("-inf"))
            return
        for k, (i, _) in enumerate(matchers):
            logits[i].masked_fill_(banned[k], float("-inf"))

    def _fill(self, todo: list[tuple[int, Any]], bitmask: np.ndarray) -> None:
        """Rows k of `bitmask` for the (k, matcher) pairs."""
        import llguidance
        import llguidance.numpy as lln

        if len(todo) == 1:
            lln.fill_next_token_bitmask(todo[0][1], bitmask, todo[0][0])
        elif todo:
            self._executor = self._executor or llguidance.LLExecutor()
            lln.fill_next_token_bitmask_par(self._executor, [(m, k) for k, m in todo], bitmask)
