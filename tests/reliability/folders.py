"""Valid model folders built from the tiny GGUF seed in a second: Hugging Face (one file or sharded with an
index) and compressed (`ember compress` output), for tests and the fuzzer to break."""
from __future__ import annotations

import json
from pathlib import Path

from tests.reliability.gguf_bytes import tiny_llama


def seed_gguf(folder: Path, **kwargs: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "seed.gguf"
    path.write_bytes(tiny_llama(**kwargs).to_bytes())  # type: ignore[arg-type]
    return path


def hf_folder(out: Path, shards: int = 1) -> Path:
    """config.json, tokenizer files and safetensors weights (sharded with an index when shards > 1)."""
    from safetensors.torch import save_file

    from ember.models.compressed import checkpoint_tensors
    from ember.models.loader import load_model

    loaded = load_model(seed_gguf(out.parent / f"{out.name}-src"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(loaded.config.to_hf()))
    loaded.tokenizer.save_pretrained(out)
    tensors = checkpoint_tensors(loaded.model)
    if shards == 1:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        return out
    names, weight_map = sorted(tensors), {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i::shards]
        save_file({n: tensors[n] for n in part}, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


def compressed_folder(out: Path, methods: str = "int4") -> Path:
    from ember.compress.pipeline import compress_model

    compress_model(seed_gguf(out.parent / f"{out.name}-src"), methods, None, out)
    return out
