"""Structure-aware GGUF mutations: header values of every type, counts, dims, tensor types, offsets,
alignment, names, vocabularies and templates -- then bit flips, field patches and truncation of the bytes."""
from __future__ import annotations

import copy
import math
import random
import struct
from typing import Any, Callable

from tests.reliability.gguf_bytes import (
    ARRAY, BOOL, F32, F64, I8, I16, I32, I64, KV, STRING, U8, U16, U32, U64, GGUFSpec, Tensor)

INTS = [0, 1, 2, 3, 4, 5, 7, 8, 16, 31, 32, 33, 63, 64, 65, 127, 128, 255, 256, 1023, 1024, 1025, 4096, 65535,
        65536, 1 << 24, (1 << 24) + 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1, -1, -2,
        -(2**31), -(2**63)]
FLOATS = [0.0, -0.0, 1.0, -1.0, 0.5, 2.0, 1e-5, 1e-12, 1e-30, 1e-45, 1e30, 3.4e38, math.nan, math.inf, -math.inf,
          10000.0, 1e12, 1e13, 8.0]
STRINGS = ["", "x", "llama", "qwen2", "mistral", "gpt2", "linear", "yarn", "none", "llama3", "smollm", "a b",
           "{% for %}", "{{ x", "{{ bos_token }}", "{% if messages %}ok{% endif %}", "\u2581", "<|im_end|>", "a" * 300]
# Keys ember reads, so a mutation can add the ones the seed lacks.
KEYS = ["general.architecture", "general.alignment", "general.name", "block_count", "context_length",
        "embedding_length", "feed_forward_length", "attention.head_count", "attention.head_count_kv",
        "attention.key_length", "rope.dimension_count", "rope.freq_base", "attention.layer_norm_rms_epsilon",
        "vocab_size", "attention.sliding_window", "rope.scaling.type", "rope.scaling.factor",
        "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
        "tokenizer.ggml.scores", "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id",
        "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token", "tokenizer.ggml.add_space_prefix",
        "tokenizer.chat_template"]
TENSOR_NAMES = ["token_embd.weight", "output.weight", "output_norm.weight", "rope_freqs.weight", "blk.0.attn_q.weight",
                "blk.1.ffn_up.weight", "blk.2.attn_norm.weight", "blk.9.attn_k.bias", "blk.0.attn_q.bias",
                "blk.0.ffn_gate.weight", "blk.x.attn_q.weight", "blk.0.attn_q", "unknown.weight", "x" * 70]
# Replacement entries for arrays, by element type (strings: vocabulary pieces and broken merges).
_ENTRIES = {STRING: ["", " ", "a b", "zz", "ab", "\u0120 a", "a  b", "<|im_end|>", "\u2581a"],
            F32: [math.nan, math.inf, -1e30, 0.0, 1.0], I32: [0, 1, 2, 3, 4, 5, 6, 7, -1, 2**31 - 1],
            BOOL: [True, False]}
_BITS = {U8: (8, False), I8: (8, True), U16: (16, False), I16: (16, True), U32: (32, False), I32: (32, True),
         U64: (64, False), I64: (64, True)}


def fit_int(value: int, vtype: int) -> int:
    """value wrapped into the range of an integer GGUF type (as a writer with a bug would store it)."""
    bits, signed = _BITS[vtype]
    value %= 1 << bits
    return value - (1 << bits) if signed and value >= 1 << (bits - 1) else value


def fit_float(value: float, vtype: int) -> float:
    return value if vtype == F64 or not math.isfinite(value) or abs(value) < 3.4e38 else math.copysign(math.inf, value)


def typed_value(rng: random.Random, vtype: int | None = None) -> tuple[int, Any, int | None]:
    """(type, value, element type) of a random GGUF value, of the given type if any."""
    if vtype is None:
        vtype = rng.choice([U8, I8, U16, I16, U32, I32, U64, I64, F32, F64, BOOL, STRING, ARRAY])
    if vtype in _BITS:
        return vtype, fit_int(rng.choice(INTS) + rng.choice([0, 0, 0, 1, -1]), vtype), None
    if vtype in (F32, F64):
        return vtype, fit_float(rng.choice(FLOATS), vtype), None
    if vtype == BOOL:
        return vtype, rng.random() < 0.5, None
    if vtype == STRING:
        return vtype, rng.choice(STRINGS), None
    etype = rng.choice([U8, I32, U32, F32, STRING, BOOL, ARRAY])
    if etype == ARRAY:  # nested arrays, which GGUF readers must refuse
        return vtype, [(I32, [1, 2])] * rng.randint(0, 3), etype
    return vtype, [typed_value(rng, etype)[1] for _ in range(rng.choice([0, 1, 2, 3, 16, 17, 40]))], etype


def _kv(rng: random.Random, spec: GGUFSpec) -> KV:
    return rng.choice(spec.kvs)


def _arch(spec: GGUFSpec) -> str:
    return next((k.value for k in spec.kvs if k.key == "general.architecture" and isinstance(k.value, str)), "llama")


def set_same_type(rng: random.Random, spec: GGUFSpec) -> None:
    kv = _kv(rng, spec)
    if kv.vtype == ARRAY:
        mutate_list(rng, kv)
    else:
        kv.vtype, kv.value, kv.etype = typed_value(rng, kv.vtype)


def set_any_type(rng: random.Random, spec: GGUFSpec) -> None:
    key = rng.choice(KEYS)
    key = key if key.startswith(("general.", "tokenizer.")) else f"{_arch(spec)}.{key}"
    existing = [k for k in spec.kvs if k.key == key]
    target = existing[0] if existing else _kv(rng, spec) if rng.random() < 0.5 else None
    vtype, value, etype = typed_value(rng)
    if target is not None:
        target.vtype, target.value, target.etype = vtype, value, etype
    else:
        spec.kvs.insert(rng.randrange(len(spec.kvs) + 1), KV(key, vtype, value, etype))


def set_known_key(rng: random.Random, spec: GGUFSpec) -> None:
    """A key ember reads, set to an interesting value of a plausible type."""
    key = rng.choice(KEYS)
    key = key if key.startswith(("general.", "tokenizer.")) else f"{_arch(spec)}.{key}"
    vtype = rng.choice([U32, U32, I32, U64, F32, STRING])
    _, value, _ = typed_value(rng, vtype)
    spec.drop(key)
    spec.kvs.append(KV(key, vtype, value))


def mutate_list(rng: random.Random, kv: KV) -> None:
    """Edit one entry of an array value: drop, duplicate, empty, retype or append."""
    values = list(kv.value)
    op = rng.randrange(6)
    i = rng.randrange(len(values)) if values else 0
    if op == 0 and values:
        del values[i]
    elif op == 1 and values:
        values.insert(i, values[i])
    elif op == 2 and values:
        values[i] = rng.choice(_ENTRIES.get(kv.etype, _ENTRIES[I32]))
    elif op == 3:
        values.append(values[-1] if values else "z")
    elif op == 4:
        rng.shuffle(values)
    else:
        values = values[:rng.randrange(len(values) + 1)]
    kv.value = values


def drop_or_duplicate_kv(rng: random.Random, spec: GGUFSpec) -> None:
    kv = _kv(rng, spec)
    if rng.random() < 0.5:
        spec.kvs.remove(kv)
    else:
        spec.kvs.append(copy.deepcopy(kv))


def tensor_dims(rng: random.Random, spec: GGUFSpec) -> None:
    t = rng.choice(spec.tensors)
    op = rng.randrange(4)
    if op == 0 and t.dims:
        t.dims[rng.randrange(len(t.dims))] = rng.choice(INTS + [16, 32, 48, 64, 96])
    elif op == 1:
        t.dims = list(reversed(t.dims))  # transposed: same bytes, wrong shape
    elif op == 2:
        t.dims = t.dims + [rng.choice([1, 2, 32])] if rng.random() < 0.5 else t.dims[:-1]
    else:
        t.dims = [rng.choice([0, 1, 2, 32, 64]) for _ in range(rng.choice([0, 1, 2, 3, 4, 5]))]


def tensor_type(rng: random.Random, spec: GGUFSpec) -> None:
    rng.choice(spec.tensors).ttype = rng.choice([0, 1, 2, 3, 6, 7, 8, 9, 10, 12, 14, 15, 16, 24, 26, 28, 30, 31, 39,
                                                 41, 42, 99, 2**31, 2**32 - 1])


def tensor_offset(rng: random.Random, spec: GGUFSpec) -> None:
    rng.choice(spec.tensors).offset = rng.choice(INTS[:20] + [2**62, 2**64 - 1, 4096 * 3])


def tensor_name(rng: random.Random, spec: GGUFSpec) -> None:
    t = rng.choice(spec.tensors)
    op = rng.randrange(3)
    if op == 0:
        t.name = rng.choice(spec.tensors).name
    elif op == 1:
        t.name = rng.choice(TENSOR_NAMES)
    else:
        t.name = t.name.replace(".0.", f".{rng.choice([1, 2, 3, 9, 1023, -1])}.")


def tensor_list(rng: random.Random, spec: GGUFSpec) -> None:
    op = rng.randrange(5)
    i = rng.randrange(len(spec.tensors)) if spec.tensors else 0
    if op == 0 and spec.tensors:
        del spec.tensors[i]
    elif op == 1 and spec.tensors:
        spec.tensors.insert(i, copy.deepcopy(spec.tensors[i]))
    elif op == 2:
        rng.shuffle(spec.tensors)
    elif op == 3 and spec.tensors:
        t = spec.tensors[i]
        t.data = t.data[:rng.randrange(len(t.data) + 1)]
    else:
        n = rng.choice([1, 3, 4, 8])
        data = struct.pack(f"<{n}f", *[rng.choice([1.0, 0.0, -1.0, math.nan, math.inf]) for _ in range(n)])
        spec.tensors.append(Tensor("rope_freqs.weight", [n], 0, data))


def alignment(rng: random.Random, spec: GGUFSpec) -> None:
    value = rng.choice([1, 2, 3, 7, 8, 16, 32, 64, 4096, 0, 2**31])
    if rng.random() < 0.7:
        spec.alignment = min(max(value, 1), 4096)  # the layout itself stays small
    vtype = rng.choice([U32, U32, U32, U64, I32, F32, STRING])
    spec.set("general.alignment", str(value) if vtype == STRING else float(value) if vtype == F32 else
             fit_int(value, vtype), vtype)


def counts_and_version(rng: random.Random, spec: GGUFSpec) -> None:
    op = rng.randrange(3)
    if op == 0:
        spec.n_tensors = max(0, len(spec.tensors) + rng.choice([-1, 1, 2, 1 << 20, 1 << 40, 2**64 - 1]))
    elif op == 1:
        spec.n_kv = max(0, len(spec.kvs) + rng.choice([-1, 1, 2, 1 << 20, 1 << 40, 2**64 - 1]))
    else:
        spec.version = rng.choice([0, 1, 2, 4, 3 << 24, 2**32 - 1])


def tokenizer(rng: random.Random, spec: GGUFSpec) -> None:
    """Vocabulary-level edits: tokens, types, scores, merges, special ids, template."""
    kvs = [k for k in spec.kvs if k.key.startswith("tokenizer.")]
    if not kvs:
        return
    kv = rng.choice(kvs)
    if kv.vtype == ARRAY:
        mutate_list(rng, kv)
    elif kv.key.endswith("_token_id"):
        kv.value = fit_int(rng.choice([0, 1, 15, 16, 17, -1, 2**31]), kv.vtype) if kv.vtype in _BITS else kv.value
    elif kv.vtype == STRING:
        kv.value = rng.choice(STRINGS) if rng.random() < 0.7 else kv.value[:rng.randrange(len(kv.value) + 1)]


STRUCTURAL: list[Callable[[random.Random, GGUFSpec], None]] = [
    set_same_type, set_same_type, set_any_type, set_known_key, set_known_key, drop_or_duplicate_kv, tensor_dims,
    tensor_dims, tensor_type, tensor_offset, tensor_name, tensor_list, alignment, counts_and_version, tokenizer,
    tokenizer]


def mutate_spec(rng: random.Random, spec: GGUFSpec) -> GGUFSpec:
    spec = copy.deepcopy(spec)
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        rng.choice(STRUCTURAL)(rng, spec)
    return spec


def mutate_bytes(rng: random.Random, data: bytes, spec: GGUFSpec | None) -> bytes:
    """Byte-level: patch a header field with an interesting value, flip bits, truncate or splice."""
    out = bytearray(data)
    op = rng.randrange(4)
    if op == 0 and spec is not None and spec.fields:
        f = rng.choice(spec.fields)
        if f.pos + f.size <= len(out):
            out[f.pos:f.pos + f.size] = (rng.choice(INTS) % (1 << (8 * f.size))).to_bytes(f.size, "little")
    elif op == 1 and out:
        header = spec.fields[-1].pos + 8 if spec is not None and spec.fields else len(out)
        for _ in range(rng.choice([1, 1, 2, 8])):
            out[rng.randrange(min(header, len(out)))] ^= 1 << rng.randrange(8)
    elif op == 2:
        del out[rng.randrange(len(out) + 1):]
    elif out:
        i = rng.randrange(len(out))
        out[i:i] = bytes(rng.randrange(256) for _ in range(rng.choice([1, 4, 8])))
    return bytes(out)
