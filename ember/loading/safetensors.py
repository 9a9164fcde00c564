"""Read the weights of a Hugging Face model folder (*.safetensors, sharded or not)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch

from ember.errors import ModelLoadError


def weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise ModelLoadError(f"{index}: malformed shard index ({e})") from None
        files = [folder / s for s in shards]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{folder}: shards listed in the index are missing: {missing}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        found = sorted(p.name for p in folder.iterdir())[:10]
        raise ModelLoadError(f"{folder}: no *.safetensors weights (found {found}); ember reads "
                             "safetensors folders and .gguf files, not .bin/.pt checkpoints")
    return files


def iter_tensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, float32 tensor) for every tensor in the folder's safetensors files."""
    from safetensors import safe_open

    for path in weight_files(folder):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name).float()
        except ModelLoadError:
            raise
        except Exception as e:
            raise ModelLoadError(f"{path}: unreadable safetensors file ({type(e).__name__}: {e})") from None
