"""Perplexity of a model on a text: fixed-length windows (non-overlapping or strided), dense forward or,
for a quantized KV cache, block by block through the engine's paged cache."""
from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from ember.engine.engine import EngineArgs, LLMEngine
from ember.engine.sampling_params import SamplingParams
from ember.errors import InvalidParameterError
from ember.models.loader import LoadedModel
from ember.ops.backends import KVSpec
from ember.ops.formats import KV_CACHE_DTYPES
from ember.ops.quant import KERNEL_MAX_ROWS

LOGIT_CHUNK = 256  # positions per logits slice: bounds memory to 256 x vocab floats


def read_text(path: str | Path) -> str:
    """The text of a UTF-8 file, with a clear error when it is missing or not text."""
    p = Path(path)
    if not p.is_file():
        raise InvalidParameterError(f"text file {str(p)!r} not found", param="text")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InvalidParameterError(f"text file {p} is not UTF-8 text ({e})", param="text") from None


def context_limit(loaded: LoadedModel) -> float:
    """The longest window the dense forward computes exactly (positions, and any sliding window); with
    EMBER_ALLOW_LONG_MAX_MODEL_LEN=1 (as vLLM's VLLM_ALLOW_LONG_MAX_MODEL_LEN), plain attention past the
    trained context, to show what it does there."""
    limit = math.inf if os.environ.get("EMBER_ALLOW_LONG_MAX_MODEL_LEN") == "1" else loaded.model.max_positions
    return min(limit, loaded.config.sliding_window) if loaded.config.sliding_window else limit


def perplexity(loaded: LoadedModel, text: str, ctx: int = 512, windows: int | None = None,
               stride: int | None = None, kv_cache_dtype: str = "auto", block_size: int = 16,
               progress: bool = False, long_context: str | None = None, attention_window: int | None = None,
               attention_sinks: int | None = None) -> dict[str, Any]:
    """exp(mean NLL) of the text's tokens under the model.

    Protocol: the whole text is tokenized once as the tokenizer encodes a prompt (a BOS token only if
    the tokenizer adds one: it then starts the first window only). Windows of `ctx` tokens start every
    `stride` tokens (default ctx: non-overlapping); only full windows are used, the first `windows` of
    them if given. Each token of the first window but its first is scored (predicted from the tokens
    before it in the window); later windows score only their last min(stride, ctx - 1) tokens, so
    every scored token is scored once, with at least ctx - stride tokens of context (as Hugging Face's
    strided perplexity).

    With any `kv_cache_dtype` but "auto" each window runs through the engine and that cache (float16,
    or KIVI) one block of `block_size` tokens per step: every token then sees earlier tokens as the cache
    stores them (KIVI: its own block in float), exactly as a generated token does.

    With `long_context` ("streaming" or "lm-infinite", ember.ops.long_context) each window runs through the
    engine under that mode, in chunks of LONG_CHUNK tokens, so `ctx` may exceed the trained context; the
    peak KV cache bytes the window held are reported with it.

    progress: a bar over the windows' tokens on stderr (where it is a terminal).
    """
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise InvalidParameterError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, "
                                    f"got {kv_cache_dtype!r}", param="kv_cache_dtype")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
        raise InvalidParameterError(f"block_size must be an integer >= 2, got {block_size!r}", param="block_size")
    ids = loaded.tokenizer.encode(text, add_special_tokens=False)
    bos = loaded.tokenizer.add_bos and loaded.tokenizer.bos_token_id is not None
    if bos:
        ids = [loaded.tokenizer.bos_token_id] + ids
    stride = ctx if stride is None else stride
    limit = context_limit(loaded) if long_context is None else math.inf
    available = _window_starts(len(ids), ctx, windows, stride, limit)
    starts = available[:windows] if windows is not None else available
    tokens = torch.tensor(ids, dtype=torch.long)
    start_time = time.perf_counter()
    windows_ = [tokens[s:s + ctx] for s in starts]
    firsts = [1 if n == 0 else max(1, ctx - stride) for n in range(len(starts))]
    nlls: list[torch.Tensor] = []
    kv_peak = 0
    with tqdm(total=len(starts) * ctx, desc=f"perplexity, {len(starts)} windows", unit="tok", leave=False,
              file=sys.stderr, disable=None if progress else True) as bar:
        if long_context is not None:
            long = dict(long_context=long_context, attention_window=attention_window, attention_sinks=attention_sinks)
            for window, first in zip(windows_, firsts):
                nll, peak = _window_nll_long(loaded, window, first, kv_cache_dtype, block_size, long)
                nlls.append(nll)
                kv_peak = max(kv_peak, peak)
                bar.update(ctx)
        elif kv_cache_dtype == "auto":
            for window, first in zip(windows_, firsts):
                nlls.append(_window_nll(loaded, window, first))
                bar.update(ctx)
        else:  # windows side by side, one block of each per step: the quantized kernels run many rows at once
            batch = max(1, KERNEL_MAX_ROWS // block_size)
            for i in range(0, len(starts), batch):
                nlls += _windows_nll_cached(loaded, windows_[i:i + batch], firsts[i:i + batch], kv_cache_dtype,
                                            block_size, bar.update)
    nll, scored = sum(float(x.sum()) for x in nlls), sum(x.numel() for x in nlls)
    mean = nll / scored
    return {"ppl": math.exp(mean), "nll": mean, "tokens": scored, "ctx": ctx, "windows": len(starts),
            "stride": stride, "windows_available": len(available), "text_tokens": len(ids), "bos": bos,
            "kv_cache_dtype": kv_cache_dtype, "kv_block_size": block_size, "long_context": long_context,
            "kv_peak_bytes": kv_peak or None, "seconds": time.perf_counter() - start_time}


def _window_starts(n_tokens: int, ctx: int, windows: int | None, stride: int, limit: int) -> list[int]:
    for name, value in (("ctx", ctx), ("stride", stride), ("windows", windows)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise InvalidParameterError(f"{name} must be an integer, got {value!r}", param=name)
    if ctx < 2:
        raise InvalidParameterError(f"ctx must be >= 2 tokens (one to predict from, one to score), got {ctx}",
                                    param="ctx")
    if ctx > limit:
        raise InvalidParameterError(f"ctx {ctx} exceeds the model's context of {limit} tokens", param="ctx")
    if not 1 <= stride <= ctx:
        raise InvalidParameterError(f"stride must be between 1 and ctx ({ctx}), got {stride}", param="stride")
    if windows is not None and windows < 1:
        raise InvalidParameterError(f"windows must be >= 1, got {windows}", param="windows")
    if n_tokens < ctx:
        raise InvalidParameterError(f"the text has {n_tokens} tokens, fewer than one window of ctx={ctx}: "
                                    f"use a longer text or a smaller --ctx", param="text")
    return list(range(0, n_tokens - ctx + 1, stride))


def _window_nll(loaded: LoadedModel, ids: torch.Tensor, first: int) -> torch.Tensor:
    """NLL [ctx - first] of tokens ids[first:] given the tokens before them in the window."""
    model = loaded.model
    hidden = model.forward_dense(ids)
    out = []
    with torch.inference_mode():
        for a in range(first - 1, ids.shape[0] - 1, LOGIT_CHUNK):
            b = min(a + LOGIT_CHUNK, ids.shape[0] - 1)
            logp = torch.log_softmax(model.compute_logits(hidden[a:b]), dim=-1)
            out.append(-logp.gather(1, ids[a + 1:b + 1, None])[:, 0].double())
    return torch.cat(out)


LONG_CHUNK = 512  # prompt tokens per step under a long-context mode


def _window_nll_long(loaded: LoadedModel, ids: torch.Tensor, first: int, kv_cache_dtype: str, block_size: int,
                     long: dict[str, Any]) -> tuple[torch.Tensor, int]:
    """NLL of ids[first:] run through the engine under a long-context mode, LONG_CHUNK tokens a step; and the
    most KV cache bytes the window held at once."""
    n = ids.shape[0]
    engine = LLMEngine(EngineArgs(kv_cache_dtype=kv_cache_dtype, block_size=block_size, max_num_seqs=1,
                                  max_num_batched_tokens=LONG_CHUNK, enable_prefix_caching=False,
                                  max_model_len=n + 1, **long), loaded=loaded)
    engine.add_request("0", {"prompt_token_ids": ids.tolist()}, SamplingParams(max_tokens=1, prompt_logprobs=0))
    done = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            done = out if out.finished else done
    peak = engine.blocks.peak_used
    assert done is not None and done.prompt_logprobs is not None
    lps = done.prompt_logprobs
    kv = KVSpec(loaded.config, kv_cache_dtype, loaded.model.embed_tokens.weight.dtype, block_size)
    nll = torch.tensor([-lps[j][int(ids[j])].logprob for j in range(first, n)], dtype=torch.float64)
    return nll, int(peak * block_size * kv.bytes_per_token())


def _window_nll_cached(loaded: LoadedModel, ids: torch.Tensor, first: int, kv_cache_dtype: str,
                       block_size: int) -> torch.Tensor:
    """As _window_nll, run one block per step through the engine over a paged cache of that type."""
    return _windows_nll_cached(loaded, [ids], [first], kv_cache_dtype, block_size)[0]


def _windows_nll_cached(loaded: LoadedModel, windows: list[torch.Tensor], firsts: list[int], kv_cache_dtype: str,
                        block_size: int, on_tokens: Callable[[int], Any] = lambda n: None) -> list[torch.Tensor]:
    """_window_nll_cached of windows of one length, run side by side by one engine as prompt-logprob requests:
    each step computes the next block of every window (a block per sequence per step, one step's fixed costs
    serving them all)."""
    n = windows[0].shape[0]
    kv = KVSpec(loaded.config, kv_cache_dtype, loaded.model.embed_tokens.weight.dtype, block_size)
    blocks = len(windows) * -(-(n + 1) // block_size)
    memory = (blocks * block_size * kv.bytes_per_token() + kv.reserved_bytes(len(windows))) / 2**30
    engine = LLMEngine(EngineArgs(kv_cache_dtype=kv_cache_dtype, block_size=block_size, max_num_seqs=len(windows),
                                  max_num_batched_tokens=block_size * len(windows), enable_prefix_caching=False,
                                  long_prefill_token_threshold=block_size, max_model_len=n + 1,
                                  kv_cache_memory=memory), loaded=loaded)
    params = SamplingParams(max_tokens=1, prompt_logprobs=0)
    for i, w in enumerate(windows):
        engine.add_request(str(i), {"prompt_token_ids": w.tolist()}, params)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[int(out.request_id)] = out
        on_tokens(sum(n for _, n in engine.last_step.chunks))
    out = []
    for i, (w, first) in enumerate(zip(windows, firsts)):
        lps = done[i].prompt_logprobs
        out.append(torch.tensor([-lps[j][int(w[j])].logprob for j in range(first, n)], dtype=torch.float64))
    return out
