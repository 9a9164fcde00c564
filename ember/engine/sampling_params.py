"""SamplingParams: how one request is decoded (vLLM-compatible names), validated on creation."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ember.errors import InvalidParameterError

if TYPE_CHECKING:
    from ember.engine.structured import StructuredOutputsParams

# Bounds on what one request may ask the engine to check every token (OpenAI allows 4 stop strings; a few
# dozen cover every client seen: lm-eval's `until` lists, code completion's stop words).
MAX_STOP_STRINGS = 32
MAX_STOP_STRING_CHARS = 512
MAX_STOP_TOKEN_IDS = 256
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)  # what torch.Generator.manual_seed takes
LOGIT_BIAS_RANGE = 100.0  # OpenAI's: -100 (ban) .. 100 (force)


def check_utf8(text: str, param: str) -> None:
    """Text from JSON may hold lone surrogates ("\\ud800"), which no tokenizer or response can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidParameterError(f"{param} contains {text[e.start:e.end]!r}, a lone UTF-16 surrogate, which "
                                    "is not a character; send valid Unicode text", param) from None


@dataclass
class SamplingParams:
    """Decoding options for one request; `temperature=0` means greedy."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit before sampling
    # Output constrained to a JSON schema, a regex, a choice or a grammar (ember.engine.structured).
    structured_outputs: "StructuredOutputsParams | None" = None
    stop_strings: list[str] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        if self.stop is None:
            self.stop_strings = []
        elif isinstance(self.stop, str):
            self.stop_strings = [self.stop]
        else:
            self.stop_strings = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == 0:
            self.top_k = -1
        self._validate()

    def _validate(self) -> None:
        def bad(param: str, why: str) -> InvalidParameterError:
            return InvalidParameterError(f"{param} {why}", param=param)

        self._validate_numbers(bad)
        if self.n < 1:
            raise bad("n", f"must be at least 1, got {self.n}")
        if self.top_k < -1:
            raise bad("top_k", f"must be -1 (disabled) or >= 1, got {self.top_k}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise bad("max_tokens", f"must be at least 1, got {self.max_tokens}")
        if self.min_tokens < 0:
            raise bad("min_tokens", f"must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"must not exceed max_tokens ({self.max_tokens}), got {self.min_tokens}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise bad("logprobs", f"must be in [0, 20], got {self.logprobs}")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= 20:
            raise bad("prompt_logprobs", f"must be in [0, 20], got {self.prompt_logprobs}")
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise bad("seed", f"must be a 64-bit integer (in [-2**63, 2**64 - 1]), got {self.seed}")
        self._validate_stops(bad)
        self._validate_logit_bias(bad)

    def _validate_numbers(self, bad: Callable[[str, str], InvalidParameterError]) -> None:
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise bad(name, f"must be a finite number, got {getattr(self, name)}")
        if self.temperature < 0:
            raise bad("temperature", f"must be >= 0 (0 means greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", f"must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise bad("min_p", f"must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise bad("repetition_penalty", f"must be > 0, got {self.repetition_penalty}")
        if not -2 <= self.presence_penalty <= 2:
            raise bad("presence_penalty", f"must be in [-2, 2], got {self.presence_penalty}")
        if not -2 <= self.frequency_penalty <= 2:
            raise bad("frequency_penalty", f"must be in [-2, 2], got {self.frequency_penalty}")

    def _validate_stops(self, bad: Callable[[str, str], InvalidParameterError]) -> None:
        if len(self.stop_strings) > MAX_STOP_STRINGS:
            raise bad("stop", f"may hold at most {MAX_STOP_STRINGS} strings, got {len(self.stop_strings)}")
        for s in self.stop_strings:
            if not isinstance(s, str) or not s:
                raise bad("stop", "must hold non-empty strings")
            if len(s) > MAX_STOP_STRING_CHARS:
                raise bad("stop", f"strings may be at most {MAX_STOP_STRING_CHARS} characters, got one of {len(s)}")
            check_utf8(s, "stop")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise bad("stop_token_ids", f"may hold at most {MAX_STOP_TOKEN_IDS} ids, got {len(self.stop_token_ids)}")
        if not all(is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must hold token ids (integers >= 0)")

    def _validate_logit_bias(self, bad: Callable[[str, str], InvalidParameterError]) -> None:
        if not self.logit_bias:
            return
        for token, value in self.logit_bias.items():
            if not is_int(token) or token < 0:
                raise bad("logit_bias", f"keys must be token ids (integers >= 0), got {token!r}")
            if not (isinstance(value, (int, float)) and -LOGIT_BIAS_RANGE <= value <= LOGIT_BIAS_RANGE):
                raise bad("logit_bias", f"values must be numbers in [-100, 100], got {value!r} for token {token}")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5


def is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
