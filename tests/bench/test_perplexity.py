"""Perplexity: agrees with a direct transformers computation on the same windows; `ember eval ppl` as a user runs it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ember.bench.perplexity import perplexity
from ember.errors import InvalidParameterError
from ember.models.loader import load_model
from tests.conftest import DATA, TEXT

TEXT_FILE = DATA / "pride-and-prejudice-ch1.txt"


def _hf_perplexity(folder: Path, ctx: int, stride: int, windows: int) -> tuple[float, int]:
    """Hugging Face's strided-perplexity loop (labels masked with -100), stopped after `windows`."""
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.tensor(tf.AutoTokenizer.from_pretrained(folder)(TEXT)["input_ids"])[None]
    nll, scored, prev_end = 0.0, 0, 0
    for begin in range(0, stride * windows, stride):
        end = begin + ctx
        target = ids[:, begin:end].clone()
        target[:, :-(end - prev_end)] = -100
        with torch.no_grad():
            loss = model(ids[:, begin:end], labels=target).loss
        n_valid = int((target[:, 1:] != -100).sum())
        nll, scored, prev_end = nll + float(loss) * n_valid, scored + n_valid, end
    return float(torch.tensor(nll / scored).exp()), scored


@pytest.mark.parametrize("ctx,stride", [(96, None), (96, 32)])
def test_matches_transformers(tiny_llama3: Path, ctx: int, stride: int | None) -> None:
    result = perplexity(load_model(str(tiny_llama3)), TEXT, ctx=ctx, windows=3, stride=stride)
    expected, scored = _hf_perplexity(tiny_llama3, ctx, stride or ctx, 3)
    assert result["tokens"] == scored == (ctx - 1) + 2 * min(stride or ctx, ctx - 1)
    assert result["ppl"] == pytest.approx(expected, rel=1e-4)
    assert result["windows"] == 3 and result["ctx"] == ctx and result["stride"] == (stride or ctx)
    assert result["bos"] is False and result["nll"] == pytest.approx(torch.tensor(expected).log().item(), rel=1e-4)


def test_bad_arguments(tiny_llama3: Path) -> None:
    loaded = load_model(str(tiny_llama3))
    cases = [({"ctx": 1}, "ctx must be >= 2"), ({"ctx": 4096}, "exceeds the model's context of 1024"),
             ({"stride": 0}, "stride must be between 1"), ({"stride": 200, "ctx": 100}, "stride must be"),
             ({"windows": 0}, "windows must be >= 1")]
    for kwargs, message in cases:
        with pytest.raises(InvalidParameterError, match=message):
            perplexity(loaded, TEXT, **kwargs)
    with pytest.raises(InvalidParameterError, match="fewer than one window"):
        perplexity(loaded, "Too short.", ctx=64)


def _ember(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ember.cli", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ})


def test_cli_json_and_text(tiny_llama3: Path) -> None:
    proc = _ember("eval", "ppl", str(tiny_llama3), "--text", str(TEXT_FILE), "--ctx", "64", "--windows", "2",
                  "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    for key in ("ppl", "nll", "tokens", "ctx", "windows", "stride", "windows_available", "text_tokens", "bos",
                "model", "text", "dtype", "seconds"):
        assert key in out, key
    expected = perplexity(load_model(str(tiny_llama3)), TEXT, ctx=64, windows=2)
    assert out["ppl"] == pytest.approx(expected["ppl"], rel=1e-6) and out["tokens"] == 63 + 63
    proc = _ember("eval", "ppl", str(tiny_llama3), "--text", str(TEXT_FILE), "--ctx", "64", "--windows", "1")
    assert proc.returncode == 0, proc.stderr
    assert "63 tokens scored" in proc.stdout and "perplexity" in proc.stdout and str(TEXT_FILE) in proc.stdout


def test_cli_kv_cache_dtype(tiny_llama3: Path) -> None:
    proc = _ember("eval", "ppl", str(tiny_llama3), "--text", str(TEXT_FILE), "--ctx", "64", "--windows", "2",
                  "--kv-cache-dtype", "int2", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    expected = perplexity(load_model(str(tiny_llama3)), TEXT, ctx=64, windows=2, kv_cache_dtype="int2")
    dense = perplexity(load_model(str(tiny_llama3)), TEXT, ctx=64, windows=2)
    assert out["kv_cache_dtype"] == "int2" and out["kv_block_size"] == 16
    assert out["ppl"] == pytest.approx(expected["ppl"], rel=1e-6) and out["ppl"] != dense["ppl"]
    with pytest.raises(InvalidParameterError, match="kv_cache_dtype"):
        perplexity(load_model(str(tiny_llama3)), TEXT, ctx=64, kv_cache_dtype="int3")


def test_cli_errors_are_messages(tiny_llama3: Path, tmp_path: Path) -> None:
    proc = _ember("eval", "ppl", str(tiny_llama3), "--text", str(tmp_path / "missing.txt"))
    assert proc.returncode == 2 and "not found" in proc.stderr and "Traceback" not in proc.stderr
    short = tmp_path / "short.txt"
    short.write_text("It is a truth universally acknowledged.")
    proc = _ember("eval", "ppl", str(tiny_llama3), "--text", str(short), "--ctx", "64")
    assert proc.returncode == 2 and "fewer than one window" in proc.stderr and "Traceback" not in proc.stderr


def test_cached_windows_side_by_side_score_as_one_at_a_time(tiny_llama3: Path) -> None:
    """A quantized cache scores windows in one batch (one block of each per step): the same NLLs as alone."""
    from ember.bench.perplexity import _window_nll_cached, _windows_nll_cached

    loaded = load_model(str(tiny_llama3))
    ids = torch.tensor(loaded.tokenizer.encode(TEXT)[:200])
    windows = [ids[:72], ids[64:136], ids[128:200]]
    together = _windows_nll_cached(loaded, windows, [1, 9, 9], "int4", 16)
    for window, first, nll in zip(windows, [1, 9, 9], together):
        assert nll.shape == (72 - first,)
        assert torch.allclose(nll, _window_nll_cached(loaded, window, 1, "int4", 16)[first - 1:], atol=1e-5)


def test_long_context_within_its_window_is_plain_attention(tiny_llama3: Path) -> None:
    loaded = load_model(str(tiny_llama3))
    dense = perplexity(loaded, TEXT, ctx=96, windows=2)
    for mode in ("streaming", "lm-infinite"):
        inside = perplexity(loaded, TEXT, ctx=96, windows=2, long_context=mode, attention_window=96)
        assert inside["ppl"] == pytest.approx(dense["ppl"], rel=1e-5)
        past = perplexity(loaded, TEXT, ctx=96, windows=2, long_context=mode, attention_window=32)
        assert past["ppl"] != pytest.approx(dense["ppl"], rel=1e-5)


def test_cli_long_context_reads_past_the_trained_context(tiny_llama3: Path) -> None:
    """1,200 tokens through a model trained on 1,024, KV held for a window of 128 (+ a step's chunk)."""
    proc = _ember("eval", "ppl", str(tiny_llama3), "--text", str(TEXT_FILE), "--ctx", "1200", "--windows", "1",
                  "--long-context", "lm-infinite", "--attention-window", "128", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["long_context"] == "lm-infinite" and out["tokens"] == 1199 and out["ppl"] < 1e4
    cfg = load_model(str(tiny_llama3)).config
    per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4
    assert out["kv_peak_bytes"] <= (128 + 512 + 4 * 16) * per_token  # window + chunk + sink blocks, not 1,200
    proc = _ember("eval", "ppl", str(tiny_llama3), "--text", str(TEXT_FILE), "--ctx", "1200")
    assert proc.returncode == 2 and "exceeds the model's context of 1024" in proc.stderr
