"""Build a ready-to-run model and tokenizer from a GGUF file or a Hugging Face folder."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from ember.config import ModelConfig, load_hf_config
from ember.errors import ModelLoadError
from ember.loading import gguf, safetensors
from ember.loading.registry import resolve
from ember.loading.tokenizer import Tokenizer
from ember.models import compressed
from ember.models.llama import LlamaModel
from ember.models.packed import load_gguf_packed

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: LlamaModel
    tokenizer: Tokenizer
    config: ModelConfig
    path: Path
    load_seconds: float


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.float32
    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype {dtype!r} is not supported; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _open(path: Path) -> tuple[ModelConfig, Tokenizer, gguf.GGUFFile | None]:
    """Config, tokenizer and (for a GGUF file) the open reader of a model, every tensor's name and shape
    checked against the config; weights are not read."""
    if path.is_dir():
        config, tokenizer = load_hf_config(path), Tokenizer.from_hf_folder(path)
        if compressed.is_compressed(path):  # packed layers: checked as they load
            compressed.read_manifest(path)
        else:
            _check_shapes(path, config, safetensors.tensor_shapes(path))
        return config, tokenizer, None
    if path.suffix == ".gguf" or path.is_file():
        reader = gguf.open_reader(path)
        gguf.check_tensor_types(reader)
        config = ModelConfig.from_gguf(reader.metadata, str(path))
        config.tie_word_embeddings = "output.weight" not in gguf.tensor_names(reader)
        tokenizer = Tokenizer.from_gguf(path, reader.metadata)
        _check_shapes(path, config, gguf.hf_shapes(reader, config.arch))
        n_tokens = len(reader.metadata["tokenizer.ggml.tokens"])
        if n_tokens != config.vocab_size:
            raise ModelLoadError(f"{path}: tokenizer.ggml.tokens has {n_tokens} entries but the model's vocabulary is "
                                 f"{config.vocab_size} (token_embd.weight rows); the file is corrupt: re-convert it")
        return config, tokenizer, reader
    raise ModelLoadError(f"{path}: not a .gguf file or a model folder")


def _meta_model(config: ModelConfig, max_positions: int | None = None) -> LlamaModel:
    """The model built on the meta device: every shape and byte count, nothing allocated."""
    with torch.device("meta"):
        return LlamaModel(config, max_positions)


def _check_shapes(path: Path, config: ModelConfig, shapes: list[tuple[str, tuple[int, ...]]]) -> None:
    """load_weights run on the meta device over the file's tensor table: unknown, duplicated, missing and
    misshapen tensors (so a wrong block_count or dimension) fail before anything is allocated."""
    net = _meta_model(config)
    with torch.device("meta"):
        net.load_weights(((name, torch.empty(shape)) for name, shape in shapes), str(path))


def available_memory() -> int | None:
    """Bytes that can be allocated without swapping: MemAvailable, capped by a cgroup v2 limit; None if unknown."""
    found = []
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            found += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def _check_memory(path: Path, net: LlamaModel) -> None:
    """Refuse before allocating when the model cannot fit: its tensors still on the meta device (float32 weights
    and rotary tables; packed layers are already in memory) and one tensor's worth of conversion scratch."""
    available = available_memory()
    if available is None:
        return
    weights = [p.numel() * 4 for p in net.parameters() if p.is_meta]
    tables = sum(b.numel() * 4 for b in net.buffers() if b.is_meta)
    need = sum(weights) + tables + max(weights, default=0)
    if need > available:
        raise ModelLoadError(
            f"{path}: loading needs about {need / 1e6:,.1f} MB of memory (weights {sum(weights) / 1e6:,.1f} MB in "
            f"float32, rotary tables {tables / 1e6:,.1f} MB for {net.max_positions} positions) but only "
            f"{available / 1e6:,.1f} MB is available; free memory or load a smaller model"
            f"{' (or give a smaller max_positions)' if tables > sum(weights) else ''}")


def _materialize(net: LlamaModel, dtype: torch.dtype) -> None:
    """Allocate (uninitialised, in dtype) every parameter still on the meta device, and the rotary tables: the
    packed layers swapped in before keep their buffers, so a packed model never holds its float32 twin."""
    for module in net.modules():
        for name, p in module._parameters.items():
            if p is not None and p.is_meta:
                module._parameters[name] = nn.Parameter(torch.empty(p.shape, dtype=dtype), requires_grad=False)
    net.set_rope()
    net.rope.to(dtype)


def load_config(model: str | Path | None = None, progress: bool = False) -> tuple[Path, ModelConfig, Tokenizer]:
    """The resolved path, config and tokenizer of a model without loading its weights."""
    path = resolve(model, progress=progress)
    config, tokenizer, _ = _open(path)
    return path, config, tokenizer


def load_model(model: str | Path | None = None, dtype: str | torch.dtype = "float32",
               max_positions: int | None = None, progress: bool = False) -> LoadedModel:
    """Load weights, config and tokenizer for a model name, .gguf path, HF folder or compressed folder.

    dtype "auto" is float32, except that a GGUF file's Q8_0 / Q4_0 / Q4_1 linear layers are kept packed, exact to
    the file (ember.models.packed); "float32" dequantizes them too."""
    start = time.perf_counter()
    path = resolve(model, progress=progress)
    torch_dtype = parse_dtype(dtype)
    config, tokenizer, reader = _open(path)
    net = _meta_model(config, max_positions)
    if compressed.is_compressed(path):  # written by `ember compress`: packed layers load as stored
        _check_memory(path, net)
        net = compressed.load_compressed(path, config, torch_dtype, max_positions)
        return LoadedModel(net, tokenizer, config, path, time.perf_counter() - start)
    # dtype auto: a GGUF's Q8_0 / Q4_0 / Q4_1 (and int8 g32 for 5-bit / K-quant) layers run packed.
    packed = load_gguf_packed(net, path, reader) if reader is not None and dtype == "auto" else set()
    _check_memory(path, net)
    _materialize(net, torch_dtype)
    if reader is None:
        weights, total = safetensors.iter_tensors(path), None
    else:
        weights = gguf.iter_hf_tensors(path, reader, config.arch, config.num_heads, config.num_kv_heads, packed)
        total = len(reader.tensors) - len(packed)
    with tqdm(weights, total=total, desc=f"loading {path.name}", unit="tensor", disable=None if progress else True,
              leave=False, file=sys.stderr) as bar:
        net.load_weights(bar, str(path))
    return LoadedModel(net.eval(), tokenizer, config, path, time.perf_counter() - start)


def load_tokenizer(model: str | Path | None) -> Tokenizer:
    """Only the tokenizer of a model (GGUF file or Hugging Face folder): no weights read, no shapes checked."""
    path = resolve(model)
    return Tokenizer.from_hf_folder(path) if path.is_dir() else Tokenizer.from_gguf(path)
