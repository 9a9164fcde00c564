"""Tokenizers from tokenizer.json or a GGUF vocabulary, chat templates, and UTF-8-safe streaming detokenisation."""
from __future__ import annotations

import codecs
import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from ember.errors import InvalidParameterError, ModelLoadError
from ember.loading import gguf_vocab
from ember.loading.values import FIX, Fields, foreign_errors, read_json_object, show

# Tokens that end a turn in common chat formats; present (special) ones become stop ids.
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "</s>", "<|end|>",
                "<end_of_turn>", "<|eom_id|>")


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
                 strip_leading_space: bool = False, add_eos: bool = False, vocab_size: int | None = None) -> None:
        self._tok = tok
        self.byte_level = byte_level
        self.bos_token_id, self.eos_token_id = bos_token_id, eos_token_id
        self.add_bos = add_bos and bos_token_id is not None
        self.add_eos = add_eos and eos_token_id is not None
        self.chat_template = chat_template
        self.strip_leading_space = strip_leading_space  # decode drops the SentencePiece prefix space
        # A GGUF vocabulary gives its size: with duplicated pieces, tokenizers counts fewer ids than the model has.
        self.vocab_size = vocab_size or tok.get_vocab_size(with_added_tokens=True)
        self._pieces = [tok.id_to_token(i) or "" for i in range(self.vocab_size)]
        self._bytes: dict[int, bytes] = {}
        self._special = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        vocab = tok.get_vocab(with_added_tokens=True)
        self.stop_token_ids = {i for i in (eos_token_id,) if i is not None} | set(extra_stop_ids)
        self.stop_token_ids |= {vocab[t] for t in _END_OF_TURN if vocab.get(t) in self._special}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # encode_batch releases the GIL (encode does not): a long prompt must not stall the server's event loop.
        ids = self._tok.encode_batch([text], add_special_tokens=False)[0].ids
        if add_special_tokens:
            ids = [self.bos_token_id] * self.add_bos + ids + [self.eos_token_id] * self.add_eos
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special

    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary entry; "" for ids past it (a model's embedding is often padded beyond its tokenizer,
        as Qwen2's 151936 rows for 151665 tokens, and such an id can be sampled)."""
        return self._pieces[token_id] if 0 <= token_id < len(self._pieces) else ""

    def id_to_bytes(self, token_id: int) -> bytes:
        """The bytes this token adds to decoded text (before the leading-space strip), as HF decodes it."""
        out = self._bytes.get(token_id)
        if out is None:
            out = self._bytes[token_id] = self._piece_bytes(self.id_to_piece(token_id))
        return out

    def _piece_bytes(self, piece: str) -> bytes:
        if self.byte_level:  # as tokenizers' ByteLevel decoder: byte stand-ins, else the text itself
            table = _byte_decoder()
            return bytes(table[c] for c in piece) if all(c in table for c in piece) else piece.encode()
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode()

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tokenize: bool = False, tools: list[dict[str, Any]] | None = None) -> str | list[int]:
        """Render with the model's template (or `_plain_chat` without one); ids get BOS once if the model adds it.
        `tools`: OpenAI's tool dicts, for templates that render them (see `renders_tools`)."""
        if not messages:
            raise InvalidParameterError("messages must not be empty", "messages")
        text = (_render(self.chat_template, messages, add_generation_prompt, self._token_str(self.bos_token_id),
                        self._token_str(self.eos_token_id), tools)
                if self.chat_template else _plain_chat(messages, add_generation_prompt))
        if not tokenize:
            return text
        ids = self.encode(text, add_special_tokens=False)
        return [self.bos_token_id] + ids if self.add_bos and ids[:1] != [self.bos_token_id] else ids

    def _token_str(self, token_id: int | None) -> str:
        return "" if token_id is None else self._pieces[token_id]

    def renders_tools(self) -> bool:
        """Whether the chat template puts a `tools` list into the prompt (else the server writes its own)."""
        if not self.chat_template:
            return False
        probe = [{"type": "function", "function": {"name": "ember_probe_tool", "parameters": {"type": "object"}}}]
        messages = [{"role": "user", "content": "x"}]
        try:
            return "ember_probe_tool" in str(self.apply_chat_template(messages, True, False, probe))
        except InvalidParameterError:
            return False

    @classmethod
    def from_gguf(cls, path: str | Path, metadata: dict[str, Any] | None = None) -> "Tokenizer":
        from ember.loading.gguf import read_metadata

        meta = metadata if metadata is not None else read_metadata(path)
        v, f = gguf_vocab.build(path, meta), Fields(meta, str(path), "tokenizer.ggml.")
        bos, eos = (gguf_vocab.token_id(f, k, v.size) for k in ("bos", "eos"))
        extra = {gguf_vocab.token_id(f, k, v.size) for k in ("eot", "eom")} - {None}
        add_bos = f.bool("add_bos_token", v.kind == "llama" or v.pre in gguf_vocab.IGNORE_MERGES)
        template = _checked_template(str(path), "tokenizer.chat_template",
                                     Fields(meta, str(path)).str("tokenizer.chat_template", None))
        return cls(v.tok, v.kind == "gpt2", bos, eos, add_bos, template, extra, v.space_prefix,
                   f.bool("add_eos_token", False), v.size)

    @classmethod
    def from_hf_folder(cls, folder: str | Path) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise ModelLoadError(f"{folder}: no tokenizer.json (ember needs the fast-tokenizer file; load the "
                                 "tokenizer with transformers and save_pretrained it into this folder)")
        with foreign_errors(path, "unreadable tokenizer"):
            tok = HFTokenizer.from_file(str(path))
            decoder = json.dumps(json.loads(path.read_text(encoding="utf-8")).get("decoder"))
            probe = tok.encode("a", add_special_tokens=True).ids  # what tokenizer.json's post-processor adds
        cfg = Fields(read_json_object(folder / "tokenizer_config.json", missing_ok=True),
                     str(folder / "tokenizer_config.json"))
        vocab = tok.get_vocab(with_added_tokens=True)
        bos, eos = (vocab.get(_token_content(cfg, k) or "") for k in ("bos_token", "eos_token"))
        gen = Fields(read_json_object(folder / "generation_config.json", missing_ok=True),
                     str(folder / "generation_config.json"))
        add_bos = cfg.bool("add_bos_token", bos is not None and probe[:1] == [bos])
        add_eos = cfg.bool("add_eos_token", eos is not None and probe[-1:] == [eos])
        byte_level = "ByteLevel" in decoder
        strip = not byte_level and ("Strip" in decoder or ("Metaspace" in decoder and '"never"' not in decoder))
        return cls(tok, byte_level, bos, eos, add_bos, _hf_template(folder, cfg), _id_set(gen, "eos_token_id"), strip,
                   add_eos)

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


def _id_set(f: Fields, key: str) -> set[int]:
    """A token id or a list of them (generation_config.json's eos_token_id)."""
    value = f.get(key, [])
    ids = [value] if isinstance(value, int) else value
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise f.error(key, f"must be a token id or a list of token ids, found {show(value)}")
    return set(ids)


def _token_content(f: Fields, key: str) -> str | None:
    """A special token given as its text or as an AddedToken object ({"content": text, ...})."""
    value = f.get(key, None)
    content = value.get("content") if isinstance(value, dict) else value
    if content is not None and not isinstance(content, str):
        raise f.error(key, f"must be a token string or an object with a string content, found {show(value)}")
    return content


def _hf_template(folder: Path, cfg: Fields) -> str | None:
    """tokenizer_config.json's chat_template (a string, or named templates: "default"), else chat_template.jinja."""
    template = cfg.get("chat_template", None)
    named = isinstance(template, list) and all(
        isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str) for t in template)
    if not (template is None or isinstance(template, str) or named):
        raise cfg.error("chat_template", f"must be a string or a list of {{name, template}} objects, found "
                                         f"{show(template)}")
    if named:
        template = next((t["template"] for t in template if t["name"] == "default"), None)
    jinja = folder / "chat_template.jinja"
    if template is None and jinja.is_file():
        try:
            return _checked_template(str(jinja), "chat_template", jinja.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ModelLoadError(f"{jinja}: not valid UTF-8 ({e}); {FIX}") from None
    return _checked_template(cfg.source, "chat_template", template)


def _checked_template(source: str, key: str, template: str | None) -> str | None:
    """The chat template, compiled once at load so a broken one fails here rather than on the first request."""
    from jinja2 import TemplateError

    if template is not None:
        try:
            _compile(template)
        except (TemplateError, RecursionError) as e:
            raise ModelLoadError(f"{source}: {key} does not compile ({type(e).__name__}: {str(e)[:200]}); fix or "
                                 "remove it (without one, ember uses a plain 'role: content' format)") from None
    return template


def _render(template: str, messages: list[dict[str, Any]], add_generation_prompt: bool, bos: str, eos: str,
            tools: list[dict[str, Any]] | None = None) -> str:
    from jinja2 import TemplateError

    try:
        return _compile(template).render(messages=messages, tools=tools, documents=None, bos_token=bos,
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
