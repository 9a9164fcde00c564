"""Swap a model's linear layers for QuantLinear modules built from stored packed buffers: an `ember compress`
folder's, or a GGUF file's Q8_0 / Q4_0 / Q4_1 tensors taken as they are (no re-quantization)."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch

from ember.errors import ModelLoadError
from ember.loading import gguf
from ember.loading.values import FIX
from ember.models.llama import Linear, LlamaModel
from ember.ops.quant import QuantLinear

Buffers = dict[str, torch.Tensor | None]  # qweight, scales, mins
FUSED_PARTS = {"qkv_proj": 3, "gate_up_proj": 2}  # Hugging Face tensors per fused module (see LlamaModel)


def swap_in(net: LlamaModel, name: str, bufs: Buffers, source: str) -> None:
    """Replace the linear layer `name` (or a tied model's absent lm_head) by a QuantLinear of bufs; a bias, if
    the layer has one, is left to be loaded with the float tensors."""
    parent_name, _, attr = name.rpartition(".")
    try:
        parent = net.get_submodule(parent_name)
        old = getattr(parent, attr)
    except AttributeError:
        raise ModelLoadError(f"{source}: packed tensors for {name!r}, which is not a layer of this model") from None
    if old is None and name == "lm_head":  # tied head with its own quantized copy
        shape, bias = (net.config.vocab_size, net.config.hidden_size), None
    elif isinstance(old, Linear):
        shape, bias = tuple(old.weight.shape), None if old.bias is None else torch.empty(old.weight.shape[0])
    else:
        raise ModelLoadError(f"{source}: packed tensors for {name!r}, which is not a linear layer")
    setattr(parent, attr, packed_layer(name, bufs, shape, bias, source))


def packed_layer(name: str, bufs: Buffers, shape: tuple[int, int], bias: torch.Tensor | None,
                 source: str) -> QuantLinear:
    """A QuantLinear from stored buffers, each checked against the layer's [out, in] shape first: the kernels
    read them unchecked, so a wrong size or dtype must never get that far."""
    def bad(problem: str) -> ModelLoadError:
        return ModelLoadError(f"{source}: packed layer {name!r} {problem}; {FIX}")

    qweight, scales, mins = bufs["qweight"], bufs["scales"], bufs["mins"]
    if qweight is None or qweight.dtype not in (torch.int8, torch.uint8):
        raise bad(f"has qweight of type {getattr(qweight, 'dtype', None)}, expected torch.int8 (8-bit) or "
                  "torch.uint8 (4-bit)")
    bits, (n, k) = 4 if qweight.dtype == torch.uint8 else 8, shape
    if tuple(qweight.shape) != (n, k // 2 if bits == 4 else k):
        raise bad(f"has qweight of shape {tuple(qweight.shape)}, expected {(n, k // 2 if bits == 4 else k)}")
    if scales is None:
        raise bad("lacks scales")
    if scales.dim() != 2 or scales.shape[0] != n or not scales.shape[1] or k % scales.shape[1] \
            or scales.dtype not in (torch.float16, torch.float32):
        raise bad(f"has scales of shape {tuple(scales.shape)} and type {scales.dtype}, expected float16 or "
                  f"float32 of shape ({n}, groups) with groups dividing {k}")
    if (mins is None) != (bits == 8):
        raise bad("lacks mins (4-bit layers are asymmetric)" if bits == 4 else "has mins, which 8-bit layers lack")
    if mins is not None and (mins.shape != scales.shape or mins.dtype not in (torch.float16, torch.float32)):
        raise bad(f"has mins of shape {tuple(mins.shape)} and type {mins.dtype}, expected those of its scales")
    try:
        return QuantLinear(qweight, scales, mins, bias, bits)
    except ValueError as e:
        raise bad(f"is malformed ({e})") from None


def _module_of(net: LlamaModel, target: str) -> tuple[str, int] | None:
    """The module a Hugging Face weight name loads into and the first row it fills (q/k/v and gate/up are fused);
    None for a tensor that is not a linear layer's weight."""
    if target == "embed_tokens.weight":  # a tied model's head
        return ("lm_head", 0) if net.lm_head is None else None
    if not target.endswith(".weight") or not (target.startswith("layers.") or target == "lm_head.weight"):
        return None
    fused, rows = net._fused_target(target)
    return fused.removesuffix(".weight"), 0 if rows is None else rows.start


def _concat(parts: list[gguf.Packed]) -> Buffers | None:
    """One module's buffers from its row blocks in order; None when they mix int8 and int4."""
    if len({p.bits for p in parts}) != 1:
        return None
    dtype = torch.float16 if all(p.scales.dtype == torch.float16 for p in parts) else torch.float32
    return {"qweight": torch.cat([p.qweight for p in parts]),
            "scales": torch.cat([p.scales.to(dtype) for p in parts]),
            "mins": None if parts[0].mins is None else torch.cat([p.mins.to(dtype) for p in parts])}


def load_gguf_packed(net: LlamaModel, path: Path, reader: gguf.GGUFFile) -> set[str]:
    """Swap in a QuantLinear for every linear layer whose GGUF tensors are all Q8_0, or all Q4_0 / Q4_1 (a tied
    head from a packed token_embd, whose float copy still serves the lookup); the GGUF names it consumed."""
    cfg = net.config
    found: dict[str, list[tuple[int, str, gguf.Packed]]] = defaultdict(list)
    for name, target, p in gguf.iter_hf_packed(path, reader, cfg.arch, cfg.num_heads, cfg.num_kv_heads):
        where = _module_of(net, target)
        if where is not None:
            found[where[0]].append((where[1], name, p))
    used: set[str] = set()
    for module, parts in found.items():
        parts.sort(key=lambda part: part[0])
        if len(parts) != FUSED_PARTS.get(module.rpartition(".")[2], 1):
            continue  # some rows are in a type that does not map: the whole layer stays float
        bufs = _concat([p for _, _, p in parts])
        if bufs is not None:
            swap_in(net, module, bufs, str(path))
            used |= {name for _, name, _ in parts if name != "token_embd.weight"}
    return used
