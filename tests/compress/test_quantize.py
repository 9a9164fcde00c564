"""Weight quantization: RTN error bounds, pruned zeros surviving int4, AWQ's exact folding and its lower
output error than RTN on calibration activations."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from ember.compress.calibrate import LayerInputs, calibration_ids, layerwise
from ember.compress.quantize import awq_layer, awq_search
from ember.models.quantize import QuantSpec, fake_quantize, quant_linear, quantize_tensor
from ember.models.llama import DecoderLayer
from ember.models.loader import load_model
from ember.ops import quant
from tests.conftest import DATA


def _weights(n: int = 48, k: int = 256) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, k, generator=gen) * torch.logspace(-2, 1, n).unsqueeze(1)  # rows of very different scales


def test_int8_per_channel_error_is_at_most_half_a_step() -> None:
    w = _weights()
    q, scales, mins = quantize_tensor(w, QuantSpec(8))
    assert q.dtype == torch.int8 and scales.shape == (48, 1) and mins is None
    err = (quant.dequantize(q, scales, None, 8) - w).abs()
    assert (err <= scales / 2 * (1 + 1e-5)).all()


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("keep_zeros", [False, True])
def test_int4_group_error_is_at_most_half_a_step(group: int, keep_zeros: bool) -> None:
    w = _weights()
    q, scales, mins = quantize_tensor(w, QuantSpec(4, group, keep_zeros))
    assert q.dtype == torch.uint8 and q.shape == (48, 128) and scales.shape == mins.shape == (48, 256 // group)
    err = (quant.dequantize(q, scales, mins, 4) - w).abs().reshape(48, 256 // group, group)
    assert (err <= scales.unsqueeze(-1) / 2 * (1 + 1e-5) + 1e-7).all()


def test_pruned_zeros_stay_exactly_zero_with_a_zero_point() -> None:
    w = _weights()
    w[torch.rand(w.shape, generator=torch.Generator().manual_seed(1)) < 0.5] = 0
    zero_point = fake_quantize(w, QuantSpec(4, 32, keep_zeros=True))
    assert (zero_point[w == 0] == 0).all()
    assert (fake_quantize(w, QuantSpec(8))[w == 0] == 0).all()  # symmetric int8: always
    assert (fake_quantize(w, QuantSpec(4, 32))[w == 0] != 0).any()  # (scale, min) grids miss 0.0


def _layer_error(layer: torch.nn.Module, x: torch.Tensor, ref: torch.Tensor) -> float:
    # The weights' error alone (the kernels would add the activations' int8 rounding).
    return (torch.nn.functional.linear(x, layer.dequantized(), layer.bias) - ref).pow(2).mean().item()


def test_awq_layer_beats_rtn_on_activations_with_outlier_channels() -> None:
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(96, 128, generator=gen) * 0.1
    x = torch.randn(256, 128, generator=gen)
    x[:, :4] *= 30  # a few salient input channels, as in LLM activations
    spec = QuantSpec(4, 64)
    found = awq_search(w, x, spec)
    ref = x @ w.T
    rtn = _layer_error(quant_linear(w, None, spec), x, ref)
    awq = _layer_error(quant_linear(w * found.scale, None, spec), x / found.scale, ref)
    assert 0 < found.alpha <= 1 and found.rtn_error == pytest.approx(rtn, rel=1e-4)
    assert awq < 0.8 * rtn, (awq, rtn)


def _model_and_ids(folder: Path) -> tuple[torch.nn.Module, torch.Tensor]:
    loaded = load_model(folder)
    return loaded.model, calibration_ids(loaded.tokenizer, DATA / "pride-and-prejudice-ch1.txt", 256, 128)


@pytest.mark.parametrize("bits,group", [(4, 32), (8, None)])
def test_awq_lowers_every_layers_error_on_real_calibration_activations(tiny_llama3: Path, bits: int,
                                                                       group: int | None) -> None:
    model, ids = _model_and_ids(tiny_llama3)
    spec = QuantSpec(bits, group)
    errors: list[tuple[float, float]] = []

    def check(i: int, layer: DecoderLayer, inputs: LayerInputs) -> None:
        for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
            w, x = layer.get_submodule(name).weight.data, inputs[name]
            found = awq_search(w, x, spec)
            ref = x @ w.T
            errors.append((_layer_error(quant_linear(w * found.scale, None, spec), x / found.scale, ref),
                           _layer_error(quant_linear(w, None, spec), x, ref)))

    layerwise(model, ids, check)
    assert all(awq <= rtn * (1 + 1e-4) for awq, rtn in errors), errors
    assert sum(awq for awq, _ in errors) < sum(rtn for _, rtn in errors)


@pytest.mark.parametrize("fixture", ["tiny_llama3", "tiny_qwen2"])  # GQA; Qwen2 adds v biases
def test_awq_folding_is_exact_in_float(fixture: str, request: pytest.FixtureRequest) -> None:
    model, ids = _model_and_ids(request.getfixturevalue(fixture))
    original = copy.deepcopy(model)
    alphas: list[float] = []

    def fold_only(i: int, layer: DecoderLayer, inputs: LayerInputs) -> None:
        alphas.extend(f.alpha for f in awq_layer(layer, inputs, QuantSpec(4, 32)).values())

    layerwise(model, ids, fold_only)  # scales folded into norms / v rows / up rows, nothing quantized
    assert any(a > 0 for a in alphas) and all(isinstance(m, torch.nn.Module) for m in model.modules())
    for seq in ids:
        torch.testing.assert_close(model.forward_dense(seq), original.forward_dense(seq), rtol=1e-4, atol=1e-4)
    changed = model.layers[0].input_layernorm.weight != original.layers[0].input_layernorm.weight
    assert changed.any()
