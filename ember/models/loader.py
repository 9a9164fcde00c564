"""Build a ready-to-run model and tokenizer from a GGUF file or a Hugging Face folder."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ember.config import ModelConfig, load_hf_config
from ember.errors import ModelLoadError
from ember.loading import gguf, safetensors
from ember.loading.registry import resolve
from ember.loading.tokenizer import Tokenizer
from ember.models import compressed
from ember.models.llama import LlamaModel

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
    """Config, tokenizer and (for a GGUF file) the open reader of a model; weights are not read."""
    if path.is_dir():
        return load_hf_config(path), Tokenizer.from_hf_folder(path), None
    if path.suffix == ".gguf" or path.is_file():
        reader = gguf.open_reader(path)
        gguf.check_tensor_types(reader)
        meta = gguf.read_metadata(path, reader)
        config = ModelConfig.from_gguf(meta, str(path))
        config.tie_word_embeddings = "output.weight" not in gguf.tensor_names(reader)
        return config, Tokenizer.from_gguf(path, meta), reader
    raise ModelLoadError(f"{path}: not a .gguf file or a model folder")


def load_config(model: str | Path | None = None, progress: bool = False) -> tuple[Path, ModelConfig, Tokenizer]:
    """The resolved path, config and tokenizer of a model without loading its weights."""
    path = resolve(model, progress=progress)
    config, tokenizer, _ = _open(path)
    return path, config, tokenizer


def load_model(model: str | Path | None = None, dtype: str | torch.dtype = "float32",
               max_positions: int | None = None, progress: bool = False) -> LoadedModel:
    """Load weights, config and tokenizer for a model name, .gguf path, HF folder or compressed folder."""
    start = time.perf_counter()
    path = resolve(model, progress=progress)
    torch_dtype = parse_dtype(dtype)
    config, tokenizer, reader = _open(path)
    if compressed.is_compressed(path):  # written by `ember compress`: packed layers load as stored
        net = compressed.load_compressed(path, config, torch_dtype, max_positions)
        return LoadedModel(net, tokenizer, config, path, time.perf_counter() - start)
    if reader is None:
        weights, total = safetensors.iter_tensors(path), None
    else:
        weights = gguf.iter_hf_tensors(path, reader, config.arch, config.num_heads, config.num_kv_heads)
        total = len(reader.tensors)
    net = LlamaModel(config, max_positions)
    with tqdm(weights, total=total, desc=f"loading {path.name}", unit="tensor", disable=None if progress else True,
              leave=False, file=sys.stderr) as bar:
        net.load_weights(bar, str(path))
    net.to(torch_dtype).eval()
    return LoadedModel(net, tokenizer, config, path, time.perf_counter() - start)
