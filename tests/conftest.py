"""Shared fixtures: the real default model (pulled once) and tiny random HF models built on the fly."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ember.loading.registry import pull

DATA = Path(__file__).parent / "data"
TEXT = (DATA / "pride-and-prejudice-ch1.txt").read_text()
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    """Path to SmolLM2-135M-Instruct's GGUF, fetched into the ember cache on first use."""
    return pull(progress=False)


def _save_tokenizer(folder: Path) -> int:
    """Train a small byte-level BPE on the test text; returns its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|im_end|>", "bos_token": None, "chat_template": CHATML,
        "tokenizer_class": "PreTrainedTokenizerFast"}))
    return tok.get_vocab_size()


def _build(folder: Path, kind: str, layers: int = 2) -> Path:
    import transformers as tf

    folder.mkdir(parents=True, exist_ok=True)
    vocab = _save_tokenizer(folder)
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=160, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  initializer_range=0.25, eos_token_id=2, bos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    if kind == "qwen2":
        cfg = tf.Qwen2Config(**common, tie_word_embeddings=False, rope_theta=10000.0)
        model = tf.Qwen2ForCausalLM(cfg)
        with torch.no_grad():  # random-init biases are zero; make them count
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    elif kind == "mistral":
        cfg = tf.MistralConfig(**common, tie_word_embeddings=False, sliding_window=512)
        model = tf.MistralForCausalLM(cfg)
    else:
        cfg = tf.LlamaConfig(**common, tie_word_embeddings=True, rope_theta=500000.0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64})
        model = tf.LlamaForCausalLM(cfg)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def tiny_llama3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random Llama-3-style model (llama3 rope scaling, GQA, tied embeddings) as an HF folder."""
    return _build(tmp_path_factory.mktemp("tiny") / "llama3", "llama3")


@pytest.fixture(scope="session")
def tiny_llama_deep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_llama3 with 6 layers: enough for layer skipping (SWIFT never skips the first and the last)."""
    return _build(tmp_path_factory.mktemp("tiny") / "llama3-deep", "llama3", layers=6)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random Qwen2-style model (q/k/v biases, untied head, GQA) as an HF folder."""
    return _build(tmp_path_factory.mktemp("tiny") / "qwen2", "qwen2")


@pytest.fixture(scope="session")
def tiny_mistral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random Mistral-style model (sliding window 512, untied head) as an HF folder."""
    return _build(tmp_path_factory.mktemp("tiny") / "mistral", "mistral")
