"""`ember chat` driven through a pseudo-terminal: two turns, /reset, /exit."""
from __future__ import annotations

import sys
from pathlib import Path

import pexpect

from ember import LLM, SamplingParams


def _reply(child: pexpect.spawn, line: str) -> str:
    child.sendline(line)
    child.expect_exact(">>> ", timeout=120)
    out = child.before.replace("\r\n", "\n")
    return out.split("\n", 1)[1].rstrip("\n") if "\n" in out else ""  # drop the echoed input line


def test_chat_two_turns_reset_exit(tiny_llama3: Path) -> None:
    child = pexpect.spawn(sys.executable, ["-m", "ember.cli", "chat", str(tiny_llama3), "--kv-cache-memory", "0.01",
                                           "--max-model-len", "512", "--max-tokens", "8", "--temperature", "0"],
                          encoding="utf-8", timeout=120)
    child.expect_exact("/reset clears the history")
    child.expect_exact(">>> ")
    first = _reply(child, "Hello there")
    second = _reply(child, "Tell me more")

    llm = LLM(tiny_llama3, kv_cache_memory=0.01, max_model_len=512)
    params = SamplingParams(max_tokens=8, temperature=0)
    history = [{"role": "user", "content": "Hello there"}]
    expected_first = llm.chat(history, params)[0].outputs[0].text
    history += [{"role": "assistant", "content": expected_first}, {"role": "user", "content": "Tell me more"}]
    expected_second = llm.chat(history, params)[0].outputs[0].text
    assert first and first == expected_first.replace("\r\n", "\n")
    assert second == expected_second.replace("\r\n", "\n")  # the second turn saw the first

    assert "(history cleared)" in _reply(child, "/reset")
    again = _reply(child, "Tell me more")  # after /reset: a fresh conversation
    fresh = llm.chat([{"role": "user", "content": "Tell me more"}], params)[0].outputs[0].text
    assert again == fresh.replace("\r\n", "\n")
    child.sendline("/exit")
    child.expect(pexpect.EOF, timeout=60)
    child.close()
    assert child.exitstatus == 0
