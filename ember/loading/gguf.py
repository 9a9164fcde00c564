"""Read GGUF files: metadata as Python values, tensors dequantized to torch (via the gguf package)."""
from __future__ import annotations

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
# Large per-token arrays kept as lists only when asked for (the tokenizer needs them).
_TOKENIZER_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores",
                     "tokenizer.ggml.token_type", "tokenizer.ggml.merges")


def open_reader(path: str | Path) -> Any:
    """Open a GGUF file, turning every kind of malformation into a ModelLoadError."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such file (expected a .gguf model file)")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelLoadError(
            f"{path}: not a GGUF file (first bytes {magic!r}, expected b'GGUF'); "
            "give a .gguf file, a Hugging Face model folder or a known model name")
    try:
        return gguf.GGUFReader(str(path), "r")
    except Exception as e:  # the reader raises many kinds of errors on corrupt headers
        raise ModelLoadError(f"{path}: corrupt GGUF header or tensor table ({type(e).__name__}: {e}); "
                             "re-download or re-convert the file") from None


def _field_value(field: Any) -> Any:
    value = field.contents()
    if isinstance(value, np.generic):
        value = value.item()
    return value


def read_metadata(path: str | Path, reader: Any = None) -> dict[str, Any]:
    """Every key/value of a GGUF header as plain Python values (lists, str, int, float, bool)."""
    reader = reader or open_reader(path)
    meta: dict[str, Any] = {}
    try:
        for key, field in reader.fields.items():
            if key.startswith("GGUF."):
                continue
            meta[key] = _field_value(field)
    except Exception as e:
        raise ModelLoadError(f"{path}: unreadable metadata value ({type(e).__name__}: {e})") from None
    return meta


def _dequantize(t: Any) -> np.ndarray:
    import gguf

    name = t.tensor_type.name
    if name not in SUPPORTED_TYPES:
        raise ModelLoadError(
            f"tensor {t.name} has type {name}, which ember cannot load; "
            f"supported: {', '.join(SUPPORTED_TYPES)}")
    if name == "F32":
        arr = np.asarray(t.data, dtype=np.float32)
    elif name == "F16":
        arr = np.asarray(t.data, dtype=np.float16).astype(np.float32)
    else:
        arr = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
    # GGUF lists dims fastest-first; torch wants them slowest-first.
    shape = tuple(int(d) for d in reversed(t.shape))
    return arr.reshape(shape)


def iter_tensors(path: str | Path, reader: Any = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (gguf tensor name, float32 tensor) for every tensor in the file."""
    reader = reader or open_reader(path)
    for t in reader.tensors:
        try:
            arr = _dequantize(t)
        except ModelLoadError as e:
            raise ModelLoadError(f"{path}: {e}") from None
        except Exception as e:
            raise ModelLoadError(f"{path}: tensor {t.name} is truncated or corrupt ({e})") from None
        if not arr.flags.writeable:  # plain F32 tensors are views of the read-only file map
            arr = arr.copy()
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


def tensor_names(reader: Any) -> list[str]:
    return [t.name for t in reader.tensors]


def iter_hf_tensors(path: str | Path, reader: Any, arch: str, n_head: int, n_kv_head: int
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
