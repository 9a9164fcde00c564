"""Malformed GGUF files give a ModelLoadError naming the file and the problem, before any large allocation:
header structure, metadata types and ranges, consistency with the tensor table, memory, tokenizer metadata."""
from __future__ import annotations

import math
import struct
import time
from pathlib import Path
from typing import Callable

import pytest

from ember.errors import ModelLoadError
from ember.loading.gguf import open_reader
from ember.models import loader
from ember.models.loader import load_config, load_model
from tests.reliability.gguf_bytes import (
    ARRAY, F32, F64, I32, KV, STRING, T_F32, U8, U32, U64, Field, GGUFSpec, Tensor, tiny_llama)


def _write(tmp_path: Path, spec: GGUFSpec | bytes, name: str = "bad.gguf") -> Path:
    path = tmp_path / name
    path.write_bytes(spec if isinstance(spec, bytes) else spec.to_bytes())
    return path


def _refused(tmp_path: Path, spec: GGUFSpec | bytes, match: str, load: Callable = load_config) -> ModelLoadError:
    path = _write(tmp_path, spec)
    with pytest.raises(ModelLoadError, match=match) as info:
        load(path)
    assert str(path) in str(info.value)
    return info.value


def test_the_valid_seed_loads_and_runs(tmp_path: Path) -> None:
    for tied in (False, True):
        loaded = load_model(_write(tmp_path, tiny_llama(tied=tied), f"ok{tied}.gguf"))
        assert loaded.config.num_layers == 2 and loaded.config.tie_word_embeddings == tied
        assert loaded.tokenizer.vocab_size == 16 and loaded.tokenizer.chat_template


# -- header structure ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", [2, 3])  # tensor count, KV count
def test_counts_beyond_what_the_file_can_hold_fail_at_once(tmp_path: Path, which: int) -> None:
    spec = tiny_llama()
    data = bytearray(spec.to_bytes())
    struct.pack_into("<Q", data, spec.fields[which].pos, 1 << 40)
    start = time.perf_counter()
    _refused(tmp_path, bytes(data), r"(tensor|key/value) count 1099511627776 .*file of \d+ bytes can hold")
    assert time.perf_counter() - start < 1.0


def test_versions(tmp_path: Path) -> None:
    spec = tiny_llama()
    spec.version = 1
    _refused(tmp_path, spec, "GGUF version 1 is not supported")
    spec.version = 3 << 24  # a big-endian file read as little-endian
    _refused(tmp_path, spec, "big-endian")


def test_nested_arrays_are_refused_without_recursion(tmp_path: Path) -> None:
    nested: list = [(I32, [1, 2])]
    spec = tiny_llama()
    spec.kvs.append(KV("x.nested", ARRAY, nested, ARRAY))
    _refused(tmp_path, spec, "x.nested: arrays of arrays")
    # 100k levels deep, built by hand: the old reader recursed until RecursionError.
    deep = (struct.pack("<4sIQQ", b"GGUF", 3, 0, 1) + struct.pack("<Q", 1) + b"k" + struct.pack("<I", ARRAY)
            + struct.pack("<IQ", ARRAY, 1) * 100_000)
    _refused(tmp_path, deep, "arrays of arrays")


def test_array_and_string_lengths_are_bounded_by_the_file(tmp_path: Path) -> None:
    spec = tiny_llama()
    data = bytearray(spec.to_bytes())
    count = _field_after(spec, data, "tokenizer.ggml.tokens", "count")
    struct.pack_into("<Q", data, count.pos, 1 << 60)
    _refused(tmp_path, bytes(data), "tokenizer.ggml.tokens: array of 1152921504606846976 .* bytes left")
    data = bytearray(spec.to_bytes())
    struct.pack_into("<Q", data, spec.fields[4].pos, 1 << 62)  # the first key's length
    _refused(tmp_path, bytes(data), "string of 4611686018427387904 bytes .* bytes left")


def _field_after(spec: GGUFSpec, data: bytes | bytearray, key: str, kind: str) -> Field:
    """The first header field of this kind after the given key's name."""
    at = bytes(data).index(key.encode())
    return next(f for f in spec.fields if f.kind == kind and f.pos > at)


def test_array_values_are_bounded_in_all(tmp_path: Path) -> None:
    """Arrays become Python lists at ~8x their bytes: 9M one-byte values would take ~70 MB as a list."""
    spec = tiny_llama()
    spec.kvs.append(KV("x.big", ARRAY, b"", U8))
    data = spec.to_bytes()
    head = data[:data.index(b"x.big") + 5] + struct.pack("<IIQ", ARRAY, U8, 9_000_000)
    start = time.perf_counter()
    _refused(tmp_path, head + bytes(9_000_000), r"x\.big: array of 9000000 values takes the header's arrays past")
    assert time.perf_counter() - start < 1.0


def test_duplicate_keys(tmp_path: Path) -> None:
    spec = tiny_llama()
    spec.kvs.append(KV("llama.block_count", U32, 1))
    _refused(tmp_path, spec, "key 'llama.block_count' appears twice")


def test_key_names_must_be_utf8(tmp_path: Path) -> None:
    spec = tiny_llama()
    spec.kvs.append(KV("badXY", U8, 1))
    data = spec.to_bytes().replace(b"badXY", b"bad\xff\xfe")
    _refused(tmp_path, data, "key 22 name b'bad.*' is not valid UTF-8")


@pytest.mark.parametrize("value, vtype, match", [
    (7, U32, "general.alignment is 7; it must be a power of two"),
    (0, U32, "general.alignment is 0; it must be a power of two"),
    (32, U64, "general.alignment must be a uint32"),
    (32.0, F32, "general.alignment must be a uint32"),
    ("32", STRING, "general.alignment must be a uint32"),
])
def test_alignment(tmp_path: Path, value: object, vtype: int, match: str) -> None:
    _refused(tmp_path, tiny_llama().set("general.alignment", value, vtype), match)


def test_alignment_other_than_32_is_honoured(tmp_path: Path) -> None:
    spec = tiny_llama().set("general.alignment", 64)
    spec.alignment = 64
    ref = load_model(_write(tmp_path, tiny_llama(), "ref.gguf")).model.state_dict()
    got = load_model(_write(tmp_path, spec, "a64.gguf")).model.state_dict()
    assert all((ref[k] == got[k]).all() for k in ref)


def _tensor(spec: GGUFSpec, name: str) -> Tensor:
    return next(t for t in spec.tensors if t.name == name)


@pytest.mark.parametrize("edit, match", [
    (lambda t: setattr(t, "dims", [32, 16, 1, 1, 1]), "has 5 dimensions; GGUF allows at most 4"),
    (lambda t: setattr(t, "dims", [32, 0]), r"dimension 1 is 0"),
    (lambda t: setattr(t, "dims", [32, -16]), r"dimension 1 is 18446744073709551600"),
    (lambda t: setattr(t, "dims", [1 << 40, 1 << 40]), "(runs past the end|expected offset)"),
    (lambda t: setattr(t, "ttype", 99), "unknown type id 99"),
    (lambda t: setattr(t, "name", "x" * 64), "name of 64 bytes"),
])
def test_tensor_entries(tmp_path: Path, edit: Callable, match: str) -> None:
    spec = tiny_llama()
    edit(_tensor(spec, "token_embd.weight"))
    _refused(tmp_path, spec, match)


def test_huge_dimension_count_fails_fast(tmp_path: Path) -> None:
    spec = tiny_llama()
    spec.tensors[0].data += bytes(4 << 20)  # room the old reader crawled through 8 bytes at a time
    data = bytearray(spec.to_bytes())
    ndims = next(f for f in spec.fields if f.kind == "ndims")
    struct.pack_into("<I", data, ndims.pos, 0xFFFFFFFF)
    start = time.perf_counter()
    _refused(tmp_path, bytes(data), "has 4294967295 dimensions")
    assert time.perf_counter() - start < 1.0


def test_row_not_a_whole_number_of_blocks(tmp_path: Path) -> None:
    spec = tiny_llama()
    t = _tensor(spec, "blk.0.attn_q.weight")
    t.dims = [33, 32]
    _refused(tmp_path, spec, r"'blk\.0\.attn_q\.weight': rows of 33 elements are not a whole number of Q8_0 blocks")


@pytest.mark.parametrize("offset, match", [(0, "offset 0, expected"), (1, "offset 1, expected"),
                                           (1 << 62, "offset 4611686018427387904, expected")])
def test_tensor_offsets_must_follow_the_layout(tmp_path: Path, offset: int, match: str) -> None:
    spec = tiny_llama()
    spec.tensors[3].offset = offset  # 0: the same bytes as the first tensor
    _refused(tmp_path, spec, match)


def test_duplicate_tensor_names(tmp_path: Path) -> None:
    spec = tiny_llama()
    spec.tensors[2].name = spec.tensors[1].name
    _refused(tmp_path, spec, "tensor 'blk.0.attn_norm.weight' appears twice")


def test_a_table_as_large_as_the_file_parses_quickly(tmp_path: Path) -> None:
    spec = tiny_llama(layers=0)
    spec.tensors = [Tensor(f"t.{i}", [1], T_F32, b"\0\0\0\0") for i in range(150_000)]
    spec.alignment = 1
    spec.set("general.alignment", 1)
    path = _write(tmp_path, spec, "wide.gguf")
    start = time.perf_counter()
    assert len(open_reader(path).tensors) == 150_000
    assert time.perf_counter() - start < 3.0


# -- metadata values --------------------------------------------------------------------------------------

@pytest.mark.parametrize("key, value, vtype, match", [
    ("llama.rope.freq_base", math.nan, F32, "llama.rope.freq_base is nan"),
    ("llama.rope.freq_base", 0.0, F32, "llama.rope.freq_base is 0.0"),
    ("llama.rope.freq_base", math.inf, F64, "llama.rope.freq_base is inf"),
    ("llama.attention.layer_norm_rms_epsilon", -1.0, F32, "layer_norm_rms_epsilon is -1.0"),
    ("llama.attention.layer_norm_rms_epsilon", 0.0, F32, "layer_norm_rms_epsilon is 0.0"),
    ("llama.context_length", 0, U32, "llama.context_length is 0"),
    ("llama.context_length", 2**32 - 1, U32, "llama.context_length is 4294967295"),
    ("llama.block_count", 65536, U32, "llama.block_count is 65536"),
    ("llama.block_count", 0, U32, "llama.block_count is 0"),
    ("llama.attention.head_count", 0, U32, "llama.attention.head_count is 0"),
    ("llama.attention.head_count_kv", 3, U32, "4 attention heads are not a multiple of 3 KV heads"),
    ("llama.embedding_length", "abc", STRING, "llama.embedding_length must be an integer, found 'abc'"),
    ("llama.embedding_length", 32.5, F32, "llama.embedding_length must be an integer, found 32.5"),
    ("llama.feed_forward_length", True, 7, "llama.feed_forward_length must be an integer, found True"),
    ("llama.rope.freq_base", "x", STRING, "llama.rope.freq_base must be a number, found 'x'"),
    ("llama.rope.dimension_count", 7, U32, "head dimension 7 .* even"),
    ("llama.attention.sliding_window", 0, U32, "sliding_window is 0"),
    ("llama.rope.scaling.type", "yarn", STRING, "rope scaling type 'yarn' is not supported"),
    ("general.architecture", 5, U32, "general.architecture must be a string, found 5"),
])
def test_metadata_values(tmp_path: Path, key: str, value: object, vtype: int, match: str) -> None:
    _refused(tmp_path, tiny_llama().set(key, value, vtype), match)


def test_head_dimension_derived_from_a_width_heads_do_not_divide(tmp_path: Path) -> None:
    spec = tiny_llama().drop("llama.rope.dimension_count").set("llama.attention.head_count", 5)
    _refused(tmp_path, spec, "llama.embedding_length 32 is not a multiple of llama.attention.head_count 5")


def test_linear_rope_scaling_factor(tmp_path: Path) -> None:
    spec = tiny_llama().set("llama.rope.scaling.type", "linear", STRING)
    _refused(tmp_path, spec, "llama.rope.scaling.factor")  # missing
    _refused(tmp_path, spec.set("llama.rope.scaling.factor", math.nan, F32), "llama.rope.scaling.factor is nan")
    spec.set("llama.rope.scaling.factor", 4.0, F32)
    assert load_config(_write(tmp_path, spec, "ok.gguf"))[1].rope_scaling == {"rope_type": "linear", "factor": 4.0}


# -- consistency with the tensor table, before allocating ------------------------------------------------

def test_layer_count_must_match_the_tensors(tmp_path: Path) -> None:
    _refused(tmp_path, tiny_llama().set("llama.block_count", 3), r"missing tensors \['layers\.2\.")
    _refused(tmp_path, tiny_llama().set("llama.block_count", 1), r"unexpected tensor 'layers\.1\.")


@pytest.mark.parametrize("key, value, match", [
    ("llama.embedding_length", 64, r"tensor embed_tokens\.weight has shape \(16, 32\), expected \(16, 64\)"),
    ("llama.feed_forward_length", 32, r"tensor layers\.0\.mlp\.gate_proj\.weight has shape \(64, 32\), expected"),
    ("llama.vocab_size", 4000, r"embed_tokens\.weight has shape \(16, 32\), expected \(4000, 32\)"),
])
def test_dimensions_must_match_the_tensors(tmp_path: Path, key: str, value: int, match: str) -> None:
    _refused(tmp_path, tiny_llama().set(key, value), match)


def test_tensor_names_must_be_known(tmp_path: Path) -> None:
    spec = tiny_llama()
    spec.tensors[1].name = "blk.0.attn_norm_x.weight"
    _refused(tmp_path, spec, "unknown tensor 'blk.0.attn_norm_x.weight'")


def test_rope_freqs_shape(tmp_path: Path) -> None:
    spec = tiny_llama()
    spec.tensors.append(Tensor("rope_freqs.weight", [3], T_F32, b"\0" * 12))
    _refused(tmp_path, spec, r"rope_freqs\.weight has shape \(3,\), expected \(4,\)")


def test_memory_needed_vs_available(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path, tiny_llama(), "ok.gguf")
    monkeypatch.setattr(loader, "available_memory", lambda: 50_000)
    with pytest.raises(ModelLoadError, match=r"ok\.gguf: loading needs about .* MB of memory .* available"):
        load_model(path)
    monkeypatch.setattr(loader, "available_memory", lambda: None)  # unknown: no check
    load_model(path)


# -- tokenizer metadata --------------------------------------------------------------------------------------

@pytest.mark.parametrize("key, value, vtype, etype, match", [
    ("tokenizer.ggml.tokens", [1, 2, 3], ARRAY, I32, "tokenizer.ggml.tokens must be a list of strings"),
    ("tokenizer.ggml.tokens", "abc", STRING, None, "tokenizer.ggml.tokens must be a list of strings"),
    ("tokenizer.ggml.token_type", ["a"] * 16, ARRAY, STRING, "tokenizer.ggml.token_type must be a list of integers"),
    ("tokenizer.ggml.merges", [1, 2], ARRAY, I32, "tokenizer.ggml.merges must be a list of strings"),
    ("tokenizer.ggml.merges", ["ab"], ARRAY, STRING, "tokenizer.ggml.merges entry 0 'ab' is not two tokens"),
    ("tokenizer.ggml.merges", ["x y"], ARRAY, STRING, "tokenizer.ggml.merges entry 0 'x y' .* not in the vocabulary"),
    ("tokenizer.ggml.bos_token_id", "1", STRING, None, "tokenizer.ggml.bos_token_id must be an integer"),
    ("tokenizer.ggml.eos_token_id", 16, U32, None, "eos_token_id is 16, outside the vocabulary"),
    ("tokenizer.ggml.add_bos_token", "yes", STRING, None, "tokenizer.ggml.add_bos_token must be a boolean"),
    ("tokenizer.ggml.pre", 3, U32, None, "tokenizer.ggml.pre must be a string"),
    ("tokenizer.chat_template", "{% for %}", STRING, None, "tokenizer.chat_template does not compile"),
    ("tokenizer.chat_template", 5, U32, None, "tokenizer.chat_template must be a string"),
])
def test_tokenizer_metadata(tmp_path: Path, key: str, value: object, vtype: int, etype: int | None,
                            match: str) -> None:
    spec = tiny_llama().set(key, value, vtype)
    spec.kv(key).etype = etype
    _refused(tmp_path, spec, match)


def test_scores_of_the_wrong_length_or_type(tmp_path: Path) -> None:
    spec = tiny_llama()
    spec.set("tokenizer.ggml.model", "llama", STRING)
    spec.kvs.append(KV("tokenizer.ggml.scores", ARRAY, [0.0] * 3, F32))
    _refused(tmp_path, spec, "tokenizer.ggml.scores has 3 entries but the vocabulary has 16")
    spec.kv("tokenizer.ggml.scores").value, spec.kv("tokenizer.ggml.scores").etype = ["s"] * 16, STRING
    _refused(tmp_path, spec, "tokenizer.ggml.scores must be a list of numbers")


def test_vocabulary_must_match_the_embedding(tmp_path: Path) -> None:
    spec = tiny_llama().drop("llama.vocab_size")
    spec.kv("tokenizer.ggml.tokens").value = spec.kv("tokenizer.ggml.tokens").value + ["zz"]
    spec.kv("tokenizer.ggml.token_type").value = spec.kv("tokenizer.ggml.token_type").value + [1]
    _refused(tmp_path, spec, r"embed_tokens\.weight has shape \(16, 32\), expected \(17, 32\)")
    spec.set("llama.vocab_size", 16)
    _refused(tmp_path, spec, "tokenizer.ggml.tokens has 17 entries but the model's vocabulary is 16")


def test_duplicated_vocabulary_pieces_still_cover_every_model_id(tmp_path: Path) -> None:
    """llama.cpp keeps every id of a vocabulary with repeated pieces; tokenizers counted the distinct ones, so
    detokenizing the model's last ids failed with an IndexError (found by the fuzzer's --use)."""
    from ember.loading.tokenizer import IncrementalDetokenizer

    spec = tiny_llama()
    spec.kv("tokenizer.ggml.tokens").value[11] = "!"
    loaded = load_model(_write(tmp_path, spec, "dup.gguf"))
    assert loaded.tokenizer.vocab_size == loaded.config.vocab_size == 16
    detok = IncrementalDetokenizer(loaded.tokenizer)
    assert [detok.add(i) for i in range(16)][-1] == "de"


def test_sentencepiece_vocabulary_cannot_blow_up_into_merges() -> None:
    """Runs of "a" split every way: 3000 pieces (4.5 MB) made 4.5M candidate merges, 98 s, before the cap."""
    from ember.loading.tokenizer import Tokenizer
    from tests.reliability.gguf_bytes import SPM_TYPES, SPM_VOCAB

    def meta(extra: list[str]) -> dict:
        tokens = SPM_VOCAB + extra
        return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
                "tokenizer.ggml.token_type": SPM_TYPES + [1] * len(extra), "tokenizer.ggml.scores": [0.0] * len(tokens)}

    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match=r"x\.gguf: .*split into over 32 known pairs each"):
        Tokenizer.from_gguf("x.gguf", meta(["a" * k for k in range(2, 3000)]))
    Tokenizer.from_gguf("x.gguf", meta(["b" * 10**6, "a" * 10**6 + "b"]))  # long pieces: not split, not quadratic
    assert time.perf_counter() - start < 5.0
