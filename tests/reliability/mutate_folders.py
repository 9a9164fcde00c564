"""Structure-aware mutations of model folders: JSON files (config, tokenizer config, generation config,
shard index, manifest) edited key by key, safetensors headers edited entry by entry, files dropped, added,
corrupted or linked out of the folder."""
from __future__ import annotations

import json
import math
import random
import struct
from pathlib import Path
from typing import Any, Union

from tests.reliability.mutate_gguf import STRINGS

SYMLINK = "symlink"
FileContent = Union[bytes, tuple[str, str]]  # bytes, or (SYMLINK, target)
Folder = dict[str, FileContent]

KEYS = {
    "config.json": ["architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size",
                    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                    "rope_theta", "rope_scaling", "rope_parameters", "max_position_embeddings", "tie_word_embeddings",
                    "attention_bias", "sliding_window", "use_sliding_window", "_name_or_path"],
    "tokenizer_config.json": ["bos_token", "eos_token", "add_bos_token", "add_eos_token", "chat_template"],
    "generation_config.json": ["eos_token_id", "bos_token_id"],
    "model.safetensors.index.json": ["weight_map", "metadata"],
    "manifest.json": ["format", "format_version", "methods", "quantization", "layers"],
}
ROPE_KEYS = ["rope_type", "type", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings",
             "rope_theta"]
VALUES: list[Any] = [0, 1, -1, 2, 3, 7, 8, 16, 32, 64, 1 << 24, 2**31, 2**63, 10**30, 1e-6, 0.0, -1.0, 0.5, math.nan,
                     math.inf, -math.inf, 1e300, "", "x", "LlamaForCausalLM", "llama3", "linear", "yarn", None, True,
                     False, [], [1], ["LlamaForCausalLM"], ["Qwen2ForCausalLM", 5], {}, {"content": 5},
                     {"content": "<|im_end|>"}, [{"name": "default"}], [{"name": "default", "template": "{{"}],
                     {"rope_type": "llama3", "factor": 8.0}, {"type": "linear", "factor": 2.0}, "ember-compressed"]
PATHS = ["../outside.safetensors", "/etc/passwd", "", ".", "..", "nonexistent.safetensors", "sub/../x.safetensors",
         "model.safetensors", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "config.json"]
DTYPES = ["F32", "F16", "BF16", "F64", "I8", "U8", "I32", "I64", "BOOL", "F8_E4M3", "XX"]


def _value(rng: random.Random) -> Any:
    v = rng.choice(VALUES + STRINGS)
    return json.loads(json.dumps(v))  # a fresh copy


def _edit_json(rng: random.Random, name: str, doc: Any) -> Any:
    if not isinstance(doc, dict) or rng.random() < 0.05:
        return _value(rng)
    keys = KEYS.get(name, []) + list(doc)
    key = rng.choice(keys) if keys else "x"
    op = rng.randrange(5)
    if op == 0:
        doc.pop(key, None)
    elif op == 1 and isinstance(doc.get(key), dict) and doc[key]:  # one level down: rope_scaling, weight_map...
        inner = doc[key]
        sub = rng.choice(list(inner) + ROPE_KEYS)
        inner[sub] = rng.choice(PATHS) if key == "weight_map" else _value(rng)
    elif op == 2 and key == "weight_map" and isinstance(doc.get(key), dict):
        doc[key] = dict.fromkeys(doc[key], rng.choice(PATHS))
    elif op == 3 and key == "rope_scaling":
        doc[key] = {k: _value(rng) if rng.random() < 0.3 else v for k, v in
                    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 64}.items() if rng.random() < 0.9}
    else:
        doc[key] = _value(rng)
    return doc


def _json_file(rng: random.Random, name: str, data: bytes) -> bytes:
    op = rng.randrange(10)
    if op == 0:
        return data[:rng.randrange(len(data) + 1)]
    if op == 1:
        return rng.choice([b"\xff\xfe{}", b"[" * 100_000 + b"]" * 100_000, b"", b"null", b"{\"a\": NaN}",
                           b'{"vocab_size": ' + b"9" * 5000 + b"}", b'{"rms_norm_eps": 1e999}'])
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        return data
    return json.dumps(_edit_json(rng, name, doc)).encode()


def _safetensors_file(rng: random.Random, data: bytes) -> bytes:
    """Edit one header entry (shape, dtype, offsets, name), or the header length."""
    if len(data) < 8 or rng.random() < 0.15:
        out = bytearray(data)
        if out and rng.random() < 0.5:
            out[rng.randrange(min(len(out), 64))] ^= 1 << rng.randrange(8)
        else:
            del out[rng.randrange(len(out) + 1):]
        return bytes(out)
    (n,) = struct.unpack_from("<Q", data)
    try:
        header = json.loads(data[8:8 + n])
    except (ValueError, RecursionError):
        return data
    if not isinstance(header, dict):
        return data
    names = [k for k in header if k != "__metadata__"]
    if not names:
        return data
    name = rng.choice(names)
    entry = header[name] if isinstance(header[name], dict) else {}
    header[name] = entry
    op = rng.randrange(6)
    if op == 0:
        shape = entry.get("shape")
        entry["shape"] = list(reversed(shape)) if isinstance(shape, list) and rng.random() < 0.5 else \
            [rng.choice([0, 1, 2, 16, 32, 64, 2**40]) for _ in range(rng.randrange(4))]
    elif op == 1:
        entry["dtype"] = rng.choice(DTYPES)
    elif op == 2:
        entry["data_offsets"] = [rng.choice([0, 4, 2**62]), rng.choice([0, 8, 2**63])]
    elif op == 3:
        header[rng.choice(["embed_tokens.weight", "model.layers.9.mlp.up_proj.weight", "lm_head.weight",
                           "model.norm.bias", "model.layers.0.self_attn.rotary_emb.inv_freq"])] = header.pop(name)
    elif op == 4:
        del header[name]
    else:
        header[name] = _value(rng)
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + n:]


def mutate_folder(rng: random.Random, folder: Folder, outside: Path) -> Folder:
    """A mutated copy; `outside` is a valid weights file beyond the folder, for links and paths to reach."""
    folder = dict(folder)
    for _ in range(rng.choice([1, 1, 2])):
        if not folder:
            break
        name = rng.choice(list(folder))
        data = folder[name]
        op = rng.randrange(20)
        if op == 0:
            del folder[name]
        elif op == 1:
            shard = rng.choice([n for n in folder if n.endswith(".safetensors")] or [name])
            folder["extra.safetensors"] = folder[shard]
        elif op == 2:
            folder[rng.choice([n for n in folder if n.endswith(".safetensors")] or ["link.safetensors"])] = \
                (SYMLINK, str(outside))
        elif not isinstance(data, bytes):
            continue
        elif name.endswith(".json") and name != "tokenizer.json":
            folder[name] = _json_file(rng, name, data)
        elif name.endswith(".safetensors"):
            folder[name] = _safetensors_file(rng, data)
        elif name.endswith(".jinja") or rng.random() < 0.5:
            folder["chat_template.jinja"] = rng.choice(STRINGS).encode()
        else:
            folder[name] = data[:rng.randrange(len(data) + 1)]
    return folder


def write_folder(folder: Folder, path: Path) -> Path:
    path.mkdir(parents=True)
    for name, content in folder.items():
        if isinstance(content, tuple):
            (path / name).symlink_to(content[1])
        else:
            (path / name).write_bytes(content)
    return path


def read_folder(path: Path) -> Folder:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}
