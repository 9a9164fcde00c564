"""A byte-level GGUF writer for tests: every header field settable (bad counts, types, dims, offsets),
the position of each field recorded so a fuzzer can patch it, and a tiny valid llama model as the seed."""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
_FMT = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<?", U64: "<Q",
        I64: "<q", F64: "<d"}
T_F32, T_F16, T_Q8_0 = 0, 1, 8


@dataclass
class KV:
    key: str
    vtype: int
    value: Any
    etype: int | None = None  # element type of an array


@dataclass
class Tensor:
    name: str
    dims: list[int]  # GGUF order: fastest-varying first
    ttype: int
    data: bytes
    offset: int | None = None  # None: laid out after the previous tensor, padded to the alignment


@dataclass
class Field:
    """Where a header field sits in the serialized file: kind is count, strlen, vtype, etype, ndims, dim,
    ttype, offset or value; size in bytes."""
    pos: int
    size: int
    kind: str


@dataclass
class GGUFSpec:
    kvs: list[KV]
    tensors: list[Tensor]
    version: int = 3
    alignment: int = 32  # layout of the data section (general.alignment itself is a KV)
    n_tensors: int | None = None  # overrides of the real counts
    n_kv: int | None = None
    fields: list[Field] = field(default_factory=list)

    def kv(self, key: str) -> KV:
        return next(k for k in self.kvs if k.key == key)

    def set(self, key: str, value: Any, vtype: int | None = None) -> "GGUFSpec":
        """Replace (or add) a scalar KV; the type stays unless given."""
        for k in self.kvs:
            if k.key == key:
                k.value, k.vtype, k.etype = value, k.vtype if vtype is None else vtype, None
                return self
        self.kvs.append(KV(key, U32 if vtype is None else vtype, value))
        return self

    def drop(self, key: str) -> "GGUFSpec":
        self.kvs = [k for k in self.kvs if k.key != key]
        return self

    def to_bytes(self) -> bytes:
        out = bytearray()
        self.fields = []
        _put(out, self.fields, "<4s", b"GGUF", "magic")
        _put(out, self.fields, "<I", self.version, "version")
        _put(out, self.fields, "<Q", len(self.tensors) if self.n_tensors is None else self.n_tensors, "count")
        _put(out, self.fields, "<Q", len(self.kvs) if self.n_kv is None else self.n_kv, "count")
        for kv in self.kvs:
            _string(out, self.fields, kv.key)
            _put(out, self.fields, "<I", kv.vtype, "vtype")
            _value(out, self.fields, kv.vtype, kv.value, kv.etype)
        offset = 0
        for t in self.tensors:
            _string(out, self.fields, t.name)
            _put(out, self.fields, "<I", len(t.dims), "ndims")
            for d in t.dims:
                _put(out, self.fields, "<Q", d % (1 << 64), "dim")
            _put(out, self.fields, "<I", t.ttype, "ttype")
            _put(out, self.fields, "<Q", offset if t.offset is None else t.offset, "offset")
            offset += -(-len(t.data) // self.alignment) * self.alignment
        out += bytes(-len(out) % self.alignment)
        for t in self.tensors:
            out += t.data + bytes(-len(t.data) % self.alignment)
        return bytes(out)


def _put(out: bytearray, fields: list[Field], fmt: str, value: Any, kind: str) -> None:
    fields.append(Field(len(out), struct.calcsize(fmt), kind))
    out += struct.pack(fmt, value)


def _string(out: bytearray, fields: list[Field], s: str | bytes) -> None:
    raw = s.encode() if isinstance(s, str) else s
    _put(out, fields, "<Q", len(raw), "strlen")
    out += raw


def _value(out: bytearray, fields: list[Field], vtype: int, value: Any, etype: int | None) -> None:
    if vtype == STRING:
        _string(out, fields, value)
    elif vtype == ARRAY:
        etype = etype if etype is not None else STRING if value and isinstance(value[0], str) else I32
        _put(out, fields, "<I", etype, "etype")
        _put(out, fields, "<Q", len(value), "count")
        for v in value:
            if etype == ARRAY:  # nested: value is a list of (etype, list) pairs
                _put(out, fields, "<I", v[0], "etype")
                _put(out, fields, "<Q", len(v[1]), "count")
                for x in v[1]:
                    _value(out, fields, v[0], x, None)
            else:
                _value(out, fields, etype, v, None)
    else:
        _put(out, fields, _FMT[vtype], value, "value")


# -- the seed: a complete tiny llama model with a byte-level BPE vocabulary ------------------------------

VOCAB = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "a", "b", "c", "Ġ", "ab", "Ġa", "abc", "!", "?",
         "d", "e", "Ġb", "de"]
MERGES = ["a b", "Ġ a", "ab c", "Ġ b", "d e"]
# A SentencePiece-style ("llama") vocabulary of the same size: unknown, control, normal and byte tokens.
SPM_VOCAB = ["<unk>", "<s>", "</s>", "▁", "a", "b", "c", "▁a", "ab", "▁ab", "bc", "<0x0A>", "<0xC3>", "<0xA9>",
             "d", "▁d"]
SPM_TYPES = [2, 3, 3] + [1] * 8 + [6, 6, 6] + [1, 1]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
HIDDEN, FFN, HEADS, KV_HEADS = 32, 64, 4, 2


def _f32(rng: np.random.Generator, *shape: int) -> bytes:
    return rng.standard_normal(shape).astype(np.float32).tobytes()


def _q8_0(rng: np.random.Generator, rows: int, cols: int) -> bytes:
    """Q8_0 blocks (fp16 scale + 32 int8) of random values."""
    blocks = rows * cols // 32
    scale = np.full((blocks, 1), 0.01, np.float16).view(np.uint8)
    q = rng.integers(-127, 128, (blocks, 32), dtype=np.int8).view(np.uint8)
    return np.concatenate([scale, q], axis=1).tobytes()


def _layer_tensors(rng: np.random.Generator, i: int, bias: bool) -> list[Tensor]:
    kv = KV_HEADS * (HIDDEN // HEADS)
    out = [
        Tensor(f"blk.{i}.attn_norm.weight", [HIDDEN], T_F32, _f32(rng, HIDDEN)),
        Tensor(f"blk.{i}.attn_q.weight", [HIDDEN, HIDDEN], T_Q8_0, _q8_0(rng, HIDDEN, HIDDEN)),
        Tensor(f"blk.{i}.attn_k.weight", [HIDDEN, kv], T_F16,
               rng.standard_normal(kv * HIDDEN).astype(np.float16).tobytes()),
        Tensor(f"blk.{i}.attn_v.weight", [HIDDEN, kv], T_F32, _f32(rng, kv, HIDDEN)),
        Tensor(f"blk.{i}.attn_output.weight", [HIDDEN, HIDDEN], T_F32, _f32(rng, HIDDEN, HIDDEN)),
        Tensor(f"blk.{i}.ffn_norm.weight", [HIDDEN], T_F32, _f32(rng, HIDDEN)),
        Tensor(f"blk.{i}.ffn_gate.weight", [HIDDEN, FFN], T_F32, _f32(rng, FFN, HIDDEN)),
        Tensor(f"blk.{i}.ffn_up.weight", [HIDDEN, FFN], T_Q8_0, _q8_0(rng, FFN, HIDDEN)),
        Tensor(f"blk.{i}.ffn_down.weight", [FFN, HIDDEN], T_F32, _f32(rng, HIDDEN, FFN)),
    ]
    if bias:
        out += [Tensor(f"blk.{i}.attn_{p}.bias", [n], T_F32, _f32(rng, n))
                for p, n in (("q", HIDDEN), ("k", kv), ("v", kv))]
    return out


def _tokenizer_kvs(kind: str) -> list[KV]:
    if kind == "llama":
        return [KV("tokenizer.ggml.model", STRING, "llama"),
                KV("tokenizer.ggml.tokens", ARRAY, list(SPM_VOCAB), STRING),
                KV("tokenizer.ggml.scores", ARRAY, [-float(i) for i in range(len(SPM_VOCAB))], F32),
                KV("tokenizer.ggml.token_type", ARRAY, list(SPM_TYPES), I32),
                KV("tokenizer.ggml.bos_token_id", U32, 1), KV("tokenizer.ggml.eos_token_id", U32, 2),
                KV("tokenizer.ggml.unknown_token_id", U32, 0), KV("tokenizer.ggml.add_space_prefix", BOOL, True)]
    return [KV("tokenizer.ggml.model", STRING, "gpt2"), KV("tokenizer.ggml.pre", STRING, "smollm"),
            KV("tokenizer.ggml.tokens", ARRAY, list(VOCAB), STRING),
            KV("tokenizer.ggml.token_type", ARRAY, [3, 3, 3] + [1] * (len(VOCAB) - 3), I32),
            KV("tokenizer.ggml.merges", ARRAY, list(MERGES), STRING),
            KV("tokenizer.ggml.bos_token_id", U32, 1), KV("tokenizer.ggml.eos_token_id", U32, 2),
            KV("tokenizer.ggml.add_bos_token", BOOL, False)]


def tiny_llama(layers: int = 2, tied: bool = False, seed: int = 0, arch: str = "llama",
               tokenizer: str = "gpt2") -> GGUFSpec:
    """A valid, complete GGUF (F32, F16 and Q8_0 tensors) that ember loads and runs: llama, or qwen2 (q/k/v
    biases); a byte-level BPE ("gpt2") or SentencePiece ("llama") vocabulary of 16 tokens."""
    rng = np.random.default_rng(seed)
    kvs = [
        KV("general.architecture", STRING, arch), KV("general.name", STRING, "tiny"),
        KV("general.alignment", U32, 32),
        KV(f"{arch}.block_count", U32, layers), KV(f"{arch}.context_length", U32, 128),
        KV(f"{arch}.embedding_length", U32, HIDDEN), KV(f"{arch}.feed_forward_length", U32, FFN),
        KV(f"{arch}.attention.head_count", U32, HEADS), KV(f"{arch}.attention.head_count_kv", U32, KV_HEADS),
        KV(f"{arch}.rope.freq_base", F32, 10000.0), KV(f"{arch}.attention.layer_norm_rms_epsilon", F32, 1e-5),
        KV(f"{arch}.vocab_size", U32, len(VOCAB)), KV(f"{arch}.rope.dimension_count", U32, HIDDEN // HEADS),
        *_tokenizer_kvs(tokenizer), KV("tokenizer.chat_template", STRING, CHATML),
    ]
    tensors = [Tensor("token_embd.weight", [HIDDEN, len(VOCAB)], T_F32, _f32(rng, len(VOCAB), HIDDEN))]
    for i in range(layers):
        tensors += _layer_tensors(rng, i, bias=arch == "qwen2")
    tensors.append(Tensor("output_norm.weight", [HIDDEN], T_F32, _f32(rng, HIDDEN)))
    if not tied:
        tensors.append(Tensor("output.weight", [HIDDEN, len(VOCAB)], T_F32, _f32(rng, len(VOCAB), HIDDEN)))
    return GGUFSpec(kvs, tensors)


def spec_from_file(path: str) -> GGUFSpec:
    """A real GGUF file as a spec (every key with its type, every tensor with its bytes), to mutate."""
    import gguf

    reader = gguf.GGUFReader(path)
    kvs = [KV(f.name, int(f.types[0]), f.contents(), int(f.types[1]) if len(f.types) > 1 else None)
           for f in reader.fields.values() if not f.name.startswith("GGUF.")]
    tensors = [Tensor(t.name, [int(d) for d in t.shape], int(t.tensor_type), t.data.tobytes()) for t in reader.tensors]
    return GGUFSpec(kvs, tensors, alignment=reader.alignment)
