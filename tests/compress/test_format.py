"""The compressed-model folder: reloads bit-identically, generates what the in-memory model generates,
and its manifest says what was done; GGUF sources get a config.json and tokenizer files."""
from __future__ import annotations

import hashlib
import json
from datetime import datetime
from pathlib import Path

import pytest
import torch

from ember import LLM, SamplingParams
from ember.compress.pipeline import CompressOptions, compress, plan_compression, save
from ember.config import ModelConfig
from ember.engine.engine import EngineArgs, LLMEngine
from ember.loading.tokenizer import Tokenizer
from ember.models.loader import LoadedModel, load_config, load_model
from ember.ops import quant
from tests.conftest import DATA, TEXT

CALIB = DATA / "pride-and-prejudice-ch1.txt"


def _greedy(engine: LLMEngine, prompt: list[int], n: int = 12) -> list[int]:
    engine.add_request("r", {"prompt_token_ids": prompt}, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
    last = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            last = out
    assert last is not None and last.finished
    return list(last.outputs[0].token_ids)


def _tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def _compress(source: Path, methods: str, out: Path, **options: object) -> tuple[LoadedModel, dict]:
    plan = plan_compression(source, methods, CompressOptions(**options), out)  # type: ignore[arg-type]
    model, manifest = compress(plan)
    manifest = save(plan, model, manifest)
    return LoadedModel(model, plan.tokenizer, plan.config, plan.source, 0.0), manifest


CASES = [  # fixture, methods, options
    ("tiny_llama3", "int8", {}),  # tied head: its own int8 copy
    ("tiny_qwen2", "awq", {"calib": CALIB, "calib_tokens": 512}),  # biases, untied head
    ("tiny_mistral", "wanda,int4", {"calib": CALIB, "calib_tokens": 512, "pattern": "2:4", "group_size": 32}),
    ("tiny_llama3", "magnitude", {"sparsity": 0.3, "dtype": "bfloat16"}),
]


@pytest.mark.parametrize("fixture,methods,options", CASES, ids=[c[1] for c in CASES])
def test_reload_is_bit_identical_and_generates_the_same(fixture: str, methods: str, options: dict,
                                                        request: pytest.FixtureRequest, tmp_path: Path) -> None:
    out = tmp_path / "out"
    memory, manifest = _compress(request.getfixturevalue(fixture), methods, out, **options)
    reloaded = LLM(out, kv_cache_memory=0.01)
    disk = reloaded.engine.loaded.model
    mine, theirs = _tensors(memory.model), _tensors(disk)
    assert mine.keys() == theirs.keys()
    for name, t in mine.items():
        assert t.dtype == theirs[name].dtype and torch.equal(t, theirs[name]), name
    n_quant = sum(isinstance(m, quant.QuantLinear) for m in disk.modules())
    assert n_quant == (0 if methods == "magnitude" else 4 * len(disk.layers) + 1)  # + the LM head
    prompt = memory.tokenizer.encode(TEXT[:200])
    in_memory = LLMEngine(EngineArgs(kv_cache_memory=0.01), loaded=memory)
    assert _greedy(in_memory, prompt) == _greedy(reloaded.engine, prompt)


def test_manifest_says_what_was_done(tiny_mistral: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    _, manifest = _compress(tiny_mistral, "int4,wanda", out, calib=CALIB, calib_tokens=700, pattern="2:4")
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == manifest
    assert manifest["methods"] == ["wanda", "int4"]  # pruning runs first
    assert manifest["quantization"] == {"method": "int4", "bits": 4, "group_size": 32,
                                        "scheme": "asymmetric, integer zero point", "lm_head": "int8 per-channel"}
    pruning = manifest["pruning"]
    assert pruning["method"] == "wanda" and pruning["sparsity"] == 0.5 and pruning["pattern"] == "2:4"
    assert pruning["achieved_sparsity"] == pytest.approx(0.5)
    assert manifest["calibration"] == {"file": CALIB.name, "tokens": 512, "sequences": 1, "seq_len": 512}
    layers = manifest["layers"]
    assert len(layers) == 2 * 4 + 1 and layers["layers.1.mlp.down_proj"]["shape"] == [64, 160]
    for name, row in layers.items():
        assert row["format"] == ("int8 per-channel" if name == "lm_head" else "int4 g32 zero-point")
        assert row["sparsity"] >= (0 if name == "lm_head" else 0.5)  # zeros survive quantization
    sizes = {p.name: p.stat().st_size for p in out.iterdir() if p.name != "manifest.json"}
    assert manifest["bytes"]["files"] == sizes and manifest["bytes"]["weights"] == sizes["model.safetensors"]
    assert manifest["bytes"]["total"] == sum(sizes.values())
    assert manifest["source"]["sha256"] == hashlib.sha256((tiny_mistral / "model.safetensors").read_bytes()).hexdigest()
    assert manifest["ember_version"] and datetime.fromisoformat(manifest["created"])
    assert not list(tmp_path.glob(".*partial"))


def test_gguf_source_gets_config_and_tokenizer_files(default_gguf: Path, tmp_path: Path) -> None:
    out = tmp_path / "smol-int8"
    memory, manifest = _compress(default_gguf, "int8", out, dtype="bfloat16")
    assert manifest["quantization"]["lm_head"] == "int8 per-channel (own copy of the tied embedding)"
    _, cfg, tok = load_config(default_gguf)
    _, cfg2, tok2 = load_config(out)
    assert ModelConfig.from_hf(cfg.to_hf(), "-") == cfg and cfg2 == cfg
    assert tok2.encode(TEXT) == tok.encode(TEXT) and tok2.stop_token_ids == tok.stop_token_ids
    chat = [{"role": "user", "content": "Who is Mr. Bennet?"}]
    assert tok2.apply_chat_template(chat, tokenize=True) == tok.apply_chat_template(chat, tokenize=True)
    disk = _tensors(load_model(out).model)
    assert all(torch.equal(t, disk[n]) for n, t in _tensors(memory.model).items())
    assert disk["embed_tokens.weight"].dtype == torch.float32  # loaded in the runtime dtype, stored in bf16
    assert torch.equal(disk["embed_tokens.weight"], disk["embed_tokens.weight"].bfloat16().float())


def test_tokenizer_round_trips_through_save_pretrained(tiny_qwen2: Path, tmp_path: Path) -> None:
    tok = Tokenizer.from_hf_folder(tiny_qwen2)
    tok.save_pretrained(tmp_path)
    again = Tokenizer.from_hf_folder(tmp_path)
    assert again.encode(TEXT) == tok.encode(TEXT) and again.chat_template == tok.chat_template
    assert (again.bos_token_id, again.eos_token_id, again.stop_token_ids) == \
        (tok.bos_token_id, tok.eos_token_id, tok.stop_token_ids)
