"""LLMEngine: requests in, one schedule -> forward -> sample -> update step at a time, outputs out."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch

from ember.engine.kv_cache import BlockManager
from ember.engine.outputs import CompletionOutput, EngineState, Logprob, LogprobDict, RequestOutput, StepShape
from ember.engine.runner import ModelRunner, PromptLogprobRows, StepResult
from ember.engine.sampler import Sampler, SamplingRow, compute_logprobs, top_logprobs
from ember.engine import pooling
from ember.engine.pooling_params import PoolingParams
from ember.engine.sampling_params import SamplingParams, check_utf8, is_int
from ember.engine.scheduler import POLICIES, Scheduler, SchedulerConfig, valid_itl_target
from ember.engine.sequence import Sequence, Status
from ember.errors import InvalidParameterError, PromptTooLongError
from ember.loading.tokenizer import IncrementalDetokenizer
from ember.models.loader import LoadedModel, available_memory, load_model, parse_dtype
from ember.models.quantize import apply as apply_quantization
from ember.ops.backends import KVSpec
from ember.ops.formats import KV_CACHE_DTYPES, QUANT_METHODS
from ember.ops.long_context import DEFAULT_SINKS, MODES as LONG_MODES, LongContext
from ember.engine.structured import GrammarCompiler, Masker
from ember.spec import SpeculativeConfig, Speculator, build_speculator, parse_speculative_config

log = logging.getLogger("ember")
GiB = 1 << 30
LONG_CONTEXT_DEFAULT_LEN = 1 << 20  # max_model_len under a long-context mode when none is given
Prompt = str | list[int] | dict[str, Any]
T = TypeVar("T")


def default_kv_memory(context_bytes: int, max_num_seqs: int) -> int:
    """KV cache bytes when none are given: max_num_seqs full contexts, at most 2 GiB and half the memory
    available now (after the weights loaded), but never less than one full context (or 2 GiB)."""
    memory = min(2 * GiB, context_bytes * max_num_seqs)
    free = available_memory()
    return max(min(memory, free // 2) if free is not None else memory, min(context_bytes, 2 * GiB))


@dataclass
class EngineArgs:
    """Engine options; names follow vLLM's where one exists."""

    model: str | Path | None = None
    dtype: str = "auto"  # see ember.models.loader.load_model
    max_model_len: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512  # token budget per step
    enable_prefix_caching: bool = True
    kv_cache_memory: float | None = None  # GiB; default: default_kv_memory
    scheduler: str = "splitfuse"
    block_size: int = 16
    quantization: str = "none"  # "int8" / "int4": weights quantized at load (ember.compress.quantize)
    kv_cache_dtype: str = "auto"  # "float16", or "int8" / "int4" / "int2": KIVI (ember.ops.kv_quant)
    # SplitFuse: seconds a step carrying decodes and prompt chunks may take, predicted from the measured
    # step costs, "auto" (twice a plain decode step) or "<N>x" (N times one); None: fill every step to
    # max_num_batched_tokens.
    itl_target: float | str | None = None
    long_prefill_token_threshold: int = 0  # most prompt tokens one sequence takes per step (0: no cap), as vLLM
    # Speculative decoding (ember.spec): a SpeculativeConfig, its dict or JSON text, as vLLM's; None: off.
    speculative_config: SpeculativeConfig | dict[str, Any] | str | None = None
    # Inputs past the trained context (ember.ops.long_context): "streaming" (StreamingLLM) or "lm-infinite";
    # attention_window: recent keys each query sees (default: the trained context, less the sinks for
    # streaming); attention_sinks: first tokens every query sees (default 4 streaming, 10 lm-infinite).
    long_context: str | None = None
    attention_window: int | None = None
    attention_sinks: int | None = None

    def validate(self) -> None:
        self.speculative_config = parse_speculative_config(self.speculative_config)
        checks = [
            (self.scheduler in POLICIES, "scheduler", f"must be one of {', '.join(POLICIES)}"),
            (self.quantization in QUANT_METHODS, "quantization", f"must be one of {', '.join(QUANT_METHODS)}"),
            (self.kv_cache_dtype in KV_CACHE_DTYPES, "kv_cache_dtype",
             f"must be one of {', '.join(KV_CACHE_DTYPES)}"),
            (self.max_num_seqs >= 1, "max_num_seqs", "must be >= 1"),
            (self.max_num_batched_tokens >= 1, "max_num_batched_tokens", "must be >= 1"),
            (valid_itl_target(self.itl_target), "itl_target",
             'must be seconds > 0, "auto", "<N>x" (N >= 1 plain decode steps) or None'),
            (self.block_size >= 1, "block_size", "must be >= 1"),
            (KV_CACHE_DTYPES.get(self.kv_cache_dtype) is None or self.block_size >= 2, "block_size",
             "must be >= 2 with a quantized KV cache (keys are quantized per channel over a block)"),
            (self.kv_cache_memory is None or self.kv_cache_memory > 0, "kv_cache_memory", "must be > 0 GiB"),
            (self.max_model_len is None or self.max_model_len >= 2, "max_model_len", "must be >= 2"),
            (self.long_prefill_token_threshold >= 0, "long_prefill_token_threshold", "must be >= 0"),
            (self.long_context in (None, *LONG_MODES), "long_context", f"must be one of {', '.join(LONG_MODES)}"),
            (self.attention_window is None or self.attention_window >= 1, "attention_window", "must be >= 1"),
            (self.attention_sinks is None or self.attention_sinks >= 0, "attention_sinks",
             "must be >= 0 (0: a sliding window without sinks)"),
        ]
        for ok, name, why in checks:
            if not ok:
                raise InvalidParameterError(f"{name} {why}, got {getattr(self, name)!r}", param=name)
        self._check_long_context()

    def _check_long_context(self) -> None:
        """The combinations a long-context mode refuses, and window options without one."""
        if self.long_context is None:
            for name in ("attention_window", "attention_sinks"):
                if getattr(self, name) is not None:
                    raise InvalidParameterError(f"{name} needs a long-context mode (--long-context streaming or "
                                                "lm-infinite)", param=name)
            return
        refusals = [
            (KV_CACHE_DTYPES.get(self.kv_cache_dtype) is not None, "kv_cache_dtype",
             "a quantized (KIVI) KV cache: its keys are quantized per channel over a block, and the sink keys "
             "are re-rotated every step; use a float KV cache (--kv-cache-dtype auto or float16)"),
            (self.speculative_config is not None, "speculative_config",
             "speculative decoding: candidate rows would each need their own sink rotation"),
            (self.scheduler != "splitfuse", "scheduler",
             "the prefill-first scheduler: it prefills whole prompts, which may be longer than the KV cache"),
        ]
        for bad, name, why in refusals:
            if bad:
                raise InvalidParameterError(f"--long-context {self.long_context} does not work with {why}",
                                            param=name)


def load_for(args: EngineArgs) -> LoadedModel:
    """The model as an engine with these args runs it: -q re-quantizes float weights, so a GGUF's packed
    tensors are dequantized first. (Callers may load it ahead, e.g. to size the engine from its tokenizer.)"""
    dtype = "float32" if args.dtype == "auto" and args.quantization != "none" else args.dtype
    return load_model(args.model, dtype, progress=True)


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    arrival: float
    detoks: dict[int, IncrementalDetokenizer] = field(default_factory=dict)
    stop_ids: frozenset[int] = frozenset()
    error: str | None = None  # set when the engine failed this request

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)


class LLMEngine:
    """Synchronous engine: call add_request, then step() until has_unfinished_requests() is False."""

    def __init__(self, args: EngineArgs | None = None, loaded: LoadedModel | None = None, **kwargs: Any) -> None:
        self.args = args = args or EngineArgs(**kwargs)
        args.validate()
        self.dtype = parse_dtype(args.dtype)
        self.loaded = loaded or load_for(args)
        self.tokenizer = self.loaded.tokenizer
        # No token covers more characters than the longest vocabulary entry; 4x spare for normalizers that
        # compose characters (NFC joins three Hangul jamo into one syllable).
        self.max_text_chars_per_token = 4 * max(
            (len(self.tokenizer.id_to_piece(i)) for i in range(self.tokenizer.vocab_size)), default=1)
        self.config = self.loaded.config
        model = apply_quantization(self.loaded.model, args.quantization)
        kv = KVSpec(self.config, args.kv_cache_dtype, self.dtype, args.block_size)
        per_token = kv.bytes_per_token()
        self.long = self._long_context(model)
        context = min(args.max_model_len or self.config.max_position_embeddings, model.max_positions)
        # What one sequence may hold at once: its whole context, or a long-context mode's sinks, their
        # private copies and a window plus a step's chunk.
        seq_tokens = context
        if self.long is not None:
            context = args.max_model_len or LONG_CONTEXT_DEFAULT_LEN
            k = self.long.sink_blocks(args.block_size)
            seq_tokens = (2 * k + 2 + -(-(self.long.window + args.max_num_batched_tokens) // args.block_size)
                          ) * args.block_size
        elif self.config.sliding_window and context > self.config.sliding_window:
            # Full attention equals sliding-window attention only up to the window.
            log.info("capping the context at the model's sliding window of %d tokens", self.config.sliding_window)
            context = self.config.sliding_window
        if args.max_model_len and args.max_model_len > model.max_positions and self.long is None:
            raise InvalidParameterError(f"max_model_len {args.max_model_len} exceeds the model's "
                                        f"{model.max_positions} positions; a long-context mode (--long-context "
                                        "streaming or lm-infinite) reads past them", param="max_model_len")
        # A quantized cache keeps blocks still filling in float, out of the same memory (added to a default size).
        residual = kv.reserved_bytes(args.max_num_seqs)
        memory = (args.kv_cache_memory * GiB if args.kv_cache_memory else
                  default_kv_memory(per_token * seq_tokens, args.max_num_seqs) + residual) - residual
        num_blocks = max(0, int(memory // (per_token * args.block_size)))
        if self.long is not None and num_blocks * args.block_size < seq_tokens:
            raise InvalidParameterError(
                f"kv_cache_memory {memory / GiB:.3g} GiB holds {num_blocks * args.block_size} tokens, fewer than "
                f"one sequence needs under --long-context ({seq_tokens}: sinks, window and a step's chunk); raise "
                "--kv-cache-memory or lower --attention-window", param="kv_cache_memory")
        if num_blocks * args.block_size < context and self.long is None:
            if args.max_model_len:
                raise InvalidParameterError(
                    f"kv_cache_memory {memory / GiB:.3g} GiB holds {num_blocks * args.block_size} tokens, "
                    f"fewer than max_model_len {args.max_model_len}; raise --kv-cache-memory or lower "
                    "--max-model-len", param="kv_cache_memory")
            context = num_blocks * args.block_size
        if num_blocks < 1:
            raise InvalidParameterError("kv_cache_memory is too small for a single block", "kv_cache_memory")
        self.max_model_len = context
        backend = kv.build(num_blocks, args.max_num_seqs)
        self.blocks = BlockManager(num_blocks, args.block_size, args.enable_prefix_caching, backend)
        self.scheduler = Scheduler(SchedulerConfig(args.max_num_seqs, args.max_num_batched_tokens, args.scheduler,
                                                   args.itl_target, args.long_prefill_token_threshold),
                                   self.blocks)
        self.runner = ModelRunner(model, backend)
        if self.long is not None:
            self.blocks.set_window(self.long.window, self.long.sink_blocks(args.block_size))
            self.runner.set_long_context(self.long)
        self.sampler = Sampler()
        self.grammars = GrammarCompiler(self.tokenizer, self.config.vocab_size)
        self.mask_grammars = Masker()
        self.speculator: Speculator | None = build_speculator(args.speculative_config, self)
        self.requests: dict[str, Request] = {}
        self._failed: list[Request] = []  # failed in this step; their outputs go out with the step's
        self._schedule_failures = 0  # scheduling failures in a row
        self.last_step = StepShape(0, ())  # what the latest step scheduled (traces and benchmarks read it)
        # step_s / forward_s: wall time of whole steps and of the model inside them (engine overhead).
        # spec_*: candidate tokens scored, kept, and the steps that verified any (set_candidates, the speculator).
        # grammar_*: structured outputs' token masks, their time and count (rows masked).
        self.stats: dict[str, float] = {"prompt_tokens": 0, "generation_tokens": 0, "steps": 0,
                                        "step_s": 0.0, "forward_s": 0.0, "spec_draft_tokens": 0,
                                        "spec_accepted_tokens": 0, "spec_verifications": 0,
                                        "grammar_mask_s": 0.0, "grammar_masks": 0}
        log.info("KV cache: %d blocks of %d tokens = %d tokens (%.1f MiB, %s); max_model_len %d",
                 num_blocks, args.block_size, num_blocks * args.block_size,
                 num_blocks * args.block_size * per_token / 2**20, kv.name, self.max_model_len)

    def _long_context(self, model: Any) -> LongContext | None:
        """The long-context mode the args ask for, checked against the model, or None."""
        args, cfg = self.args, self.config
        if args.long_context is None:
            return None
        if cfg.sliding_window:
            raise InvalidParameterError(f"--long-context does not work with a sliding-window model (this one "
                                        f"attends {cfg.sliding_window} tokens)", param="long_context")
        trained = min(cfg.max_position_embeddings, model.max_positions)
        sinks = DEFAULT_SINKS[args.long_context] if args.attention_sinks is None else args.attention_sinks
        window = args.attention_window or (trained - sinks if args.long_context == "streaming" else trained)
        long = LongContext(args.long_context, sinks, window, model.rope.inv_freq)
        least = long.sink_blocks(args.block_size) * args.block_size
        if not least <= window <= trained:
            raise InvalidParameterError(
                f"attention_window {window} must be between {least} (the blocks holding "
                f"{sinks} sink tokens) and the model's trained context of {trained}", param="attention_window")
        return long

    @property
    def num_cache_tokens(self) -> int:
        return self.blocks.num_blocks * self.blocks.block_size

    # -- requests ---------------------------------------------------------------------------

    def tokenize_prompt(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                ids = prompt["prompt_token_ids"]
                if not isinstance(ids, (list, tuple)) or not all(is_int(t) for t in ids):
                    raise InvalidParameterError("prompt_token_ids must be a list of integers", "prompt")
                return prompt.get("prompt"), list(ids)
            if "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise InvalidParameterError("a prompt dict needs 'prompt' or 'prompt_token_ids'", "prompt")
        if isinstance(prompt, str):
            self.check_text(prompt, "prompt")
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)) and all(is_int(t) for t in prompt):
            return None, list(prompt)
        raise InvalidParameterError(f"prompt must be a string, a list of token ids or a dict, "
                                    f"got {type(prompt).__name__}", "prompt")

    def check_text(self, text: str, param: str = "prompt") -> None:
        """Refuse text that cannot be tokenized (lone surrogates) or is so long that its tokens cannot fit in
        the context, before spending time tokenizing it: a token covers at most the longest vocabulary entry."""
        check_utf8(text, param)
        most = self.max_model_len * self.max_text_chars_per_token
        if len(text) > most:
            raise PromptTooLongError(
                f"the {param} has {len(text)} characters, more than {self.max_model_len} tokens (this model's "
                f"context) can hold; shorten it", param)

    def add_request(self, request_id: str, prompt: Prompt, params: SamplingParams | PoolingParams | None = None
                    ) -> None:
        """Validate a request and queue it; raises an EmberError (and queues nothing) if it is bad. With
        PoolingParams the request generates nothing: its output carries the pooled vector / attention."""
        self.admit(self.prepare(request_id, prompt, params))

    def prepare(self, request_id: str, prompt: Prompt, params: SamplingParams | PoolingParams | None = None
                ) -> Request:
        """Tokenize and validate without touching engine state (safe to call from another thread)."""
        pooling = params if isinstance(params, PoolingParams) else None
        params = SamplingParams(max_tokens=1) if pooling else params or SamplingParams()
        text, ids = self.tokenize_prompt(prompt)
        self._check_prompt(ids, params, whole_context=pooling is not None)
        if pooling is not None:
            pooling = pooling.resolve(len(ids), self.config.num_layers)
            if pooling.attention_span is not None and self.long is not None:
                raise InvalidParameterError("attention capture (re-ranking from attention, ICR) does not work with "
                                            f"--long-context {self.long.mode}: serve it from an engine without one",
                                            param="long_context")
        now = time.monotonic()
        depth = pooling.depth(self.config.num_layers) if pooling is not None else None
        seqs = [Sequence(request_id, i, ids, params, now, generator=self._generator(params, i), pooling=pooling,
                         depth=depth)
                for i in range(params.n)]
        self._check_token_ids(params)
        self._constrain(seqs, params)
        stop = set(params.stop_token_ids or ())
        if not params.ignore_eos:
            stop |= self.tokenizer.stop_token_ids
        req = Request(request_id, text, ids, params, seqs, now, stop_ids=frozenset(stop))
        for s in seqs:
            req.detoks[s.seq_id] = IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens)
        return req

    def _constrain(self, seqs: list[Sequence], params: SamplingParams) -> None:
        """Structured outputs: each completion gets its own matcher of the request's constraint."""
        if params.structured_outputs is None:
            return
        matcher = self.grammars.matcher(params.structured_outputs)
        for i, seq in enumerate(seqs):
            seq.grammar = matcher if i == 0 else matcher.deep_copy()

    def admit(self, req: Request) -> None:
        """Queue a prepared request (engine thread only)."""
        if req.request_id in self.requests:
            raise InvalidParameterError(f"request id {req.request_id!r} is already in use", "request_id")
        # Completions 1..n-1 wait for the first one's prompt and then share its KV blocks.
        req.seqs[0].fork_children = req.seqs[1:]
        self.requests[req.request_id] = req
        self.stats["prompt_tokens"] += len(req.prompt_ids)
        self.scheduler.add(req.seqs[0])

    def _check_prompt(self, ids: list[int], params: SamplingParams, whole_context: bool = False) -> None:
        """whole_context: the prompt may fill the context (nothing will be generated)."""
        if not ids:
            raise InvalidParameterError("the prompt is empty", "prompt")
        vocab = self.config.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidParameterError(f"token id {bad} is outside the vocabulary [0, {vocab})", "prompt")
        if len(ids) > self.max_model_len - (0 if whole_context else 1):
            raise PromptTooLongError(
                f"the prompt has {len(ids)} tokens but this model's context is {self.max_model_len} "
                "tokens (prompt plus output); shorten the prompt", "prompt")
        room = self.max_model_len - len(ids)
        if not whole_context and params.max_tokens is not None and params.max_tokens > room:
            raise PromptTooLongError(
                f"max_tokens {params.max_tokens} plus the prompt's {len(ids)} tokens exceeds the "
                f"context of {self.max_model_len} tokens; ask for at most {room} tokens", "max_tokens")
        if (params.prompt_logprobs or params.logprobs or 0) > vocab:
            raise InvalidParameterError("logprobs exceeds the vocabulary size", "logprobs")

    def _check_token_ids(self, params: SamplingParams) -> None:
        """Token ids in the parameters must index the model's logits (checked here: the vocabulary is the
        engine's, not the parameters')."""
        vocab = self.config.vocab_size
        for name, ids in (("stop_token_ids", params.stop_token_ids or ()),
                          ("logit_bias", (params.logit_bias or {}).keys())):
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise InvalidParameterError(f"{name}: token id {bad} is outside the vocabulary [0, {vocab})", name)

    @staticmethod
    def _generator(params: SamplingParams, index: int) -> torch.Generator | None:
        if params.seed is None:
            return None
        seed = params.seed + index  # SamplingParams keeps seed in torch's range; wrap past its top
        return torch.Generator().manual_seed(seed - (1 << 64) if seed >= 1 << 64 else seed)

    def abort_request(self, request_id: str) -> None:
        """Stop a request wherever it is; every block it held is freed."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        for seq in req.seqs:
            if not seq.finished:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)
        self._release(req)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def set_candidates(self, request_id: str, tokens: list[int], index: int = 0) -> None:
        """Candidate next tokens for completion `index` of a decoding request (the speculative-decoding seam: a
        proposer's drafts). The next step scores them beside the sequence's next token and keeps the longest
        prefix the model itself produces, token for token as without them; the KV of the rest is rolled back.
        Trimmed to what the context and max_tokens leave room for, and to what a structured output allows."""
        req = self.requests.get(request_id)
        seq = req.seqs[index] if req is not None and 0 <= index < len(req.seqs) else None
        if seq is None or not self._decoding(seq):
            raise InvalidParameterError(f"request {request_id!r} has no decoding completion {index}", "request_id")
        vocab = self.config.vocab_size
        if not all(is_int(t) and 0 <= t < vocab for t in tokens):
            raise InvalidParameterError(f"candidate tokens must be token ids in [0, {vocab})", "tokens")
        seq.spec_tokens = self._allowed(seq, list(tokens[:self._candidate_room(seq)]))

    @staticmethod
    def _decoding(seq: Sequence) -> bool:
        """Its prompt computed and its first token sampled (which also forks the n > 1 completions)."""
        return (seq.status is Status.RUNNING and not seq.in_prefill and seq.pooling is None
                and bool(seq.output_ids) and not seq.fork_children)

    def _candidate_room(self, seq: Sequence) -> int:
        """Most candidates the context and max_tokens leave room for (the last one's successor is sampled too)."""
        room = self.max_model_len - len(seq)
        if seq.params.max_tokens is not None:
            room = min(room, seq.params.max_tokens - len(seq.output_ids) - 1)
        return max(0, room)

    def _propose(self) -> None:
        """The proposer's drafts for the decoding sequences that carry none yet (set_candidates may have)."""
        assert self.speculator is not None
        decoding = [s for s in self.scheduler.running if self._decoding(s) and not s.spec_tokens]
        try:
            self.speculator.propose(decoding, {s: self._candidate_room(s) for s in decoding})
        except Exception:  # drafts only ever save time: a failing proposer costs its drafts, never a request
            log.exception("the speculative proposer failed; this step runs without drafts")
            for seq in decoding:
                seq.spec_tokens = []
        for seq in decoding:
            if seq.grammar is not None and seq.spec_tokens:
                seq.spec_tokens = self._allowed(seq, seq.spec_tokens)

    @staticmethod
    def _allowed(seq: Sequence, tokens: list[int]) -> list[int]:
        """The leading candidates a structured output's grammar accepts (the rest could never be kept: the mask
        forbids them), checked without moving the matcher; verification then samples each row under the mask
        of the state the accepted tokens before it left."""
        return tokens if seq.grammar is None else tokens[:seq.grammar.validate_tokens(tokens)]

    # -- the step ----------------------------------------------------------------------------
    # A step serves many requests; an exception caused by one of them must fail that request alone. The
    # parts of a step that belong to one request (its commit, prompt logprobs, fork, append, output) run
    # under _guard; the batched parts (scheduling, the forward, sampling) are retried per request when they
    # fail, so a request that breaks them is found and failed while the others run on as they would have.

    def step(self) -> list[RequestOutput]:
        if self.speculator is not None:
            self._propose()
        start = time.perf_counter()
        batch = self._schedule()
        self.mask_grammars.prefetch([s.grammar for s, n in batch.items()
                                     if s.grammar is not None and s.num_computed + n >= len(s)], self.config.vocab_size)
        self.last_step = StepShape(sum(1 for s in batch if not s.in_prefill),
                                   tuple((s.num_computed, n) for s, n in batch.items() if s.in_prefill),
                                   sum(n - 1 for s, n in batch.items() if not s.in_prefill))
        if batch:
            runs = self._forward(batch)
            for sub, result in runs:
                self._advance(sub, result)
            seconds = time.perf_counter() - start
            self.stats["step_s"] += seconds
            if len(runs) == 1 and runs[0][0] is batch:  # replayed steps would skew the step-cost model
                self.scheduler.observe(batch, seconds)
                if self.speculator is not None:
                    self.speculator.step_done(sum(batch.values()), not self.last_step.chunks, seconds,
                                              [s for s in batch if not s.finished and s.pooling is None])
        return self._outputs({seq.request_id for seq in batch})

    def state(self) -> EngineState:
        """A snapshot of the counters (call it on the thread that steps the engine)."""
        b = self.blocks
        return EngineState(len(self.scheduler.running), len(self.scheduler.waiting), b.num_used_blocks, b.num_blocks,
                           b.prefix_queries, b.prefix_hits, self.scheduler.num_preemptions, dict(self.stats))

    def _schedule(self) -> dict[Sequence, int]:
        """The scheduler's batch; if it fails, the newest request is failed (the likeliest cause) and the
        step is empty, so a request that confuses the scheduler cannot stall the others. From the third
        failure in a row the oldest goes instead: the cause was not among the new ones."""
        try:
            batch = self.scheduler.schedule()
            if not batch and self.scheduler.has_work():
                raise RuntimeError(f"scheduler made no progress: {len(self.scheduler.running)} running, "
                                   f"{len(self.scheduler.waiting)} waiting, "
                                   f"{self.blocks.num_free_blocks}/{self.blocks.num_blocks} blocks free")
            self._schedule_failures = 0
            return batch
        except Exception as e:
            if not self.requests:
                raise
            self._schedule_failures += 1
            oldest = self._schedule_failures >= 3
            log.exception("scheduling failed; failing the %s request", "oldest" if oldest else "newest")
            self._fail(next(iter(self.requests)) if oldest else next(reversed(self.requests)), e)
            return {}

    def _forward(self, batch: dict[Sequence, int]) -> list[tuple[dict[Sequence, int], StepResult]]:
        """Run the batch; if the model fails, run each request's part alone and fail those that still do."""
        try:
            return [(batch, self.runner.run(batch))]
        except Exception:
            log.exception("the model failed on a step of %d sequences; running each request alone", len(batch))
        parts: dict[str, dict[Sequence, int]] = {}
        for seq, n in batch.items():
            parts.setdefault(seq.request_id, {})[seq] = n
        runs = []
        for rid, part in parts.items():
            result = self._guard(rid, self.runner.run, part)
            if result is not None:
                runs.append((part, result))
        return runs

    def _advance(self, batch: dict[Sequence, int], result: StepResult) -> None:
        for seq, n in batch.items():
            self._guard(seq.request_id, self._commit, seq, n)
        self.stats["steps"] += 1
        began = time.perf_counter()
        # Logits only for the rows sampled or scored.
        result.logits = self.runner.model.compute_logits(result.hidden[: result.num_logit_rows])
        self.stats["forward_s"] += result.forward_s + time.perf_counter() - began
        for part in result.prompt_rows:
            self._guard(part.seq.request_id, self._prompt_logprobs, result, part)
        pooling.collect(result, self._guard)
        for seq in [s for s in batch if s.pooling is not None]:
            self._guard(seq.request_id, self._finish_pooling, seq)
        self._sample(result)

    def _commit(self, seq: Sequence, n: int) -> None:
        """The step's tokens are in the cache; a sequence carrying candidates hashes its blocks only once it
        knows which of them stay (_verify)."""
        seq.spec_tokens = seq.spec_tokens[: max(0, n - seq.num_remaining)]  # the ones this step fed
        seq.num_computed += n
        if not seq.spec_tokens:
            self.blocks.commit(seq)

    def _finish_pooling(self, seq: Sequence) -> None:
        if seq.num_computed == len(seq):
            pooling.finish(seq)
            self._finish(seq, "stop", None)

    def _guard(self, request_id: str, fn: Callable[..., T], *args: Any) -> T | None:
        """fn(*args) for one request's part of a step: an exception fails that request alone (None back);
        a request that has already failed is skipped."""
        if request_id not in self.requests:
            return None
        try:
            return fn(*args)
        except Exception as e:
            self._fail(request_id, e)
            return None

    def _fail(self, request_id: str, error: Exception) -> None:
        """Finish a request with finish_reason "error" and free its blocks; its output says why."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        log.error("request %s failed, the others run on: %s: %s", request_id, type(error).__name__, error,
                  exc_info=error)
        req.error = f"{type(error).__name__}: {error}"
        for seq in req.seqs:
            if not seq.finished:
                seq.finish_reason = "error"
                self.scheduler.finish(seq)
        self._failed.append(req)

    def _outputs(self, touched: set[str]) -> list[RequestOutput]:
        """Outputs of the requests this step advanced, and of those it failed."""
        outputs = []
        for rid in touched:
            req = self.requests.get(rid)
            out = req and self._guard(rid, self._output, req)
            if out is not None:
                outputs.append(out)
                if req.finished:
                    del self.requests[rid]
                    self._release(req)
        failed, self._failed = self._failed, []
        for req in failed:
            self._release(req)
        return outputs + [self._error_output(req) for req in failed]

    def _release(self, req: Request) -> None:
        """A request is gone: the proposer forgets its sequences (a draft model frees their KV)."""
        if self.speculator is not None:
            for seq in req.seqs:
                self.speculator.release(seq)

    def _error_output(self, req: Request) -> RequestOutput:
        try:
            out = self._output(req)
        except Exception:  # the request's own state is what broke: report it bare
            out = RequestOutput(req.request_id, req.prompt, req.prompt_ids, [], True)
        out.finished, out.error = True, req.error
        return out

    def _prompt_logprobs(self, result: StepResult, part: PromptLogprobRows) -> None:
        seq, k = part.seq, part.seq.params.prompt_logprobs or 0
        # A preempted sequence recomputes its prompt: overwrite rather than append twice.
        del seq.prompt_logprobs[part.first_token:]
        if not seq.prompt_logprobs:
            seq.prompt_logprobs.append(None)
        lps = compute_logprobs(result.logits[part.row: part.row + part.count])
        for i in range(part.count):
            token = seq.prompt_ids[part.first_token + i]
            seq.prompt_logprobs.append(top_logprobs(lps[i], k, token))

    def _sample(self, result: StepResult) -> None:
        assert result.logits is not None
        pairs: list[tuple[Sequence, int]] = []
        for seq, rows in result.sample_rows.items():
            if len(rows) > 1:  # carried candidates: verified below
                continue
            forked = self._guard(seq.request_id, self._fork, seq)
            if forked is not None:
                pairs += [(s, rows[0]) for s in [seq] + forked]
        self._sample_batch(result.logits, pairs)
        for seq, rows in result.sample_rows.items():
            if len(rows) > 1:
                self._guard(seq.request_id, self._verify, result.logits, seq, rows)

    def _verify(self, logits: torch.Tensor, seq: Sequence, rows: list[int]) -> None:
        """Sample a sequence's rows in order, as one-token steps would (the sampler sees each accepted token
        before the next row, a seeded generator draws once per token), while each sample equals the candidate
        fed after it; roll back the KV of the candidates that did not survive, then hash what stays."""
        candidates, accepted = seq.spec_tokens, 0
        for i, row in enumerate(rows):
            self._sample_rows(logits, [(seq, row)])
            if seq.finished or i == len(candidates) or seq.output_ids[-1] != candidates[i]:
                break
            accepted += 1
        self.stats["spec_draft_tokens"] += len(candidates)
        self.stats["spec_accepted_tokens"] += accepted
        self.stats["spec_verifications"] += 1
        if self.speculator is not None:
            self.speculator.verified(seq, len(candidates), accepted)
        seq.spec_tokens = []
        if not seq.finished:
            self.blocks.truncate(seq, seq.num_computed - (len(candidates) - accepted))
            self.blocks.commit(seq)

    def _sample_batch(self, logits: torch.Tensor, pairs: list[tuple[Sequence, int]]) -> None:
        if not pairs:
            return
        # The batched draw may have advanced seeded generators before it failed: rewind them for the retry, so a
        # seeded request samples what it would have without the failing one.
        states = [(s.generator, s.generator.get_state()) for s, _ in pairs if s.generator is not None]
        try:
            self._sample_rows(logits, pairs)
        except Exception:
            log.exception("sampling %d rows failed; sampling each row alone", len(pairs))
            for generator, state in states:
                generator.set_state(state)
            for seq, row in pairs:
                self._guard(seq.request_id, self._sample_rows, logits, [(seq, row)])

    def _sample_rows(self, all_logits: torch.Tensor, pairs: list[tuple[Sequence, int]]) -> None:
        """Sample the next token of each (sequence, logits row) and append it (rows of failed requests
        are skipped: a failure in the batched part retries row by row)."""
        pairs = [(s, r) for s, r in pairs if s.request_id in self.requests]
        if not pairs:
            return
        seqs = [s for s, _ in pairs]
        logits = all_logits[torch.tensor([r for _, r in pairs])]
        self._block_early_stops(logits, seqs)
        constrained = [(i, s.grammar) for i, s in enumerate(seqs) if s.grammar is not None]
        if constrained:
            start = time.perf_counter()
            self.mask_grammars(logits, constrained)
            self.stats["grammar_mask_s"] += time.perf_counter() - start
            self.stats["grammar_masks"] += len(constrained)
        sample = self.sampler.sample(logits, [SamplingRow(s.params, s.generator, s.prompt_ids, s.output_ids)
                                              for s in seqs])
        now = time.monotonic()
        for i, seq in enumerate(seqs):
            self._guard(seq.request_id, self._append, seq, sample.token_ids[i], sample.logprobs[i], logits[i], now)

    def _block_early_stops(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        """As vLLM: below min_tokens, stop tokens cannot be sampled at all."""
        for i, seq in enumerate(seqs):
            if len(seq.output_ids) < seq.params.min_tokens:
                stop_ids = list(self.requests[seq.request_id].stop_ids)
                if stop_ids:
                    logits[i, stop_ids] = float("-inf")

    def _fork(self, seq: Sequence) -> list[Sequence]:
        """Start the request's other completions on the prompt `seq` just finished."""
        children, seq.fork_children = seq.fork_children, []
        for child in children:
            if self.blocks.num_free_blocks < 1 + self.blocks.sink_blocks:  # no room for its own blocks: recompute
                self.scheduler.add(child)
                continue
            copy = self.blocks.fork(seq, child)
            if copy:
                self.runner.copy_block(*copy)
            self.scheduler.add_running(child)
        return [c for c in children if c.status is Status.RUNNING]

    def _append(self, seq: Sequence, token: int, logprobs: dict[int, float] | None,
                logits: torch.Tensor, now: float) -> None:
        req = self.requests[seq.request_id]
        params = seq.params
        seq.output_ids.append(token)
        self.stats["generation_tokens"] += 1
        seq.first_token_time = seq.first_token_time or now
        if logprobs is not None:
            seq.logprobs.append(self._ranked(logprobs, logits, token))
            seq.cumulative_logprob += logprobs[token]
        n_out = len(seq.output_ids)
        if seq.grammar is not None and not seq.grammar.consume_token(token):
            why = (seq.grammar.get_error() or "").splitlines()[:1]
            raise RuntimeError(f"the structured output matcher refused token {token}: {''.join(why)}")
        if token in req.stop_ids and n_out > params.min_tokens:
            self._finish(seq, "stop", None if token in self.tokenizer.stop_token_ids and
                         token not in (params.stop_token_ids or ()) else token)
            return
        delta = req.detoks[seq.seq_id].add(token)
        old_len = len(seq.text)
        seq.text += delta
        if params.stop_strings and n_out > params.min_tokens and self._check_stop_strings(seq, old_len):
            return
        if (params.max_tokens is not None and n_out >= params.max_tokens) or len(seq) >= self.max_model_len:
            seq.text += req.detoks[seq.seq_id].flush()
            self._finish(seq, "length", None)
        elif seq.grammar is not None and seq.grammar.is_stopped():  # complete (with ignore_eos: nothing may follow)
            seq.text += req.detoks[seq.seq_id].flush()
            self._finish(seq, "stop", None)

    def _check_stop_strings(self, seq: Sequence, old_len: int) -> bool:
        longest = max(len(s) for s in seq.params.stop_strings)
        start = max(0, old_len - longest + 1)
        hits = [(seq.text.find(s, start), s) for s in seq.params.stop_strings]
        hits = [(i, s) for i, s in hits if i >= 0]
        if not hits:
            return False
        idx, stop = min(hits)
        seq.text = seq.text[: idx + (len(stop) if seq.params.include_stop_str_in_output else 0)]
        self._finish(seq, "stop", stop)
        return True

    def _ranked(self, logprobs: dict[int, float], logits: torch.Tensor, token: int) -> LogprobDict:
        ranked = sorted(logprobs.items(), key=lambda kv: -kv[1])
        out = {t: Logprob(lp, rank=r + 1, decoded_token=self.tokenizer.decode([t], skip_special_tokens=False))
               for r, (t, lp) in enumerate(ranked)}
        out[token].rank = int((logits > logits[token]).sum()) + 1
        return out

    def _finish(self, seq: Sequence, reason: str, stop_reason: int | str | None) -> None:
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        self.scheduler.finish(seq)

    # -- outputs -----------------------------------------------------------------------------

    def _output(self, req: Request) -> RequestOutput:
        completions = []
        for seq in req.seqs:
            text = seq.text
            if not seq.finished and seq.params.stop_strings:
                # Hold back what could still turn out to be the start of a stop string.
                hold = max(len(s) for s in seq.params.stop_strings) - 1
                text = text[: max(0, len(text) - hold)]
            completions.append(CompletionOutput(
                index=seq.index, text=text, token_ids=list(seq.output_ids),
                cumulative_logprob=seq.cumulative_logprob if seq.params.logprobs is not None else None,
                logprobs=seq.logprobs if seq.params.logprobs is not None else None,
                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason))
        first = req.seqs[0]
        prompt_lps = None
        if req.params.prompt_logprobs is not None:
            prompt_lps = [None if d is None else {t: Logprob(lp) for t, lp in d.items()}
                          for d in first.prompt_logprobs]
        metrics = {"arrival": req.arrival}
        if first.first_token_time:
            metrics["first_token"] = first.first_token_time
        if first.pooling is not None:
            completions = []
        return RequestOutput(req.request_id, req.prompt, req.prompt_ids, completions, req.finished,
                             prompt_lps, first.num_cached_tokens, metrics,
                             pooled=pooling.output(first) if req.finished else None)
