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


MODEL_COMMANDS = [  # every command that takes a model: the words before MODEL, what else it needs
    (["generate"], ["hi"]), (["serve"], []), (["chat"], []), (["eval", "ppl"], ["--text", "t.txt"]),
    (["compress"], ["--method", "int8", "--out", "o"]), (["bench", "latency"], []), (["bench", "throughput"], [])]


@pytest.mark.parametrize("head,rest", MODEL_COMMANDS, ids=lambda c: " ".join(c) if c and c[0][0] != "-" else "")
def test_every_command_takes_the_model_both_ways(head: list[str], rest: list[str],
                                                 capsys: pytest.CaptureFixture) -> None:
    from ember.cli import parse_args

    positional = [*head, "m.gguf", *rest]
    for argv in (positional, [*head, *rest, "--model", "m.gguf"], [*head, *rest, "-m", "m.gguf"],
                 [*positional, "--model", "m.gguf"]):
        assert parse_args(argv).model == "m.gguf", argv
    assert parse_args([*head, *rest]).model is None  # the default model
    with pytest.raises(SystemExit) as e:
        parse_args([*positional, "--model", "other.gguf"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"usage: ember {' '.join(head)}" in err
    assert f"ember {' '.join(head)}: error: the model is given twice" in err


def test_errors_print_the_subcommands_usage(capsys: pytest.CaptureFixture) -> None:
    from ember.cli import parse_args

    for argv, usage in ((["generate", "a", "b", "c"], "usage: ember generate"),
                        (["bench", "latency", "--bogus"], "usage: ember bench latency"),
                        (["serve", "--port", "99999"], "usage: ember serve")):
        with pytest.raises(SystemExit):
            parse_args(argv)
        err = capsys.readouterr().err
        assert err.startswith(usage) and "usage: ember [-h]" not in err, err
    assert "a port is a number from 1 to 65535, got '99999'" in err


def test_help_lists_known_models_and_bench_kinds() -> None:
    from ember.loading.registry import KNOWN_MODELS

    out = _ember("pull", "--help").stdout
    assert all(name in out for name in KNOWN_MODELS)
    out = _ember("bench", "--help").stdout
    assert all(kind in out for kind in ("throughput", "latency", "serve", "mixed", "soak"))


def test_serve_refuses_a_bad_or_busy_port_before_loading(tiny_llama3: Path) -> None:
    import socket

    proc = _ember("serve", str(tiny_llama3), "--port", "99999")
    assert proc.returncode == 2 and "65535" in proc.stderr and "Traceback" not in proc.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = _ember("serve", str(tiny_llama3), "--port", str(port))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: port {port} on 127.0.0.1 is already in use (another server?); choose another with --port"]


def test_generate_sizes_the_kv_cache_and_notes_a_cut(tiny_llama3: Path) -> None:
    prompt = TEXT[:80]
    proc = _ember("generate", str(tiny_llama3), prompt, "--raw", "--max-tokens", "12", "--ignore-eos")
    assert proc.returncode == 0, proc.stderr
    n = len(LLM(tiny_llama3, kv_cache_memory=0.01).get_tokenizer().encode(prompt))
    tokens = -(-(n + 12) // 16) * 16  # the prompt and --max-tokens, in whole blocks of 16
    assert f"KV cache: {tokens // 16} blocks of 16 tokens = {tokens} tokens" in proc.stderr, proc.stderr
    assert f"max_model_len {tokens}" in proc.stderr
    assert "[cut at --max-tokens 12]" in proc.stderr and "[cut at" not in proc.stdout


def test_default_kv_memory_follows_free_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    from ember.engine import engine

    gib = engine.GiB
    monkeypatch.setattr(engine, "available_memory", lambda: 100 * gib)
    assert engine.default_kv_memory(gib // 8, 64) == 2 * gib  # 64 full contexts: capped at 2 GiB
    assert engine.default_kv_memory(gib // 8, 4) == gib // 2  # what 4 sequences need
    monkeypatch.setattr(engine, "available_memory", lambda: gib)
    assert engine.default_kv_memory(gib // 8, 64) == gib // 2  # half of what is free
    monkeypatch.setattr(engine, "available_memory", lambda: gib // 16)
    assert engine.default_kv_memory(gib // 8, 64) == gib // 8  # never less than one context
