"""Pydantic models of the OpenAI API shapes ember serves (requests validated, responses built)."""
from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from ember.engine import sampling_params as S
from ember.engine.sampling_params import check_utf8


def _utf8(text: str) -> str:
    check_utf8(text, "text")  # a ValueError: pydantic reports it with the field's location
    return text


# Every string a client sends: JSON can carry lone surrogates, which nothing downstream can encode.
Text = Annotated[str, AfterValidator(_utf8)]
# The schema says the ranges the engine accepts (SamplingParams checks them again, for the Python API too).
MAX_N = 128  # OpenAI's cap on n
MAX_PROMPTS = 256  # prompts in one /v1/completions request
Finite = Annotated[float, Field(allow_inf_nan=False)]
TokenId = Annotated[int, Field(ge=0)]
StopText = Annotated[Text, Field(min_length=1, max_length=S.MAX_STOP_STRING_CHARS)]
Bias = Annotated[float, Field(ge=-S.LOGIT_BIAS_RANGE, le=S.LOGIT_BIAS_RANGE, allow_inf_nan=False)]
NonEmptyText = Annotated[Text, Field(min_length=1)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class _Request(BaseModel):
    # Unknown fields are ignored, as OpenAI-compatible servers do (clients send extras freely); known ones
    # must have their documented JSON type (strict: "5" is not a number, 0 is not a boolean; 1 is a float).
    model_config = ConfigDict(extra="ignore", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data: Any) -> Any:
        """OpenAI's schema makes most parameters nullable, and clients send null for "not set": a null
        optional field takes its default (so the fields below are `| None` in the schema, never at run time)."""
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {k: v for k, v in data.items() if v is not None or k not in fields or fields[k].is_required()}


class StreamOptions(_Request):
    include_usage: bool | None = False


class _Sampling(_Request):
    model: Text | None = None
    temperature: Annotated[Finite, Field(ge=0)] | None = None
    top_p: Annotated[Finite, Field(gt=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] | None = 1
    stop: StopText | Annotated[list[StopText], Field(max_length=S.MAX_STOP_STRINGS)] | None = None
    seed: Annotated[int, Field(ge=S.SEED_RANGE[0], le=S.SEED_RANGE[1])] | None = None
    presence_penalty: Annotated[Finite, Field(ge=-2, le=2)] | None = 0.0
    frequency_penalty: Annotated[Finite, Field(ge=-2, le=2)] | None = 0.0
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: Text | None = None
    logit_bias: dict[Annotated[Text, Field(pattern=r"^[0-9]+$")], Bias] | None = None
    # vLLM's extras, which its users' code sends
    top_k: Annotated[int, Field(ge=-1)] | None = None
    min_p: Annotated[Finite, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[Finite, Field(gt=0)] | None = None
    ignore_eos: bool | None = False
    stop_token_ids: Annotated[list[TokenId], Field(max_length=S.MAX_STOP_TOKEN_IDS)] | None = None
    min_tokens: Annotated[int, Field(ge=0)] | None = 0
    skip_special_tokens: bool | None = True
    include_stop_str_in_output: bool | None = False


class ContentPart(_Request):
    type: Text
    text: Text | None = None


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Text | list[ContentPart] | None = None
    name: Text | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text or "" for p in self.content if p.type == "text")
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    add_generation_prompt: bool | None = True


class CompletionRequest(_Sampling):
    prompt: (NonEmptyText | Annotated[list[NonEmptyText], Field(min_length=1, max_length=MAX_PROMPTS)] | TokenIds
             | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)])
    max_tokens: Annotated[int, Field(ge=1)] | None = 16
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: bool | None = False
    suffix: Text | None = None
    best_of: Annotated[int, Field(ge=1, le=MAX_N)] | None = None


class TokenizeCompletionRequest(_Request):
    """vLLM's /tokenize shapes: a prompt, or chat messages rendered through the template."""

    model: Text | None = None
    prompt: Text
    add_special_tokens: bool | None = True


class TokenizeChatRequest(_Request):
    model: Text | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    add_generation_prompt: bool | None = True


TokenizeRequest = TokenizeCompletionRequest | TokenizeChatRequest


class DetokenizeRequest(_Request):
    model: Text | None = None
    tokens: list[TokenId]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    """Every error, as OpenAI's API answers it."""

    error: ErrorInfo


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def usage(prompt: int, completion: int) -> dict[str, int]:
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion).model_dump()


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | int | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def envelope(kind: str, rid: str, model: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": choices, **extra}


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "ember"
    max_model_len: int | None = None
