"""Write the compressed-model folder: config.json, tokenizer files, model.safetensors, manifest.json."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ember.config import ModelConfig
from ember.loading import gguf
from ember.loading.tokenizer import Tokenizer
from ember.models.compressed import MANIFEST, WEIGHTS, save_weights
from ember.models.llama import LlamaModel

# Copied from a Hugging Face source as they are (other tools read more of them than ember does).
HF_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
            "special_tokens_map.json", "chat_template.jinja")
HASH_LIMIT = 8 << 30  # bytes: sources bigger than this are not hashed


def write_folder(out: Path, source: Path, model: LlamaModel, config: ModelConfig, tokenizer: Tokenizer,
                 manifest: dict[str, Any], float_dtype: torch.dtype) -> dict[str, Any]:
    """Write everything into a temporary sibling folder, then move it to out (so a failed run leaves no
    half-written model behind). Fills manifest["bytes"] (every file but the manifest) and returns it."""
    tmp = out.parent / f".{out.name}.{os.getpid()}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _write_config_and_tokenizer(tmp, source, config, tokenizer)
        save_weights(model, tmp / WEIGHTS, float_dtype, _rope_freqs(source))
        _default_mode(tmp / WEIGHTS)  # safetensors creates its files owner-only
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        manifest["bytes"] = {"files": files, "weights": files[WEIGHTS], "total": sum(files.values())}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        if out.exists():
            out.rmdir()  # checked empty before any work
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _default_mode(path: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def _write_config_and_tokenizer(folder: Path, source: Path, config: ModelConfig, tokenizer: Tokenizer) -> None:
    if source.is_dir():
        for name in HF_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, folder / name)
        return
    (folder / "config.json").write_text(json.dumps({
        **config.to_hf(), "torch_dtype": "float32", "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id}, indent=2) + "\n", encoding="utf-8")
    tokenizer.save_pretrained(folder)


def _rope_freqs(source: Path) -> dict[str, torch.Tensor]:
    """llama.cpp stores Llama-3 rope scaling as a tensor rather than config: carry it over."""
    if source.is_dir():
        return {}
    reader = gguf.open_reader(source)
    infos = [t for t in reader.tensors if t.name == "rope_freqs.weight"]
    return dict(gguf.iter_tensors(source, dataclasses.replace(reader, tensors=infos))) if infos else {}


def source_sha256(source: Path) -> str | None:
    """sha256 of a model file, or of a folder's weight files in name order; None when too big to be cheap."""
    files = [source] if source.is_file() else sorted(source.glob("*.safetensors"))
    if not files or sum(f.stat().st_size for f in files) > HASH_LIMIT:
        return None
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()
