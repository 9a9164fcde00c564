"""Read GGUF files: metadata as Python values, tensors dequantized to torch (via the gguf package)."""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from ember.errors import ModelLoadError

# Tensor types ember dequantizes; the gguf package does the bit-unpacking.
SUPPORTED_TYPES = (
    "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K",
)
# GGUF value types -> numpy dtypes (8 = string and 9 = array are handled apart).
_SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8",
            11: "<i8", 12: "<f8"}
_U64 = struct.Struct("<Q")


@dataclass
class TensorInfo:
    name: str
    type_id: int
    shape: tuple[int, ...]  # slowest-varying first (torch order)
    data: np.ndarray  # raw bytes of the tensor, a view of the memory-mapped file

    @property
    def type_name(self) -> str:
        import gguf

        try:
            return gguf.GGMLQuantizationType(self.type_id).name
        except ValueError:
            return f"unknown type {self.type_id}"


@dataclass
class GGUFFile:
    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: list[TensorInfo]


class _Cursor:
    """Sequential little-endian reader over the file's bytes; overruns raise ModelLoadError."""

    def __init__(self, buf: np.ndarray, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise ModelLoadError(f"{self.path}: GGUF header is truncated or corrupt (read past the end "
                                 f"at byte {self.pos}); re-download or re-convert the file")
        out = memoryview(self.buf[self.pos:self.pos + n])
        self.pos += n
        return out

    def scalar(self, fmt: str) -> Any:
        return np.frombuffer(self.take(np.dtype(fmt).itemsize), dtype=fmt)[0].item()

    def string(self) -> str:
        return bytes(self.take(self.scalar("<u8"))).decode("utf-8", errors="replace")

    def strings(self, count: int) -> list[str]:
        """A string array in one tight loop (a vocabulary holds 100k+ strings)."""
        data, pos, end, out = memoryview(self.buf), self.pos, len(self.buf), []
        try:
            for _ in range(count):
                (n,) = _U64.unpack_from(data, pos)
                pos += 8
                if pos + n > end:
                    raise struct.error
                out.append(str(data[pos:pos + n], "utf-8", "replace"))
                pos += n
        except struct.error:
            raise ModelLoadError(f"{self.path}: GGUF header is truncated or corrupt (read past the end "
                                 f"at byte {pos}); re-download or re-convert the file") from None
        self.pos = pos
        return out

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == 8:
            return self.string()
        if vtype == 9:
            etype, count = self.scalar("<u4"), self.scalar("<u8")
            if etype in _SCALARS:
                dt = np.dtype(_SCALARS[etype])
                return np.frombuffer(self.take(dt.itemsize * count), dtype=dt).tolist()
            if etype == 8:
                return self.strings(count)
            return [self.value(etype) for _ in range(count)]
        raise ModelLoadError(f"{self.path}: unknown GGUF value type {vtype} at byte {self.pos}")


def open_reader(path: str | Path) -> GGUFFile:
    """Parse a GGUF header and tensor table (data stays memory-mapped)."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such file (expected a .gguf model file)")
    buf = np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size else np.zeros(0, np.uint8)
    if bytes(buf[:4]) != b"GGUF":
        raise ModelLoadError(
            f"{path}: not a GGUF file (first bytes {bytes(buf[:4])!r}, expected b'GGUF'); "
            "give a .gguf file, a Hugging Face model folder or a known model name")
    cur = _Cursor(buf, path)
    cur.take(4)
    version = cur.scalar("<u4")
    if version not in (2, 3):
        raise ModelLoadError(f"{path}: GGUF version {version} is not supported (ember reads versions 2 and 3)")
    n_tensors, n_kv = cur.scalar("<u8"), cur.scalar("<u8")
    meta = {}
    for _ in range(n_kv):
        key = cur.string()
        meta[key] = cur.value(cur.scalar("<u4"))
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        dims = [cur.scalar("<u8") for _ in range(cur.scalar("<u4"))]
        infos.append((name, dims, cur.scalar("<u4"), cur.scalar("<u8")))
    align = int(meta.get("general.alignment", 32))
    start = -(-cur.pos // align) * align
    tensors = [_tensor(path, buf, start, *info) for info in infos]
    return GGUFFile(path, version, meta, tensors)


def _tensor(path: Path, buf: np.ndarray, start: int, name: str, dims: list[int], type_id: int,
            offset: int) -> TensorInfo:
    import gguf

    shape = tuple(int(d) for d in reversed(dims))
    try:
        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(type_id)]
    except (ValueError, KeyError):
        raise ModelLoadError(f"{path}: tensor {name} has unknown type id {type_id}; "
                             f"supported: {', '.join(SUPPORTED_TYPES)}") from None
    n = int(np.prod(shape)) if shape else 1
    nbytes = n // block * type_size
    lo = start + offset
    if lo + nbytes > len(buf):
        raise ModelLoadError(f"{path}: tensor {name} runs past the end of the file "
                             "(the file is truncated; re-download it)")
    return TensorInfo(name, type_id, shape, buf[lo:lo + nbytes])


def check_tensor_types(reader: GGUFFile) -> None:
    """Fail before any work if a tensor uses a type ember cannot dequantize."""
    bad = sorted({t.type_name for t in reader.tensors} - set(SUPPORTED_TYPES))
    if bad:
        raise ModelLoadError(f"{reader.path}: tensor type(s) {', '.join(bad)} cannot be loaded; "
                             f"supported: {', '.join(SUPPORTED_TYPES)}; re-quantize the model to one of these")


def read_metadata(path: str | Path, reader: GGUFFile | None = None) -> dict[str, Any]:
    """Every key/value of a GGUF header as plain Python values (lists, str, int, float, bool)."""
    return (reader or open_reader(path)).metadata


def _dequantize(t: TensorInfo) -> np.ndarray:
    import gguf

    name = t.type_name
    if name not in SUPPORTED_TYPES:
        raise ModelLoadError(f"tensor {t.name} has type {name}, which ember cannot load; "
                             f"supported: {', '.join(SUPPORTED_TYPES)}")
    if name == "F32":
        arr = t.data.view(np.float32).copy()
    elif name == "F16":
        arr = t.data.view(np.float16).astype(np.float32)
    else:
        rows = t.data.reshape(-1, t.data.size // (int(np.prod(t.shape[:-1])) if len(t.shape) > 1 else 1))
        arr = gguf.quants.dequantize(rows, gguf.GGMLQuantizationType(t.type_id)).astype(np.float32, copy=False)
    return arr.reshape(t.shape)


def iter_tensors(path: str | Path, reader: GGUFFile | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (gguf tensor name, float32 tensor) for every tensor in the file."""
    reader = reader or open_reader(path)
    for t in reader.tensors:
        try:
            arr = _dequantize(t)
        except ModelLoadError as e:
            raise ModelLoadError(f"{path}: {e}") from None
        except Exception as e:
            raise ModelLoadError(f"{path}: tensor {t.name} is corrupt ({type(e).__name__}: {e})") from None
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


def iter_hf_tensors(path: str | Path, reader: GGUFFile, arch: str, n_head: int, n_kv_head: int
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """GGUF tensors renamed to Hugging Face names, with llama.cpp's Q/K permutation undone."""
    for name, tensor in iter_tensors(path, reader):
        target = hf_name(name)
        if target is None:
            raise ModelLoadError(f"{path}: unknown tensor {name!r} for architecture {arch!r}")
        if arch in ("llama", "mistral"):
            if ".q_proj." in target:
                tensor = unpermute_qk(tensor, n_head)
            elif ".k_proj." in target:
                tensor = unpermute_qk(tensor, n_kv_head)
        yield target, tensor
