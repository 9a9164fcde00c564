"""GGUF tensors of every supported type load with the right values and shapes; Q/K permutation is undone."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ember.loading import gguf as eg

QUANTIZABLE = ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
K_QUANTS = ["Q4_K", "Q5_K", "Q6_K"]


def _write(path: Path, tensors: dict[str, tuple[np.ndarray, object]]) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    for name, (data, qtype) in tensors.items():
        w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("type_name", QUANTIZABLE)
def test_quantized_types_round_trip(tmp_path: Path, type_name: str) -> None:
    import gguf

    qtype = gguf.GGMLQuantizationType[type_name]
    x = np.random.default_rng(0).standard_normal((6, 256)).astype(np.float32)
    path = _write(tmp_path / "t.gguf", {"w": (gguf.quants.quantize(x, qtype), qtype)})
    (name, got), = list(eg.iter_tensors(path))
    assert name == "w" and got.shape == (6, 256) and got.dtype == torch.float32
    rel = np.abs(got.numpy() - x).mean() / np.abs(x).mean()
    assert rel < {"Q4_0": 0.15, "Q4_1": 0.15, "Q5_0": 0.08, "Q5_1": 0.08}.get(type_name, 0.01)


@pytest.mark.parametrize("type_name", K_QUANTS)
def test_k_quants_match_the_gguf_reference(tmp_path: Path, type_name: str) -> None:
    import gguf

    qtype = gguf.GGMLQuantizationType[type_name]
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    raw = np.random.default_rng(1).integers(0, 256, (3, 2 * type_size), dtype=np.uint8)
    # Keep the fp16 super-block scales finite: write small positive halves where they live.
    raw_view = raw.reshape(-1, type_size)
    scale_at = {"Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [type_size - 2]}[type_name]
    for off in scale_at:
        raw_view[:, off:off + 2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    path = _write(tmp_path / "k.gguf", {"w": (raw, qtype)})
    (_, got), = list(eg.iter_tensors(path))
    ref = gguf.quants.dequantize(raw, qtype)
    assert got.shape == (3, 512)
    np.testing.assert_array_equal(got.numpy(), ref.astype(np.float32))


def test_default_model_tensor_types_and_names(default_gguf: Path) -> None:
    reader = eg.open_reader(default_gguf)
    types = {t.type_name for t in reader.tensors}
    assert {"Q4_1", "Q8_0", "F32"} <= types
    assert all(eg.hf_name(t.name) for t in reader.tensors)
    assert reader.metadata["general.architecture"] == "llama"


def test_unpermute_inverts_llama_cpp_permutation() -> None:
    n_head, hd, dim = 3, 8, 5
    w = torch.randn(n_head * hd, dim)
    # llama.cpp's convert script: reshape(n_head, 2, hd//2, dim).swapaxes(1, 2)
    permuted = w.reshape(n_head, 2, hd // 2, dim).transpose(1, 2).reshape(n_head * hd, dim)
    torch.testing.assert_close(eg.unpermute_qk(permuted, n_head), w, rtol=0, atol=0)
