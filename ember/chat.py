"""`ember chat`: an interactive multi-turn chat in the terminal, replies streamed, history kept in context (or,
with --memory NAME, in a stored session that SCM's controller recalls from, surviving restarts)."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, TextIO

from ember.engine.sampling_params import SamplingParams
from ember.errors import EmberError

BANNER = "ember chat: {name} ({ctx} tokens of context). /reset clears the history, /exit quits."


def fit_history(tok: Any, history: list[dict[str, str]], budget: int) -> list[int] | None:
    """Chat-template the history, dropping the oldest turns (never the system prompt) to fit `budget`."""
    system = [m for m in history[:1] if m["role"] == "system"]
    turns = history[len(system):]
    while turns:
        ids = tok.apply_chat_template(system + turns, tokenize=True)
        if len(ids) <= budget:
            history[:] = system + turns
            return ids
        turns = turns[2:] if len(turns) > 2 else []
    return None


def cut_note(out: Any, max_tokens: int | None, context: int, stream: TextIO) -> str | None:
    """A dim note for a completion cut short by length (None otherwise): by max_tokens or by the context."""
    if out.finish_reason != "length":
        return None
    why = (f"--max-tokens {max_tokens}" if max_tokens is not None and len(out.token_ids) >= max_tokens
           else f"the {context}-token context")
    return f"\x1b[2m[cut at {why}]\x1b[0m" if stream.isatty() else f"[cut at {why}]"


def line_editing() -> Path | None:
    """Line editing and history for input() where the stdlib's readline exists; the history file, if any."""
    try:
        import readline
    except ImportError:
        return None
    from ember.loading.registry import ember_home

    readline.parse_and_bind("set enable-bracketed-paste off")  # no escape codes around each line
    path = ember_home() / "chat_history"
    readline.set_history_length(1000)
    try:
        readline.read_history_file(path)
    except OSError:
        pass
    return path


def _save_history(path: Path | None) -> None:
    if path is None:
        return
    import readline

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        readline.write_history_file(path)
    except OSError:
        pass


def run_chat(model: str | None, engine_kwargs: dict[str, Any], params: SamplingParams,
             system: str | None, memory: str | None = None, memory_db: str | None = None,
             memory_embedder: str | None = None) -> int:
    from ember.apps.embedder import resolve_embedder
    from ember.llm import LLM

    embedder = resolve_embedder(memory_embedder) if memory is not None else None
    llm = LLM(model, **engine_kwargs)
    history_file = line_editing()
    try:
        if memory is not None:
            return _memory_loop(llm, params, system, memory, memory_db, embedder)
        return _loop(llm, params, system)
    finally:
        _save_history(history_file)


def _read_line() -> str | None:
    """The next non-empty input line, or None at end of input or Ctrl-C."""
    while True:
        try:
            line = input(">>> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return None
        if line:
            return line


def _memory_loop(llm: Any, params: SamplingParams, system: str | None, session: str, path: str | None,
                 embedder: Any = None) -> int:
    from ember.apps.memory import Memory, with_system
    from ember.apps.memory_store import check_session_id
    from ember.apps.plan import drive

    check_session_id(session)
    ctx = llm.engine.max_model_len
    params = dataclasses.replace(params, max_tokens=min(params.max_tokens or ctx // 4, ctx // 4))
    memory = Memory(llm, path, embedder=embedder)
    ctl = memory.controller
    print(BANNER.format(name=llm.engine.loaded.path.name, ctx=ctx).replace(
        "/reset clears the history", f"memory session {session!r} ({memory.store.next_index(session)} turns "
        f"stored in {memory.store.path}); /forget deletes it"), flush=True)
    try:
        while (line := _read_line()) is not None:
            if line in ("/exit", "/quit", "/bye"):
                break
            if line in ("/forget", "/reset"):
                memory.delete(session)
                print(f"(session {session!r} forgotten)", flush=True)
                continue
            try:
                recall = drive(ctl.recall(session, line, params.max_tokens or 0), llm._run_jobs)
            except EmberError as e:
                print(f"error: {e}", flush=True)
                continue
            ids = llm.get_tokenizer().apply_chat_template(with_system(recall.messages, system), tokenize=True)
            reply = _stream_reply(llm, ids, params, ctx)
            if not reply.startswith(("error: ", "(interrupted)")):
                drive(ctl.remember(session, line, reply), llm._run_jobs)
    finally:
        memory.close()
    return 0


def _loop(llm: Any, params: SamplingParams, system: str | None) -> int:
    tok = llm.get_tokenizer()
    ctx = llm.engine.max_model_len
    params = dataclasses.replace(params, max_tokens=min(params.max_tokens or ctx // 2, ctx // 2))
    base = [{"role": "system", "content": system}] if system else []
    history = list(base)
    print(BANNER.format(name=llm.engine.loaded.path.name, ctx=ctx), flush=True)
    while (line := _read_line()) is not None:
        if line in ("/exit", "/quit", "/bye"):
            return 0
        if line == "/reset":
            history = list(base)
            print("(history cleared)", flush=True)
            continue
        history.append({"role": "user", "content": line})
        ids = fit_history(tok, history, ctx - params.max_tokens)
        if ids is None:
            history.pop()
            print(f"error: that message does not fit in the {ctx}-token context; send something shorter",
                  flush=True)
            continue
        reply = _stream_reply(llm, ids, params, ctx)
        history.append({"role": "assistant", "content": reply})
    return 0


class TerminalStream:
    """An `on_output` callback that writes each new piece of the first completion to stdout."""

    def __init__(self) -> None:
        self.shown = 0

    def __call__(self, out: Any) -> None:
        text = out.outputs[0].text
        sys.stdout.write(text[self.shown:])
        sys.stdout.flush()
        self.shown = len(text)


def _stream_reply(llm: Any, ids: list[int], params: SamplingParams, ctx: int) -> str:
    show = TerminalStream()
    note = None
    try:
        out = llm.generate({"prompt_token_ids": ids}, params, on_output=show)[0]
        text = out.outputs[0].text
        note = cut_note(out.outputs[0], params.max_tokens, ctx, sys.stdout)
    except KeyboardInterrupt:
        text = "(interrupted)"
    except EmberError as e:
        text = f"error: {e}"
    sys.stdout.write(text[show.shown:] + "\n" + (note + "\n" if note else ""))
    sys.stdout.flush()
    return text
