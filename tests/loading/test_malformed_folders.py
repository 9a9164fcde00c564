"""Malformed Hugging Face and compressed folders give a ModelLoadError naming the file and the problem:
config.json, the shard index (weights stay inside the folder), tokenizer files, manifest and packed layers."""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest

from ember.errors import ModelLoadError
from ember.models.loader import load_config, load_model
from tests.reliability.folders import compressed_folder, hf_folder


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("seeds")
    return {"hf": hf_folder(root / "hf"), "sharded": hf_folder(root / "sharded", shards=2),
            "compressed": compressed_folder(root / "compressed")}


def _copy(seeds: dict[str, Path], kind: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(seeds[kind], tmp_path / kind))


def _edit_json(path: Path, edit: Callable[[Any], Any]) -> None:
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


def _refused(folder: Path, match: str, load: Callable = load_config) -> None:
    with pytest.raises(ModelLoadError, match=match):
        load(folder)


def test_the_valid_seeds_load(seeds: dict[str, Path]) -> None:
    for kind, folder in seeds.items():
        assert load_model(folder).config.num_layers == 2, kind


# -- the shard index ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("entry", ["../outside.safetensors", "/abs/outside.safetensors", "sub/../../x.safetensors"])
def test_index_entries_stay_inside_the_folder(seeds: dict[str, Path], tmp_path: Path, entry: str) -> None:
    folder = _copy(seeds, "sharded", tmp_path)
    # A complete, valid weights file outside the folder: the old loader read it.
    shutil.copyfile(seeds["hf"] / "model.safetensors", tmp_path / "outside.safetensors")
    entry = entry.replace("/abs", str(tmp_path))
    _edit_json(folder / "model.safetensors.index.json",
               lambda ix: {**ix, "weight_map": dict.fromkeys(ix["weight_map"], entry)})
    _refused(folder, r"model\.safetensors\.index\.json: weight_map names .* outside the model folder", load_model)


@pytest.mark.parametrize("entry", ["model\x00.safetensors", "x" * 5000 + ".safetensors"])
def test_index_entries_that_are_not_paths(seeds: dict[str, Path], tmp_path: Path, entry: str) -> None:
    folder = _copy(seeds, "sharded", tmp_path)
    _edit_json(folder / "model.safetensors.index.json",
               lambda ix: {**ix, "weight_map": dict.fromkeys(ix["weight_map"], entry)})
    _refused(folder, r"is not a usable path", load_model)


def test_index_symlink_out_of_the_folder(seeds: dict[str, Path], tmp_path: Path) -> None:
    folder = _copy(seeds, "sharded", tmp_path)
    shutil.copyfile(seeds["hf"] / "model.safetensors", tmp_path / "outside.safetensors")
    os.symlink(tmp_path / "outside.safetensors", folder / "link.safetensors")
    _edit_json(folder / "model.safetensors.index.json",
               lambda ix: {**ix, "weight_map": dict.fromkeys(ix["weight_map"], "link.safetensors")})
    _refused(folder, "'link.safetensors'.* outside the model folder", load_model)


def test_hugging_face_cache_symlinks_to_blobs_are_followed(seeds: dict[str, Path], tmp_path: Path) -> None:
    """huggingface_hub's cache links snapshots/<rev>/<file> to ../../blobs/<hash>: that layout must load."""
    repo = tmp_path / "models--x--tiny"
    snapshot, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for f in seeds["sharded"].iterdir():
        shutil.copyfile(f, blobs / f.name)
        os.symlink(Path("../../blobs") / f.name, snapshot / f.name)
    assert load_model(snapshot).config.num_layers == 2


@pytest.mark.parametrize("index, match", [
    ("[1, 2]", "must be a JSON object"),
    ('{"weight_map": ["a"]}', "weight_map must be an object"),
    ('{"weight_map": {"a": 5}}', "weight_map entry for 'a' must be a file name, found 5"),
    ('{"weight_map": {}}', "weight_map is empty"),
    ('{"nothing": 1}', "lacks weight_map"),
    (b"\xff\xfe{}", "not valid (UTF-8|JSON)"),
])
def test_malformed_index(seeds: dict[str, Path], tmp_path: Path, index: str | bytes, match: str) -> None:
    folder = _copy(seeds, "sharded", tmp_path)
    path = folder / "model.safetensors.index.json"
    path.write_bytes(index if isinstance(index, bytes) else index.encode())
    _refused(folder, rf"index\.json: .*{match}")


def test_duplicated_tensors_across_shards(seeds: dict[str, Path], tmp_path: Path) -> None:
    folder = _copy(seeds, "sharded", tmp_path)
    shutil.copyfile(folder / "model-00001-of-00002.safetensors", folder / "extra.safetensors")
    _edit_json(folder / "model.safetensors.index.json",
               lambda ix: {**ix, "weight_map": {**ix["weight_map"], "zzz": "extra.safetensors"}})
    _refused(folder, "tensor '.*' appears in both .*safetensors and .*safetensors")


# -- config.json -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("edit, match", [
    (lambda c: [c], "must be a JSON object"),
    (lambda c: {**c, "architectures": 5}, "architectures must be a list of strings, found 5"),
    (lambda c: {**c, "architectures": "LlamaForCausalLM"}, "architectures must be a list of strings"),
    (lambda c: {**c, "hidden_size": "big"}, "hidden_size must be an integer, found 'big'"),
    (lambda c: {**c, "hidden_size": None}, "lacks hidden_size"),
    (lambda c: {**c, "num_attention_heads": 0}, "num_attention_heads is 0"),
    (lambda c: {**c, "num_hidden_layers": [2]}, r"num_hidden_layers must be an integer, found \[2\]"),
    (lambda c: {**c, "rope_theta": math.nan}, "rope_theta is nan"),
    (lambda c: {**c, "rms_norm_eps": -1}, "rms_norm_eps is -1"),
    (lambda c: {**c, "max_position_embeddings": 0}, "max_position_embeddings is 0"),
    (lambda c: {**c, "tie_word_embeddings": "no"}, "tie_word_embeddings must be a boolean"),
    (lambda c: {**c, "rope_scaling": [1]}, "rope_scaling must be an object"),
    (lambda c: {**c, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "lacks rope_scaling.low_freq_factor"),
    (lambda c: {**c, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 1.0, "original_max_position_embeddings": 64}},
     "high_freq_factor .* must be greater than low_freq_factor"),
    (lambda c: {**c, "rope_scaling": {"type": "linear", "factor": "x"}}, "rope_scaling.factor must be a number"),
    (lambda c: {**c, "rope_scaling": {"type": "linear", "factor": 0}}, "rope_scaling.factor is 0"),
    (lambda c: {**c, "sliding_window": -4, "use_sliding_window": True}, "sliding_window is -4"),
    (lambda c: {**c, "head_dim": 7}, "head dimension 7 .* even"),
    (lambda c: {**c, "hidden_size": 64}, r"weight has shape \(16, 32\), expected \(16, 64\)"),
    (lambda c: {**c, "num_hidden_layers": 3}, r"missing tensors \['layers\.2\."),
])
def test_malformed_config(seeds: dict[str, Path], tmp_path: Path, edit: Callable, match: str) -> None:
    folder = _copy(seeds, "hf", tmp_path)
    _edit_json(folder / "config.json", edit)
    _refused(folder, rf"config\.json: .*{match}|{match}")


def test_config_not_utf8(seeds: dict[str, Path], tmp_path: Path) -> None:
    folder = _copy(seeds, "hf", tmp_path)
    (folder / "config.json").write_bytes(b"\xff\xfe{}")
    _refused(folder, r"config\.json: not valid (UTF-8|JSON)")


def test_json_numbers_too_long_to_parse(seeds: dict[str, Path], tmp_path: Path) -> None:
    """Python refuses integers of over 4300 digits with a plain ValueError, not a JSONDecodeError."""
    folder = _copy(seeds, "hf", tmp_path)
    (folder / "tokenizer_config.json").write_text('{"add_bos_token": ' + "9" * 5000 + "}")
    _refused(folder, r"tokenizer_config\.json: not valid JSON \(Exceeds the limit")


# -- tokenizer files ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("file, content, match", [
    ("tokenizer_config.json", "[1]", r"tokenizer_config\.json: .*must be a JSON object"),
    ("tokenizer_config.json", b"\xff{}", r"tokenizer_config\.json: not valid (UTF-8|JSON)"),
    ("tokenizer_config.json", '{"bos_token": ["<s>"]}', r"tokenizer_config\.json: bos_token must be"),
    ("tokenizer_config.json", '{"eos_token": {"content": 5}}', r"tokenizer_config\.json: eos_token must be"),
    ("tokenizer_config.json", '{"add_bos_token": "yes"}', r"tokenizer_config\.json: add_bos_token must be a boolean"),
    ("tokenizer_config.json", '{"chat_template": 5}', r"tokenizer_config\.json: chat_template must be"),
    ("tokenizer_config.json", '{"chat_template": [{"name": "default"}]}', r"chat_template must be"),
    ("tokenizer_config.json", '{"chat_template": "{% if %}"}',
     r"tokenizer_config\.json: chat_template does not compile"),
    ("chat_template.jinja", "{{ x", r"chat_template\.jinja: chat_template does not compile"),
    ("chat_template.jinja", b"\xff\xfe", r"chat_template\.jinja: not valid UTF-8"),
    ("generation_config.json", '{"eos_token_id": "x"}', r"generation_config\.json: eos_token_id must be"),
    ("generation_config.json", "[]", r"generation_config\.json: .*must be a JSON object"),
    ("tokenizer.json", "[]", r"tokenizer\.json: unreadable tokenizer"),
    ("tokenizer.json", b"\xff", r"tokenizer\.json: unreadable tokenizer"),
])
def test_malformed_tokenizer_files(seeds: dict[str, Path], tmp_path: Path, file: str, content: str | bytes,
                                   match: str) -> None:
    folder = _copy(seeds, "hf", tmp_path)
    if file == "chat_template.jinja":
        _edit_json(folder / "tokenizer_config.json", lambda c: {**c, "chat_template": None})
    (folder / file).write_bytes(content if isinstance(content, bytes) else content.encode())
    _refused(folder, match)


# -- compressed folders ------------------------------------------------------------------------------------

@pytest.mark.parametrize("content, match", [
    ("{not json", "not valid JSON"), ("[1]", "must be a JSON object"),
    ('{"format": "something-else"}', "format must be 'ember-compressed'"),
    ('{"format": "ember-compressed", "format_version": 99}', "format_version 99 is not supported"),
])
def test_malformed_manifest(seeds: dict[str, Path], tmp_path: Path, content: str, match: str) -> None:
    folder = _copy(seeds, "compressed", tmp_path)
    (folder / "manifest.json").write_text(content)
    _refused(folder, rf"manifest\.json: .*{match}")


@pytest.mark.parametrize("edit, match", [
    (lambda t: t.pop("model.layers.0.mlp.down_proj.scales"), "down_proj.*lacks scales"),
    (lambda t: t.update({"model.layers.0.mlp.down_proj.scales": t["model.layers.0.mlp.down_proj.scales"][:3]}),
     r"down_proj.*scales of shape \(3, 2\) .* expected .* \(32, groups\)"),
    (lambda t: t.update({"model.layers.0.mlp.down_proj.qweight": t["model.layers.0.mlp.down_proj.qweight"].float()}),
     "down_proj.*qweight of type torch.float32"),
    (lambda t: t.update({"model.layers.0.mlp.down_proj.scales": t["model.layers.0.mlp.down_proj.scales"][:, :0]}),
     "down_proj.*scales of shape"),
    (lambda t: t.update({"model.layers.0.mlp.down_proj.mins": t["model.layers.0.mlp.down_proj.mins"].reshape(-1)}),
     "down_proj.*mins of shape"),
])
def test_malformed_packed_layers(seeds: dict[str, Path], tmp_path: Path, edit: Callable, match: str) -> None:
    from safetensors.torch import load_file, save_file

    folder = _copy(seeds, "compressed", tmp_path)
    tensors = load_file(str(folder / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"))
    _refused(folder, rf"model\.safetensors: packed layer .*{match}", load_model)
