"""Read the weights of a Hugging Face model folder (*.safetensors, sharded or not), never outside the folder."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from ember.errors import ModelLoadError
from ember.loading.values import FIX, foreign_errors, read_json_object, show

INDEX = "model.safetensors.index.json"


def weight_files(folder: Path) -> list[Path]:
    index = folder / INDEX
    if index.is_file():
        names = _index_files(index)
        source = index
    else:
        names = sorted(p.name for p in folder.glob("*.safetensors"))
        source = folder
        if not names:
            found = sorted(p.name for p in folder.iterdir())[:10]
            raise ModelLoadError(f"{folder}: no *.safetensors weights (found {found}); ember reads "
                                 "safetensors folders and .gguf files, not .bin/.pt checkpoints")
    files = [_inside(folder, name, source) for name in names]
    missing = [name for name, f in zip(names, files) if not f.is_file()]
    if missing:
        raise ModelLoadError(f"{folder}: shards listed in the index are missing: {missing}")
    return files


def _index_files(index: Path) -> list[str]:
    """The shard file names of model.safetensors.index.json's weight_map (tensor name -> file name)."""
    weight_map = read_json_object(index).get("weight_map")
    if weight_map is None:
        raise ModelLoadError(f"{index}: lacks weight_map (tensor name -> shard file); {FIX}")
    if not isinstance(weight_map, dict):
        raise ModelLoadError(f"{index}: weight_map must be an object (tensor name -> shard file), "
                             f"found {show(weight_map)}; {FIX}")
    if not weight_map:
        raise ModelLoadError(f"{index}: weight_map is empty; {FIX}")
    bad = next(((k, v) for k, v in weight_map.items() if not isinstance(v, str) or not v), None)
    if bad is not None:
        raise ModelLoadError(f"{index}: weight_map entry for {bad[0]!r} must be a file name, found "
                             f"{show(bad[1])}; {FIX}")
    return sorted(set(weight_map.values()))


def _inside(folder: Path, name: str, source: Path) -> Path:
    """folder / name, refused unless it resolves inside the folder (no absolute paths, .. or symlinks out).
    One exception: huggingface_hub's cache links snapshots/<rev>/<file> to ../../blobs/<hash>."""
    try:
        root, target = folder.resolve(), (folder / name).resolve()
        target.is_file()  # raises for a name the file system cannot take
    except (OSError, ValueError) as e:  # a NUL byte, a name too long, a symlink loop
        raise ModelLoadError(f"{source}: weight file name {show(name)} is not a usable path ({e}); {FIX}") from None
    allowed = [root] + ([root.parent.parent / "blobs"] if root.parent.name == "snapshots" else [])
    if not any(target.is_relative_to(a) for a in allowed):
        what = "weight_map names" if source.name == INDEX else "the weight file"
        raise ModelLoadError(f"{source}: {what} {name!r}, which resolves to {target}, outside the model folder "
                             f"{root}; weights must be files inside the folder")
    return folder / name


@contextmanager
def _opened(path: Path) -> Iterator[Any]:
    """safe_open, its errors (bad header, truncated data) as ModelLoadError naming the file."""
    from safetensors import safe_open

    with foreign_errors(path, "unreadable safetensors file"), safe_open(str(path), framework="pt") as f:
        yield f


def tensor_shapes(folder: Path) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor in the folder, from the files' headers alone; a name in two files is refused."""
    out, where = [], {}
    for path in weight_files(folder):
        with _opened(path) as f:
            for name in f.keys():
                if name in where:
                    raise ModelLoadError(f"{folder}: tensor {name!r} appears in both {where[name]} and "
                                         f"{path.name}; {FIX}")
                where[name] = path.name
                out.append((name, tuple(f.get_slice(name).get_shape())))
    return out


def iter_tensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, float32 tensor) for every tensor in the folder's safetensors files."""
    for path in weight_files(folder):
        with _opened(path) as f:
            for name in f.keys():
                yield name, f.get_tensor(name).float()
