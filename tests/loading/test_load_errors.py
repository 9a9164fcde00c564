"""Every user mistake at load time gives an EmberError naming the file, what was found and what is supported."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ember.errors import ModelLoadError, UnsupportedArchitectureError
from ember.models.loader import load_model


def _write_gguf(path: Path, arch: str = "llama", tensor_type: str = "F32") -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_vocab_size(4)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["a", "b", "ab", "<eos>"])
    w.add_token_merges(["a b"])
    qtype = gguf.GGMLQuantizationType[tensor_type]
    if tensor_type == "F32":
        w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    else:  # raw bytes of one block per row, for 8 rows
        _, size = gguf.GGML_QUANT_SIZES[qtype]
        w.add_tensor("token_embd.weight", np.zeros((8, size), dtype=np.uint8), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no such file|neither an existing file"):
        load_model(tmp_path / "nope.gguf")


def test_not_a_gguf(tmp_path: Path) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 this is a zip file")
    with pytest.raises(ModelLoadError, match=r"model\.gguf: not a GGUF file .*expected b'GGUF'"):
        load_model(bad)


def test_truncated_header(tmp_path: Path) -> None:
    good = _write_gguf(tmp_path / "good.gguf")
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(good.read_bytes()[:60])
    with pytest.raises(ModelLoadError, match=r"truncated\.gguf: .*(truncated|corrupt)"):
        load_model(bad)


def test_truncated_tensor_data(tmp_path: Path) -> None:
    good = _write_gguf(tmp_path / "good.gguf")
    bad = tmp_path / "short.gguf"
    bad.write_bytes(good.read_bytes()[:-40])
    with pytest.raises(ModelLoadError, match="runs past the end of the file"):
        load_model(bad)


def test_unknown_architecture_gguf(tmp_path: Path) -> None:
    path = _write_gguf(tmp_path / "rwkv.gguf", arch="rwkv6")
    with pytest.raises(UnsupportedArchitectureError, match=r"rwkv\.gguf: architecture 'rwkv6' .*llama, qwen2, mistral"):
        load_model(path)


def test_unsupported_tensor_type(tmp_path: Path) -> None:
    path = _write_gguf(tmp_path / "iq.gguf", tensor_type="IQ2_XXS")
    with pytest.raises(ModelLoadError, match=r"iq\.gguf: .*IQ2_XXS.*supported: F32, F16"):
        load_model(path)


def test_hf_folder_errors(tmp_path: Path, tiny_qwen2: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(empty)
    folder = tmp_path / "copy"
    shutil.copytree(tiny_qwen2, folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UnsupportedArchitectureError, match="GPT2LMHeadModel.*LlamaForCausalLM"):
        load_model(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        load_model(folder)
    (folder / "config.json").write_text(json.dumps(cfg))
    for f in folder.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ModelLoadError, match="no \\*.safetensors weights"):
        load_model(folder)


def test_cli_reports_errors_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"garbage")
    proc = subprocess.run([sys.executable, "-m", "ember.cli", "generate", "hi", "--model", str(bad)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "not a GGUF file" in proc.stderr
    assert "Traceback" not in proc.stderr
