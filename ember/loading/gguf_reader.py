"""The GGUF header and tensor table, read in bulk with struct over the memory-mapped file and checked field by
field as llama.cpp's gguf.cpp checks them: a crafted header fails at once, never after a long crawl."""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ember.errors import ModelLoadError

MAX_DIMS, MAX_NAME = 4, 64  # GGML_MAX_DIMS; GGML_MAX_NAME (names are shorter)
DEFAULT_ALIGNMENT = 32
# The smallest key/value (empty key, type, one-byte value) and tensor entry (empty name, no dims, type, offset):
# counts that could not fit in what is left of the file are refused before the first is read.
_MIN_KV, _MIN_TENSOR = 8 + 4 + 1, 8 + 4 + 4 + 8
# Array values become Python lists, ~8x the bytes they take in the file: all arrays together may hold this many
# values (the largest vocabularies need about 1M: tokens, scores, types and merges of 256k each).
MAX_ARRAY_VALUES = 1 << 23
_STRING, _ARRAY, _U32_TYPE = 8, 9, 4
# GGUF scalar value types -> little-endian struct/numpy formats.
_FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_SCALARS = {t: struct.Struct(f) for t, f in _FMT.items()}
_U32, _U64, _TYPE_OFFSET = struct.Struct("<I"), struct.Struct("<Q"), struct.Struct("<IQ")
_DIMS = [struct.Struct(f"<{n}Q") for n in range(MAX_DIMS + 1)]
_FIX = "re-download or re-convert the file"


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
    """Position in the file's bytes; every read is bounded by what is left."""

    def __init__(self, buf: np.ndarray, path: Path) -> None:
        self.buf, self.mv, self.pos, self.end, self.path = buf, memoryview(buf), 0, len(buf), path
        self.array_values = 0

    def corrupt(self, problem: str) -> ModelLoadError:
        return ModelLoadError(f"{self.path}: {problem} (GGUF header, byte {self.pos}); the file is corrupt: {_FIX}")

    def need(self, n: int, what: str) -> None:
        if n > self.end - self.pos:
            raise ModelLoadError(f"{self.path}: GGUF header is truncated or corrupt: {what} at byte {self.pos} needs "
                                 f"{n} bytes, {self.end - self.pos} bytes left; {_FIX}")

    def scalar(self, st: struct.Struct, what: str) -> Any:
        self.need(st.size, what)
        (value,) = st.unpack_from(self.mv, self.pos)
        self.pos += st.size
        return value

    def raw_string(self, what: str) -> memoryview:
        n = self.scalar(_U64, what)
        self.need(n, f"{what}: string of {n} bytes")
        self.pos += n
        return self.mv[self.pos - n:self.pos]

    def name(self, what: str) -> str:
        raw = self.raw_string(what)
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError:
            raise self.corrupt(f"{what} name {bytes(raw[:40])!r} is not valid UTF-8") from None

    def strings(self, count: int, key: str) -> list[str]:
        """A string array in one tight loop (a vocabulary holds 100k+ strings)."""
        mv, pos, end, unpack, out = self.mv, self.pos, self.end, _U64.unpack_from, []
        for i in range(count):
            if end - pos < 8:
                self.pos = pos
                self.need(8, f"{key}: string {i}")
            n = unpack(mv, pos)[0]
            if n > end - pos - 8:
                self.pos = pos + 8
                self.need(n, f"{key}: string {i} of {n} bytes")
            out.append(str(mv[pos + 8:pos + 8 + n], "utf-8", "replace"))
            pos += 8 + n
        self.pos = pos
        return out


def open_reader(path: str | Path) -> GGUFFile:
    """Parse and check a GGUF header and tensor table (data stays memory-mapped)."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such file (expected a .gguf model file)")
    buf = np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size else np.zeros(0, np.uint8)
    if bytes(buf[:4]) != b"GGUF":
        raise ModelLoadError(
            f"{path}: not a GGUF file (first bytes {bytes(buf[:4])!r}, expected b'GGUF'); "
            "give a .gguf file, a Hugging Face model folder or a known model name")
    cur = _Cursor(buf, path)
    cur.pos = 4
    version = _version(cur, cur.scalar(_U32, "version"))
    n_tensors, n_kv = cur.scalar(_U64, "tensor count"), cur.scalar(_U64, "key/value count")
    if n_kv * _MIN_KV + n_tensors * _MIN_TENSOR > cur.end - cur.pos:
        raise cur.corrupt(f"tensor count {n_tensors} and key/value count {n_kv} are more than a file of "
                          f"{cur.end} bytes can hold")
    meta, types = _read_kvs(cur, n_kv)
    align = _alignment(cur, meta, types)
    table = _read_tensor_table(cur, n_tensors)
    start = -(-cur.pos // align) * align
    return GGUFFile(path, version, meta, _lay_out(cur, table, start, align))


def _version(cur: _Cursor, version: int) -> int:
    if version & 0xFFFF == 0 and version:
        raise cur.corrupt(f"GGUF version field reads {version}: this looks like a big-endian file, which ember "
                          "cannot read (convert the model on a little-endian machine)")
    if version not in (2, 3):
        raise ModelLoadError(f"{cur.path}: GGUF version {version} is not supported (ember reads versions 2 and 3)")
    return version


def _read_kvs(cur: _Cursor, n_kv: int) -> tuple[dict[str, Any], dict[str, int]]:
    meta: dict[str, Any] = {}
    types: dict[str, int] = {}
    for i in range(n_kv):
        key = cur.name(f"key {i}")
        if key in meta:
            raise cur.corrupt(f"key {key!r} appears twice")
        types[key] = cur.scalar(_U32, key)
        meta[key] = _read_value(cur, key, types[key])
    return meta, types


def _read_value(cur: _Cursor, key: str, vtype: int) -> Any:
    if vtype in _SCALARS:
        return cur.scalar(_SCALARS[vtype], key)
    if vtype == _STRING:
        return str(cur.raw_string(key), "utf-8", "replace")
    if vtype != _ARRAY:
        raise cur.corrupt(f"{key}: unknown GGUF value type {vtype}")
    etype, count = cur.scalar(_U32, key), cur.scalar(_U64, key)
    if etype != _STRING and etype not in _SCALARS:
        kind = "arrays of arrays are not valid GGUF (llama.cpp refuses them too)" if etype == _ARRAY else \
            f"unknown array element type {etype}"
        raise cur.corrupt(f"{key}: {kind}")
    size = 8 if etype == _STRING else _SCALARS[etype].size  # a string takes at least its length
    cur.need(count * size, f"{key}: array of {count} {'strings' if etype == _STRING else 'values'}")
    cur.array_values += count
    if cur.array_values > MAX_ARRAY_VALUES:
        raise cur.corrupt(f"{key}: array of {count} values takes the header's arrays past {MAX_ARRAY_VALUES} values "
                          "in all, far beyond any vocabulary")
    if etype == _STRING:
        return cur.strings(count, key)
    values = np.frombuffer(cur.mv, dtype=_FMT[etype], count=count, offset=cur.pos).tolist()
    cur.pos += count * size
    return values


def _alignment(cur: _Cursor, meta: dict[str, Any], types: dict[str, int]) -> int:
    """general.alignment: a uint32 power of two, as gguf.cpp requires (else tensors are read at wrong offsets)."""
    if "general.alignment" not in meta:
        return DEFAULT_ALIGNMENT
    align = meta["general.alignment"]
    if types["general.alignment"] != _U32_TYPE:
        raise cur.corrupt(f"general.alignment must be a uint32 (GGUF type 4), found type {types['general.alignment']} "
                          f"value {str(align)[:40]!r}")
    if align == 0 or align & (align - 1):
        raise cur.corrupt(f"general.alignment is {align}; it must be a power of two")
    return align


def _read_tensor_table(cur: _Cursor, n: int) -> list[tuple[str, tuple[int, ...], int, int]]:
    """(name, dims fastest-first, type id, offset) per tensor, names unique, dims in range."""
    table, seen = [], set()
    for i in range(n):
        name = cur.name(f"tensor {i}")
        if len(name.encode()) >= MAX_NAME:
            raise cur.corrupt(f"tensor {i} has a name of {len(name.encode())} bytes; GGUF allows {MAX_NAME - 1}")
        if name in seen:
            raise cur.corrupt(f"tensor {name!r} appears twice")
        seen.add(name)
        n_dims = cur.scalar(_U32, name)
        if n_dims > MAX_DIMS:
            raise cur.corrupt(f"tensor {name!r} has {n_dims} dimensions; GGUF allows at most {MAX_DIMS}")
        cur.need(_DIMS[n_dims].size + _TYPE_OFFSET.size, f"tensor {name!r}")
        dims = _DIMS[n_dims].unpack_from(cur.mv, cur.pos)
        type_id, offset = _TYPE_OFFSET.unpack_from(cur.mv, cur.pos + _DIMS[n_dims].size)
        bad = next((j for j, d in enumerate(dims) if not 1 <= d < 1 << 63), None)
        if bad is not None:
            raise cur.corrupt(f"tensor {name!r}: dimension {bad} is {dims[bad]}; it must be in [1, 2^63)")
        cur.pos += _DIMS[n_dims].size + _TYPE_OFFSET.size
        table.append((name, dims, type_id, offset))
    return table


def _lay_out(cur: _Cursor, table: list[tuple[str, tuple[int, ...], int, int]], start: int, align: int
             ) -> list[TensorInfo]:
    """Each tensor's bytes: stored in table order from the data section's start, each padded to the alignment
    (gguf.cpp refuses any other offset), whole blocks per row, all inside the file."""
    import gguf

    out, expected = [], 0
    for name, dims, type_id, offset in table:
        try:
            qtype = gguf.GGMLQuantizationType(type_id)
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise cur.corrupt(f"tensor {name!r} has unknown type id {type_id}") from None
        if dims and dims[0] % block:
            raise cur.corrupt(f"tensor {name!r}: rows of {dims[0]} elements are not a whole number of "
                              f"{qtype.name} blocks ({block} elements)")
        if offset != expected:
            raise cur.corrupt(f"tensor {name!r} has offset {offset}, expected {expected} (tensors are stored in "
                              f"table order, each padded to {align} bytes)")
        nbytes = math.prod(dims) // block * type_size
        lo = start + offset
        if lo + nbytes > cur.end:
            raise ModelLoadError(f"{cur.path}: tensor {name} runs past the end of the file "
                                 "(the file is truncated; re-download it)")
        out.append(TensorInfo(name, type_id, tuple(reversed(dims)), cur.buf[lo:lo + nbytes]))
        expected += -(-nbytes // align) * align
    return out
