"""Read GGUF files: metadata as Python values, tensors dequantized to torch (via the gguf package) or, for
Q8_0 / Q4_0 / Q4_1, re-laid out bit for bit as ember's packed int8 / int4 buffers."""
from __future__ import annotations

from pathlib import Path
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

from ember.errors import ModelLoadError
from ember.loading.gguf_reader import GGUFFile, TensorInfo, open_reader
from ember.loading.values import foreign_errors

__all__ = ["GGUFFile", "TensorInfo", "open_reader"]  # the reader's names, where callers import them

# Tensor types ember dequantizes; the gguf package does the bit-unpacking.
SUPPORTED_TYPES = (
    "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K",
)


def check_tensor_types(reader: GGUFFile) -> None:
    """Fail before any work if a tensor uses a type ember cannot dequantize."""
    bad = sorted({t.type_name for t in reader.tensors} - set(SUPPORTED_TYPES))
    if bad:
        raise ModelLoadError(f"{reader.path}: tensor type(s) {', '.join(bad)} cannot be loaded; "
                             f"supported: {', '.join(SUPPORTED_TYPES)}; re-quantize the model to one of these")


def read_metadata(path: str | Path, reader: GGUFFile | None = None) -> dict[str, Any]:
    """Every key/value of a GGUF header as plain Python values (lists, str, int, float, bool)."""
    return (reader or open_reader(path)).metadata


def _dequantize(path: str | Path, t: TensorInfo) -> np.ndarray:
    import gguf

    name = t.type_name
    if name not in SUPPORTED_TYPES:
        raise ModelLoadError(f"{path}: tensor {t.name} has type {name}, which ember cannot load; "
                             f"supported: {', '.join(SUPPORTED_TYPES)}")
    if name == "F32":
        arr = t.data.view(np.float32).copy()
    elif name == "F16":
        arr = t.data.view(np.float16).astype(np.float32)
    else:
        rows = t.data.reshape(-1, t.data.size // (int(np.prod(t.shape[:-1])) if len(t.shape) > 1 else 1))
        arr = gguf.quants.dequantize(rows, gguf.GGMLQuantizationType(t.type_id)).astype(np.float32, copy=False)
    return arr.reshape(t.shape)


def iter_tensors(path: str | Path, reader: GGUFFile | None = None, skip: set[str] | None = None
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (gguf tensor name, float32 tensor) for every tensor in the file but those named in skip."""
    reader = reader or open_reader(path)
    for t in reader.tensors:
        if skip and t.name in skip:
            continue
        with foreign_errors(path, f"tensor {t.name} is corrupt"):
            arr = _dequantize(path, t)
        yield t.name, torch.from_numpy(np.ascontiguousarray(arr))


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation so standard (half-split) rotary embeddings apply."""
    rows, dim = w.shape[0], w.shape[-1] if w.dim() > 1 else 1
    hd = rows // n_head
    if w.dim() == 1:
        return w.reshape(n_head, hd // 2, 2).transpose(1, 2).reshape(rows)
    return w.reshape(n_head, hd // 2, 2, dim).transpose(1, 2).reshape(rows, dim)


_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight",
              "output.weight": "lm_head.weight", "rope_freqs.weight": "rope_freqs.weight"}


def hf_name(gguf_name: str) -> str | None:
    """Map a GGUF tensor name to ember's (Hugging Face-style) parameter name; None if unknown."""
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    return None


def tensor_names(reader: GGUFFile) -> list[str]:
    return [t.name for t in reader.tensors]


def _hf_target(path: str | Path, name: str, arch: str) -> str:
    target = hf_name(name)
    if target is None:
        raise ModelLoadError(f"{path}: unknown tensor {name!r} for architecture {arch!r}")
    return target


def hf_shapes(reader: GGUFFile, arch: str) -> list[tuple[str, tuple[int, ...]]]:
    """(Hugging Face name, shape) of every tensor, from the table alone (no data is read)."""
    return [(_hf_target(reader.path, t.name, arch), t.shape) for t in reader.tensors]


# Block layouts (ggml-common.h): a float16 scale d (and min m), then 32 codes. Q4 codes are two per byte, byte j
# holding element j (low nibble) and j + 16 (high): the layout of ember's pack_int4.
_BLOCKS = {
    "Q8_0": np.dtype([("d", "<f2"), ("qs", "i1", 32)]),        # w = d * q
    "Q4_0": np.dtype([("d", "<f2"), ("qs", "u1", 16)]),        # w = d * (q - 8)
    "Q4_1": np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", 16)]),  # w = d * q + m
}
PACKED_TYPES = tuple(_BLOCKS)


@dataclass
class Packed:
    """A GGUF tensor as QuantLinear buffers: codes [N, K] int8 or [N, K/2] uint8 (int4), scales and (int4)
    mins [N, K/32], float16 where exact, else float32."""

    qweight: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None

    @property
    def bits(self) -> int:
        return 8 if self.mins is None else 4

    def rows(self, fn: Any) -> "Packed":
        """The same weight with fn (a row permutation of a [N, ...] tensor) applied to every buffer."""
        return Packed(fn(self.qweight), fn(self.scales), None if self.mins is None else fn(self.mins))


def packed(t: TensorInfo) -> Packed | None:
    """A Q8_0 / Q4_0 / Q4_1 matrix as ember's packed buffers, the same weights exactly; None for other types, and
    for int8 codes of -128 (valid Q8_0, but outside the kernels' symmetric [-127, 127])."""
    block = _BLOCKS.get(t.type_name)
    if block is None or len(t.shape) != 2 or t.shape[1] % 32:
        return None
    n, k = t.shape
    blocks = t.data.view(block).reshape(n, k // 32)
    d = torch.from_numpy(blocks["d"].copy())
    if t.type_name == "Q8_0":
        q = torch.from_numpy(blocks["qs"].reshape(n, k).copy())
        return None if bool((q == -128).any()) else Packed(q, d, None)
    q = torch.from_numpy(blocks["qs"].reshape(n, k // 2).copy())
    if t.type_name == "Q4_1":
        return Packed(q, d, torch.from_numpy(blocks["m"].copy()))
    mins = -8 * d.float()  # Q4_0: d * (q - 8) = d * q + (-8 d), exact in float32; in float16 unless it overflows
    if bool((mins.half().float() == mins).all()):
        return Packed(q, d, mins.half())
    return Packed(q, d.float(), mins)


def iter_hf_tensors(path: str | Path, reader: GGUFFile, arch: str, n_head: int, n_kv_head: int,
                    skip: set[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """GGUF tensors (but those named in skip) dequantized to float32 and renamed to Hugging Face names, with
    llama.cpp's Q/K permutation undone."""
    for name, tensor in iter_tensors(path, reader, skip):
        target = _hf_target(path, name, arch)
        yield target, hf_rows(target, arch, n_head, n_kv_head)(tensor)


def hf_rows(target: str, arch: str, n_head: int, n_kv_head: int) -> Any:
    """The row permutation (a function of a [N, ...] tensor) that takes a GGUF tensor to Hugging Face's layout:
    llama.cpp permutes Q and K rows of Llama and Mistral models for its interleaved rotary embedding."""
    if arch in ("llama", "mistral"):
        if ".q_proj." in target:
            return lambda w: unpermute_qk(w, n_head)
        if ".k_proj." in target:
            return lambda w: unpermute_qk(w, n_kv_head)
    return lambda w: w


# Quantized types with no exact packed twin (5-bit, K-quants): int8 in groups of 32 (round-to-nearest from the
# dequantized weights) keeps them in the int kernels at a loss measured in BENCHMARKS.md.
NEAREST_INT8_TYPES = ("Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K")


def nearest_int8(path: str | Path, t: TensorInfo) -> Packed | None:
    """A 5-bit or K-quant matrix as int8 g32 buffers (not exact: see NEAREST_INT8_TYPES)."""
    from ember.ops.quant import quantize_int8

    if len(t.shape) != 2 or t.shape[1] % 32:
        return None
    q, scales = quantize_int8(torch.from_numpy(np.ascontiguousarray(_dequantize(path, t))), 32)
    return Packed(q, scales, None)


def iter_hf_packed(path: str | Path, reader: GGUFFile, arch: str, n_head: int, n_kv_head: int
                   ) -> Iterator[tuple[str, str, Packed]]:
    """(GGUF name, Hugging Face name, packed buffers) of every matrix stored quantized: exact for Q8_0 / Q4_0 /
    Q4_1, int8 g32 for the types in NEAREST_INT8_TYPES."""
    for t in reader.tensors:
        if t.type_name in PACKED_TYPES + NEAREST_INT8_TYPES:
            with foreign_errors(path, f"tensor {t.name} is corrupt"):
                p = packed(t) if t.type_name in PACKED_TYPES else nearest_int8(path, t)
            if p is not None:
                target = _hf_target(path, t.name, arch)
                yield t.name, target, p.rows(hf_rows(target, arch, n_head, n_kv_head))
