"""Tokenizers from tokenizer.json or a GGUF vocabulary, chat templates, and UTF-8-safe streaming detokenisation."""
from __future__ import annotations

import codecs
import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from ember.errors import InvalidParameterError, ModelLoadError

# Pre-tokenizer regexes by GGUF `tokenizer.ggml.pre`, as llama.cpp and transformers use them.
_GPT2 = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_LLAMA3 = (r"""(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
           r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
_UPPER, _LOWER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_TEKKEN = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_PRES = ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral")
_PRE_REGEX = {**dict.fromkeys(_LLAMA3_PRES + ("dbrx", "smaug-bpe"), _LLAMA3),
              **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2), "tekken": _TEKKEN}
_IGNORE_MERGES = _LLAMA3_PRES + ("tekken",)  # whole words in the vocabulary skip BPE (and BOS is on by default)
_DIGIT_SPLIT = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
# Tokens that end a turn in common chat formats; present (special) ones become stop ids.
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "</s>", "<|end|>",
                "<end_of_turn>", "<|eom_id|>")
SUPPORTED_GGUF_TOKENIZERS = ("gpt2", "llama")
CONTROL, USER_DEFINED = 3, 4  # GGUF token types matched whole in text


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode map (printable stand-ins for the 256 byte values)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class Tokenizer:
    """Encode/decode text and render chat templates; wraps a Hugging Face `tokenizers.Tokenizer`."""

    def __init__(self, tok: Any, byte_level: bool, bos_token_id: int | None, eos_token_id: int | None,
                 add_bos: bool, chat_template: str | None, extra_stop_ids: set[int] = frozenset(),
                 strip_leading_space: bool = False, add_eos: bool = False) -> None:
        self._tok = tok
        self.byte_level = byte_level
        self.bos_token_id, self.eos_token_id = bos_token_id, eos_token_id
        self.add_bos = add_bos and bos_token_id is not None
        self.add_eos = add_eos and eos_token_id is not None
        self.chat_template = chat_template
        self.strip_leading_space = strip_leading_space  # decode drops the SentencePiece prefix space
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self._pieces = [tok.id_to_token(i) or "" for i in range(self.vocab_size)]
        self._bytes: dict[int, bytes] = {}
        self._special = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        vocab = tok.get_vocab(with_added_tokens=True)
        self.stop_token_ids = {i for i in (eos_token_id,) if i is not None} | set(extra_stop_ids)
        self.stop_token_ids |= {vocab[t] for t in _END_OF_TURN if vocab.get(t) in self._special}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_special_tokens:
            ids = [self.bos_token_id] * self.add_bos + ids + [self.eos_token_id] * self.add_eos
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special

    def id_to_piece(self, token_id: int) -> str:
        return self._pieces[token_id]

    def id_to_bytes(self, token_id: int) -> bytes:
        """The bytes this token adds to decoded text (before the leading-space strip), as HF decodes it."""
        out = self._bytes.get(token_id)
        if out is None:
            out = self._bytes[token_id] = self._piece_bytes(self._pieces[token_id])
        return out

    def _piece_bytes(self, piece: str) -> bytes:
        if self.byte_level:  # as tokenizers' ByteLevel decoder: byte stand-ins, else the text itself
            table = _byte_decoder()
            return bytes(table[c] for c in piece) if all(c in table for c in piece) else piece.encode()
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode()

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tokenize: bool = False) -> str | list[int]:
        """Render with the model's template (or `_plain_chat` without one); ids get BOS once if the model adds it."""
        if not messages:
            raise InvalidParameterError("messages must not be empty", "messages")
        text = (_render(self.chat_template, messages, add_generation_prompt, self._token_str(self.bos_token_id),
                        self._token_str(self.eos_token_id))
                if self.chat_template else _plain_chat(messages, add_generation_prompt))
        if not tokenize:
            return text
        ids = self.encode(text, add_special_tokens=False)
        return [self.bos_token_id] + ids if self.add_bos and ids[:1] != [self.bos_token_id] else ids

    def _token_str(self, token_id: int | None) -> str:
        return "" if token_id is None else self._pieces[token_id]

    @classmethod
    def from_gguf(cls, path: str | Path, metadata: dict[str, Any] | None = None) -> "Tokenizer":
        from ember.loading.gguf import read_metadata

        meta = metadata if metadata is not None else read_metadata(path)
        kind, tokens = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.tokens")
        if kind not in SUPPORTED_GGUF_TOKENIZERS:
            raise ModelLoadError(f"{path}: tokenizer model {kind!r} is not supported; "
                                 f"supported: {', '.join(SUPPORTED_GGUF_TOKENIZERS)}")
        if not tokens:
            raise ModelLoadError(f"{path}: GGUF has no tokenizer.ggml.tokens vocabulary (re-convert the model "
                                 "with its tokenizer, or load the Hugging Face folder instead)")
        types = _per_token(path, meta, "token_type", 1)
        pre = meta.get("tokenizer.ggml.pre", "default")
        space_prefix = kind == "llama" and bool(meta.get("tokenizer.ggml.add_space_prefix", True))
        if kind == "gpt2":
            tok = _gguf_bpe(tokens, meta.get("tokenizer.ggml.merges") or [], pre)
        else:
            tok = _gguf_spm(tokens, _per_token(path, meta, "scores", 0.0), types, space_prefix)
        _add_special(tok, tokens, types)
        bos, eos = (_token_id(path, meta, k, len(tokens)) for k in ("bos", "eos"))
        extra = {_token_id(path, meta, k, len(tokens)) for k in ("eot", "eom")} - {None}
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama" or pre in _IGNORE_MERGES))
        return cls(tok, kind == "gpt2", bos, eos, add_bos, meta.get("tokenizer.chat_template"), extra,
                   space_prefix, bool(meta.get("tokenizer.ggml.add_eos_token", False)))

    @classmethod
    def from_hf_folder(cls, folder: str | Path) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise ModelLoadError(f"{folder}: no tokenizer.json (ember needs the fast-tokenizer file; load the "
                                 "tokenizer with transformers and save_pretrained it into this folder)")
        try:
            tok = HFTokenizer.from_file(str(path))
            decoder = json.dumps(json.loads(path.read_text(encoding="utf-8")).get("decoder"))
        except Exception as e:
            raise ModelLoadError(f"{path}: unreadable tokenizer ({type(e).__name__}: {e})") from None
        cfg = _read_json(folder / "tokenizer_config.json")
        vocab = tok.get_vocab(with_added_tokens=True)
        bos, eos = (vocab.get(_token_content(cfg.get(k)) or "") for k in ("bos_token", "eos_token"))
        gen = _read_json(folder / "generation_config.json").get("eos_token_id")
        extra = set(gen if isinstance(gen, list) else [gen] if gen is not None else [])
        probe = tok.encode("a", add_special_tokens=True).ids  # what tokenizer.json's post-processor adds
        add_bos = bool(cfg.get("add_bos_token", bos is not None and probe[:1] == [bos]))
        add_eos = bool(cfg.get("add_eos_token", eos is not None and probe[-1:] == [eos]))
        byte_level = "ByteLevel" in decoder
        strip = not byte_level and ("Strip" in decoder or ("Metaspace" in decoder and '"never"' not in decoder))
        return cls(tok, byte_level, bos, eos, add_bos, _hf_template(folder, cfg), extra, strip, add_eos)

    def save_pretrained(self, folder: str | Path) -> None:
        """Write tokenizer.json, tokenizer_config.json and generation_config.json (stop ids) so that
        from_hf_folder reads back a tokenizer that encodes, decodes and templates the same."""
        folder = Path(folder)
        self._tok.save(str(folder / "tokenizer.json"))
        bos, eos = (None if i is None else self._pieces[i] for i in (self.bos_token_id, self.eos_token_id))
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
               "add_bos_token": self.add_bos, "add_eos_token": self.add_eos, "chat_template": self.chat_template,
               "clean_up_tokenization_spaces": False}
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False), encoding="utf-8")
        gen = {"bos_token_id": self.bos_token_id, "eos_token_id": sorted(self.stop_token_ids)}
        (folder / "generation_config.json").write_text(json.dumps(gen, indent=2), encoding="utf-8")


def _per_token(path: str | Path, meta: dict[str, Any], key: str, default: Any) -> list[Any]:
    """A per-token GGUF array (scores, token types), checked against the vocabulary's length."""
    n = len(meta["tokenizer.ggml.tokens"])
    values = meta.get(f"tokenizer.ggml.{key}") or [default] * n
    if len(values) != n:
        raise ModelLoadError(f"{path}: tokenizer.ggml.{key} has {len(values)} entries but the vocabulary has {n}; "
                             "the file is corrupt (re-convert it)")
    return values


def _token_id(path: str | Path, meta: dict[str, Any], name: str, n: int) -> int | None:
    value = meta.get(f"tokenizer.ggml.{name}_token_id")
    if value is not None and not 0 <= value < n:
        raise ModelLoadError(f"{path}: tokenizer.ggml.{name}_token_id is {value}, outside the vocabulary "
                             f"(0..{n - 1}); the file is corrupt (re-convert it)")
    return value


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path}: not valid JSON ({e})") from None


def _token_content(tok: Any) -> str | None:
    return tok.get("content") if isinstance(tok, dict) else tok


def _hf_template(folder: Path, cfg: dict[str, Any]) -> str | None:
    """tokenizer_config.json's chat_template (a string, or named templates: "default"), else chat_template.jinja."""
    template = cfg.get("chat_template")
    if isinstance(template, list):
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    return template


def _gguf_bpe(tokens: list[str], merges: list[str], pre: str) -> Any:
    """Byte-level BPE (llama.cpp's "gpt2" model), split as `tokenizer.ggml.pre` says (GPT-2's regex if unknown)."""
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = HFTokenizer(models.BPE(vocab, pairs, ignore_merges=pre in _IGNORE_MERGES))
    steps = [pre_tokenizers.Split(Regex(_PRE_REGEX.get(pre, _GPT2)), behavior="isolated"),
             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    if pre in _DIGIT_SPLIT:
        steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    return tok


def _gguf_spm(tokens: list[str], scores: list[float], types: list[int], space_prefix: bool) -> Any:
    """SentencePiece-style BPE (llama.cpp's "llama" model): ▁ for spaces, <0xXX> byte fallback."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, normalizers

    vocab = {t: i for i, t in enumerate(tokens)}
    # SentencePiece merges whichever adjacent pair forms the best-scoring normal piece; as BPE ranks,
    # that is every split of a normal piece into two known pieces, best score first (ties as transformers).
    merges = []
    for i, piece in enumerate(tokens):
        if types[i] == 1:
            splits = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
            merges += [(-scores[i], -len(a), -len(b), vocab[a], vocab[b], a, b) for a, b in splits]
    merges.sort()
    unk = next((tokens[i] for i, t in enumerate(types) if t == 2), None)
    tok = HFTokenizer(models.BPE(vocab, [m[-2:] for m in merges], unk_token=unk, fuse_unk=True, byte_fallback=True))
    # llama.cpp prefixes a space to the text and after every special token, as legacy SentencePiece does.
    norm = [normalizers.Prepend("\u2581")] * space_prefix + [normalizers.Replace(" ", "\u2581")]
    tok.normalizer = normalizers.Sequence(norm)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + [decoders.Strip(" ", 1, 0)] * space_prefix)
    return tok


def _add_special(tok: Any, tokens: list[str], types: list[int]) -> None:
    """Control tokens are special and user-defined ones plain added tokens; both are matched whole in text."""
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                            for i, t in enumerate(types) if t == CONTROL])
    tok.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                    for i, t in enumerate(types) if t == USER_DEFINED])


def _render(template: str, messages: list[dict[str, Any]], add_generation_prompt: bool, bos: str, eos: str) -> str:
    from jinja2 import TemplateError

    try:
        return _compile(template).render(messages=messages, tools=None, documents=None, bos_token=bos,
                                         eos_token=eos, add_generation_prompt=add_generation_prompt)
    except InvalidParameterError:
        raise
    except TemplateError as e:
        raise InvalidParameterError(f"the model's chat template failed on these messages: {e}", "messages") from None


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    """transformers' tojson: plain json.dumps (jinja2's own escapes HTML characters)."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise InvalidParameterError(f"chat template: {message}", "messages")


@lru_cache(maxsize=8)
def _compile(template: str) -> Any:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env.from_string(template)


def _plain_chat(messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
    """Fallback for models without a template: one "role: content" line per message, then "assistant:"."""
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    return text + ("assistant:" if add_generation_prompt else "")


class IncrementalDetokenizer:
    """Turns tokens into text one at a time, holding back bytes until they form whole UTF-8 characters."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._strip = tokenizer.strip_leading_space
        self.text = ""

    def add(self, token_id: int) -> str:
        """Text completed by this token ("" while a character is still partial)."""
        if self.skip_special_tokens and self.tokenizer.is_special(token_id):
            return ""
        return self._emit(self._decoder.decode(self.tokenizer.id_to_bytes(token_id)))

    def flush(self) -> str:
        """The held-back bytes at the end; incomplete ones become U+FFFD as in HF's decode (which, for
        SentencePiece byte fallback, gives one per byte)."""
        pending = self._decoder.getstate()[0]
        self._decoder.reset()
        per_byte = pending and not self.tokenizer.byte_level
        return self._emit("\ufffd" * len(pending) if per_byte else pending.decode("utf-8", errors="replace"))

    def _emit(self, text: str) -> str:
        if self._strip and text:
            text = text[1:] if text.startswith(" ") else text
            self._strip = False
        self.text += text
        return text
