"""The `ember` command line: serve, generate, chat, rerank, bench, eval, compress, pull, models."""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from typing import Any

from ember.errors import EmberError, InvalidParameterError
from ember.ops.formats import KV_CACHE_DTYPES, QUANT_METHODS
from ember.server.routing import ROUTERS, ROUTING_IMBALANCE

log = logging.getLogger("ember")


MODEL_HELP = "model name, .gguf file or Hugging Face folder (default: smollm2-135m-instruct)"
DTYPE_HELP = ("auto (default): a GGUF file's Q8_0 / Q4_0 / Q4_1 layers run packed as stored (int8 / int4 "
              "in groups of 32, exact to the file, fast; 5-bit and K-quant layers as int8 g32), the rest in "
              "float32; float32: every weight dequantized to float32; bfloat16: weights and KV cache in "
              "bfloat16")
KV_HELP = ("KV cache storage: auto (the model dtype), float16 (half a float32 model's cache, as llama.cpp's "
           "default), or KIVI int8 / int4 / int2 (keys per channel, values per token, each sequence's newest "
           "block kept in float); more tokens fit in --kv-cache-memory")


def _model_args(p: argparse.ArgumentParser) -> None:
    """MODEL as an optional positional and as --model/-m; parse_args merges them."""
    p.add_argument("model", nargs="?", default=None, metavar="MODEL", help=MODEL_HELP)
    p.add_argument("--model", "-m", dest="model_opt", default=None, metavar="MODEL", help="the same as MODEL")


def _resolve_model(a: argparse.Namespace) -> None:
    """One model from the positional MODEL and --model; the subcommand's usage error when they differ."""
    opt = getattr(a, "model_opt", None)
    if opt is None:
        return
    if a.model is not None and a.model != opt:
        a.parser.error(f"the model is given twice, as {a.model!r} and as --model {opt!r}: give it once")
    a.model = opt


def _engine_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help=DTYPE_HELP)
    g.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    g.add_argument("--max-num-seqs", type=int, default=None,
                   help="most sequences running at once (default: 64 for serve; what the command needs otherwise)")
    g.add_argument("--max-num-batched-tokens", type=int, default=512, help="token budget of one step")
    g.add_argument("--kv-cache-memory", type=float, default=None,
                   help="KV cache size in GiB (default: generate and bench size it to what they run; serve and "
                        "chat to --max-num-seqs full contexts, at most 2 GiB and half the free memory)")
    g.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false",
                   help="turn off sharing of identical prompt prefixes")
    g.add_argument("--scheduler", default="splitfuse", choices=["splitfuse", "prefill-first"],
                   help="step policy (default: splitfuse)")
    g.add_argument("--itl-target", type=parse_itl_target, default=None, metavar="MS|Nx|auto|off",
                   help="splitfuse: milliseconds a step carrying decodes and prompt chunks may take, predicted "
                        "from the step costs measured as the engine runs (smaller prompt chunks while sequences "
                        "decode); "
                        "Nx = N times a plain decode step of the same sequences (e.g. 1.25x); auto = 2x; "
                        "off = fill every step to --max-num-batched-tokens (default: off)")
    g.add_argument("--long-prefill-token-threshold", type=int, default=0, metavar="N",
                   help="most prompt tokens one sequence takes per step, so long prompts share the budget "
                        "(default: 0, no cap)")
    g.add_argument("--quantization", "-q", default="none", choices=QUANT_METHODS,
                   help="quantize weights at load for ember's AVX2 kernels: int8 (per channel, near-lossless) "
                        "or int4 (groups of 32, LM head int8; fastest decode) (default: none)")
    g.add_argument("--kv-cache-dtype", default="auto", choices=list(KV_CACHE_DTYPES),
                   help=KV_HELP)
    g.add_argument("--speculative-config", type=_speculative_config, default=None, metavar="JSON",
                   help='speculative decoding, as vLLM\'s: \'{"method": "ngram", "num_speculative_tokens": 5, '
                        '"prompt_lookup_max": 4}\' (prompt lookup), \'{"method": "draft", "model": PATH}\' (a draft '
                        'model with the same tokenizer; "quantization": "int4" quantizes it) or \'{"method": '
                        '"swift"}\' (the model drafts for itself, skipping layers); outputs are unchanged '
                        '(default: off)')
    g.add_argument("--long-context", choices=["streaming", "lm-infinite"], default=None,
                   help="read and generate past the trained context: streaming (StreamingLLM: attention sinks + "
                        "a recent window, older tokens evicted) or lm-infinite (LM-Infinite: global tokens + a "
                        "window, distance capped); KV memory and decode speed stay constant (default: off)")
    g.add_argument("--attention-window", type=_positive_int, default=None, metavar="W",
                   help="with --long-context: recent tokens each token attends to (default: the trained context, "
                        "less the sinks for streaming)")
    g.add_argument("--attention-sinks", type=int, default=None, metavar="N",
                   help="with --long-context: first tokens every token attends to (default: 4 for streaming, "
                        "10 for lm-infinite; 0: a plain sliding window)")


def _speculative_config(text: str) -> Any:
    from ember.spec import parse_speculative_config

    try:
        return parse_speculative_config(text)
    except InvalidParameterError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_itl_target(text: str) -> float | str | None:
    """--itl-target: 'off' -> None, 'auto' or '<N>x' as they are, else milliseconds -> seconds."""
    if text in ("off", "auto"):
        return None if text == "off" else text
    if text.endswith("x"):
        from ember.engine.scheduler import valid_itl_target

        if not valid_itl_target(text):
            raise argparse.ArgumentTypeError(f"'<N>x' needs a number N >= 1 (plain decode steps), got {text!r}")
        return text
    try:
        ms = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected milliseconds, '<N>x', 'auto' or 'off', got {text!r}") from None
    if not ms > 0 or math.isinf(ms):
        raise argparse.ArgumentTypeError(f"milliseconds must be a positive number, got {text!r}")
    return ms / 1000


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text!r}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is a number from 1 to 65535, got {text!r}")
    return value


def _engine_kwargs(a: argparse.Namespace, seqs: int | None = None, tokens: int | None = None) -> dict[str, Any]:
    """EngineArgs from the flags. A one-shot command gives the sequences it runs at once (`seqs`, unless
    --max-num-seqs) and the most tokens one of them holds (`tokens`): without --max-model-len and
    --kv-cache-memory, the KV cache then holds just that (max_model_len rounded up to whole blocks)."""
    keys = ("dtype", "max_model_len", "max_num_seqs", "max_num_batched_tokens", "kv_cache_memory",
            "enable_prefix_caching", "scheduler", "itl_target", "quantization", "kv_cache_dtype",
            "long_prefill_token_threshold", "speculative_config", "long_context", "attention_window",
            "attention_sinks")
    kwargs = {k: getattr(a, k) for k in keys if getattr(a, k) is not None}
    if seqs is not None:
        kwargs.setdefault("max_num_seqs", seqs)
    if tokens is not None and a.max_model_len is None and a.kv_cache_memory is None:
        from ember.engine.engine import EngineArgs

        block = EngineArgs.block_size
        kwargs["max_model_len"] = max(2, -(-tokens // block) * block)
    return kwargs


def _sampling_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", "-n", type=int, default=256, help="most tokens to generate (default 256)")
    g.add_argument("--temperature", "-t", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=-1)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="keep going past end-of-sequence tokens")


def cmd_generate(a: argparse.Namespace) -> int:
    from ember import LLM
    from ember.chat import TerminalStream, cut_note
    from ember.llm import load_for

    params = _sampling(a)
    loaded = load_for(a.model, a.dtype, a.quantization)
    tok = loaded.tokenizer
    use_template = not a.raw and tok.chat_template
    ids = (tok.apply_chat_template([{"role": "user", "content": a.prompt}], tokenize=True) if use_template
           else tok.encode(a.prompt))
    need = len(ids) + a.max_tokens
    llm = LLM(a.model, loaded=loaded, **_engine_kwargs(a, 1, need if need <= loaded.model.max_positions else None))
    prompt: Any = {"prompt_token_ids": ids} if use_template else a.prompt
    start = time.perf_counter()
    out = llm.generate(prompt, params, on_output=TerminalStream())[0]
    elapsed = time.perf_counter() - start
    sys.stdout.write("\n")
    sys.stdout.flush()
    n = len(out.outputs[0].token_ids)
    note = cut_note(out.outputs[0], params.max_tokens, llm.engine.max_model_len, sys.stderr)
    print(f"{note + chr(10) if note else ''}[{len(out.prompt_token_ids)} prompt tokens, {n} generated in "
          f"{elapsed:.2f} s ({n / elapsed:.1f} tok/s), finish: {out.outputs[0].finish_reason}]", file=sys.stderr)
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    from ember.server.app import ServerLimits
    from ember.server.serve import serve

    limits = ServerLimits(max_request_bytes=a.max_request_bytes, max_request_tokens=a.max_request_tokens)
    if a.replicas > 1 or a.ray_address:
        return _serve_replicas(a, limits)
    if a.replica_threads or a.router != "prefix" or a.routing_imbalance:
        a.parser.error("--replica-threads, --router and --routing-imbalance apply to --replicas N (N > 1) or "
                       "--ray-address")
    serve(_engine_kwargs(a), a.model, a.host, a.port, a.api_key, a.served_model_name, limits, a.shutdown_grace,
          a.pooling, a.memory_db, not a.no_ui, a.memory_embedder)
    return 0


def _serve_replicas(a: argparse.Namespace, limits: Any) -> int:
    import os

    from ember.engine.engine import EngineArgs
    from ember.loading.registry import DEFAULT_MODEL
    from ember.server.ray_serve import ClusterSpec, ReplicaSpec, plan_cpus, serve_replicas
    from ember.server.serve import default_name

    threads, cpus = plan_cpus(a.replicas, a.replica_threads, os.cpu_count() or 1)
    spec = ReplicaSpec(a.model, _engine_kwargs(a), a.served_model_name or default_name(a.model or DEFAULT_MODEL),
                       limits, a.pooling, a.memory_db, threads, not a.no_ui, a.memory_embedder)
    cluster = ClusterSpec(a.replicas, threads, cpus, a.router, a.routing_imbalance or ROUTING_IMBALANCE,
                          EngineArgs.block_size, a.shutdown_grace)
    serve_replicas(spec, cluster, a.host, a.port, a.api_key, a.ray_address)
    return 0


def cmd_chat(a: argparse.Namespace) -> int:
    from ember.chat import run_chat

    return run_chat(a.model, _engine_kwargs(a, seqs=1), _sampling(a), a.system, a.memory, a.memory_db,
                    a.memory_embedder)


def _memory_embedder_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--memory-embedder", default=None, metavar="E", type=_memory_embedder,
                   help="what embeds long-term memory's turns: minilm (all-MiniLM-L6-v2 via sentence-transformers, "
                        "fetched once; a turn is found by its best sentence), model (the served model's pooled "
                        "hidden states, fused with BM25), or a sentence-transformers model folder (default: minilm "
                        "where pip install 'ember[memory]' put sentence-transformers, else model)")


def _memory_embedder(value: str) -> str:
    from ember.apps.embedder import check_choice

    return check_choice(value)


def _sampling(a: argparse.Namespace) -> Any:
    from ember import SamplingParams

    return SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p,
                          top_k=a.top_k, min_p=a.min_p, repetition_penalty=a.repetition_penalty,
                          seed=a.seed, stop=a.stop, ignore_eos=a.ignore_eos)


def cmd_models(a: argparse.Namespace) -> int:
    from ember.loading.registry import describe_cached

    rows = describe_cached()
    if not rows:
        print("no models cached yet: run `ember pull`")
        return 0
    print(f"{'NAME':28} {'ARCH':8} {'SIZE':>9}  PATH")
    for name, arch, size, path in rows:
        print(f"{name:28} {arch:8} {size / 1e6:7.1f}MB  {path}")
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    from ember.bench.common import emit

    if a.kind == "soak":  # prints a line per interval as it runs; exits 1 when the server misbehaved
        from ember.bench.soak import SoakConfig, print_soak, run_soak, soak_progress

        cfg = SoakConfig(a.url, a.minutes, a.served_model, a.concurrency, a.report_every, a.input_len, a.output_len,
                         a.disconnect_frac, a.invalid_frac, a.max_rss_growth_pct, a.pid, a.api_key, a.allow_remote,
                         a.drain_timeout, a.idle_timeout, a.seed)
        result = run_soak(cfg, soak_progress(a.json))
        print_soak(result, a.json)
        return 0 if result["passed"] else 1
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    if a.kind == "mixed":
        from ember.bench.serve import run_mixed

        result = run_mixed(a.url, a.served_model, a.streams, a.stream_output, a.long_prompts, a.long_prompt_len,
                           a.interval, a.seed, a.api_key)
    elif a.kind == "spec":
        from ember.bench.spec import compare_outputs, run_spec

        result = run_spec(a.url, a.prompts, a.streams, a.max_tokens, a.served_model, a.api_key)
        if a.reference:
            result.update(compare_outputs(result, a.reference))
        if a.save_outputs:
            from pathlib import Path

            Path(a.save_outputs).write_text(json.dumps(result, indent=1))
        if not a.json:
            result.pop("outputs")
    elif a.kind == "serve":
        from ember.bench.serve import run_serve

        from ember.bench.serve import SharedPrefixes

        shared = (SharedPrefixes(a.prefix_repetition_num_prefixes, a.prefix_repetition_prefix_len)
                  if a.dataset == "prefix-repetition" else None)
        result = run_serve(a.url, a.served_model, a.num_prompts, a.input_len, a.output_len, a.range_ratio,
                           a.request_rate, a.burstiness, a.max_concurrency, a.seed, a.api_key, a.slo_scale,
                           a.slo_gen_rate, shared)
    else:
        from ember import LLM
        from ember.llm import load_for

        if a.kind == "latency":
            from ember.bench.latency import check_latency_args, latency_tokens

            check_latency_args(a.pp, a.tg, a.depth, a.repetitions)  # before loading the model
            seqs, need = 1, latency_tokens(a.pp, a.tg, a.depth)
        else:
            most = lambda mean: max(1, int(mean * (1 + a.range_ratio)))  # noqa: E731 (as sample_lengths)
            seqs, need = min(a.num_prompts, 64), most(a.input_len) + most(a.output_len)
        loaded = load_for(a.model, a.dtype, a.quantization)
        kwargs = _engine_kwargs(a, seqs, need if need <= loaded.model.max_positions else None)
        if a.kind == "latency":  # one pass per prompt, as llama-bench; no prefix-cache help
            kwargs["max_num_batched_tokens"] = max(a.max_num_batched_tokens, a.pp)
            kwargs["enable_prefix_caching"] = False
        llm = LLM(a.model, loaded=loaded, **kwargs)
        if a.kind == "throughput":
            from ember.bench.throughput import run_throughput

            result = run_throughput(llm, a.num_prompts, a.input_len, a.output_len, a.range_ratio, a.seed,
                                    progress=not a.json)
        else:
            from ember.bench.latency import run_latency

            result = run_latency(llm, a.pp, a.tg, a.repetitions, a.seed, membw=not a.no_membw, depth=a.depth,
                                 progress=not a.json)
    emit(result, a.json, f"ember bench {a.kind}")
    return 0 if result.get("failed", 0) == 0 else 1


def _bench_parsers(sub: Any) -> None:
    bench = sub.add_parser("bench", help="benchmarks: throughput, latency, serve, spec, mixed, soak",
                           description="Measure ember (or any OpenAI-compatible server). KIND is throughput or "
                                       "latency (a model loaded here), serve, spec, mixed or soak (a running server); "
                                       "`ember bench KIND --help` for its options.")
    kinds = bench.add_subparsers(dest="kind", required=True, metavar="KIND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    load = argparse.ArgumentParser(add_help=False)
    load.add_argument("--num-prompts", type=int, default=16)
    load.add_argument("--input-len", type=int, default=250, help="prompt tokens (mean)")
    load.add_argument("--output-len", type=int, default=128, help="output tokens (mean)")
    load.add_argument("--range-ratio", type=float, default=0.0, help="lengths uniform in mean*(1 +- r)")

    tp = kinds.add_parser("throughput", parents=[common, load], help="offline: N requests through the engine")
    _model_args(tp)
    _engine_flags(tp)
    lat = kinds.add_parser("latency", parents=[common], help="llama-bench style pp/tg tok/s and bandwidth")
    _model_args(lat)
    _engine_flags(lat)
    lat.add_argument("--pp", type=int, default=512, help="prompt tokens per pp run (0: skip pp)")
    lat.add_argument("--tg", type=int, default=128, help="tokens generated per tg run (0: skip tg)")
    lat.add_argument("--depth", "-d", type=int, default=0,
                     help="context tokens before the tg run (llama-bench's -d): decode speed at that depth")
    lat.add_argument("--repetitions", "-r", type=int, default=3)
    lat.add_argument("--no-membw", action="store_true", help="skip measuring the machine's read bandwidth")
    sv = kinds.add_parser("serve", parents=[common, load], help="streaming load against a running server")
    sv.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    sv.add_argument("--served-model", default=None, help="model id to send (default: the server's first)")
    sv.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (default: all at once)")
    sv.add_argument("--burstiness", type=float, default=1.0, help="gamma shape; 1 = Poisson arrivals")
    sv.add_argument("--max-concurrency", type=int, default=None)
    sv.add_argument("--api-key", default=None)
    sv.add_argument("--slo-scale", type=float, default=8.0,
                    help="prompt-latency SLA: prompt_tokens/512*SCALE seconds (DeepSpeed-FastGen uses 1 on GPUs)")
    sv.add_argument("--slo-gen-rate", type=float, default=2.0, help="generation SLA in tok/s")
    sv.add_argument("--dataset", choices=["random", "prefix-repetition"], default="random",
                    help="random prompts (default), or vLLM's prefix-repetition: shared prefixes (system prompts, "
                         "documents) each followed by --input-len tokens of its own; reports the prefix-cache hit "
                         "rate where the server sends usage.prompt_tokens_details")
    sv.add_argument("--prefix-repetition-prefix-len", type=_positive_int, default=1000, metavar="TOKENS")
    sv.add_argument("--prefix-repetition-num-prefixes", type=_positive_int, default=4, metavar="N")
    sp = kinds.add_parser("spec", parents=[common],
                          help="a prompt set's greedy chat completions, 1 or N streams (speculative decoding)",
                          description="Send a JSONL prompt set ({\"messages\": [...]} per line, e.g. from "
                                      "benchmarks/spec_prompts.py) as greedy chat completions to a running server, "
                                      "--streams at a time; report output tok/s, per-request decode tok/s and, "
                                      "from ember's /metrics or llama-server's timings, draft acceptance.")
    sp.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    sp.add_argument("--prompts", required=True, metavar="FILE", help="JSONL prompt set")
    sp.add_argument("--streams", type=_positive_int, default=1, help="requests in flight at once (default 1)")
    sp.add_argument("--max-tokens", type=_positive_int, default=256, help="per request, unless the prompt sets it")
    sp.add_argument("--served-model", default=None)
    sp.add_argument("--api-key", default=None)
    sp.add_argument("--save-outputs", default=None, metavar="FILE", help="write the result with every output")
    sp.add_argument("--reference", default=None, metavar="FILE",
                    help="a saved result (--save-outputs) to count identical outputs against")
    mx = kinds.add_parser("mixed", parents=[common],
                          help="decode streams while long prompts arrive (SplitFuse vs prefill-first)")
    mx.add_argument("--url", required=True)
    mx.add_argument("--served-model", default=None)
    mx.add_argument("--api-key", default=None)
    mx.add_argument("--streams", type=int, default=8, help="decoding streams")
    mx.add_argument("--stream-output", type=int, default=256, help="tokens each stream generates")
    mx.add_argument("--long-prompts", type=int, default=4)
    mx.add_argument("--long-prompt-len", type=int, default=1500)
    mx.add_argument("--interval", type=float, default=2.0, help="seconds between long prompts")
    sk = kinds.add_parser(
        "soak", help="minutes of varied load on a local server: throughput, latency, RSS and KV over time",
        description="Drive a running OpenAI-compatible server on this machine for --minutes with a seeded mix "
                    "(chat and completions, streaming or not, varied lengths, n>1, stop strings, clients hanging "
                    "up mid-stream, invalid requests that must get a 4xx); print a line every --report-every "
                    "seconds and a summary. Exits 1 if a request failed unexpectedly, if the server's KV cache "
                    "and queues did not return to 0 once idle, or if its RSS grew past --max-rss-growth-pct.")
    sk.add_argument("--url", required=True, help="server base URL on this machine, e.g. http://127.0.0.1:8000")
    sk.add_argument("--minutes", type=float, required=True, help="how long to send load (fractions allowed)")
    sk.add_argument("--served-model", default=None, help="model id to send (default: the server's first)")
    sk.add_argument("--api-key", default=None)
    sk.add_argument("--concurrency", type=int, default=8, help="clients, each sending its next request as the "
                                                               "last ends (default 8)")
    sk.add_argument("--report-every", type=float, default=60.0, metavar="S",
                    help="seconds per report line (default 60); RSS growth is measured from the end of the first "
                         "(warm-up) interval to the end of the last")
    sk.add_argument("--input-len", type=int, default=128, help="prompt words, mean of a uniform +-90%% (5%% of "
                                                               "prompts 4x) (default 128)")
    sk.add_argument("--output-len", type=int, default=64, help="max_tokens, mean of a uniform +-90%% (default 64)")
    sk.add_argument("--disconnect-frac", type=float, default=0.1, help="requests that hang up mid-stream (0.1)")
    sk.add_argument("--invalid-frac", type=float, default=0.05, help="invalid requests, expecting a 4xx (0.05)")
    sk.add_argument("--max-rss-growth-pct", type=float, default=10.0, help="fail above this RSS growth (10)")
    sk.add_argument("--pid", type=int, default=None,
                    help="server process id: its RSS from /proc if /metrics has no process_resident_memory_bytes")
    sk.add_argument("--drain-timeout", type=float, default=120.0, help="seconds in-flight requests may take "
                                                                       "after the load stops (120)")
    sk.add_argument("--idle-timeout", type=float, default=10.0,
                    help="seconds the idle server has to bring KV usage, running and waiting to 0 (10)")
    sk.add_argument("--allow-remote", action="store_true", help="allow a URL whose host is not loopback")
    sk.add_argument("--seed", type=int, default=0)
    sk.add_argument("--json", action="store_true", help="print one JSON object (interval lines go to stderr)")
    for p in (tp, lat, sv, sp, mx, sk):
        p.set_defaults(func=cmd_bench, parser=p)


def cmd_eval(a: argparse.Namespace) -> int:
    import json

    from ember.bench.perplexity import perplexity, read_text
    from ember.models.loader import load_model

    text = read_text(a.text)  # a missing file fails before the model loads
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    loaded = load_model(a.model, a.dtype, progress=not a.json)
    result = {"model": str(loaded.path), "text": a.text, "dtype": a.dtype,
              **perplexity(loaded, text, a.ctx, a.windows, a.stride, a.kv_cache_dtype, a.block_size,
                           progress=not a.json, long_context=a.long_context, attention_window=a.attention_window,
                           attention_sinks=a.attention_sinks)}
    if a.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"model       {result['model']} ({a.dtype})")
    print(f"text        {a.text}: {result['text_tokens']} tokens, BOS {'added' if result['bos'] else 'not added'}")
    print(f"protocol    {result['windows']} of {result['windows_available']} windows of {a.ctx} tokens, "
          f"stride {result['stride']}; {result['tokens']} tokens scored")
    if result["kv_cache_dtype"] != "auto":
        print(f"KV cache    {result['kv_cache_dtype']}: each window run in blocks of {result['kv_block_size']} "
              "tokens through the paged cache, so every token reads earlier blocks as stored")
    if a.long_context:
        print(f"long input  --long-context {a.long_context}: each window through the engine in chunks, peak KV "
              f"cache {result['kv_peak_bytes'] / 2**20:.1f} MiB")
    print(f"perplexity  {result['ppl']:.4f}  (mean NLL {result['nll']:.4f} nats, {result['seconds']:.1f} s)")
    return 0


def cmd_passkey(a: argparse.Namespace) -> int:
    import json

    from ember.bench.passkey import run_passkey, table
    from ember.engine.engine import LLMEngine

    lengths, depths = _numbers(a, a.lengths, int), _numbers(a, a.depths, float)
    kwargs = _engine_kwargs(a, seqs=len(depths) * a.trials, tokens=max(lengths) + 64)
    engine = LLMEngine(model=a.model, **kwargs)
    result = run_passkey(engine, lengths, depths, a.trials, a.seed)
    result.update(long_context=a.long_context, attention_window=engine.long.window if engine.long else None,
                  attention_sinks=engine.long.sinks if engine.long else None)
    if a.json:
        print(json.dumps(result, indent=1))
        return 0
    mode = (f"--long-context {a.long_context}, window {result['attention_window']}, {result['attention_sinks']} "
            "sinks" if a.long_context else "plain attention")
    print(f"passkey retrieval, {mode}: accuracy over {a.trials} keys per cell ({result['seconds']:.0f} s)")
    print(table(result))
    return 0


def _numbers(a: argparse.Namespace, text: str, kind: type) -> list[Any]:
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        a.parser.error(f"expected comma-separated numbers, got {text!r}")
        raise


def _eval_parsers(sub: Any) -> None:
    ev = sub.add_parser("eval", help="evaluate a model: perplexity, passkey retrieval, long-term memory on synthetic "
                                     "dialogues, re-ranking on a retrieval set",
                        description="Evaluate MODEL (any model ember loads, compressed ones included).")
    kinds = ev.add_subparsers(dest="kind", required=True, metavar="KIND")
    ppl = kinds.add_parser("ppl", help="perplexity on a text file, in fixed-length windows",
                           description="Perplexity of MODEL on FILE: the text is tokenized once and cut into "
                                       "windows of --ctx tokens; every token but each window's first is scored "
                                       "(with --stride S, windows after the first score their last S tokens).")
    _model_args(ppl)
    ppl.add_argument("--text", required=True, metavar="FILE", help="UTF-8 text file to score")
    ppl.add_argument("--ctx", type=int, default=512, help="tokens per window (default 512)")
    ppl.add_argument("--windows", type=int, default=None, help="score only the first N windows (default: all)")
    ppl.add_argument("--stride", type=int, default=None, help="window step in tokens (default: ctx, no overlap)")
    ppl.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                     help=DTYPE_HELP)
    ppl.add_argument("--kv-cache-dtype", default="auto", choices=list(KV_CACHE_DTYPES),
                     help="auto: one dense forward per window; float16, or KIVI int8 / int4 / int2: score "
                          "through that cache, one block of tokens per step, as generation reads it")
    ppl.add_argument("--block-size", type=int, default=16,
                     help="KV block size with a quantized cache: KIVI's key group and most float tokens (default 16)")
    ppl.add_argument("--long-context", choices=["streaming", "lm-infinite"], default=None,
                     help="run each window through the engine under this mode (then --ctx may exceed the trained "
                          "context)")
    ppl.add_argument("--attention-window", type=_positive_int, default=None, metavar="W",
                     help="with --long-context: recent tokens each token sees (default: the trained context)")
    ppl.add_argument("--attention-sinks", type=int, default=None, metavar="N",
                     help="with --long-context: first tokens every token sees (default 4 streaming, 10 lm-infinite; "
                          "LM-Infinite's perplexity runs use 100; 0 = a plain sliding window)")
    ppl.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ppl.add_argument("--json", action="store_true", help="print one JSON object")
    ppl.set_defaults(func=cmd_eval, parser=ppl)

    pk = kinds.add_parser("passkey", help="passkey retrieval: a number hidden at depths of a long filler text",
                          description="A 5-digit pass key hidden at each --depths fraction of a filler text of each "
                                      "of --lengths tokens, asked for at the end (LM-Infinite's evaluation); "
                                      "accuracy = the key in the greedy reply. With --long-context, lengths may "
                                      "exceed the trained context.")
    _model_args(pk)
    _engine_flags(pk)
    pk.add_argument("--lengths", default="1024,2048,4096", help="prompt lengths in tokens (default 1024,2048,4096)")
    pk.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="needle depths (default 0,0.25,0.5,0.75,1)")
    pk.add_argument("--trials", type=_positive_int, default=4, help="keys per (length, depth) (default 4)")
    pk.add_argument("--seed", type=int, default=0)
    pk.add_argument("--json", action="store_true", help="print one JSON object")
    pk.set_defaults(func=cmd_passkey, parser=pk)

    from ember.bench.memory_eval import add_memory_parser

    add_memory_parser(kinds)

    rr = kinds.add_parser("rerank", help="re-ranking methods on a retrieval set, after a BM25 first stage",
                          description="Retrieve each query's top-k documents with BM25 (bm25s) from the corpus of "
                                      "FILE (every line's document is `title. abstract`; a line's query has one "
                                      "relevant document, its own), re-rank them with each method and MODEL, and "
                                      "report MRR@10, nDCG@10 and R@1 (ir-measures) beside seconds, forward passes "
                                      "and tokens per query. Rows: random (a seeded random order of the top-k), "
                                      "bm25 and the methods; --fuse adds bm25+METHOD (reciprocal-rank fusion, "
                                      "k=60). Needs the eval extra: pip install 'ember[eval]'.")
    _model_args(rr)
    rr.add_argument("--data", required=True, metavar="FILE",
                    help='JSON lines {"id", "title", "abstract", "query"} (e.g. shared/data/papers/dev.jsonl)')
    rr.add_argument("--first-stage", default="bm25", choices=["bm25"], help="first-stage retriever (bm25)")
    rr.add_argument("--top-k", type=_positive_int, default=20,
                    help="documents the first stage hands each re-ranker (default 20); a relevant document "
                         "outside them stays missing")
    rr.add_argument("--shuffle", action="store_true",
                    help="give the re-rankers the top-k in a seeded random order instead of BM25's, so each "
                         "must rank by its own signal")
    rr.add_argument("--seed", type=int, default=0, help="seed of the random order (default 0)")
    rr.add_argument("--methods", default="icr,listwise,pairwise,pointwise,embedding,bm25", metavar="M[,M]",
                    help="comma-separated: icr, listwise, pairwise, pointwise, embedding, bm25 (default: all; "
                         "pairwise compares every pair in both orders: k(k-1) prompts per query)")
    rr.add_argument("--fuse", action="store_true", help="add a bm25+METHOD row per method: reciprocal-rank "
                                                        "fusion (k=60) of BM25's order and the method's")
    rr.add_argument("--queries", type=_positive_int, default=None, metavar="N",
                    help="evaluate the first N queries (default: all); the corpus is always every line")
    rr.add_argument("--max-tokens-per-doc", type=_positive_int, default=None, metavar="N",
                    help="cut each document to N tokens (default: not cut)")
    rr.add_argument("--layers", default=None, metavar="L[,L]",
                    help="ICR's scored layers, numbers and ranges such as 0-7,12, or all (default: a band "
                         "from a fifth to a third of the depth, 6-9 of 30 layers)")
    rr.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    rr.add_argument("--json", action="store_true", help="print one JSON object")
    _engine_flags(rr)
    rr.set_defaults(func=cmd_eval_rerank, parser=rr)


def cmd_eval_rerank(a: argparse.Namespace) -> int:
    import json

    from ember.apps.rerank import METHODS
    from ember.bench.rerank import evaluate, format_table, load_dataset, parse_layers, parse_methods, \
        require_eval_deps

    require_eval_deps()  # every input checked before the model loads
    methods, layers, data = parse_methods(a.methods), parse_layers(a.layers), load_dataset(a.data)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    llm = None
    if any(m in METHODS for m in methods):
        from ember import LLM

        llm = LLM(a.model, **_engine_kwargs(a))
    result = {"data": a.data, "model": str(llm.engine.loaded.path) if llm else None, "methods": methods,
              **evaluate(llm, data, methods, a.top_k, a.shuffle, a.seed, a.fuse, a.queries, a.max_tokens_per_doc,
                         layers, progress=not a.json)}
    if a.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"model {result['model'] or '-'}; data {a.data}")
        print(format_table(result))
    return 0


def _read_documents(path: str) -> list[str]:
    """`ember rerank --docs FILE` ("-": stdin): JSON lines, each a string, {"text"} or {"title", "abstract"}."""
    from ember.bench.common import json_lines, read_lines
    from ember.bench.rerank import document_text
    from ember.errors import InvalidParameterError

    lines = sys.stdin.read().splitlines() if path == "-" else read_lines(path, "documents file", "docs")
    docs = []
    for n, row in json_lines(lines, path, "docs", '; each line is a JSON string, {"text": ...} or '
                                                  '{"title": ..., "abstract": ...}'):
        if isinstance(row, dict) and isinstance(row.get("text"), str):
            row = row["text"]
        elif isinstance(row, dict) and isinstance(row.get("title"), str) and isinstance(row.get("abstract"), str):
            row = document_text(row["title"], row["abstract"])
        if not isinstance(row, str):
            raise InvalidParameterError(f'{path}:{n}: expected a JSON string, {{"text": ...}} or '
                                        '{"title": ..., "abstract": ...}', "docs")
        docs.append(row)
    if not docs:
        raise InvalidParameterError(f"documents file {path} has no documents", "docs")
    return docs


def cmd_rerank(a: argparse.Namespace) -> int:
    import json

    from ember import LLM
    from ember.apps.rerank import RerankOptions
    from ember.errors import InvalidParameterError

    RerankOptions(method=a.method, max_tokens_per_doc=a.max_tokens_per_doc)  # a bad method fails before loading
    if not a.query.strip():
        raise InvalidParameterError("the query is empty", "query")
    if a.documents and a.docs:
        raise InvalidParameterError("give the documents after QUERY or with --docs FILE, not both", "docs")
    docs = _read_documents(a.docs) if a.docs else a.documents
    if not docs:
        raise InvalidParameterError("no documents: give them after QUERY or with --docs FILE", "docs")
    empty = [i for i, d in enumerate(docs) if not d.strip()]
    if empty:
        raise InvalidParameterError(f"document {empty[0]} is empty", "docs")
    llm = LLM(a.model, **_engine_kwargs(a))
    start = time.perf_counter()
    out = llm.rerank(a.query, docs, method=a.method, top_n=a.top_n, max_tokens_per_doc=a.max_tokens_per_doc)
    elapsed = time.perf_counter() - start
    u, r = out.usage, out.ranking
    if a.json:
        print(json.dumps({
            "model": str(llm.engine.loaded.path), "method": a.method, "query": a.query,
            "results": [{"index": x.index, "relevance_score": x.relevance_score, "document": {"text": x.document}}
                        for x in out.results],
            "usage": {"prompt_tokens": u.prompt_tokens, "total_tokens": u.prompt_tokens + u.generated_tokens,
                      "computed_tokens": u.computed_tokens, "generated_tokens": u.generated_tokens,
                      "requests": u.requests, "forward_passes": u.forward_passes},
            "meta": {"windows": r.windows, "truncated_documents": r.truncated, "generations": r.generations,
                     "malformed": r.malformed, "seconds": elapsed}}, indent=1))
        return 0
    print(f"{'rank':>4}  {'index':>5}  {'score':>10}  document")
    for rank, x in enumerate(out.results, 1):
        text = " ".join((x.document or "").split())
        print(f"{rank:>4}  {x.index:>5}  {x.relevance_score:>10.4g}  {text[:80] + ('...' if len(text) > 80 else '')}")
    notes = [f"{len(r.truncated)} cut to {a.max_tokens_per_doc} tokens"] if r.truncated else []
    notes += [f"{r.malformed} of {r.generations} generated rankings malformed"] if r.malformed else []
    print(f"[{a.method}: {len(docs)} documents, {u.forward_passes} forward passes, {u.prompt_tokens} prompt tokens "
          f"({u.computed_tokens} computed), {r.windows} window{'s' * (r.windows > 1)}, {elapsed:.2f} s"
          f"{'; ' + '; '.join(notes) if notes else ''}]", file=sys.stderr)
    return 0


def _rerank_parser(sub: Any) -> None:
    from ember.apps.rerank import METHODS

    rr = sub.add_parser("rerank", help="rank documents for a query with a model (ICR and baselines)",
                        description="Rank DOCs (first-stage order, best first) for QUERY with MODEL: `ember rerank "
                                    "QUERY DOC... [--model MODEL]` or `ember rerank QUERY --docs FILE`. Prints "
                                    "the ranking best first; --json prints the rerank API's shape.")
    rr.add_argument("query", metavar="QUERY", help="the query")
    rr.add_argument("documents", nargs="*", metavar="DOC", help="the documents, best first by a first stage")
    rr.add_argument("--model", "-m", dest="model_opt", default=None, metavar="MODEL", help=MODEL_HELP)
    rr.add_argument("--docs", default=None, metavar="FILE",
                    help='documents as JSON lines, each a string, {"text": ...} or {"title": ..., "abstract": ...} '
                         '("-": stdin)')
    rr.add_argument("--method", default="icr", metavar="METHOD",
                    help=f"one of {', '.join(METHODS)} (default icr: the attention the query pays each document, "
                         "two forward passes)")
    rr.add_argument("--top-n", type=_positive_int, default=None, metavar="N", help="print the best N (default all)")
    rr.add_argument("--max-tokens-per-doc", type=_positive_int, default=None, metavar="N",
                    help="cut each document to N tokens (default: not cut)")
    rr.add_argument("--json", action="store_true", help="print one JSON object in the rerank API's shape")
    _engine_flags(rr)
    rr.set_defaults(func=cmd_rerank, parser=rr, model=None)


def cmd_compress(a: argparse.Namespace) -> int:
    from pathlib import Path

    from ember.compress.pipeline import CompressOptions, compress_model, model_bytes

    options = CompressOptions(bits=a.bits, group_size=a.group_size, sparsity=a.sparsity, pattern=a.pattern,
                              calib=a.calib, calib_tokens=a.calib_tokens, dtype=a.dtype)
    manifest = compress_model(a.model, a.method, options, a.out)
    source = Path(manifest["source"]["path"])
    size_in, size_out = model_bytes(source), manifest["bytes"]["total"]
    print(f"{source.name} {size_in / 1e6:.1f} MB -> {a.out} {size_out / 1e6:.1f} MB "
          f"({size_out / max(size_in, 1):.0%} of the input)", file=sys.stderr)
    if size_out > size_in:
        log.warning("the output is larger than its input: the input stores its weights in fewer bits than %s "
                    "(the embedding stays %s)", "+".join(manifest["methods"]), a.dtype)
    print(a.out)
    return 0


def _compress_parser(sub: Any) -> None:
    cp = sub.add_parser("compress", help="prune and/or quantize a model into a folder every command loads",
                        description="Compress MODEL without training and write a folder that `ember serve`, "
                                    "`generate --model` and LLM() load. Methods: int8 (per-channel), int4 "
                                    "(groups), awq (activation-aware int4), magnitude, wanda, dsnot (pruning); "
                                    "combine one pruning and one quantization method, e.g. wanda,int4 "
                                    "(pruning runs first).")
    _model_args(cp)
    cp.add_argument("--method", required=True, metavar="METHOD[,METHOD]", help="int8, int4, awq, magnitude, wanda, dsnot, or pruning,quantization")
    cp.add_argument("--out", required=True, metavar="DIR", help="output folder (new or empty)")
    cp.add_argument("--bits", type=int, default=None, help="weight bits: 8 (int8), 4 (int4, awq default) or 8 (awq)")
    cp.add_argument("--group-size", type=int, default=None,
                    help="inputs per quantization group, a multiple of 32 (default: per output channel for "
                         "8 bits; the largest of 128/64/32 that fits for 4 bits)")
    cp.add_argument("--sparsity", type=float, default=None, help="fraction of weights to prune (default 0.5)")
    cp.add_argument("--pattern", default=None, metavar="N:M", help="N:M sparsity, e.g. 2:4 (N of every M pruned)")
    cp.add_argument("--calib", default=None, metavar="FILE", help="calibration text (needed by awq, wanda, dsnot)")
    cp.add_argument("--calib-tokens", type=int, default=4096,
                    help="calibration tokens, used in whole windows of 512 (default 4096)")
    cp.add_argument("--dtype", default="float16", choices=["float32", "bfloat16", "float16"],
                    help="dtype of the tensors kept float: embedding, norms (default float16: half the bytes of "
                         "float32; perplexity moves by ~0.01%%)")
    cp.set_defaults(func=cmd_compress, parser=cp)


def cmd_pull(a: argparse.Namespace) -> int:
    from ember.loading.registry import DEFAULT_MODEL, pull

    path = pull(a.name or DEFAULT_MODEL, progress=True)
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ember", description="Run Llama-family LLMs on the hardware you have.")
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", help="generate a reply to a prompt, streamed to the terminal",
                         description="Generate text for PROMPT (chat template applied unless --raw) with MODEL: "
                                     "`ember generate [MODEL] PROMPT` or `ember generate PROMPT --model MODEL`.")
    _model_args(gen)
    gen.add_argument("prompt", metavar="PROMPT", help="the prompt text")
    gen.add_argument("--raw", action="store_true", help="send the prompt as-is, without the chat template")
    _engine_flags(gen)
    _sampling_flags(gen)
    gen.set_defaults(func=cmd_generate, parser=gen)

    sv = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API",
                        description="Serve MODEL over an OpenAI-compatible API (/v1/chat/completions, "
                                    "/v1/completions, /v1/embeddings, /v1/rerank, /v1/score, /v1/models, "
                                    "/tokenize, /detokenize, /health, /metrics) and a chat page at /.")
    _model_args(sv)
    _engine_flags(sv)
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    sv.add_argument("--port", type=_port, default=8000, help="port to listen on, 1-65535 (default 8000)")
    sv.add_argument("--api-key", default=None,
                    help="require 'Authorization: Bearer KEY' on every route but /health (which stays open for "
                         "probes): /v1/*, /tokenize, /detokenize, /metrics, /docs and /openapi.json")
    sv.add_argument("--served-model-name", default=None, help="model id clients use (default: from MODEL)")
    sv.add_argument("--max-request-bytes", type=_positive_int, default=4 << 20, metavar="BYTES",
                    help="refuse request bodies larger than this with 413 (default 4 MiB)")
    sv.add_argument("--max-request-tokens", type=_positive_int, default=1 << 18, metavar="TOKENS",
                    help="most tokens one request may ask to generate, over all its completions (n x max_tokens, "
                         "or the rest of the context without max_tokens; default 262144); n is capped at 128, "
                         "prompts per request at 256")
    sv.add_argument("--shutdown-grace", type=_seconds, default=60.0, metavar="SECONDS",
                    help="on SIGTERM/SIGINT, how long requests in flight may run before they end with an error "
                         "(default 60); a second signal ends them at once")
    sv.add_argument("--pooling", choices=["last", "mean"], default="last",
                    help="how /v1/embeddings pools a text's hidden states unless the request sends pooling: the "
                         "last token's (default, as vLLM for decoder models) or the mean over its tokens")
    sv.add_argument("--memory-db", default=None, metavar="PATH",
                    help="the SQLite file of long-term memory sessions (chat completions with \"session\"; "
                         "default $EMBER_HOME/memory.sqlite3)")
    _memory_embedder_flag(sv)
    sv.add_argument("--no-ui", action="store_true",
                    help="do not serve the chat page at GET / (by default it is served, open without the API key: "
                         "it asks for the key and sends it with its own requests)")
    scale = sv.add_argument_group("replicas (Ray Serve: pip install 'ember[ray]')")
    scale.add_argument("--replicas", type=_positive_int, default=1, metavar="N",
                       help="run N engine replicas behind this one endpoint as Ray Serve deployments (EmberEngine, "
                            "behind EmberIngress); 1 (default): one process, without Ray")
    scale.add_argument("--ray-address", default=None, metavar="ADDR",
                       help="join this Ray cluster (e.g. 10.0.0.1:6379, after `ray start --head` there) instead of "
                            "starting Ray on this machine")
    scale.add_argument("--replica-threads", type=_positive_int, default=None, metavar="T",
                       help="torch threads per replica (default: the cores divided by N); each replica reserves "
                            "min(T, cores/N) CPUs from Ray, so N replicas always fit")
    scale.add_argument("--router", choices=ROUTERS, default="prefix",
                       help="how requests pick a replica: prefix (default: the replica already holding the prompt's "
                            "leading token blocks, unless load is uneven), ray-prefix (Ray's PrefixCacheAffinity"
                            "Router, on characters), pow2 (Ray's default: less loaded of two), random")
    scale.add_argument("--routing-imbalance", type=_positive_int, default=None, metavar="N",
                       help="prefix routing: when the replicas' requests in flight differ by more than N, send the "
                            "request to the least loaded replica even if another holds its prefix (default %d)"
                            % ROUTING_IMBALANCE)
    sv.set_defaults(func=cmd_serve, parser=sv)

    ch = sub.add_parser("chat", help="interactive chat in the terminal (/reset, /exit)",
                        description="Chat with MODEL; replies stream. /reset clears the history, /exit quits.")
    _model_args(ch)
    _engine_flags(ch)
    _sampling_flags(ch)
    ch.add_argument("--system", default=None, help="system prompt")
    ch.add_argument("--memory", default=None, metavar="NAME",
                    help="keep the conversation as session NAME in long-term memory (SCM): every turn is stored, "
                         "each message brings back the previous turn and the most relevant earlier ones within a "
                         "token budget; the session survives restarts and grows without bound (/forget deletes it)")
    ch.add_argument("--memory-db", default=None, metavar="PATH",
                    help="the memory database (default $EMBER_HOME/memory.sqlite3)")
    _memory_embedder_flag(ch)
    ch.set_defaults(func=cmd_chat, temperature=0.7, max_tokens=512, parser=ch)

    _bench_parsers(sub)
    _eval_parsers(sub)
    _rerank_parser(sub)
    _compress_parser(sub)

    md = sub.add_parser("models", help="list models in the local cache")
    md.set_defaults(func=cmd_models, parser=md)

    from ember.loading.registry import DEFAULT_MODEL, KNOWN_MODELS

    known = ", ".join(KNOWN_MODELS)
    pl = sub.add_parser("pull", help="fetch a known model into the local cache ($EMBER_HOME)",
                        description=f"Fetch a known model into the local cache ($EMBER_HOME). Known names: {known}. "
                                    "Other commands also take a .gguf file or a Hugging Face folder directly.")
    pl.add_argument("name", nargs="?", default=None, metavar="NAME",
                    help=f"one of: {known} (default: {DEFAULT_MODEL})")
    pl.set_defaults(func=cmd_pull, parser=pl)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line parsed; MODEL merged from its two forms. Errors exit 2 with the subcommand's usage."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # reported by the subcommand, with its usage (argparse reports them at the top level)
        getattr(args, "parser", parser).error(f"unrecognized arguments: {' '.join(extra)}")
    _resolve_model(args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="ember: %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per HTTP request otherwise
    try:
        return args.func(args)
    except EmberError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
