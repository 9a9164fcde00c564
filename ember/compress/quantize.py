"""Weight quantization: round-to-nearest int8/int4 and AWQ, as swaps of linear layers for QuantLinear."""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ember.compress.calibrate import LayerInputs, layerwise
from ember.models.llama import DecoderLayer, Linear, LlamaModel
from ember.ops.quant import BLOCK, GROUP, QuantLinear, dequantize, pack_int4, quantize_int4
from ember.ops.quant import quantize_int8 as int8_codes

log = logging.getLogger("ember")
METHODS = ("none", "int8", "int4")  # what `--quantization` applies at load time
AWQ_GRID = 20  # alpha in {0, 1/20, ..., 1}


@dataclass(frozen=True)
class QuantSpec:
    """Bits, group size along the input dimension (None: one group per output channel), and whether
    exact zeros must survive (after pruning: int4 then uses an integer zero point)."""

    bits: int
    group: int | None = None
    keep_zeros: bool = False

    def group_for(self, k: int) -> int:
        return self.group or k

    def fits(self, k: int) -> bool:
        g = self.group_for(k)
        return g % BLOCK == 0 and k % g == 0

    def describe(self) -> str:
        if self.group is None:
            return f"int{self.bits} per-channel"
        return f"int{self.bits} g{self.group}" + (" zero-point" if self.keep_zeros and self.bits == 4 else "")


def quantize_int4_zero_point(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 whose grid contains 0.0 exactly (an integer zero point, min = -zero * scale), so
    pruned weights dequantize to exactly 0. Same (codes [N, K], scales, mins) layout as quantize_int4."""
    n, k = w.shape
    g = w.float().reshape(n, k // group, group)
    lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
    scales = (hi - lo) / 15.0
    safe = torch.where(scales > 0, scales, 1.0)
    zero = torch.round(-lo / safe)
    q = (torch.round(g / safe.unsqueeze(-1)) + zero.unsqueeze(-1)).clamp(0, 15)
    return q.to(torch.uint8).reshape(n, k), scales, -(zero * scales)


def quantize_tensor(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """QuantLinear buffers (qweight, scales, mins) for a float weight [N, K]."""
    group = spec.group_for(w.shape[1])
    if spec.bits == 8:
        return *int8_codes(w, group), None
    q, scales, mins = (quantize_int4_zero_point if spec.keep_zeros else quantize_int4)(w, group)
    return pack_int4(q), scales, mins


def fake_quantize(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """w after a quantize/dequantize round trip (float32)."""
    return dequantize(*quantize_tensor(w, spec), spec.bits)


def quant_linear(weight: torch.Tensor, bias: torch.Tensor | None, spec: QuantSpec) -> QuantLinear:
    return QuantLinear(*quantize_tensor(weight, spec), bias=bias, bits=spec.bits)


def linear_slots(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module, str, Linear]]:
    """(qualified name, parent, attribute, layer) for every float Linear under module."""
    for parent_name, parent in module.named_modules(prefix=prefix.rstrip(".")):
        for attr, child in parent.named_children():
            if isinstance(child, Linear):
                yield f"{parent_name}.{attr}" if parent_name else attr, parent, attr, child


def quantize_linears(module: nn.Module, spec: QuantSpec, prefix: str = "") -> dict[str, str]:
    """Swap the float Linears under module for QuantLinears; name -> format (or why it stays float)."""
    return {name: _quantize_slot(parent, attr, layer.weight.data, layer.bias, spec)
            for name, parent, attr, layer in list(linear_slots(module, prefix))}


def head_spec(spec: QuantSpec) -> QuantSpec:
    """The LM head's format for a body quantized with `spec`: int8 per channel below 8 bits (on
    SmolLM2-135M an int4 head alone costs ~3 perplexity points; it is a small share of the bytes read
    per token), else the body's. Pruning leaves the head dense, so it needs no zero point."""
    return QuantSpec(8) if spec.bits < 8 else replace(spec, keep_zeros=False)


def quantize_head(model: LlamaModel, spec: QuantSpec) -> dict[str, str]:
    """Round-to-nearest LM head in head_spec(spec); a tied head gets its own quantized copy (the
    embedding lookup stays float)."""
    spec = head_spec(spec)
    if model.lm_head is None:
        fmt = _quantize_slot(model, "lm_head", model.embed_tokens.weight.data, None, spec)
        return {"lm_head": fmt + (" (own copy of the tied embedding)" if model.lm_head is not None else "")}
    if isinstance(model.lm_head, Linear):
        return {"lm_head": _quantize_slot(model, "lm_head", model.lm_head.weight.data, model.lm_head.bias, spec)}
    return {}


def _quantize_slot(parent: nn.Module, attr: str, weight: torch.Tensor, bias: torch.Tensor | None,
                   spec: QuantSpec) -> str:
    k = weight.shape[1]
    if not spec.fits(k):
        return f"float (input dim {k} is not a multiple of {spec.group or BLOCK})"
    setattr(parent, attr, quant_linear(weight, None if bias is None else bias.data, spec))
    return spec.describe()


def quantize_rtn(model: LlamaModel, spec: QuantSpec, on_layer: Callable[[], Any] = lambda: None) -> dict[str, str]:
    """Round-to-nearest for every projection and the LM head; name -> format. on_layer: called per layer done."""
    report: dict[str, str] = {}
    for i, layer in enumerate(model.layers):
        report |= quantize_linears(layer, spec, f"layers.{i}")
        log.debug("layer %d/%d: %s", i + 1, len(model.layers), spec.describe())
        on_layer()
    return report | quantize_head(model, spec)


def quantize_at_load(model: LlamaModel, bits: int) -> LlamaModel:
    """`--quantization int8|int4`: round-to-nearest for every projection (layers whose input dimension
    is not a multiple of 32 stay float). int8 is per output channel: on SmolLM2-135M as good as groups
    of 32 (perplexity 44.40 vs float 44.41) and 22% less CPU per token (no per-group scales).
    int4 is in groups of 32. The LM head is int8 per channel either way (see head_spec)."""
    spec = QuantSpec(8) if bits == 8 else QuantSpec(4, GROUP)
    for layer in model.layers:
        quantize_linears(layer, spec)
    quantize_head(model, spec)
    return model


def apply(model: LlamaModel, method: str) -> LlamaModel:
    if method in ("int8", "int4"):
        return quantize_at_load(model, int(method[3:]))
    return model


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
