"""Pydantic models of the OpenAI API shapes ember serves (requests validated, responses built)."""
from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass
from functools import lru_cache
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from ember.apps.rerank import METHODS
from ember.engine import sampling_params as S
from ember.engine.pooling_params import POOLING_TYPES
from ember.engine.sampling_params import check_utf8


def _utf8(text: str) -> str:
    check_utf8(text, "text")  # a ValueError: pydantic reports it with the field's location
    return text


# Every string a client sends: JSON can carry lone surrogates, which nothing downstream can encode.
Text = Annotated[str, AfterValidator(_utf8)]
# The schema says the ranges the engine accepts (SamplingParams checks them again, for the Python API too).
MAX_N = 128  # OpenAI's cap on n
MAX_PROMPTS = 256  # prompts in one /v1/completions request
MAX_EMBED_INPUTS = 2048  # OpenAI's cap on inputs in one /v1/embeddings request
MAX_DOCUMENTS = 1000  # Cohere's cap on documents in one rerank request (and texts of a /v1/score side)
Finite = Annotated[float, Field(allow_inf_nan=False)]
TokenId = Annotated[int, Field(ge=0)]
StopText = Annotated[Text, Field(min_length=1, max_length=S.MAX_STOP_STRING_CHARS)]
Bias = Annotated[float, Field(ge=-S.LOGIT_BIAS_RANGE, le=S.LOGIT_BIAS_RANGE, allow_inf_nan=False)]
NonEmptyText = Annotated[Text, Field(min_length=1)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]


log = logging.getLogger("ember")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def refused(field: str, message: str) -> PydanticCustomError:
    """A 400 whose `param` is `field` (under the model's location), raised from a model validator."""
    return PydanticCustomError("refused", "{message}", {"field": field, "message": message})


@dataclass(frozen=True)
class Unsupported:
    """An OpenAI or vLLM request field ember does not implement: refused with a 400 that names it, unless it
    is null or one of `off` (its values that ask for nothing), or equal to the field `same_as`."""

    off: tuple[Any, ...] = ()
    same_as: str | None = None

    def accepts(self, value: Any, data: dict[str, Any], model: type[BaseModel]) -> bool:
        off = list(self.off)
        if self.same_as:
            same = data.get(self.same_as)
            off.append(model.model_fields[self.same_as].default if same is None else same)
        return value is None or any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in off)

    def says(self) -> str:
        ok = ["null", *(json.dumps(v) for v in self.off)] + ([f"the value of {self.same_as}"] if self.same_as else [])
        return "not supported by this server (yet); leave it out" + (
            f" or send {', '.join(ok[:-1])} or {ok[-1]}" if len(ok) > 1 else "")


NO = Unsupported()  # refused unless null


@lru_cache(maxsize=256)  # once per name (bounded: a client can send any number of names)
def _warn_unknown(model: str, name: str) -> None:
    log.warning("ignoring the request field %.64r of %s: neither OpenAI's API nor vLLM's extras define it",
                name, model)


class _Request(BaseModel):
    # Known fields must have their documented JSON type (strict: "5" is not a number, 0 is not a boolean; 1 is
    # a float). Fields that OpenAI or vLLM define and ember does not implement are refused (`unsupported`);
    # other unknown fields are ignored with a warning, as vLLM does.
    model_config = ConfigDict(extra="ignore", strict=True, json_schema_extra=lambda s, cls: _document(s, cls))
    unsupported: ClassVar[dict[str, Unsupported]] = {}
    inert: ClassVar[frozenset[str]] = frozenset()  # defined elsewhere, and asking for nothing ember lacks
    warn_unknown: ClassVar[bool] = True

    @model_validator(mode="before")
    @classmethod
    def _check_fields(cls, data: Any) -> Any:
        """Refuse unsupported fields; and as OpenAI's schema makes most parameters nullable, and clients send
        null for "not set", a null optional field takes its default (so the fields below are `| None` in the
        schema, never at run time)."""
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        names = set(fields) | {f.alias for f in fields.values() if f.alias}
        for key, value in data.items():
            if key in names or key in cls.inert:
                continue
            rule = cls.unsupported.get(key)
            if rule is None:
                if cls.warn_unknown and isinstance(key, str):
                    _warn_unknown(cls.__name__, key)
                continue
            if not rule.accepts(value, data, cls):
                raise refused(key, rule.says())
        return {k: v for k, v in data.items() if v is not None or k not in fields or fields[k].is_required()}


def _document(schema: dict[str, Any], cls: Any) -> None:
    """The schema lists the fields refused with a 400 (they are not properties: a client should not send them)."""
    if cls.unsupported:
        refused_fields = ", ".join(sorted(cls.unsupported))
        schema["description"] = (schema.get("description", "") + "\n\nNot supported (yet), refused with a 400 "
                                 f"that names the field unless null or off: {refused_fields}").strip()


class StreamOptions(_Request):
    unsupported = {"continuous_usage_stats": Unsupported((False,)), "include_obfuscation": Unsupported((False,))}
    include_usage: bool | None = False


# vLLM's structured outputs and extras that ember does not implement, and OpenAI's stored completions and tiers.
_SAMPLING_UNSUPPORTED = {
    **dict.fromkeys(["guided_decoding_backend", "guided_whitespace_pattern", "prompt_logprobs", "allowed_token_ids",
                     "truncate_prompt_tokens", "logits_processors", "request_id", "cache_salt",
                     "kv_transfer_params", "vllm_xargs"], NO),
    "bad_words": Unsupported(([],)),
    "use_beam_search": Unsupported((False,)), "length_penalty": Unsupported((1.0,)),
    "spaces_between_special_tokens": Unsupported((True,)), "return_tokens_as_token_ids": Unsupported((False,)),
    "return_token_ids": Unsupported((False,)), "priority": Unsupported((0,)), "store": Unsupported((False,)),
    "service_tier": Unsupported(("auto", "default")),
}


class JsonSchemaFormat(_Request):
    """OpenAI's response_format.json_schema (`strict` is how ember always decodes: the output follows the schema)."""

    name: Text | None = None
    description: Text | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> "ResponseFormat":
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.schema_ is None):
            raise refused("json_schema", "type json_schema needs json_schema.schema (the JSON schema to follow)")
        return self


class StructuredOutputsRequest(_Request):
    """vLLM's structured_outputs: exactly one of these."""

    json_: dict[str, Any] | Text | None = Field(default=None, alias="json")
    regex: Text | None = None
    choice: Annotated[list[NonEmptyText], Field(min_length=1)] | None = None
    grammar: NonEmptyText | None = None
    json_object: bool | None = None


class _Sampling(_Request):
    inert = frozenset({"metadata", "prompt_cache_key"})  # metadata is for stored completions; caching is automatic
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
    user: Text | None = None  # who the end user is, for the operator: logged
    safety_identifier: Text | None = None  # OpenAI's newer name for it
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
    # Structured outputs: OpenAI's response_format, or vLLM's guided_* / structured_outputs (one of them).
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | Text | None = None
    guided_regex: Text | None = None
    guided_choice: Annotated[list[NonEmptyText], Field(min_length=1)] | None = None
    guided_grammar: NonEmptyText | None = None
    structured_outputs: StructuredOutputsRequest | None = None

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> "_Sampling":
        if self.stream_options is not None and not self.stream:
            raise refused("stream_options", "only allowed with stream: true")
        return self


class ContentPart(_Request):
    unsupported = dict.fromkeys(["image_url", "input_audio", "file", "refusal"], NO)
    type: Literal["text"]
    text: Text | None = None


FunctionName = Annotated[str, Field(pattern=r"^[a-zA-Z0-9_.-]{1,64}$")]


class FunctionDef(_Request):
    name: FunctionName
    description: Text | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Request):
    type: Literal["function"]
    function: FunctionDef


class CalledFunction(_Request):
    name: FunctionName
    arguments: Text  # JSON text, as OpenAI sends it


class ToolCall(_Request):
    id: Text
    type: Literal["function"] = "function"
    function: CalledFunction


class NamedFunction(_Request):
    name: FunctionName


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


class ChatMessage(_Request):
    unsupported = {"function_call": NO, "audio": NO, "refusal": NO}
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Text | list[ContentPart] | None = None
    name: Text | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: Text | None = None  # a tool message: the call it answers

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text or "" for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    unsupported = {
        **_SAMPLING_UNSUPPORTED, "functions": Unsupported(([],)), "function_call": Unsupported(("none", "auto")),
        "modalities": Unsupported((["text"],)), "continue_final_message": Unsupported((False,)),
        "echo": Unsupported((False,)), "add_special_tokens": Unsupported((False,)),
        "chat_template_kwargs": Unsupported(({},)),
        **dict.fromkeys(["audio", "prediction", "reasoning_effort", "verbosity", "web_search_options",
                         "chat_template", "documents", "mm_processor_kwargs"], NO)}
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = True
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    add_generation_prompt: bool | None = True
    session: Annotated[str, Field(min_length=1, max_length=256, description=(
        "ember: a long-term memory session (SCM). Send only the new user message (and optionally a system "
        "message): the server adds what memory recalls from the session's earlier turns and stores this turn; "
        "the response carries memory.turns_used and memory.memory_tokens"))] | None = None

    @model_validator(mode="after")
    def _tool_choice_names_a_tool(self) -> "ChatCompletionRequest":
        choice = self.tool_choice
        names = {t.function.name for t in self.tools or []}
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise refused("tool_choice", f"names the function {choice.function.name!r}, which is not among tools")
        if choice == "required" and not names:
            raise refused("tool_choice", "required needs tools to choose from")
        return self


class CompletionRequest(_Sampling):
    unsupported = {**_SAMPLING_UNSUPPORTED, "suffix": Unsupported(("",)), "best_of": Unsupported(same_as="n"),
                   "add_special_tokens": Unsupported((True,)), "prompt_embeds": NO}
    prompt: (NonEmptyText | Annotated[list[NonEmptyText], Field(min_length=1, max_length=MAX_PROMPTS)] | TokenIds
             | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)])
    max_tokens: Annotated[int, Field(ge=0, description="0 (with echo) scores the prompt")] | None = 16
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: bool | None = False

    @model_validator(mode="after")
    def _zero_tokens_need_echo(self) -> "CompletionRequest":
        if self.max_tokens == 0 and not self.echo:
            raise refused("max_tokens", "must be at least 1 (0 only with echo: true, which scores the prompt)")
        return self


class TokenizeCompletionRequest(_Request):
    """vLLM's /tokenize shapes: a prompt, or chat messages rendered through the template."""

    warn_unknown = False  # each shape's fields are unknown to the other
    model: Text | None = None
    prompt: Text
    add_special_tokens: bool | None = True


class TokenizeChatRequest(_Request):
    warn_unknown = False
    model: Text | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    add_generation_prompt: bool | None = True
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None  # as chat completions would place them


TokenizeRequest = TokenizeCompletionRequest | TokenizeChatRequest


class DetokenizeRequest(_Request):
    model: Text | None = None
    tokens: list[TokenId]


class EmbeddingRequest(_Request):
    """OpenAI's /v1/embeddings; `pooling` (extra) overrides the server's --pooling."""

    unsupported = {"truncate_prompt_tokens": NO, "request_id": NO, "embed_dtype": Unsupported(("float32",)),
                   "use_activation": Unsupported((True,)), "normalize": Unsupported((True,)),
                   "add_special_tokens": Unsupported((True,)), "priority": Unsupported((0,))}
    model: Text | None = None
    input: (NonEmptyText | Annotated[list[NonEmptyText], Field(min_length=1, max_length=MAX_EMBED_INPUTS)]
            | TokenIds | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_EMBED_INPUTS)])
    encoding_format: Literal["float", "base64"] | None = "float"
    dimensions: Annotated[int, Field(ge=1, description="only the model's hidden size: vectors are not "
                                                        "shortened")] | None = None
    pooling: Literal[POOLING_TYPES] | None = Field(None, description="last or mean (default: the server's "
                                                                     "--pooling); vectors are L2-normalised")
    user: Text | None = None


class _RetrievalOptions(_Request):
    """How documents are scored (ember's extras): `method`, ICR's `layers` and `calibration`, the embedding
    method's `pooling`, and `max_tokens_per_doc` (Cohere's: each document cut to that many tokens)."""

    unsupported = {"truncate_prompt_tokens": NO, "request_id": NO, "priority": Unsupported((0,))}
    model: Text | None = None
    max_tokens_per_doc: Annotated[int, Field(ge=1)] | None = None
    method: Literal[METHODS] | None = "icr"
    layers: Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)] | Literal["all"] | None = Field(
        None, description='ICR: the layers whose attention is scored (default: a band from a fifth to a third '
                          'of the depth; "all": every layer)')
    calibration: bool | None = Field(True, description="ICR: subtract a content-free query's attention")
    pooling: Literal[POOLING_TYPES] | None = Field(None, description="method embedding: last or mean (default: "
                                                                     "the server's --pooling)")

    @model_validator(mode="after")
    def _options_of_the_method(self) -> "_RetrievalOptions":
        if self.method != "icr":
            if self.layers is not None:
                raise refused("layers", f"only method icr scores layers (method is {self.method})")
            if self.calibration is False:
                raise refused("calibration", f"only method icr calibrates (method is {self.method})")
        if self.method != "embedding" and self.pooling is not None:
            raise refused("pooling", f"only method embedding pools (method is {self.method})")
        return self


class RerankDocument(_Request):
    text: Text


class RerankRequest(_RetrievalOptions):
    """Jina's and Cohere's rerank (vLLM's /rerank, /v1/rerank, /v2/rerank); with `texts` instead of
    `documents`, TEI's (answered in TEI's shape, a list of {index, score, text?})."""

    unsupported = {**_RetrievalOptions.unsupported, "rank_fields": NO, "truncate": Unsupported((False,))}
    # TEI's raw_scores: the methods' scores pass through no sigmoid either way
    inert = frozenset({"raw_scores", "truncation_direction"})
    query: Text
    documents: Annotated[list[Text | RerankDocument], Field(min_length=1, max_length=MAX_DOCUMENTS)] | None = None
    texts: Annotated[list[Text], Field(min_length=1, max_length=MAX_DOCUMENTS)] | None = None
    top_n: Annotated[int, Field(ge=0, description="the best top_n results (0 or null: all)")] | None = None
    return_documents: bool | None = True
    return_text: bool | None = Field(False, description="with texts (TEI): each result's text")

    @model_validator(mode="after")
    def _documents_or_texts(self) -> "RerankRequest":
        if self.documents is None and self.texts is None:
            raise refused("documents", "required: a list of strings or {\"text\": ...} objects (or texts, TEI's "
                                       "name, for TEI's response shape)")
        if self.documents is not None and self.texts is not None:
            raise refused("texts", "send documents or texts, not both")
        return self

    def document_texts(self) -> list[str]:
        docs = self.texts if self.texts is not None else self.documents or []
        return [d if isinstance(d, str) else d.text for d in docs]


class ScoreRequest(_RetrievalOptions):
    """vLLM's /score: text_1 and text_2 (or queries and documents), each a string or a list; paired 1:1, 1:N
    (one text_1) or N:N (lists of equal length). Default method: embedding (cosine of the pooled vectors)."""

    method: Literal[METHODS] | None = Field("embedding", description="embedding: the cosine of the two texts' "
                                                                      "pooled vectors")
    text_1: Text | Annotated[list[Text], Field(min_length=1, max_length=MAX_DOCUMENTS)] | None = None
    text_2: Text | Annotated[list[Text], Field(min_length=1, max_length=MAX_DOCUMENTS)] | None = None
    queries: Text | Annotated[list[Text], Field(min_length=1, max_length=MAX_DOCUMENTS)] | None = None
    documents: Text | Annotated[list[Text], Field(min_length=1, max_length=MAX_DOCUMENTS)] | None = None

    @model_validator(mode="after")
    def _pairs(self) -> "ScoreRequest":
        legacy = self.text_1 is not None or self.text_2 is not None
        if legacy and (self.queries is not None or self.documents is not None):
            raise refused("queries" if self.queries is not None else "documents",
                          "send text_1 and text_2, or queries and documents, not both")
        names = ("text_1", "text_2") if legacy else ("queries", "documents")
        sides = []
        for name in names:
            value = getattr(self, name)
            if value is None:
                raise refused(name, f"required (a string or a list of strings, paired with {names[names[0] == name]})")
            items = [value] if isinstance(value, str) else value
            empty = next((i for i, t in enumerate(items) if not t.strip()), None)
            if empty is not None:
                raise refused(name, "must not be empty" if isinstance(value, str) else f"item {empty} is empty")
            sides.append(items)
        first, second = sides
        if len(first) != 1 and len(first) != len(second):
            raise refused(names[1], f"{names[0]} has {len(first)} texts and {names[1]} {len(second)}: pair them 1:1, "
                                    f"1:N (one {names[0]}) or N:N (lists of equal length)")
        return self

    def pairs(self) -> tuple[list[str], list[str]]:
        """Both sides as lists (text_1 / queries first)."""
        first, second = (self.text_1, self.text_2) if self.text_1 is not None else (self.queries, self.documents)
        return ([first] if isinstance(first, str) else list(first or []),
                [second] if isinstance(second, str) else list(second or []))


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


def usage(prompt: int, completion: int, cached: int | None = None) -> dict[str, Any]:
    """OpenAI's usage; `cached`: the prompt tokens read from the prefix cache (prompt_tokens_details)."""
    out: dict[str, Any] = Usage(prompt_tokens=prompt, completion_tokens=completion,
                                total_tokens=prompt + completion).model_dump()
    if cached is not None:
        out["prompt_tokens_details"] = {"cached_tokens": cached}
    return out


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
