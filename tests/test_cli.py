"""The `ember` command as a user runs it: generate streams text, pull is idempotent and offline, help reads."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ember import LLM, SamplingParams
from tests.conftest import TEXT


def _ember(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ember.cli", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def test_generate_streams_the_same_text_as_the_api(tiny_llama3: Path) -> None:
    prompt = TEXT[:80]
    proc = _ember("generate", prompt, "--model", str(tiny_llama3), "--raw", "--max-tokens", "12",
                  "--ignore-eos", "--kv-cache-memory", "0.01")
    assert proc.returncode == 0, proc.stderr
    expected = LLM(tiny_llama3, kv_cache_memory=0.01).generate(
        prompt, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0].outputs[0].text
    assert proc.stdout == expected + "\n"
    assert "12 generated" in proc.stderr and "KV cache:" in proc.stderr


def test_generate_with_a_quantized_kv_cache(tiny_llama3: Path) -> None:
    prompt = TEXT[:80]
    proc = _ember("generate", prompt, "--model", str(tiny_llama3), "--raw", "--max-tokens", "12",
                  "--ignore-eos", "--kv-cache-dtype", "int4")
    assert proc.returncode == 0, proc.stderr
    expected = LLM(tiny_llama3, kv_cache_dtype="int4").generate(
        prompt, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0].outputs[0].text
    assert proc.stdout == expected + "\n" and "int4" in proc.stderr


def test_bad_flags_give_a_message_not_a_traceback(tiny_llama3: Path) -> None:
    proc = _ember("generate", "hi", "--model", str(tiny_llama3), "--temperature", "-1")
    assert proc.returncode == 2
    assert "temperature must be >= 0" in proc.stderr and "Traceback" not in proc.stderr
    proc = _ember("generate", "hi", "--model", str(tiny_llama3), "--max-model-len", "100000")
    assert proc.returncode == 2 and "max_model_len" in proc.stderr and "Traceback" not in proc.stderr
    proc = _ember("generate", "hi", "--model", str(tiny_llama3), "--itl-target", "fast")
    assert proc.returncode == 2 and "--itl-target" in proc.stderr and "Traceback" not in proc.stderr


def testparse_itl_target_values() -> None:
    from ember.cli import parse_itl_target
    assert parse_itl_target("auto") == "auto" and parse_itl_target("off") is None and parse_itl_target("80") == 0.08
    assert parse_itl_target("1.25x") == "1.25x"
    for bad in ("-5", "0", "nan", "inf", "0.5x", "x", "fastx", "infx"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_itl_target(bad)


def test_pull_uses_the_cache(default_gguf: Path) -> None:
    # Already pulled by the fixture: a second pull must not need the network (proxy to nowhere).
    home = default_gguf.parents[2]
    proc = _ember("pull", env={"EMBER_HOME": str(home), "PIP_INDEX_URL": "http://127.0.0.1:9/none"})
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()) == default_gguf


def test_help_lists_commands_and_flags() -> None:
    out = _ember("--help").stdout
    assert "generate" in out and "pull" in out
    out = _ember("generate", "--help").stdout
    for flag in ("--max-num-batched-tokens", "--kv-cache-memory", "--scheduler", "--itl-target", "--dtype", "--top-p"):
        assert flag in out
