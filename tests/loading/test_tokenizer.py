"""Tokenizers from GGUF vocabularies and tokenizer.json agree with transformers; streaming never breaks UTF-8."""
from __future__ import annotations

from pathlib import Path

import pytest

from ember.errors import ModelLoadError
from ember.loading.tokenizer import IncrementalDetokenizer, Tokenizer

TEXTS = [
    "It is a truth universally acknowledged, that a single man in possession of 10,000 a year...",
    "def f(x):\n    return x ** 2  # square\n\n\tdone",
    "مرحبا بالعالم، كيف حالك؟",
    "I ❤️ 🦙 llamas 👩‍👩‍👧 and 日本語のテキスト",
    "<|im_start|>user\nhi<|im_end|>",
    "  leading   and trailing spaces  ",
]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is 2+2?"}]


@pytest.fixture(scope="module")
def gguf_pair(default_gguf: Path):
    import transformers as tf

    ref = tf.AutoTokenizer.from_pretrained(default_gguf.parent, gguf_file=default_gguf.name)
    return Tokenizer.from_gguf(default_gguf), ref


@pytest.mark.parametrize("text", TEXTS)
def test_gguf_bpe_matches_transformers(gguf_pair, text: str) -> None:
    ours, ref = gguf_pair
    ids = ours.encode(text)
    assert ids == ref.encode(text, add_special_tokens=True)
    assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False)
    assert ours.decode(ids, skip_special_tokens=False) == text


def test_gguf_chat_template_and_stop_ids(gguf_pair) -> None:
    ours, ref = gguf_pair
    assert ours.apply_chat_template(CHAT) == ref.apply_chat_template(CHAT, tokenize=False,
                                                                     add_generation_prompt=True)
    assert ours.apply_chat_template(CHAT, tokenize=True) == ours.encode(ours.apply_chat_template(CHAT),
                                                                        add_special_tokens=False)
    assert ours.eos_token_id == ref.eos_token_id
    assert ref.convert_tokens_to_ids("<|im_end|>") in ours.stop_token_ids


def _stream(tok: Tokenizer, ids: list[int]) -> list[str]:
    detok = IncrementalDetokenizer(tok)
    return [detok.add(t) for t in ids] + [detok.flush()]


@pytest.mark.parametrize("text", ["مرحبا بالعالم، كيف حالك؟ أنا بخير", "I ❤️ 🦙 llamas 👩‍👩‍👧 🎉🎉"])
def test_streaming_never_breaks_utf8(gguf_pair, text: str) -> None:
    ours, _ = gguf_pair
    ids = ours.encode(text)
    deltas = _stream(ours, ids)
    assert "".join(deltas) == ours.decode(ids) == text
    assert all("\ufffd" not in d for d in deltas)
    # Some token must carry only part of a character (else this test proves nothing) ...
    partial = [i for i, t in enumerate(ids) if not _complete(ours.id_to_bytes(t))]
    assert partial
    # ... and for it nothing (or only the text before the split character) is emitted.
    for i in partial:
        assert deltas[i].encode() != ours.id_to_bytes(ids[i])


def _complete(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_stream_skips_special_tokens(gguf_pair) -> None:
    ours, _ = gguf_pair
    ids = ours.encode("<|im_start|>assistant\nSure<|im_end|>")
    assert "".join(_stream(ours, ids)) == "assistant\nSure"


def _spm_metadata() -> dict:
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    normal = ["▁", "h", "e", "l", "o", "w", "r", "d", "▁h", "▁he", "ll", "▁hell", "▁hello", "▁w", "or",
              "▁wor", "ld", "▁world"]
    scores = [0.0] * len(pieces) + [-float(i) for i in range(len(normal))][::-1]
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": pieces + normal,
            "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types + [1] * len(normal),
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.add_bos_token": True}


def test_sentencepiece_vocab_with_byte_fallback() -> None:
    tok = Tokenizer.from_gguf("tiny-spm.gguf", _spm_metadata())
    ids = tok.encode("hello world")
    assert ids[0] == 1  # BOS
    vocab = _spm_metadata()["tokenizer.ggml.tokens"]
    assert [vocab[i] for i in ids[1:]] == ["▁hello", "▁world"]
    assert tok.decode(ids) == "hello world"
    ids = tok.encode("héllo")  # é is not in the vocabulary: two byte tokens
    assert [vocab[i] for i in ids[2:4]] == ["<0xC3>", "<0xA9>"]
    assert tok.decode(ids) == "héllo"
    assert "".join(_stream(tok, ids)) == "héllo"


def test_hf_folder_tokenizer(tiny_llama3: Path) -> None:
    import transformers as tf

    tok = Tokenizer.from_hf_folder(tiny_llama3)
    ref = tf.AutoTokenizer.from_pretrained(tiny_llama3)
    text = "It is a truth universally acknowledged"
    assert tok.encode(text) == ref.encode(text)
    assert tok.apply_chat_template(CHAT) == ref.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert tok.eos_token_id in tok.stop_token_ids


def test_tokenizer_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"tokenizer model 'rwkv' is not supported; supported: gpt2, llama"):
        Tokenizer.from_gguf("x.gguf", {"tokenizer.ggml.model": "rwkv"})
    with pytest.raises(ModelLoadError, match="no tokenizer.json"):
        Tokenizer.from_hf_folder(tmp_path)
