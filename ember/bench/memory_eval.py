"""Long-term memory evaluation (`ember eval memory`): facts planted early in synthetic long dialogues, asked later."""
from __future__ import annotations

import argparse
import json
import random
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from ember.bench.common import parse_names
from ember.errors import InvalidParameterError

if TYPE_CHECKING:  # the engine (torch) loads only when the evaluation runs, not when `ember` parses its flags
    from ember.apps.memory import MemoryOptions
    from ember.engine.sampling_params import SamplingParams

CONDITIONS = ("scm", "truncation", "streaming")
SINK_TOKENS = 4  # streaming attention keeps the first tokens (attention sinks) and the last `window`
PLANT_WITHIN = 10  # facts are planted in the dialogue's first turns
SESSION = "eval"
LONG_FLAGS = ("long_context", "attention_window", "attention_sinks")  # engine flags of the streaming condition
SENTENCE_END = re.compile(r"(?<!\bMr\.)(?<!\bMrs\.)(?<!\bMs\.)(?<!\bDr\.)(?<!\bSt\.)(?<=[.!?\"'])\s+")


@dataclass(frozen=True)
class Template:
    """A kind of fact: how a value is drawn, stated by the user and, later, asked about in other words."""

    kind: str
    values: Callable[[random.Random], str]
    statements: tuple[str, ...]
    questions: tuple[str, ...]


def _pick(options: Sequence[str]) -> Callable[[random.Random], str]:
    return lambda rng: rng.choice(list(options))


def _digits(n: int) -> Callable[[random.Random], str]:
    return lambda rng: str(rng.randrange(10 ** (n - 1), 10 ** n))


TEMPLATES = (
    Template("locker code", _digits(4),
             ("Before I forget: the code for my locker at the gym is {v}.",
              "I changed the combination of my gym locker today, it is {v} now."),
             ("I'm standing in the changing room and can't get my things out. Which number opens it again?",
              "What was the combination I use at the fitness centre to get into my storage box?")),
    Template("neighbour's name", _pick(("Priya", "Zainab", "Oksana", "Ingrid", "Amara", "Yuki", "Leilani", "Freya",
                                        "Ximena", "Anouk", "Svetlana", "Imani", "Beatriz", "Noor")),
             ("A new neighbour moved in next door yesterday; her name is {v}.",
              "I finally met the woman who lives in the house beside mine. She introduced herself as {v}."),
             ("Remind me, what is the lady who lives next to me called?",
              "Who is the woman that recently became my next-door neighbour? I forgot her name.")),
    Template("sister's city", _pick(("Reykjavik", "Nairobi", "Montevideo", "Osaka", "Vancouver", "Krakow",
                                     "Marrakesh", "Auckland", "Helsinki", "Hanoi", "Adelaide", "Porto", "Seoul")),
             ("My sister just accepted a job offer and is moving to {v} next month.",
              "Big news in my family: my sister is relocating to {v} for work."),
             ("Which city will my sibling be living in once she starts her new position?",
              "Where did I tell you my sister is going for her new job?")),
    Template("bicycle colour", _pick(("turquoise", "magenta", "lavender", "teal", "maroon", "mustard", "tangerine",
                                      "burgundy", "lime", "charcoal", "coral", "indigo")),
             ("I spent the weekend repainting my old bicycle; it is {v} now.",
              "I bought a second-hand bike today, a {v} one."),
             ("What colour is the bike I ride?", "Remind me what shade my cycle is?")),
    Template("dog's name", _pick(("Biscuit", "Pepper", "Ziggy", "Mochi", "Waffles", "Pixel", "Noodle", "Bandit",
                                  "Pretzel", "Tofu", "Nacho", "Gizmo")),
             ("We adopted a puppy from the shelter and named him {v}.",
              "Our family has a new dog; the kids decided to call him {v}."),
             ("What did we end up calling the pet we brought home?",
              "What is the name of our young hound from the rescue centre?")),
    Template("hotel room", _digits(3),
             ("For the conference trip the hotel gave me room {v}.",
              "I checked in this afternoon and my hotel room number is {v}."),
             ("Which room am I staying in during my business trip?",
              "What number was on the door of the place I'm sleeping at while travelling?")),
)
ACKS = ("Thanks for telling me, I will keep that in mind.", "Noted.", "Got it.", "Good to know!")
SHARE = ("Here is a passage from the book I am reading:\n\n{p}\n\nWhat do you make of it?",
         "What do you think of this part?\n\n{p}", "Let me share another paragraph with you:\n\n{p}",
         "{p}\n\nCan you tell me what happens next?")
REPLY = ("{p}", "Here is how it goes on: {p}", "The story continues: {p}")
ASIDE = "{s} Anyway, back to the book:\n\n{p}\n\nWhat do you think?"


@dataclass(frozen=True)
class Fact:
    """A planted fact: its value, the turn that states it and the question that asks for it."""

    kind: str
    value: str
    turn: int
    question: str


@dataclass
class Dialogue:
    """A constructed conversation: `turns` (user, assistant) come before the question about facts[0]."""

    turns: list[tuple[str, str]]
    facts: list[Fact]

    @property
    def asked(self) -> Fact:
        return self.facts[0]

    @property
    def gap(self) -> int:
        """Turns from the planting turn to the question (1: the planting turn is the one just before)."""
        return len(self.turns) - self.asked.turn

    def messages(self) -> list[dict[str, str]]:
        """The history and the question as chat messages."""
        history = [m for u, a in self.turns for m in ({"role": "user", "content": u},
                                                      {"role": "assistant", "content": a})]
        return history + [{"role": "user", "content": self.asked.question}]


def passages(text: str, max_chars: int = 500) -> list[str]:
    """The text's paragraphs (blank-line separated, else lines) cut into runs of whole sentences of at most
    max_chars (a longer sentence is cut at a word); paragraphs of fewer than 6 words (headings) are skipped."""
    blocks = re.split(r"\n\s*\n", text.strip())
    if len(blocks) < 2:
        blocks = text.strip().splitlines()
    out: list[str] = []
    for block in blocks:
        words = block.split()
        if len(words) < 6:
            continue
        chunk = ""
        for sentence in SENTENCE_END.split(" ".join(words)):
            while len(sentence) > max_chars:  # a sentence longer than a passage: its own passages
                cut = sentence.rfind(" ", 0, max_chars) if " " in sentence[:max_chars] else max_chars
                out += [chunk] if chunk else []
                out.append(sentence[:cut])
                chunk, sentence = "", sentence[cut:].strip()
            if chunk and len(chunk) + 1 + len(sentence) > max_chars:
                out.append(chunk)
                chunk = ""
            chunk = f"{chunk} {sentence}".strip()
        if chunk:
            out.append(chunk)
    return out


def fresh_value(template: Template, text: str, rng: random.Random) -> str:
    """A value of the template that the source text does not contain as a word."""
    for _ in range(100):
        value = template.values(rng)
        if not mentions(text, value):
            return value
    raise InvalidParameterError(f"every {template.kind} value tried occurs in the text", "text")


def make_dialogue(text: str, chunks: Sequence[str], rng: random.Random, min_gap: int = 50, max_gap: int = 200,
                  facts: int = 2) -> Dialogue:
    """One dialogue: `facts` facts of different kinds planted at distinct turns among the first PLANT_WITHIN,
    the first of them asked about `gap` turns after its planting turn (gap uniform in [min_gap, max_gap]); every
    other turn shares a passage of the text and gets the passage after it as the reply."""
    if not 1 <= facts <= len(TEMPLATES):
        raise InvalidParameterError(f"facts must be 1..{len(TEMPLATES)}, got {facts}", "facts")
    if not 1 <= min_gap <= max_gap:
        raise InvalidParameterError(f"gaps must satisfy 1 <= min_gap <= max_gap, got {min_gap}..{max_gap}", "gap")
    if len(chunks) < 2:
        raise InvalidParameterError("the text needs at least two paragraphs of six words or more", "text")
    gap = rng.randint(min_gap, max_gap)
    slots = rng.sample(range(PLANT_WITHIN), facts)  # slots[0]: the asked fact's turn
    n_turns = slots[0] + gap
    planted = [(slot, tpl) for slot, tpl in zip(slots, rng.sample(TEMPLATES, facts)) if slot < n_turns]
    start = rng.randrange(len(chunks))
    turns: list[tuple[str, str]] = []
    by_turn = {slot: tpl for slot, tpl in planted}
    found: dict[int, Fact] = {}
    for i in range(n_turns):
        p, q = chunks[(start + 2 * i) % len(chunks)], chunks[(start + 2 * i + 1) % len(chunks)]
        if i in by_turn:
            tpl = by_turn[i]
            value = fresh_value(tpl, text, rng)
            statement = rng.choice(tpl.statements).format(v=value)
            found[i] = Fact(tpl.kind, value, i, rng.choice(tpl.questions))
            turns.append((ASIDE.format(s=statement, p=p), rng.choice(REPLY).format(p=q)) if rng.random() < 0.5
                         else (statement, rng.choice(ACKS)))
        else:
            turns.append((rng.choice(SHARE).format(p=p), rng.choice(REPLY).format(p=q)))
    return Dialogue(turns, [found[slot] for slot, _ in planted])


def generate_dialogues(text: str, n: int, seed: int = 0, min_gap: int = 50, max_gap: int = 200, facts: int = 2,
                       passage_chars: int = 500) -> list[Dialogue]:
    """n dialogues from the text; dialogue i depends only on (text, seed, i) and the other arguments."""
    if n < 1:
        raise InvalidParameterError(f"dialogues must be >= 1, got {n}", "dialogues")
    chunks = passages(text, passage_chars)
    return [make_dialogue(text, chunks, random.Random(f"ember-memory:{seed}:{i}"), min_gap, max_gap, facts)
            for i in range(n)]


# -- conditions ---------------------------------------------------------------------------------------------------


@dataclass
class Trial:
    """One dialogue under one condition."""

    recalled: bool  # the planted turn is in what the model attends to when it answers
    correct: bool  # the planted value is in the reply
    prompt_tokens: int
    within_budget: bool
    seconds: float  # answering: recall (SCM), prompt assembly and the reply
    reply: str
    extra: dict[str, Any] = field(default_factory=dict)


def greedy(tokens: int) -> SamplingParams:
    from ember.engine.sampling_params import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=tokens)


def mentions(text: str, value: str) -> bool:
    """The value as a word of the text, case-insensitive ("lime" is not in "sublime")."""
    return re.search(rf"(?<!\w){re.escape(value)}(?!\w)", text, re.IGNORECASE) is not None


def run_scm(llm: Any, dialogue: Dialogue, options: MemoryOptions, reply_tokens: int, db: Path,
            embedder: Any = None) -> Trial:
    """History stored through MemoryController.remember, then recall() for the question and a greedy reply
    (embedder: the memory's dedicated sentence embedder; None: the served model embeds)."""
    from ember.apps.memory import MemoryController
    from ember.apps.memory_store import MemoryStore
    from ember.apps.plan import drive

    tok = llm.get_tokenizer()
    with MemoryStore(db) as store:
        ctl = MemoryController(store, tok, llm.engine.max_model_len, options, embedder)
        start = time.perf_counter()
        for user, assistant in dialogue.turns:
            drive(ctl.remember(SESSION, user, assistant), llm._run_jobs)
        stored = time.perf_counter() - start
        start = time.perf_counter()
        recall = drive(ctl.recall(SESSION, dialogue.asked.question, reply_tokens), llm._run_jobs)
        ids = tok.apply_chat_template(recall.messages, tokenize=True)
        reply = llm.generate({"prompt_token_ids": ids}, greedy(reply_tokens))[0].outputs[0].text
    return Trial(dialogue.asked.turn in recall.turns_used, mentions(reply, dialogue.asked.value), len(ids),
                 recall.memory_tokens <= options.budget and len(ids) + reply_tokens <= llm.engine.max_model_len,
                 time.perf_counter() - start, reply,
                 {"turns_used": recall.turns_used, "memory_tokens": recall.memory_tokens, "store_seconds": stored})


def truncate(tok: Any, dialogue: Dialogue, budget: int) -> tuple[list[int] | None, int]:
    """`ember chat`'s history cut (fit_history: oldest turns dropped until the chat fits `budget`) and the
    number of history turns kept. The oldest turns are dropped first without templating while the text of the
    turns after them alone overflows the budget (fit_history would drop them too), so a long history costs a few
    templatings, not one per turn."""
    from ember.chat import fit_history

    history = dialogue.messages()
    content = [len(tok.encode(m["content"], add_special_tokens=False)) for m in history]
    first = 0
    while first < len(history) - 1 and sum(content[first + 2:]) > budget:  # even without this turn: too long
        first += 2
    kept = history[first:]
    ids = fit_history(tok, kept, budget)
    return ids, (len(kept) - 1) // 2


def run_truncation(llm: Any, dialogue: Dialogue, reply_tokens: int, context: int) -> Trial:
    """The whole history as chat messages, cut as `ember chat` cuts it to `context` minus the reply."""
    start = time.perf_counter()
    ids, kept = truncate(llm.get_tokenizer(), dialogue, context - reply_tokens)
    if ids is None:
        raise InvalidParameterError(f"the question alone does not fit in {context} tokens", "context")
    reply = llm.generate({"prompt_token_ids": ids}, greedy(reply_tokens))[0].outputs[0].text
    return Trial(dialogue.asked.turn >= len(dialogue.turns) - kept, mentions(reply, dialogue.asked.value),
                 len(ids), len(ids) + reply_tokens <= context, time.perf_counter() - start, reply,
                 {"turns_kept": kept})


def planted_span(tok: Any, dialogue: Dialogue) -> tuple[int, int]:
    """The token span [start, end) of the asked fact's planting turn in the whole chat's prompt."""
    turn = dialogue.asked.turn
    text = str(tok.apply_chat_template(dialogue.messages()[: 2 * turn + 2], add_generation_prompt=False))
    user, assistant = dialogue.turns[turn]
    at = text.rindex(user, 0, text.rindex(assistant))
    return len(tok.encode(text[:at], add_special_tokens=False)), len(tok.encode(text, add_special_tokens=False))


def run_streaming(llm: Any, dialogue: Dialogue, reply_tokens: int, window: int, sinks: int = SINK_TOKENS) -> Trial:
    """The whole history as one prompt under streaming attention (the first `sinks` and the last `window` tokens
    kept): recalled when the planting turn overlaps them."""
    tok = llm.get_tokenizer()
    ids = tok.apply_chat_template(dialogue.messages(), tokenize=True)
    first, end = planted_span(tok, dialogue)
    start = time.perf_counter()
    reply = llm.generate({"prompt_token_ids": ids}, greedy(reply_tokens))[0].outputs[0].text
    recalled = first < sinks or end > len(ids) - window
    return Trial(recalled, mentions(reply, dialogue.asked.value), len(ids), True, time.perf_counter() - start,
                 reply, {"attended_tokens": min(len(ids), window + sinks)})


# -- the evaluation -----------------------------------------------------------------------------------------------


def parse_conditions(text: str) -> list[str]:
    """--conditions: comma-separated names from CONDITIONS, each once, in the order given."""
    return parse_names(text, CONDITIONS, "condition", "conditions")


def _row(name: str, trials: list[Trial], k: int | None = None, note: str | None = None) -> dict[str, Any]:
    if not trials:
        return {"condition": name, "available": False, "note": note}
    n = len(trials)
    tokens = [t.prompt_tokens for t in trials]
    return {"condition": name, "available": True, "note": note, "k": k, "dialogues": n,
            "recall": sum(t.recalled for t in trials) / n, "accuracy": sum(t.correct for t in trials) / n,
            "prompt_tokens_mean": sum(tokens) / n, "prompt_tokens_max": max(tokens),
            "within_budget": all(t.within_budget for t in trials), "seconds_per_dialogue":
                sum(t.seconds for t in trials) / n,
            "store_seconds_per_dialogue": sum(t.extra.get("store_seconds", 0.0) for t in trials) / n}


def _streaming_llm(factory: Callable[[int], Any] | None, dialogues: Sequence[Dialogue], tok: Any,
                   reply_tokens: int) -> tuple[Any, str | None]:
    """The streaming-attention LLM for the longest dialogue, or None and why it is not available."""
    if factory is None:
        return None, "not available: no streaming model given"
    longest = max(len(tok.apply_chat_template(d.messages(), tokenize=True)) for d in dialogues)
    try:
        return factory(longest + reply_tokens), None
    except (TypeError, ValueError) as e:
        return None, f"not available: {e}"


def evaluate(llm: Any, dialogues: Sequence[Dialogue], conditions: Sequence[str], options: MemoryOptions | None = None,
             reply_tokens: int = 32, context: int | None = None, window: int | None = None,
             streaming_factory: Callable[[int], Any] | None = None, progress: bool = False,
             embedder: Any = None) -> dict[str, Any]:
    """Every condition on every dialogue. llm: an ember LLM (SCM and truncation); context: a second, smaller
    truncation row ("truncation@C") besides the one at the model's context; streaming_factory(max_len): an LLM
    with streaming attention (TypeError/ValueError: the condition is reported as not available); window: its
    attention window, for the recall of an engine that does not say (one that does is believed); embedder:
    SCM's dedicated sentence embedder (None: the served model embeds)."""
    from tqdm import tqdm

    from ember.apps.memory import MemoryOptions

    options = options or MemoryOptions()
    ctx = llm.engine.max_model_len
    rows: list[dict[str, Any]] = []
    details: list[dict[str, Any]] = [{"gap": d.gap, "turns": len(d.turns), "planted_turn": d.asked.turn,
                                      "kind": d.asked.kind, "value": d.asked.value, "question": d.asked.question,
                                      "facts": len(d.facts)} for d in dialogues]

    def run(name: str, fn: Callable[[int, Dialogue], Trial], k: int | None = None) -> None:
        trials = []
        for i, d in enumerate(tqdm(dialogues, desc=name, unit="dialogue", disable=not progress, leave=False)):
            trial = fn(i, d)
            trials.append(trial)
            details[i][name] = {"recalled": trial.recalled, "correct": trial.correct,
                                "prompt_tokens": trial.prompt_tokens, "seconds": round(trial.seconds, 3),
                                "reply": trial.reply[:300], **trial.extra}
        rows.append(_row(name, trials, k))

    for name in conditions:
        if name == "scm":
            with tempfile.TemporaryDirectory(prefix="ember-memory-eval-") as tmp:
                run("scm", lambda i, d: run_scm(llm, d, options, reply_tokens, Path(tmp) / f"{i}.sqlite3",
                                                embedder), options.top_k)
        elif name == "truncation":
            run("truncation", lambda i, d: run_truncation(llm, d, reply_tokens, ctx))
            if context is not None and context < ctx:
                run(f"truncation@{context}", lambda i, d: run_truncation(llm, d, reply_tokens, context))
        else:
            slm, note = _streaming_llm(streaming_factory, dialogues, llm.get_tokenizer(), reply_tokens)
            if slm is None:
                rows.append(_row("streaming", [], note=note))
            else:
                long = getattr(slm.engine, "long", None)
                window = getattr(long, "window", window) or ctx - SINK_TOKENS
                sinks = getattr(long, "sinks", SINK_TOKENS)
                run("streaming", lambda i, d: run_streaming(slm, d, reply_tokens, window, sinks))
    history = [len(llm.get_tokenizer().apply_chat_template(d.messages(), tokenize=True)) for d in dialogues]
    return {"dialogues": len(dialogues), "context": ctx, "reply_tokens": reply_tokens, "top_k": options.top_k,
            "memory_embedder": embedder.name if embedder is not None else "model",
            "budget": options.budget, "window": window, "history_tokens_mean": sum(history) / len(history),
            "history_tokens_max": max(history), "rows": rows, "per_dialogue": details}


COLUMNS = (("condition", "condition", "{}"), ("recall", "recall", "{:.2f}"), ("accuracy", "accuracy", "{:.2f}"),
           ("prompt mean", "prompt_tokens_mean", "{:.0f}"), ("prompt max", "prompt_tokens_max", "{}"),
           ("in budget", "within_budget", "{}"), ("s/dialogue", "seconds_per_dialogue", "{:.1f}"),
           ("store s", "store_seconds_per_dialogue", "{:.1f}"))


def format_table(result: dict[str, Any]) -> str:
    """A header and a plain-text table, a row per condition."""
    gaps = [d["gap"] for d in result["per_dialogue"]]
    head = [f"{result['dialogues']} dialogues, question {min(gaps)}-{max(gaps)} turns after the planted fact; "
            f"whole history {result['history_tokens_mean']:.0f} tokens on average (max "
            f"{result['history_tokens_max']}); context {result['context']}, reply {result['reply_tokens']} tokens",
            f"recall: scm = planted turn among the recalled (top-{result['top_k']} + previous, memory budget "
            f"{result['budget']}); truncation = among the turns kept; streaming = within the sinks or the last "
            f"{result['window'] or 'W'} tokens. accuracy: the planted value in the greedy reply. s/dialogue: "
            "answering; store s: SCM storing the history (summaries, embeddings)"]
    cells = [[name for name, _, _ in COLUMNS]]
    cells += [[fmt.format(row[key]) for _, key, fmt in COLUMNS] for row in result["rows"] if row["available"]]
    widths = [max(len(r[c]) for r in cells) for c in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(r, widths)))
             for r in cells]
    missing = [f"{row['condition'].ljust(widths[0])}  {row['note']}" for row in result["rows"] if not row["available"]]
    return "\n".join([*head, "", lines[0], "-" * len(lines[0]), *lines[1:], *missing])


# -- command line -------------------------------------------------------------------------------------------------


def add_memory_parser(kinds: Any) -> argparse.ArgumentParser:
    """`ember eval memory TEXT [MODEL]` under the eval subcommand's parsers."""
    from ember.cli import _engine_flags, _memory_embedder_flag, _model_args, _positive_int

    p = kinds.add_parser("memory", help="long-term conversation memory (SCM) against truncation and streaming",
                         description="Build synthetic long dialogues from TEXT (a plain-text file: users share its "
                                     "passages, the assistant answers with the next ones), plant facts in early "
                                     "turns, ask about one --min-gap..--max-gap turns later, and report for each "
                                     "condition the recall of the planted turn, answer accuracy (the value in the "
                                     "greedy reply) and prompt tokens. scm: the history stored and recalled by "
                                     "SCM's memory controller; truncation: the oldest turns dropped to fit the "
                                     "context as `ember chat` does; streaming: the whole history with streaming "
                                     "attention (--long-context, default streaming: sinks + --attention-window; "
                                     "only the streaming condition's model gets these flags).")
    p.add_argument("text", metavar="TEXT", help="UTF-8 text file the dialogues are built from")
    _model_args(p)
    p.add_argument("--dialogues", type=_positive_int, default=5, metavar="N", help="dialogues (default 5)")
    p.add_argument("--min-gap", type=_positive_int, default=50, help="fewest turns between fact and question (50)")
    p.add_argument("--max-gap", type=_positive_int, default=200, help="most turns between fact and question (200)")
    p.add_argument("--facts", type=_positive_int, default=2, help="facts planted per dialogue, one asked (default 2)")
    p.add_argument("--passage-chars", type=_positive_int, default=500,
                   help="most characters of a passage; a turn holds two (default 500)")
    p.add_argument("--seed", type=int, default=0, help="seed of the dialogues (default 0)")
    p.add_argument("--conditions", default=",".join(CONDITIONS), metavar="C[,C]",
                   help="comma-separated: scm, truncation, streaming (default: all)")
    p.add_argument("--context", type=_positive_int, default=None, metavar="C",
                   help="also truncate to C tokens (a truncation@C row), for dialogues that fit the model's context")
    p.add_argument("--max-tokens", type=_positive_int, default=32, help="reply tokens (default 32)")
    p.add_argument("--top-k", type=int, default=None, help="SCM's retrieved turns (default: MemoryOptions', 4)")
    p.add_argument("--budget", type=int, default=None,
                   help="SCM's memory tokens at most (default: MemoryOptions', 2500)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the result as JSON to OUT (-: stdout)")
    _memory_embedder_flag(p)
    _engine_flags(p)
    p.set_defaults(func=cmd_eval_memory, parser=p)
    return p


def cmd_eval_memory(a: argparse.Namespace) -> int:
    from ember import LLM
    from ember.apps.embedder import resolve_embedder
    from ember.apps.memory import MemoryOptions
    from ember.bench.perplexity import read_text
    from ember.cli import _engine_kwargs

    conditions = parse_conditions(a.conditions)
    text = read_text(a.text)
    dialogues = generate_dialogues(text, a.dialogues, a.seed, a.min_gap, a.max_gap, a.facts, a.passage_chars)
    knobs = {"top_k": a.top_k, "budget": a.budget}
    options = MemoryOptions(**{k: v for k, v in knobs.items() if v is not None})  # checked before the model loads
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    embedder = resolve_embedder(a.memory_embedder)
    kwargs = _engine_kwargs(a, seqs=1)
    long = {k: kwargs.pop(k) for k in LONG_FLAGS if k in kwargs}  # the streaming condition's, not the main model's
    long.setdefault("long_context", "streaming")
    llm = LLM(a.model, **kwargs)

    def streaming(max_len: int) -> Any:
        return LLM(a.model, **{**kwargs, "max_model_len": max_len, **long})

    result = {"text": a.text, "model": str(llm.engine.loaded.path), "seed": a.seed, "min_gap": a.min_gap,
              "max_gap": a.max_gap, "facts": a.facts, "conditions": conditions,
              **evaluate(llm, dialogues, conditions, options, a.max_tokens, a.context, long.get("attention_window"),
                         streaming, progress=a.json != "-", embedder=embedder)}
    if a.json == "-":
        print(json.dumps(result, indent=1))
        return 0
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1) + "\n")
    print(f"model {result['model']}; text {a.text}; seed {a.seed}; memory embedder {result['memory_embedder']}")
    print(format_table(result))
    return 0

