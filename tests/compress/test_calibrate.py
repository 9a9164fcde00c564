"""Calibration windows from a text file, and the layer-by-layer pass that feeds compressed layers forward."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ember.compress.calibrate import LINEARS, LayerInputs, calibration_ids, layerwise
from ember.errors import CompressionError
from ember.models.loader import load_model
from tests.conftest import DATA, TEXT

TEXT_FILE = DATA / "pride-and-prejudice-ch1.txt"


def test_calibration_ids_are_consecutive_windows(tiny_llama3: Path) -> None:
    tok = load_model(str(tiny_llama3)).tokenizer
    ids = calibration_ids(tok, TEXT_FILE, n_tokens=1000, seq_len=128)
    assert ids.shape == (7, 128) and ids.dtype == torch.long
    assert ids.flatten().tolist() == tok.encode(TEXT, add_special_tokens=False)[:7 * 128]


def test_calibration_errors(tiny_llama3: Path, tmp_path: Path) -> None:
    tok = load_model(str(tiny_llama3)).tokenizer
    with pytest.raises(CompressionError, match="not found"):
        calibration_ids(tok, tmp_path / "nope.txt", 1024, 128)
    short = tmp_path / "short.txt"
    short.write_text(TEXT[:1000])
    with pytest.raises(CompressionError, match=r"has \d+ tokens but 8 sequences x 128 tokens = 1024"):
        calibration_ids(tok, short, 1024, 128)
    with pytest.raises(CompressionError, match="at least one window"):
        calibration_ids(tok, TEXT_FILE, 64, 128)


def test_layerwise_captures_inputs_and_feeds_compressed_layers_forward(tiny_llama3: Path) -> None:
    model = load_model(str(tiny_llama3)).model
    ids = calibration_ids(load_model(str(tiny_llama3)).tokenizer, TEXT_FILE, 3 * 40, 40)
    seen: list[int] = []

    def compress(i: int, layer: torch.nn.Module, inputs: LayerInputs) -> None:
        seen.append(i)
        assert list(inputs) == list(LINEARS)
        for name in LINEARS:
            x = inputs[name]
            assert x.dtype == torch.float32 and x.shape == (120, layer.get_submodule(name).weight.shape[1])
        h = inputs.hidden.reshape(120, -1)
        assert torch.allclose(inputs["self_attn.qkv_proj"], layer.input_layernorm(h), atol=1e-6)
        assert torch.allclose(inputs.sq_norms("mlp.down_proj"), inputs["mlp.down_proj"].square().sum(0))
        if i == 0:  # layer 0 becomes the identity (residual only): layer 1 must see the embeddings
            layer.self_attn.o_proj.weight.data.zero_()
            layer.mlp.down_proj.weight.data.zero_()
        else:
            assert torch.equal(inputs.hidden, model.embed_tokens(ids))

    layerwise(model, ids, compress)
    assert seen == [0, 1]
    assert model.layers[0].mlp.down_proj.weight.abs().sum() == 0
    assert not model.layers[0].mlp.down_proj.weight.is_inference()


def test_layerwise_rejects_bad_ids(tiny_llama3: Path) -> None:
    model = load_model(str(tiny_llama3)).model
    with pytest.raises(CompressionError, match=r"\[sequences, seq_len\]"):
        layerwise(model, torch.zeros(16, dtype=torch.long), lambda *a: None)
    with pytest.raises(CompressionError, match="exceed the model's 1024 positions"):
        layerwise(model, torch.zeros(1, 2048, dtype=torch.long), lambda *a: None)
