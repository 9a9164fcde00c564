"""AWQ weight quantization (activation-aware scales searched on calibration data), on top of the round-to-nearest
core in ember.models.quantize."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ember.compress.calibrate import LayerInputs, layerwise
from ember.models.llama import DecoderLayer, Linear, LlamaModel
from ember.models.quantize import QuantSpec, fake_quantize, quantize_head, quantize_linears

log = logging.getLogger("ember")
AWQ_GRID = 20  # alpha in {0, 1/20, ..., 1}


# -- AWQ ------------------------------------------------------------------------------------------

@dataclass
class ScaleSearch:
    """The best per-input-channel scale s for one linear layer, and its output error with and without."""

    scale: torch.Tensor
    alpha: float
    rtn_error: float
    error: float


def awq_search(weight: torch.Tensor, x: torch.Tensor, spec: QuantSpec, x_scale: torch.Tensor | None = None,
               grid: int = AWQ_GRID) -> ScaleSearch:
    """AWQ's grid search: s = mean|x|^alpha (normalised), minimising the mean squared output error
    ||x W^T - (x/s) Q(W diag s)^T||^2 over alpha in [0, 1]; alpha = 0 is plain round-to-nearest, so the
    result is never worse on x. x_scale replaces mean|x| per channel (to tie channels that must share a
    scale). The error is D G D^T with D = W - Q(W diag s)/s and G = x^T x, computed once."""
    w = weight.float()
    gram = x.T @ x
    act = (x.abs().mean(0) if x_scale is None else x_scale).clamp(min=1e-4)
    best: ScaleSearch | None = None
    for i in range(grid + 1):
        s = act.pow(i / grid)
        s = s / (s.max() * s.min()).sqrt()
        d = w - fake_quantize(w * s, spec) / s
        err = ((d @ gram) * d).sum().item() / (x.shape[0] * w.shape[0])
        if best is None or err < best.error:
            best = ScaleSearch(s, i / grid, best.rtn_error if best else err, err)
    assert best is not None
    return best


def awq_layer(layer: DecoderLayer, inputs: LayerInputs, spec: QuantSpec, grid: int = AWQ_GRID
              ) -> dict[str, ScaleSearch]:
    """Search scales for the four projections of one decoder layer, fold them exactly (in float) into
    the preceding op, then quantize the layer with round-to-nearest. Returns the searches by name.

    qkv_proj / gate_up_proj: 1/s goes into the RMSNorm weight before them. down_proj: into the up rows
    of gate_up_proj (silu(g) * (u/s) = (silu(g) * u)/s). o_proj: into the v rows of qkv_proj, which
    is exact because attention output channel (head h, dim d) is linear in v of (kv head h // rep, d);
    so o_proj's scale is tied across the query heads that share a kv head."""
    attn, mlp = layer.self_attn, layer.mlp
    rep = attn.n_heads // attn.n_kv
    o_act = inputs.mean_abs("self_attn.o_proj").view(attn.n_kv, rep, attn.hd).mean(1, keepdim=True)
    found: dict[str, ScaleSearch] = {}
    for name, lin in (("self_attn.qkv_proj", attn.qkv_proj), ("self_attn.o_proj", attn.o_proj),
                      ("mlp.gate_up_proj", mlp.gate_up_proj), ("mlp.down_proj", mlp.down_proj)):
        if isinstance(lin, Linear) and spec.fits(lin.weight.shape[1]):
            tied = o_act.expand(-1, rep, -1).reshape(-1) if name == "self_attn.o_proj" else None
            found[name] = awq_search(lin.weight.data, inputs[name], spec, tied, grid)
    s = _scale(found, "self_attn.qkv_proj")
    if s is not None:
        layer.input_layernorm.weight.data.div_(s)
        attn.qkv_proj.weight.data.mul_(s)
    s = _scale(found, "self_attn.o_proj")
    if s is not None:
        v_rows = slice(attn.q_size + attn.kv_size, attn.q_size + 2 * attn.kv_size)
        _div_rows(attn.qkv_proj, v_rows, s.view(attn.n_kv, rep, attn.hd)[:, 0].reshape(-1))
        attn.o_proj.weight.data.mul_(s)
    s = _scale(found, "mlp.gate_up_proj")
    if s is not None:
        layer.post_attention_layernorm.weight.data.div_(s)
        mlp.gate_up_proj.weight.data.mul_(s)
    s = _scale(found, "mlp.down_proj")
    if s is not None:
        _div_rows(mlp.gate_up_proj, slice(mlp.inter, 2 * mlp.inter), s)
        mlp.down_proj.weight.data.mul_(s)
    return found


def _scale(found: dict[str, ScaleSearch], name: str) -> torch.Tensor | None:
    return found[name].scale if name in found and found[name].alpha > 0 else None


def _div_rows(layer: Linear, rows: slice, s: torch.Tensor) -> None:
    layer.weight.data[rows] /= s.unsqueeze(1)
    if layer.bias is not None:
        layer.bias.data[rows] /= s


def quantize_awq(model: LlamaModel, calib_ids: torch.Tensor, spec: QuantSpec, grid: int = AWQ_GRID,
                 on_layer: Callable[[], Any] = lambda: None) -> tuple[dict[str, str], dict[str, dict[str, float]]]:
    """AWQ for every decoder layer (calibrated layer by layer), then a round-to-nearest LM head.

    Returns (name -> format, name -> {alpha, rtn_error, awq_error})."""
    report: dict[str, str] = {}
    searches: dict[str, dict[str, float]] = {}

    def compress_layer(i: int, layer: DecoderLayer, inputs: LayerInputs) -> None:
        found = awq_layer(layer, inputs, spec, grid)
        report.update(quantize_linears(layer, spec, f"layers.{i}"))
        for name, f in found.items():
            searches[f"layers.{i}.{name}"] = {"alpha": f.alpha, "rtn_error": float(f"{f.rtn_error:.6g}"),
                                              "awq_error": float(f"{f.error:.6g}")}
        gains = ", ".join(f"{n.split('.')[-1]} a={f.alpha:.2f} err x{f.error / max(f.rtn_error, 1e-30):.2f}"
                          for n, f in found.items())
        log.debug("layer %d/%d: AWQ %s (%s)", i + 1, len(model.layers), spec.describe(), gains)
        on_layer()

    layerwise(model, calib_ids, compress_layer)
    return report | quantize_head(model, spec), searches
