"""Which grammar engine fits ember: llguidance, xgrammar and outlines-core on the default model's vocabulary.
Each engine compiles the same JSON schemas, a regex and a GBNF grammar, then walks the same valid outputs
(tokenized by ember's tokenizer) token by token as ember's decode loop does: fill the next-token bitmask, check
the token's bit is set, consume the token. Reported: compile time, mask fill per row (1 row, and a batch of 16
rows through the engine's batched API where it has one), consume time, whether a fill lets other Python threads
run (ember fills masks on a worker thread during the forward), and which JSON-schema keywords each enforces.
An engine that is not installed is skipped: xgrammar and outlines-core are not ember's dependencies (xgrammar's
wheel requires torch and triton: `pip install --no-deps xgrammar apache-tvm-ffi` keeps ember's torch; outlines-core
needs nothing).
    usage: python benchmarks/grammar_engines.py [--engines llguidance,xgrammar,outlines-core] [--repeats 5]
                                                [--batch 16] [--threads 2] [--no-gil] [--no-coverage]"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ember.engine.structured import JSON_WHITESPACE, GrammarCompiler, StructuredOutputsParams
from ember.errors import InvalidParameterError
from ember.loading.registry import pull
from ember.loading.tokenizer import Tokenizer

MAX_WS = 24  # JSON_WHITESPACE's bound, given to xgrammar as max_whitespace_cnt

# As benchmarks/structured_cost.py's SCHEMA (the request ember's decode-path figure is measured with).
STORY = {"type": "object", "required": ["title", "story", "tags"], "additionalProperties": False,
         "properties": {"title": {"type": "string", "maxLength": 60}, "story": {"type": "string"},
                        "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}}}}
STORY_OUT = {"title": "The Keeper of Gull Rock",
             "story": "Every night Mara climbed the ninety-two steps of the lighthouse on Gull Rock to trim the "
                      "wick. One November the fog came in so thick that the beam vanished a yard from the glass, "
                      "so she rang the bell by hand until dawn, and the fishing boats found their way home.",
             "tags": ["lighthouse", "fog", "sea", "courage"]}

_ADDRESS = {"type": "object", "required": ["street", "city", "country"], "additionalProperties": False,
            "properties": {"street": {"type": "string"}, "city": {"type": "string"},
                           "postcode": {"type": "string"}, "country": {"enum": ["GB", "FR", "DE", "US"]}}}
_ITEM = {"type": "object", "required": ["sku", "quantity", "unit_price_cents"], "additionalProperties": False,
         "properties": {"sku": {"type": "string"}, "quantity": {"type": "integer", "minimum": 1, "maximum": 100},
                        "unit_price_cents": {"type": "integer", "minimum": 0},
                        "options": {"type": "array", "items": {"enum": ["gift-wrap", "express", "insured"]}}}}
ORDER = {"type": "object", "additionalProperties": False,
         "required": ["order_id", "status", "customer", "items", "total_cents", "gift"],
         "properties": {"order_id": {"type": "integer", "minimum": 1},
                        "status": {"enum": ["pending", "paid", "shipped", "delivered", "cancelled"]},
                        "customer": {"type": "object", "required": ["name", "email", "address"],
                                     "additionalProperties": False,
                                     "properties": {"name": {"type": "string"}, "email": {"type": "string"},
                                                    "address": _ADDRESS}},
                        "items": {"type": "array", "minItems": 1, "items": _ITEM},
                        "total_cents": {"type": "integer", "minimum": 0}, "gift": {"type": "boolean"},
                        "note": {"type": ["string", "null"]}}}
ORDER_OUT = {"order_id": 48213, "status": "shipped",
             "customer": {"name": "Ada Lovelace", "email": "ada@example.org",
                          "address": {"street": "12 St James's Square", "city": "London", "postcode": "SW1Y 4JH",
                                      "country": "GB"}},
             "items": [{"sku": "LAMP-0042", "quantity": 2, "unit_price_cents": 1999, "options": ["gift-wrap"]},
                       {"sku": "WICK-0007", "quantity": 12, "unit_price_cents": 250}],
             "total_cents": 6998, "gift": True, "note": None}


def _tool(name: str, parameters: dict[str, Any]) -> dict[str, Any]:
    """One call in the shape ember's tool grammar (ember/server/tools.py) requires: the name, then arguments."""
    return {"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
            "properties": {"name": {"const": name}, "arguments": parameters}}


TOOL_CALL = {"anyOf": [
    _tool("get_weather", {"type": "object", "required": ["location", "unit"], "additionalProperties": False,
                          "properties": {"location": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]},
                                         "days": {"type": "integer", "minimum": 1, "maximum": 14}}}),
    _tool("search_web", {"type": "object", "required": ["query"], "additionalProperties": False,
                         "properties": {"query": {"type": "string"},
                                        "max_results": {"type": "integer", "minimum": 1, "maximum": 20},
                                        "safe": {"type": "boolean"}}})]}
TOOL_OUT = {"name": "search_web", "arguments": {"query": "tide times at Whitby this weekend", "max_results": 5,
                                                "safe": True}}

LOG_REGEX = (r"(INFO|WARN|ERROR) [0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z [a-z_]{1,20}: "
             r"[A-Za-z0-9 ,.'-]{1,120}")
LOG_OUT = "WARN 2026-12-04T13:40:18Z keeper_daemon: Lamp rotation slowed to 9.5 rpm, fog signal engaged at Gull Rock."

ARITH_GBNF = r"""root ::= expr
expr ::= term (("+" | "-") term)*
term ::= factor (("*" | "/") factor)*
factor ::= number | "(" expr ")"
number ::= [0-9]+ ("." [0-9]+)?
"""
ARITH_OUT = "(12.5+7)*3-(4/2)*(10-3.25)+42/(6*(1.5+0.25))-((8+9)*(2-0.5))"


@dataclass(frozen=True)
class Case:
    """A constraint (kind: json, regex or gbnf) and one output it must accept."""

    name: str
    kind: str
    spec: Any
    output: str


CASES = [Case("story (structured_cost.py)", "json", STORY, json.dumps(STORY_OUT)),
         Case("order: nested, enums, arrays, integers", "json", ORDER, json.dumps(ORDER_OUT)),
         Case("tool call: anyOf of 2 tools", "json", TOOL_CALL, json.dumps(TOOL_OUT)),
         Case("regex: a log line", "regex", LOG_REGEX, LOG_OUT),
         Case("GBNF: arithmetic", "gbnf", ARITH_GBNF, ARITH_OUT)]

# JSON-schema keywords: (keyword, schema, a valid instance, an invalid one). Enforced = the valid one's tokens all
# pass the masks and the invalid one's do not.
COVERAGE: list[tuple[str, dict[str, Any], Any, Any]] = [
    ("integer minimum/maximum", {"type": "integer", "minimum": 1, "maximum": 14}, 7, 20),
    ("number exclusiveMinimum", {"type": "number", "exclusiveMinimum": 0}, 2.5, -1.5),
    ("string minLength/maxLength", {"type": "string", "minLength": 3, "maxLength": 5}, "abcd", "abcdefgh"),
    ("string pattern", {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"}, "ABC-123", "abc-123"),
    ("format date-time", {"type": "string", "format": "date-time"}, "2026-12-04T13:40:18Z", "yesterday"),
    ("format email", {"type": "string", "format": "email"}, "ada@example.org", "not an email"),
    ("enum of mixed types", {"enum": [1, "two", None]}, "two", 3),
    ("const", {"const": "fixed"}, "fixed", "other"),
    ("array minItems/maxItems", {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3},
     [1, 2], [1]),
    ("uniqueItems", {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, [1, 2], [1, 1]),
    ("prefixItems (tuple)", {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}],
                             "items": False}, ["a", 1], [1, "a"]),
    ("additionalProperties: schema", {"type": "object", "additionalProperties": {"type": "integer"}},
     {"a": 1, "b": 2}, {"a": "x"}),
    ("oneOf", {"oneOf": [{"type": "integer"}, {"type": "boolean"}]}, True, "x"),
    ("allOf", {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                         {"type": "object", "properties": {"b": {"type": "string"}}, "required": ["b"]}]},
     {"a": 1, "b": "x"}, {"a": 1}),
    ("recursive $ref", {"$ref": "#/$defs/node", "$defs": {"node": {
        "type": "object", "required": ["v"], "additionalProperties": False,
        "properties": {"v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}}}}},
     {"v": 1, "kids": [{"v": 2, "kids": [{"v": 3}]}]}, {"v": 1, "kids": [{"v": "x"}]}),
    ("if/then/else", {"type": "object", "properties": {"a": {"type": "integer"}},
                      "if": {"properties": {"a": {"const": 1}}}, "then": {"required": ["b"]}},
     {"a": 1, "b": 2}, {"a": 1}),
]


class Engine:
    """One grammar engine behind the calls ember's decode loop makes: compile a constraint, make a matcher from
    the compiled form, fill rows of a shared int32 bitmask (32 tokens a word, little-endian bits), consume."""

    name = ""
    package = ""
    batched = False  # has a batched fill that runs rows on its own threads

    def __init__(self, tok: Tokenizer, vocab: int, threads: int) -> None:
        self.tok, self.vocab, self.threads = tok, vocab, threads

    def setup(self) -> None:
        """Build the engine's view of the vocabulary (once per model)."""

    def supports(self, case: Case) -> bool:
        return True

    def compile(self, case: Case) -> Any:
        """The compiled form of a constraint, cold (no cache the engine keeps)."""
        raise NotImplementedError

    def compile_again(self, case: Case) -> Any | None:
        """The same constraint again through the engine's own cache; None: the engine keeps none."""
        return None

    def matcher(self, compiled: Any) -> Any:
        """A fresh matcher (per-request state) from a compiled form."""
        raise NotImplementedError

    def bind(self, bitmask: np.ndarray) -> None:
        """Prepare views of the bitmask the fills below write to (outside the timings)."""
        self.bitmask = bitmask

    def fill(self, m: Any, row: int) -> None:
        raise NotImplementedError

    def fill_batch(self, ms: list[Any]) -> None:
        for k, m in enumerate(ms):
            self.fill(m, k)

    def consume(self, m: Any, token: int) -> None:
        raise NotImplementedError


class LLGuidance(Engine):
    """ember's path: GrammarCompiler.matcher (schema to grammar, validation, LLMatcher), llguidance.numpy's fills."""

    name, package, batched = "llguidance", "llguidance", True

    def setup(self) -> None:
        import llguidance

        self.compiler = GrammarCompiler(self.tok, self.vocab)
        self.compiler.ll_tokenizer
        self.executor = llguidance.LLExecutor(self.threads)

    def compile(self, case: Case) -> Any:
        key = {"json": "json", "regex": "regex", "gbnf": "grammar"}[case.kind]
        return self.compiler.matcher(StructuredOutputsParams(**{key: case.spec}))

    def matcher(self, compiled: Any) -> Any:
        return compiled.deep_copy()

    def fill(self, m: Any, row: int) -> None:
        import llguidance.numpy as lln

        lln.fill_next_token_bitmask(m, self.bitmask, row)

    def fill_batch(self, ms: list[Any]) -> None:
        import llguidance.numpy as lln

        lln.fill_next_token_bitmask_par(self.executor, [(m, k) for k, m in enumerate(ms)], self.bitmask)

    def consume(self, m: Any, token: int) -> None:
        m.consume_token(token)


class XGrammar(Engine):
    """TokenizerInfo over the raw token bytes (special tokens empty, as xgrammar marks them), GrammarCompiler
    with its cache, GrammarMatcher, BatchGrammarMatcher for batches."""

    name, package, batched = "xgrammar", "xgrammar", True

    def setup(self) -> None:
        import xgrammar as xgr

        tokens = [b"" if self.tok.is_special(i) else self.tok.id_to_bytes(i) for i in range(self.vocab)]
        info = xgr.TokenizerInfo(tokens, xgr.VocabType.RAW, vocab_size=self.vocab,
                                 stop_token_ids=[self.tok.eos_token_id])
        self.compiler = xgr.GrammarCompiler(info, max_threads=self.threads)
        self.batcher = xgr.BatchGrammarMatcher(self.threads)

    def compile(self, case: Case) -> Any:
        self.compiler.clear_cache()
        return self.compile_again(case)

    def compile_again(self, case: Case) -> Any:
        if case.kind == "json":
            return self.compiler.compile_json_schema(json.dumps(case.spec), any_whitespace=True,
                                                     max_whitespace_cnt=MAX_WS)
        if case.kind == "regex":
            return self.compiler.compile_regex(case.spec)
        return self.compiler.compile_grammar(case.spec)

    def matcher(self, compiled: Any) -> Any:
        import xgrammar as xgr

        return xgr.GrammarMatcher(compiled)

    def bind(self, bitmask: np.ndarray) -> None:
        import torch

        self.bitmask, self.view = bitmask, torch.from_numpy(bitmask)

    def fill(self, m: Any, row: int) -> None:
        m.fill_next_token_bitmask(self.view, row)

    def fill_batch(self, ms: list[Any]) -> None:
        self.batcher.batch_fill_next_token_bitmask(ms, self.view)

    def consume(self, m: Any, token: int) -> None:
        if not m.accept_token(token):
            raise ValueError(f"xgrammar refused token {token}")


class OutlinesCore(Engine):
    """Vocabulary of token bytes (special tokens left out), the schema as a regex (JSON_WHITESPACE between
    tokens, as ember gives llguidance), an Index (the compiled DFA over tokens), a Guide per request. No batched
    fill, no context-free grammars."""

    name, package = "outlines-core", "outlines-core"

    def setup(self) -> None:
        import outlines_core

        pieces: dict[bytes, list[int]] = {}
        for i in range(self.vocab):
            if not self.tok.is_special(i) and i != self.tok.eos_token_id:
                pieces.setdefault(self.tok.id_to_bytes(i), []).append(i)
        self.vocabulary = outlines_core.Vocabulary(self.tok.eos_token_id, pieces)

    def supports(self, case: Case) -> bool:
        return case.kind != "gbnf"

    def compile(self, case: Case) -> Any:
        import outlines_core
        from outlines_core.json_schema import build_regex_from_schema

        regex = (build_regex_from_schema(json.dumps(case.spec), JSON_WHITESPACE) if case.kind == "json"
                 else case.spec)
        return outlines_core.Index(regex, self.vocabulary)

    def matcher(self, compiled: Any) -> Any:
        import outlines_core

        return outlines_core.Guide(compiled)

    def bind(self, bitmask: np.ndarray) -> None:
        self.bitmask, self.ptrs = bitmask, [bitmask[k].ctypes.data for k in range(bitmask.shape[0])]

    def fill(self, m: Any, row: int) -> None:
        m.write_mask_into(self.ptrs[row], self.bitmask.shape[1], 4)

    def consume(self, m: Any, token: int) -> None:
        m.advance(token, return_tokens=False)


ENGINES: list[type[Engine]] = [LLGuidance, XGrammar, OutlinesCore]


def allocate(rows: int, vocab: int) -> np.ndarray:
    return np.zeros((rows, (vocab + 31) // 32), dtype=np.int32)


def allowed(bitmask: np.ndarray, row: int, vocab: int) -> np.ndarray:
    return np.unpackbits(bitmask[row].view(np.uint8), bitorder="little")[:vocab].astype(bool)


def has_bit(bitmask: np.ndarray, row: int, token: int) -> bool:
    return bool((int(bitmask[row, token >> 5]) >> (token & 31)) & 1)


def walk(engine: Engine, compiled: Any, tokens: list[int], keep_masks: bool = False
         ) -> tuple[bool, list[np.ndarray]]:
    """Fill, check and consume each token, then check EOS is allowed: whether the output is accepted (and the
    masks, to compare engines)."""
    eos = engine.tok.eos_token_id
    m, bitmask, masks = engine.matcher(compiled), allocate(1, engine.vocab), []
    engine.bind(bitmask)
    for t in [*tokens, eos]:
        bitmask[:] = 0
        engine.fill(m, 0)
        if keep_masks:
            masks.append(allowed(bitmask, 0, engine.vocab))
        if not has_bit(bitmask, 0, t):
            return False, masks
        if t != eos:
            try:
                engine.consume(m, t)
            except Exception:
                return False, masks
    return True, masks


def timed(f: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter_ns()
    out = f()
    return (time.perf_counter_ns() - start) / 1e3, out


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


@dataclass
class Timings:
    compile_ms: list[float] = field(default_factory=list)
    again_ms: list[float] = field(default_factory=list)
    matcher_ms: list[float] = field(default_factory=list)
    first_us: list[float] = field(default_factory=list)
    fill_us: list[float] = field(default_factory=list)
    consume_us: list[float] = field(default_factory=list)
    batch_us: list[float] = field(default_factory=list)


def measure(engine: Engine, case: Case, tokens: list[int], repeats: int, batch: int) -> Timings:
    """`repeats` cold compiles, each walked by one fresh matcher (1 row: the fill and consume of every step
    timed); then, `repeats` times, `batch` matchers walking the same tokens in lockstep, one batched fill a step
    (llguidance's rows compiled one by one, as ember compiles each request; the others' from one compiled form,
    as their caches would give)."""
    tm = Timings()
    compiled = None
    for _ in range(repeats):
        us, compiled = timed(lambda: engine.compile(case))
        tm.compile_ms.append(us / 1e3)
        again = timed(lambda: engine.compile_again(case))
        if again[1] is not None:
            tm.again_ms.append(again[0] / 1e3)
        us, m = timed(lambda: engine.matcher(compiled))
        tm.matcher_ms.append(us / 1e3)
        bitmask = allocate(1, engine.vocab)
        engine.bind(bitmask)
        for step, t in enumerate([*tokens, engine.tok.eos_token_id]):
            us, _ = timed(lambda: engine.fill(m, 0))
            tm.fill_us.append(us)
            if step == 0:
                tm.first_us.append(us)
            assert has_bit(bitmask, 0, t)
            if step < len(tokens):
                us, _ = timed(lambda: engine.consume(m, t))
                tm.consume_us.append(us)
    for _ in range(repeats):
        ms = [engine.matcher(engine.compile(case) if engine.name == "llguidance" else compiled)
              for _ in range(batch)]
        bitmask = allocate(batch, engine.vocab)
        engine.bind(bitmask)
        for step, t in enumerate([*tokens, engine.tok.eos_token_id]):
            us, _ = timed(lambda: engine.fill_batch(ms))
            tm.batch_us.append(us)
            assert all(has_bit(bitmask, k, t) for k in range(batch))
            for m in ms if step < len(tokens) else ():
                engine.consume(m, t)
    return tm


def wake_delay_ms(work: Callable[[], Any] | None, sleeps: int = 300) -> float:
    """Median lateness (ms) of the main thread waking from 1 ms sleeps while another thread runs `work` non-stop.
    Waking needs the GIL: a `work` that releases it while it runs leaves the delay at its idle value (~0.1 ms);
    one that holds it makes the main thread wait for the switch interval (5 ms). Insensitive to how busy the
    cores are, unlike timing a loop. ember's Masker fills masks on a worker thread during the forward: a fill
    that holds the GIL stalls the forward's Python between torch ops."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            work()

    worker = threading.Thread(target=loop) if work is not None else None
    if worker is not None:
        worker.start()
        time.sleep(0.01)
    late = []
    for _ in range(sleeps):
        start = time.perf_counter()
        time.sleep(0.001)
        late.append(time.perf_counter() - start - 0.001)
    stop.set()
    if worker is not None:
        worker.join()
    return 1e3 * statistics.median(late)


def fill_midway(engine: Engine, compiled: Any, tokens: list[int]) -> Callable[[], None]:
    """A 1-row fill of a matcher half-way through `tokens`."""
    m = engine.matcher(compiled)
    for t in tokens[:len(tokens) // 2]:
        engine.consume(m, t)
    engine.bind(allocate(1, engine.vocab))
    return lambda: engine.fill(m, 0)


def coverage(engine: Engine, tokenize: Callable[[str], list[int]]) -> dict[str, str]:
    out = {}
    for keyword, schema, good, bad in COVERAGE:
        case = Case(keyword, "json", schema, json.dumps(good))
        try:
            compiled = engine.compile(case)
        except InvalidParameterError:  # ember's error to the client, before any token
            out[keyword] = "refused"
            continue
        except Exception as e:  # an engine's own compile error, whatever its type
            out[keyword] = f"error ({type(e).__name__})"
            continue
        ok_good, _ = walk(engine, compiled, tokenize(json.dumps(good)))
        ok_bad, _ = walk(engine, compiled, tokenize(json.dumps(bad)))
        out[keyword] = ("enforced" if ok_good and not ok_bad else "rejects valid" if not ok_good
                        else "ignored")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engines", default=",".join(e.name for e in ENGINES))
    ap.add_argument("--repeats", type=int, default=5, help="cold compiles and 1-row walks per case")
    ap.add_argument("--batch", type=int, default=16, help="rows in the batched fill")
    ap.add_argument("--threads", type=int, default=2, help="threads of the engines' batched fills and compilers")
    ap.add_argument("--no-gil", action="store_true", help="skip the GIL check")
    ap.add_argument("--no-coverage", action="store_true", help="skip the JSON-schema keyword check")
    a = ap.parse_args()
    tok = Tokenizer.from_gguf(pull(progress=False))
    vocab = tok.vocab_size
    tokenize: Callable[[str], list[int]] = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731

    engines: list[Engine] = []
    print(f"vocabulary: {vocab} tokens, EOS {tok.eos_token_id}; {a.threads} threads for batched fills/compiles\n")
    print("| engine | version | vocabulary view s |\n|---|---|---|")
    for cls in ENGINES:
        if cls.name not in a.engines.split(","):
            continue
        try:
            version = importlib.metadata.version(cls.package)
            engine = cls(tok, vocab, a.threads)
            us, _ = timed(engine.setup)
        except (ImportError, importlib.metadata.PackageNotFoundError) as e:
            print(f"| {cls.name} | not installed, skipped ({type(e).__name__}: {e}) | - |")
            continue
        engines.append(engine)
        print(f"| {engine.name} | {version} | {us / 1e6:.3f} |")

    accepted: dict[tuple[str, str], str] = {}
    print("\nSanity: every engine accepts each output (the bit of each token set, then EOS's); masks compared "
          "step by step with the first engine's.\n")
    print("| case | tokens | " + " | ".join(e.name for e in engines) + " |\n|---|---|" + "---|" * len(engines))
    for case in CASES:
        tokens, cells, ref = tokenize(case.output), [], None
        for e in engines:
            if not e.supports(case):
                cells.append("not supported")
                continue
            ok, masks = walk(e, e.compile(case), tokens, keep_masks=True)
            accepted[(e.name, case.name)] = "yes" if ok else "NO"
            if ref is None:
                ref = masks
                cells.append("accepts" if ok else "REJECTS")
            else:
                same = sum(bool((x == y).all()) for x, y in zip(masks, ref))
                most = max(int((x != y).sum()) for x, y in zip(masks, ref))
                cells.append(f"{'accepts' if ok else 'REJECTS'}; same mask at {same}/{len(ref)} steps, "
                             f"at most {most} tokens differ")
        print(f"| {case.name} | {len(tokens)} | " + " | ".join(cells) + " |")

    print(f"\nTimings: median of {a.repeats} cold compiles; per step, median / p99 over {a.repeats} walks "
          f"(fresh matchers); batch: {a.batch} matchers walking in lockstep, one "
          "batched fill a step (sequential fills where the engine has no batched API).\n")
    print(f"| case | engine | compile ms (cold) | compile ms (cached) | matcher ms | first mask us | "
          f"1 row: fill us median / p99 | consume us median | {a.batch} rows: fill us per step median / p99 "
          f"| {a.batch} rows: us per row |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for case in CASES:
        tokens = tokenize(case.output)
        for e in engines:
            if not e.supports(case) or accepted.get((e.name, case.name)) != "yes":
                reason = "not supported" if not e.supports(case) else "rejected the output"
                print(f"| {case.name} | {e.name} | {reason} |" + " - |" * 7)
                continue
            tm = measure(e, case, tokens, a.repeats, a.batch)
            again = f"{statistics.median(tm.again_ms):.2f}" if tm.again_ms else "no cache"
            batch = "" if e.batched else " (sequential)"
            print(f"| {case.name} | {e.name} | {statistics.median(tm.compile_ms):.2f} | {again} | "
                  f"{statistics.median(tm.matcher_ms):.3f} | {statistics.median(tm.first_us):.0f} | "
                  f"{pct(tm.fill_us, 50):.1f} / {pct(tm.fill_us, 99):.1f} | {pct(tm.consume_us, 50):.1f} | "
                  f"{pct(tm.batch_us, 50):.0f} / {pct(tm.batch_us, 99):.0f}{batch} | "
                  f"{pct(tm.batch_us, 50) / a.batch:.1f} |")

    if not a.no_gil:
        print(f"\nGIL: the main thread's median lateness waking from 1 ms sleeps while a worker thread fills 1-row "
              f"masks non-stop (half-way through each case), in ms. ~0.1: the fill releases the GIL; ~"
              f"{1e3 * sys.getswitchinterval():.0f} (the switch interval): it holds it.\n")
        cases = [c for c in CASES[:2]]
        print("| worker | " + " | ".join(c.name for c in cases) + " |\n|---|" + "---|" * len(cases))
        data = b"x" * 65536
        for label, work in (("none (idle)", None), ("reference: hashlib.sha256 of 64 KiB (releases)",
                                                    lambda: hashlib.sha256(data).digest()),
                            ("reference: a Python loop (holds)", lambda: sum(range(1000)))):
            print(f"| {label} | " + " | ".join(f"{wake_delay_ms(work):.2f}" for _ in cases) + " |")
        for e in engines:
            print(f"| {e.name} | " + " | ".join(
                f"{wake_delay_ms(fill_midway(e, e.compile(c), tokenize(c.output))):.2f}" for c in cases) + " |")

    if not a.no_coverage:
        print("\nJSON-schema keywords: enforced (a valid instance's tokens pass the masks, an invalid one's do not), "
              "ignored (the invalid one passes too), rejects valid, refused (ember answers the request with an "
              "error: llguidance reports the keyword unimplemented) or the engine's compile error.\n")
        results = {e.name: coverage(e, tokenize) for e in engines}
        print("| keyword | " + " | ".join(e.name for e in engines) + " |\n|---|" + "---|" * len(engines))
        for keyword, *_ in COVERAGE:
            print(f"| {keyword} | " + " | ".join(results[e.name][keyword] for e in engines) + " |")


if __name__ == "__main__":
    main()
