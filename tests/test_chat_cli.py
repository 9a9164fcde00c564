"""`ember chat` driven through a pseudo-terminal: two turns, /reset, /exit, the note on a reply cut by
--max-tokens, and line editing with a history kept under $EMBER_HOME."""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pexpect

from ember import LLM, SamplingParams
from ember.loading.registry import ember_home

CUT = "[cut at --max-tokens 8]"


def _reply(child: pexpect.spawn, line: str) -> str:
    child.sendline(line)
    child.expect_exact(">>> ", timeout=120)
    out = re.sub(r"\x1b\[[0-9;]*m", "", child.before.replace("\r\n", "\n"))  # the note's dim colour
    return out.split("\n", 1)[1].rstrip("\n") if "\n" in out else ""  # drop the echoed input line


def _spawn(model: Path, home: Path) -> pexpect.spawn:
    home.mkdir(exist_ok=True)
    kernels = ember_home() / "kernels"
    if kernels.is_dir() and not (home / "kernels").exists():
        (home / "kernels").symlink_to(kernels)  # the built kernels, not a rebuild
    child = pexpect.spawn(sys.executable, ["-m", "ember.cli", "chat", str(model), "--kv-cache-memory", "0.01",
                                           "--max-model-len", "512", "--max-tokens", "8", "--temperature", "0"],
                          encoding="utf-8", timeout=120, env={**os.environ, "EMBER_HOME": str(home)})
    child.expect_exact("/reset clears the history")
    child.expect_exact(">>> ")
    return child


def _with_note(text: str, out) -> str:  # noqa: ANN001 (a RequestOutput)
    text = text.replace("\r\n", "\n")
    return f"{text}\n{CUT}" if out.outputs[0].finish_reason == "length" else text


def test_chat_two_turns_reset_exit_and_history(tiny_llama3: Path, tmp_path: Path) -> None:
    child = _spawn(tiny_llama3, tmp_path / "home")
    first = _reply(child, "Hello there")
    second = _reply(child, "Tell me more")

    llm = LLM(tiny_llama3, kv_cache_memory=0.01, max_model_len=512)
    params = SamplingParams(max_tokens=8, temperature=0)
    history = [{"role": "user", "content": "Hello there"}]
    out = llm.chat(history, params)[0]
    expected_first = out.outputs[0].text
    assert first and first == _with_note(expected_first, out)
    history += [{"role": "assistant", "content": expected_first}, {"role": "user", "content": "Tell me more"}]
    out = llm.chat(history, params)[0]
    assert second == _with_note(out.outputs[0].text, out)  # the second turn saw the first
    assert CUT in first + second  # a tiny random model runs to --max-tokens

    assert "(history cleared)" in _reply(child, "/reset")
    again = _reply(child, "Tell me more")  # after /reset: a fresh conversation
    out = llm.chat([{"role": "user", "content": "Tell me more"}], params)[0]
    fresh = _with_note(out.outputs[0].text, out)
    assert again == fresh
    child.sendline("/exit")
    child.expect(pexpect.EOF, timeout=60)
    child.close()
    assert child.exitstatus == 0
    saved = (tmp_path / "home" / "chat_history").read_text().splitlines()
    assert saved[-3:] == ["/reset", "Tell me more", "/exit"]

    child = _spawn(tiny_llama3, tmp_path / "home")  # a new session: up-arrow twice recalls "Tell me more"
    child.send("\x1b[A\x1b[A")
    assert _reply(child, "") == fresh
    child.sendline("/exit")
    child.expect(pexpect.EOF, timeout=60)


def test_chat_with_memory_keeps_the_session_across_restarts(tiny_llama3: Path, tmp_path: Path) -> None:
    """--memory NAME: turns are stored as they happen; a restarted chat finds them; /forget deletes them."""
    home = tmp_path / "home"

    def spawn() -> pexpect.spawn:
        home.mkdir(exist_ok=True)
        kernels = ember_home() / "kernels"
        if kernels.is_dir() and not (home / "kernels").exists():
            (home / "kernels").symlink_to(kernels)
        return pexpect.spawn(sys.executable, ["-m", "ember.cli", "chat", str(tiny_llama3), "--memory", "trip",
                                              "--kv-cache-memory", "0.01", "--max-model-len", "512",
                                              "--max-tokens", "8", "--temperature", "0"],
                             encoding="utf-8", timeout=120, env={**os.environ, "EMBER_HOME": str(home)})

    child = spawn()
    child.expect_exact("memory session 'trip' (0 turns stored in")
    child.expect_exact(">>> ")
    assert _reply(child, "My sister lives in Lisbon")
    assert _reply(child, "What should I pack?")
    child.sendline("/exit")
    child.expect(pexpect.EOF, timeout=60)

    from ember.apps.memory_store import MemoryStore

    with MemoryStore(home / "memory.sqlite3") as store:
        assert [t.user for t in store.turns("trip")] == ["My sister lives in Lisbon", "What should I pack?"]
    child = spawn()
    child.expect_exact("memory session 'trip' (2 turns stored in")
    child.expect_exact(">>> ")
    assert "(session 'trip' forgotten)" in _reply(child, "/forget")
    child.sendline("/exit")
    child.expect(pexpect.EOF, timeout=60)
    child.close()
    assert child.exitstatus == 0
    with MemoryStore(home / "memory.sqlite3") as store:
        assert store.turns("trip") == []
