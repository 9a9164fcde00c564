"""The compressed-model folder's weights: float tensors under Hugging Face names plus packed QuantLinear
buffers under fused module names, written from and read back into a LlamaModel bit for bit."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import torch

from ember.config import ModelConfig
from ember.errors import ModelLoadError
from ember.loading.values import FIX, foreign_errors, read_json_object, show
from ember.models.llama import LlamaModel
from ember.models.packed import swap_in
from ember.ops.quant import QuantLinear

MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
QUANT_BUFFERS = ("qweight", "scales", "mins")
FORMAT, FORMAT_VERSIONS = "ember-compressed", (1,)


def is_compressed(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST).is_file()


def read_manifest(folder: Path) -> dict[str, Any]:
    """manifest.json: a JSON object in a format version this ember reads."""
    path = folder / MANIFEST
    manifest = read_json_object(path)
    if manifest.get("format") != FORMAT:
        raise ModelLoadError(f"{path}: format must be {FORMAT!r}, found {show(manifest.get('format'))}; {FIX}")
    if manifest.get("format_version") not in FORMAT_VERSIONS:
        raise ModelLoadError(f"{path}: format_version {show(manifest.get('format_version'))} is not supported "
                             f"(this ember reads {', '.join(map(str, FORMAT_VERSIONS))}); update ember or re-run "
                             "`ember compress`")
    return manifest


def _hf_name(name: str) -> str:
    return name if name.startswith("lm_head") else f"model.{name}"


def _unfused(model: LlamaModel, name: str, t: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """A fused q|k|v or gate|up tensor (weight rows or bias) as its Hugging Face parts."""
    if ".qkv_proj." in name:
        attn = model.layers[0].self_attn
        parts = zip(("q_proj", "k_proj", "v_proj"), t.split([attn.q_size, attn.kv_size, attn.kv_size]))
        yield from ((name.replace("qkv_proj", p), x) for p, x in parts)
    elif ".gate_up_proj." in name:
        yield from ((name.replace("gate_up_proj", p), x) for p, x in zip(("gate_proj", "up_proj"), t.chunk(2)))
    else:
        yield name, t


def checkpoint_tensors(model: LlamaModel, float_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The model as named tensors: QuantLinear buffers as they are, under fused module names; float
    parameters under Hugging Face names (q/k/v and gate/up split) in float_dtype, except QuantLinear
    biases, which stay float32 as QuantLinear computes."""
    out: dict[str, torch.Tensor] = {}
    quant = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            for b in QUANT_BUFFERS:
                if getattr(module, b) is not None:
                    out[_hf_name(f"{name}.{b}")] = getattr(module, b)
    for name, p in model.named_parameters():
        dtype = torch.float32 if name.rsplit(".", 1)[0] in quant else float_dtype
        for part, t in _unfused(model, name, p.data):
            out[_hf_name(part)] = t.to(dtype, copy=True)  # own storage: safetensors refuses shared views
    return {k: v.contiguous() for k, v in out.items()}


def save_weights(model: LlamaModel, path: Path, float_dtype: torch.dtype = torch.float32,
                 extra: dict[str, torch.Tensor] | None = None) -> None:
    from safetensors.torch import save_file

    save_file({**checkpoint_tensors(model, float_dtype), **(extra or {})}, str(path), metadata={"format": "pt"})


def load_compressed(folder: Path, config: ModelConfig, dtype: torch.dtype,
                    max_positions: int | None = None) -> LlamaModel:
    """Build the model, swap in QuantLinear modules for every packed layer in the folder's weights file
    and load them as stored (no re-quantization); float tensors are loaded by name and cast to dtype.
    QuantLinear buffers and biases stay float32, as QuantLinear computes in float32."""
    from safetensors.torch import load_file

    path = folder / WEIGHTS
    with foreign_errors(path, "unreadable compressed weights"):
        tensors = load_file(str(path))
    net = LlamaModel(config, max_positions).to(dtype)
    for prefix in sorted(k.removesuffix(".qweight") for k in tensors if k.endswith(".qweight")):
        swap_in(net, prefix.removeprefix("model."), {b: tensors.pop(f"{prefix}.{b}", None) for b in QUANT_BUFFERS},
                 str(path))
    net.load_weights(tensors.items(), str(path))
    return net.eval()
