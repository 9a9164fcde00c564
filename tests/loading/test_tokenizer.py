"""Tokenizers from GGUF vocabularies and tokenizer.json agree with transformers; streaming never breaks UTF-8."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from ember.errors import InvalidParameterError, ModelLoadError
from ember.loading.gguf import read_metadata
from ember.loading.tokenizer import IncrementalDetokenizer, Tokenizer

DATA = Path(__file__).parent.parent / "data"
TEXTS = [
    "It is a truth universally acknowledged, that a single man in possession of 10,000 a year (in 1813!) "
    "must be in want of a wife; 3.5% of readers DON'T agree.",
    "def f(x):\n    return x ** 2  # square\n\n\tif x:\n\t\tpass\r\n",
    "مرحبا بالعالم، كيف حالك؟",
    "I ❤️ 🦙 llamas 👩‍👩‍👧 and 日本語のテキスト",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "  leading   and trailing spaces  ",
]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "What is 2+2?"}]
CHATML = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _ids(out) -> list[int]:
    """transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True)."""
    return list(out) if isinstance(out, list) else list(out["input_ids"])


# -- the real default model (byte-level BPE, "smollm" pre-tokenizer) ---------------------------------

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
    assert ours.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False) == ids
    for skip in (False, True):
        assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    assert ours.decode(ids, skip_special_tokens=False) == text


def test_gguf_special_tokens_and_ids(gguf_pair, default_gguf: Path) -> None:
    ours, ref = gguf_pair
    im_start, im_end = ref.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert ours.encode("<|im_start|>") == [im_start]
    assert ours.is_special(im_start) and not ours.is_special(ours.encode("hi")[0])
    assert (ours.vocab_size, ours.bos_token_id, ours.eos_token_id) == (49152, ref.bos_token_id, ref.eos_token_id)
    assert im_end in ours.stop_token_ids and ours.eos_token_id in ours.stop_token_ids
    assert ours.add_bos is False  # the GGUF says add_bos_token = False
    assert ours.id_to_bytes(ours.encode(" the")[0]) == b" the"
    assert ours.decode([im_start, *ours.encode("hi")]) == "hi"
    # Building from the path alone (reading the header here) gives the same tokenizer.
    again = Tokenizer.from_gguf(default_gguf, read_metadata(default_gguf))
    assert again.encode(TEXTS[0]) == ours.encode(TEXTS[0]) and again.chat_template == ours.chat_template


@pytest.mark.parametrize("messages", [CHAT, CHAT[1:]], ids=["with-system", "default-system"])
@pytest.mark.parametrize("gen", [True, False])
def test_gguf_chat_template_matches_transformers(gguf_pair, messages: list[dict], gen: bool) -> None:
    ours, ref = gguf_pair
    text = ours.apply_chat_template(messages, add_generation_prompt=gen)
    assert text == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    assert text.endswith("<|im_start|>assistant\n") == gen
    ids = ours.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True)
    assert ids == _ids(ref.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen))
    assert ids == ours.encode(text, add_special_tokens=False)


@pytest.fixture(scope="module")
def smollm_meta(default_gguf: Path) -> dict:
    return read_metadata(default_gguf)


def _write_gguf(path: Path, meta: dict) -> Path:
    """A tensor-less GGUF holding just a tokenizer, for transformers to read."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model(meta["tokenizer.ggml.model"])
    w.add_token_list(meta["tokenizer.ggml.tokens"])
    w.add_token_types(meta["tokenizer.ggml.token_type"])
    if "tokenizer.ggml.pre" in meta:
        w.add_tokenizer_pre(meta["tokenizer.ggml.pre"])
    if "tokenizer.ggml.merges" in meta:
        w.add_token_merges(meta["tokenizer.ggml.merges"])
    if "tokenizer.ggml.scores" in meta:
        w.add_token_scores(meta["tokenizer.ggml.scores"])
    w.add_bos_token_id(meta["tokenizer.ggml.bos_token_id"])
    w.add_eos_token_id(meta["tokenizer.ggml.eos_token_id"])
    w.add_add_bos_token(meta["tokenizer.ggml.add_bos_token"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    return path


PRE_PROBE = ["DON'T (hello) world.\n\n  foo\tbar 12345 x", "She said:\n\n\"ok!\"\r\n  (fine)", TEXTS[1], TEXTS[3]]


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "some-future-pre"])
def test_pre_tokenizer_regexes_match_transformers(tmp_path: Path, smollm_meta: dict, pre: str) -> None:
    import transformers as tf

    path = _write_gguf(tmp_path / f"{pre}.gguf", {**smollm_meta, "tokenizer.ggml.pre": pre})
    ours, ref = Tokenizer.from_gguf(path), tf.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    plain = Tokenizer.from_gguf("gpt2.gguf", {**smollm_meta, "tokenizer.ggml.pre": "gpt2"})
    for text in PRE_PROBE:
        assert ours.encode(text) == ref.encode(text, add_special_tokens=False)
        assert ours.decode(ours.encode(text)) == text
    # The split rule really changed (else this test would not see a wrong regex) -- except for the
    # unknown name, which falls back to GPT-2's.
    changed = any(ours.encode(t) != plain.encode(t) for t in PRE_PROBE)
    assert changed == (pre != "some-future-pre")
    assert ours.add_bos is False  # the file says so...
    unsaid = {k: v for k, v in smollm_meta.items() if k != "tokenizer.ggml.add_bos_token"}
    default = Tokenizer.from_gguf("x.gguf", {**unsaid, "tokenizer.ggml.pre": pre})
    assert default.add_bos == (pre == "llama-bpe")  # ...else llama.cpp's default for the pre-tokenizer


# -- streaming -------------------------------------------------------------------------------------

def _stream(tok: Tokenizer, ids: list[int], skip: bool = True) -> list[str]:
    detok = IncrementalDetokenizer(tok, skip)
    deltas = [detok.add(t) for t in ids] + [detok.flush()]
    assert detok.text == "".join(deltas)
    return deltas


def _complete_prefix(b: bytes) -> str:
    """The text of the longest prefix of b that ends on a character boundary."""
    for cut in range(4):
        try:
            return b[:len(b) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
    raise AssertionError(f"not UTF-8: {b!r}")


@pytest.mark.parametrize("text", ["مرحبا بالعالم، كيف حالك؟ أنا بخير", "I ❤️ 🦙 llamas 👩‍👩‍👧 🎉🎉"])
def test_streaming_never_breaks_utf8(gguf_pair, text: str) -> None:
    ours, _ = gguf_pair
    ids = ours.encode(text)
    deltas = _stream(ours, ids)
    assert "".join(deltas) == ours.decode(ids) == text
    assert all("\ufffd" not in d for d in deltas)
    # After each token exactly the complete characters so far are out: nothing of a partial one.
    for i in range(len(ids)):
        assert "".join(deltas[:i + 1]) == _complete_prefix(b"".join(map(ours.id_to_bytes, ids[:i + 1])))
    # Some token must carry only part of a character, else this test proves nothing.
    assert any(not _is_utf8(ours.id_to_bytes(t)) for t in ids)


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_emoji_split_across_tokens_is_held(gguf_pair) -> None:
    ours, _ = gguf_pair
    ids = ours.encode("🦙")
    assert len(ids) > 1  # the llama emoji is not one token in this vocabulary
    assert _stream(ours, ids) == [""] * (len(ids) - 1) + ["🦙", ""]
    # Cut short, the held bytes come out at the end as HF's decode shows them.
    cut = _stream(ours, ids[:-1])
    assert "".join(cut) == ours.decode(ids[:-1]) == "\ufffd" and cut[-1] == "\ufffd"


def test_stream_special_tokens(gguf_pair) -> None:
    ours, _ = gguf_pair
    ids = ours.encode("<|im_start|>assistant\nSure<|im_end|>")
    assert "".join(_stream(ours, ids)) == "assistant\nSure" == ours.decode(ids)
    assert "".join(_stream(ours, ids, skip=False)) == "<|im_start|>assistant\nSure<|im_end|>"


def test_stream_is_linear_and_exact_on_a_long_text(gguf_pair) -> None:
    ours, _ = gguf_pair
    text = (DATA / "pride-and-prejudice-ch1.txt").read_text() * 4
    ids = ours.encode(text)
    start = time.perf_counter()
    out = "".join(_stream(ours, ids))
    elapsed = time.perf_counter() - start
    assert out == ours.decode(ids) == text
    assert elapsed < 1.0, f"{len(ids)} tokens took {elapsed:.2f}s to stream (re-decoding everything?)"


# -- SentencePiece-style ("llama") GGUF vocabulary -------------------------------------------------

SPM_NORMAL = ["▁", "h", "e", "l", "o", "w", "r", "d", "▁h", "▁he", "ll", "▁hell", "▁hello", "▁w", "or",
              "▁wor", "ld", "▁world"]


def _spm_metadata(normal: list[str] = SPM_NORMAL, scores: list[float] | None = None, **extra) -> dict:
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    scores = scores if scores is not None else [-float(i) for i in range(len(normal))][::-1]
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": pieces + normal,
            "tokenizer.ggml.scores": [0.0] * len(pieces) + scores,
            "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * len(normal),
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.add_bos_token": True, **extra}


def _pieces(tok: Tokenizer, ids: list[int]) -> list[str]:
    return [tok.id_to_piece(i) for i in ids]


def test_sentencepiece_vocab_with_byte_fallback() -> None:
    tok = Tokenizer.from_gguf("tiny-spm.gguf", _spm_metadata())
    ids = tok.encode("hello world")
    assert ids[0] == 1 and _pieces(tok, ids[1:]) == ["▁hello", "▁world"]
    assert tok.decode(ids) == "hello world"
    assert tok.decode(ids, skip_special_tokens=False) == "<s> hello world"
    ids = tok.encode("héllo")  # é is not in the vocabulary: two byte tokens
    assert _pieces(tok, ids[1:]) == ["▁h", "<0xC3>", "<0xA9>", "ll", "o"]
    assert [tok.id_to_bytes(i) for i in ids[2:4]] == [b"\xc3", b"\xa9"]
    assert tok.decode(ids) == "héllo" == "".join(_stream(tok, ids))
    assert _stream(tok, ids)[2:4] == ["", "é"]
    emoji = tok.encode("🦙", add_special_tokens=False)  # four byte tokens after the prefix space
    assert "".join(_stream(tok, emoji[:-1])) == tok.decode(emoji[:-1]) == "\ufffd" * 3  # one per byte, as HF


def test_sentencepiece_merges_follow_scores() -> None:
    normal = ["▁", "a", "b", "c", "▁a", "bc", "ab"]
    prefer_ab = Tokenizer.from_gguf("x.gguf", _spm_metadata(normal, [-9, -9, -9, -9, -3, -2, -1]))
    prefer_a = Tokenizer.from_gguf("x.gguf", _spm_metadata(normal, [-9, -9, -9, -9, -1, -2, -3]))
    assert _pieces(prefer_ab, prefer_ab.encode("abc", add_special_tokens=False)) == ["▁", "ab", "c"]
    assert _pieces(prefer_a, prefer_a.encode("abc", add_special_tokens=False)) == ["▁a", "bc"]


def test_sentencepiece_matches_transformers(tmp_path: Path) -> None:
    import transformers as tf

    path = _write_gguf(tmp_path / "spm.gguf", _spm_metadata())
    ours, ref = Tokenizer.from_gguf(path), tf.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in ["hello world", "héllo wörld", "hello\nworld", "x🦙y", "hello  world "]:
        ids = ours.encode(text)
        assert ids == ref.encode(text)
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    # Deliberate difference: like llama.cpp (and SentencePiece), ember always adds the prefix space,
    # also before text that starts with a space and after a special token; transformers' GGUF
    # loader (Metaspace, prepend "first") does neither.
    assert _pieces(ours, ours.encode(" hello", add_special_tokens=False)) == ["▁", "▁hello"]
    assert _pieces(ours, ours.encode("world</s>hello", add_special_tokens=False)) == ["▁world", "</s>", "▁hello"]


def test_sentencepiece_without_space_prefix() -> None:
    tok = Tokenizer.from_gguf("x.gguf", _spm_metadata(**{"tokenizer.ggml.add_space_prefix": False}))
    ids = tok.encode(" hello world", add_special_tokens=False)
    assert _pieces(tok, ids) == ["▁hello", "▁world"]
    assert tok.decode(ids) == " hello world" == "".join(_stream(tok, ids))


# -- Hugging Face folders ----------------------------------------------------------------------------

def _hf_folder(folder: Path, config: dict, generation: dict | None = None) -> Path:
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([(DATA / "pride-and-prejudice-ch1.txt").read_text()[:6000]], trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    if generation is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation))
    return folder


def test_hf_folder_tokenizer(tmp_path: Path) -> None:
    import transformers as tf

    bos = {"__type": "AddedToken", "content": "<s>", "lstrip": False, "normalized": False, "rstrip": False,
           "single_word": False, "special": True}
    folder = _hf_folder(tmp_path / "m", {
        "bos_token": bos, "eos_token": "<|im_end|>", "add_bos_token": True, "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": [{"name": "default", "template": CHATML}, {"name": "tool_use", "template": "TOOLS"}]},
        {"eos_token_id": [2, 3]})
    tok, ref = Tokenizer.from_hf_folder(folder), tf.AutoTokenizer.from_pretrained(folder)
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == ref.encode(text, add_special_tokens=False)
        assert tok.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False) == text
        assert "".join(_stream(tok, ids)) == ref.decode(ids, skip_special_tokens=True)
    assert (tok.bos_token_id, tok.eos_token_id, tok.add_bos) == (0, 2, True)
    assert tok.encode("hi") == [0] + ref.encode("hi", add_special_tokens=False)
    assert tok.stop_token_ids == {2, 3}  # eos plus generation_config's list
    assert tok.encode("<|im_start|>", add_special_tokens=False) == [1] and tok.is_special(1)
    text = tok.apply_chat_template(CHAT)
    assert text == ref.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    # The template writes BOS itself, so tokenizing does not add a second one.
    ids = tok.apply_chat_template(CHAT, tokenize=True)
    assert ids == _ids(ref.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True))
    assert ids[:2] == [0, 1]


def test_hf_folder_template_without_bos_gets_bos_once(tmp_path: Path) -> None:
    folder = _hf_folder(tmp_path / "m", {"bos_token": "<s>", "eos_token": "<|im_end|>", "add_bos_token": True,
                                         "chat_template": CHATML.replace("{{ bos_token }}", "")})
    tok = Tokenizer.from_hf_folder(folder)
    ids = tok.apply_chat_template(CHAT[1:2], tokenize=True)
    assert ids == [0] + tok.encode(tok.apply_chat_template(CHAT[1:2]), add_special_tokens=False)
    assert ids.count(0) == 1


def test_hf_folder_conftest_model(tiny_llama3: Path) -> None:
    import transformers as tf

    tok, ref = Tokenizer.from_hf_folder(tiny_llama3), tf.AutoTokenizer.from_pretrained(tiny_llama3)
    text = "It is a truth universally acknowledged"
    assert tok.encode(text) == ref.encode(text)
    assert tok.apply_chat_template(CHAT) == ref.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert tok.eos_token_id in tok.stop_token_ids and tok.chat_template is not None


# -- chat templates ----------------------------------------------------------------------------------

def _with_template(template: str | None) -> Tokenizer:
    return Tokenizer.from_gguf("x.gguf", _spm_metadata(**{"tokenizer.chat_template": template} if template else {}))


def test_template_helpers() -> None:
    tok = _with_template("{{ messages[0]['content'] | tojson }}|{{ strftime_now('%Y') }}|{{ bos_token }}{{ eos_token }}"
                         "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.role }}{% endfor %}")
    text = tok.apply_chat_template([{"role": "user", "content": "héllo <b>\"x\""}, {"role": "bot", "content": ""}])
    assert text == f'"héllo <b>\\"x\\""|{time.strftime("%Y")}|<s></s>user'


def test_template_raise_exception_is_a_parameter_error() -> None:
    tok = _with_template("{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}ok")
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(InvalidParameterError, match="first must be user"):
        tok.apply_chat_template([{"role": "system", "content": "x"}])
    with pytest.raises(InvalidParameterError, match="must not be empty"):
        tok.apply_chat_template([])


def test_no_template_uses_plain_format() -> None:
    tok = _with_template(None)
    msgs = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]
    assert tok.apply_chat_template(msgs) == "user: hello\nassistant: world\nassistant:"
    assert tok.apply_chat_template(msgs, add_generation_prompt=False) == "user: hello\nassistant: world\n"
    assert tok.apply_chat_template(msgs, tokenize=True)[0] == 1  # BOS, once


# -- errors ------------------------------------------------------------------------------------------

def test_tokenizer_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"x\.gguf: tokenizer model 'rwkv' is not supported; supported: gpt2, llama"):
        Tokenizer.from_gguf("x.gguf", {"tokenizer.ggml.model": "rwkv"})
    with pytest.raises(ModelLoadError, match="no tokenizer.ggml.tokens"):
        Tokenizer.from_gguf("x.gguf", {"tokenizer.ggml.model": "gpt2"})
    with pytest.raises(ModelLoadError, match="token_type has 3 entries but the vocabulary has 277"):
        Tokenizer.from_gguf("x.gguf", _spm_metadata(**{"tokenizer.ggml.token_type": [1, 1, 1]}))
    with pytest.raises(ModelLoadError, match="eos_token_id is 9999, outside the vocabulary"):
        Tokenizer.from_gguf("x.gguf", _spm_metadata(**{"tokenizer.ggml.eos_token_id": 9999}))
    with pytest.raises(ModelLoadError, match=f"{tmp_path}: no tokenizer.json"):
        Tokenizer.from_hf_folder(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="unreadable tokenizer"):
        Tokenizer.from_hf_folder(tmp_path)


def test_truncated_vocabulary_is_a_load_error(tmp_path: Path, smollm_meta: dict) -> None:
    path = _write_gguf(tmp_path / "cut.gguf", smollm_meta)
    data = path.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:len(data) // 2])  # ends inside the token list
    with pytest.raises(ModelLoadError, match=r"cut\.gguf: GGUF header is truncated or corrupt"):
        Tokenizer.from_gguf(path)


def test_ids_past_the_tokenizer_decode_to_nothing(tiny_qwen2: Path) -> None:
    """A model's embedding may be padded beyond its tokenizer (Qwen2: 151936 rows, 151665 tokens) and such an id
    can be sampled: it adds no text instead of failing the request."""
    tok = Tokenizer.from_hf_folder(tiny_qwen2)
    past = tok.vocab_size + 3
    assert tok.id_to_piece(past) == "" and tok.id_to_bytes(past) == b""
    detok = IncrementalDetokenizer(tok)
    hi = tok.encode("hi", add_special_tokens=False)
    assert "".join(detok.add(t) for t in [*hi, past]) + detok.flush() == "hi"
