"""`ember compress` as a user runs it: every bad option fails before any work with a clear message, and a
compressed folder is what generate, serve and LLM() load."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from ember import LLM, SamplingParams
from ember.cli import main
from ember.compress import pipeline
from tests.conftest import DATA, TEXT
from tests.server.conftest import start_server, stop_server

CALIB = str(DATA / "pride-and-prejudice-ch1.txt")


BAD = [  # extra arguments, what the message must say
    (["--method", "gptq"], "unknown method gptq"),
    (["--method", "wanda,magnitude", "--calib", CALIB], "combine at most one pruning method"),
    (["--method", "int4", "--bits", "3"], "3-bit weights are not supported"),
    (["--method", "int4", "--bits", "8"], "int4 quantizes to 4 bits"),
    (["--method", "magnitude", "--bits", "4"], "--bits applies to quantization methods"),
    (["--method", "magnitude", "--sparsity", "1.0"], "sparsity must be a fraction in [0, 1)"),
    (["--method", "magnitude", "--sparsity", "-0.2"], "sparsity must be a fraction in [0, 1)"),
    (["--method", "int8", "--sparsity", "0.5"], "--sparsity and --pattern apply to pruning methods"),
    (["--method", "magnitude", "--pattern", "4:2"], "must be N:M with integers 0 < N < M"),
    (["--method", "magnitude", "--pattern", "2:4", "--sparsity", "0.3"], "fixes the sparsity at 0.5"),
    (["--method", "int4", "--group-size", "48"], "group size 48 must be a positive multiple of 32"),
    (["--method", "int4", "--group-size", "128"], "group size 128 does not divide the hidden size"),
    (["--method", "awq"], "awq needs calibration text: pass --calib FILE"),
    (["--method", "wanda,awq"], "wanda and awq need calibration text"),
    (["--method", "awq", "--calib", "no/such/file.txt"], "not found"),
    (["--method", "awq", "--calib", CALIB, "--calib-tokens", "100000"], "tokens but"),
    (["--method", "int4", "--calib-tokens", "0"], "must be positive"),
]


@pytest.fixture
def no_weights_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("weights were loaded before the options were checked")

    monkeypatch.setattr(pipeline, "load_model", refuse)


@pytest.mark.parametrize("args,message", BAD, ids=[m for _, m in BAD])
def test_bad_options_fail_before_any_work(args: list[str], message: str, tiny_llama3: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture, no_weights_loaded: None) -> None:
    out = tmp_path / "out"
    assert main(["compress", str(tiny_llama3), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err, err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_output_folder_must_be_new_or_empty(tiny_llama3: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                            no_weights_loaded: None) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    assert main(["compress", str(tiny_llama3), "--method", "int8", "--out", str(tmp_path)]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_a_compressed_folder_is_not_compressed_again(tiny_llama3: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    assert main(["compress", str(tiny_llama3), "--method", "int8", "--out", str(tmp_path / "a")]) == 0
    assert main(["compress", str(tmp_path / "a"), "--method", "int4", "--out", str(tmp_path / "b")]) == 2
    assert "already compressed" in capsys.readouterr().err


def _ember(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ember.cli", *args], capture_output=True, text=True,
                          timeout=600, env=os.environ.copy())


def test_compress_then_generate_and_serve_end_to_end(tiny_llama3: Path, tmp_path: Path) -> None:
    out = tmp_path / "dsnot-awq"
    proc = _ember("compress", str(tiny_llama3), "--method", "dsnot,awq", "--sparsity", "0.4", "--calib", CALIB,
                  "--calib-tokens", "512", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out)
    for progress in (r"pruned \(dsnot\): 40\.\d% of the layers' weights", r"wrote .*dsnot-awq",
                     r"\d+\.\d MB -> .*dsnot-awq \d+\.\d MB \(\d+% of the input\)"):
        assert re.search(progress, proc.stderr), proc.stderr
    assert "layer 1/2" not in proc.stderr  # one progress bar (on a terminal), not a line per layer
    assert "larger than its input" not in proc.stderr  # from float32: smaller
    assert {p.name for p in out.iterdir()} >= {"config.json", "tokenizer.json", "tokenizer_config.json",
                                               "model.safetensors", "manifest.json"}

    prompt = TEXT[:60]
    expected = LLM(out, kv_cache_memory=0.01).generate(
        prompt, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0].outputs[0].text
    gen = _ember("generate", prompt, "--model", str(out), "--raw", "--max-tokens", "8", "--ignore-eos",
                 "--kv-cache-memory", "0.01")
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout == expected + "\n"

    server = start_server(out, tmp_path)
    try:
        body = {"model": server.model, "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        reply = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()
        assert reply["choices"][0]["text"] == expected
    finally:
        stop_server(server)


def test_compress_keeps_the_embedding_in_float16_by_default(default_gguf: Path, tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """The default model (Q4_1, 98 MB) compressed to int8 was 252 MB with a float32 embedding: float16 halves
    that share, and perplexity barely moves."""
    from safetensors import safe_open

    from ember.bench.perplexity import perplexity
    from ember.models.loader import load_model

    sizes, ppl = {}, {}
    for dtype in ("float16", "float32"):
        out = tmp_path / dtype
        args = ["compress", str(default_gguf), "--method", "int8", "--out", str(out)]
        assert main(args if dtype == "float16" else [*args, "--dtype", dtype]) == 0
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            assert f.get_slice("model.embed_tokens.weight").get_dtype() == dtype.replace("float", "F")
        sizes[dtype] = pipeline.model_bytes(out)
        ppl[dtype] = perplexity(load_model(out), TEXT, ctx=512, windows=2)["ppl"]
    assert sizes["float16"] < sizes["float32"] - 50e6
    assert "the output is larger than its input" in caplog.text  # int8 from a 4.5-bit file
    assert abs(ppl["float16"] / ppl["float32"] - 1) < 1e-3
