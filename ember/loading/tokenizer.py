"""Tokenizers from tokenizer.json or a GGUF vocabulary, chat templates, and UTF-8-safe streaming detokenisation."""
from __future__ import annotations

import codecs
import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from ember.errors import InvalidParameterError, ModelLoadError

# Pre-tokenizer regexes by GGUF `tokenizer.ggml.pre` (as llama.cpp uses them).
_GPT2 = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_LLAMA3 = (r"""(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
           r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
_PRE_REGEX = {"llama-bpe": _LLAMA3, "llama3": _LLAMA3, "qwen2": _QWEN2, "smaug-bpe": _LLAMA3}
_DIGIT_SPLIT = ("smollm", "starcoder", "refact")
# Tokens that end a turn in common chat formats; present ones become stop ids.
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "</s>", "<|end|>",
                "<end_of_turn>", "<|eom_id|>")
SUPPORTED_GGUF_TOKENIZERS = ("gpt2", "llama")


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class Tokenizer:
    """Encode/decode text, render chat templates; wraps a Hugging Face `tokenizers.Tokenizer`."""

    def __init__(self, tok: Any, byte_level: bool, bos_token_id: int | None, eos_token_id: int | None,
                 add_bos: bool, chat_template: str | None, extra_stop_ids: set[int] = frozenset(),
                 strip_leading_space: bool = False) -> None:
        self._tok = tok
        self.byte_level = byte_level
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.add_bos = add_bos
        self.chat_template = chat_template
        self.strip_leading_space = strip_leading_space  # SentencePiece's added prefix space
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self._pieces = [tok.id_to_token(i) or "" for i in range(self.vocab_size)]
        self._special = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        vocab = tok.get_vocab(with_added_tokens=True)
        self.stop_token_ids = {i for i in (eos_token_id,) if i is not None} | set(extra_stop_ids)
        self.stop_token_ids |= {vocab[t] for t in _END_OF_TURN if t in vocab and vocab[t] in self._special}
        self._byte_decoder = _byte_decoder() if byte_level else {}

    # -- basic API --------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special

    def id_to_piece(self, token_id: int) -> str:
        return self._pieces[token_id]

    def id_to_bytes(self, token_id: int) -> bytes:
        piece = self._pieces[token_id]
        if token_id in self._special:
            return piece.encode()
        if self.byte_level:
            try:
                return bytes(self._byte_decoder[c] for c in piece)
            except KeyError:  # an added token stored as plain text
                return piece.encode()
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode()

    # -- chat templates ---------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tokenize: bool = False) -> str | list[int]:
        if not messages:
            raise InvalidParameterError("messages must not be empty", "messages")
        text = (_render(self.chat_template, messages, add_generation_prompt, self._token_str(self.bos_token_id),
                        self._token_str(self.eos_token_id))
                if self.chat_template else _plain_chat(messages, add_generation_prompt))
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def _token_str(self, token_id: int | None) -> str:
        return "" if token_id is None else self._pieces[token_id]

    # -- constructors -----------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, path: str | Path, metadata: dict[str, Any] | None = None) -> "Tokenizer":
        from ember.loading.gguf import read_metadata

        meta = metadata if metadata is not None else read_metadata(path)
        kind = meta.get("tokenizer.ggml.model")
        if kind not in SUPPORTED_GGUF_TOKENIZERS:
            raise ModelLoadError(f"{path}: tokenizer model {kind!r} is not supported; "
                                 f"supported: {', '.join(SUPPORTED_GGUF_TOKENIZERS)}")
        tokens = meta.get("tokenizer.ggml.tokens")
        if not tokens:
            raise ModelLoadError(f"{path}: GGUF has no tokenizer.ggml.tokens vocabulary")
        types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        if kind == "gpt2":
            tok = _gguf_bpe(tokens, meta.get("tokenizer.ggml.merges") or [], meta.get("tokenizer.ggml.pre", "default"))
        else:
            tok = _gguf_spm(tokens, meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens),
                            types, bool(meta.get("tokenizer.ggml.add_space_prefix", True)))
        _add_special(tok, tokens, types)
        bos, eos = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
        extra = {meta[k] for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id") if k in meta}
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama"))
        return cls(tok, kind == "gpt2", bos, eos, add_bos, meta.get("tokenizer.chat_template"), extra,
                   strip_leading_space=kind == "llama" and bool(meta.get("tokenizer.ggml.add_space_prefix", True)))

    @classmethod
    def from_hf_folder(cls, folder: str | Path) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise ModelLoadError(f"{folder}: no tokenizer.json (ember needs the fast-tokenizer file; "
                                 "convert the tokenizer with transformers and save it)")
        try:
            tok = HFTokenizer.from_file(str(path))
            spec = json.loads(path.read_text())
        except Exception as e:
            raise ModelLoadError(f"{path}: unreadable tokenizer ({e})") from None
        cfg = _read_json(folder / "tokenizer_config.json")
        vocab = tok.get_vocab(with_added_tokens=True)
        bos = vocab.get(_token_content(cfg.get("bos_token")) or "")
        eos = vocab.get(_token_content(cfg.get("eos_token")) or "")
        gen = _read_json(folder / "generation_config.json").get("eos_token_id")
        extra = set(gen if isinstance(gen, list) else [gen] if gen is not None else [])
        template = cfg.get("chat_template")
        if isinstance(template, list):
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template is None and (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text()
        byte_level = "ByteLevel" in json.dumps(spec.get("decoder"))
        probe = tok.encode("a", add_special_tokens=True).ids
        add_bos = bool(cfg.get("add_bos_token", bos is not None and probe[:1] == [bos]))
        strip = not byte_level and "Strip" in json.dumps(spec.get("decoder"))
        return cls(tok, byte_level, bos, eos, add_bos and bos is not None, template, extra, strip)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path}: not valid JSON ({e})") from None


def _token_content(tok: Any) -> str | None:
    return tok.get("content") if isinstance(tok, dict) else tok


def _gguf_bpe(tokens: list[str], merges: list[str], pre: str) -> Any:
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = HFTokenizer(models.BPE(vocab, pairs, ignore_merges=pre in ("llama-bpe", "llama3")))
    regex = _PRE_REGEX.get(pre, _GPT2)
    steps = [pre_tokenizers.Split(Regex(regex), behavior="isolated"),
             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    if pre in _DIGIT_SPLIT:
        steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    return tok


def _gguf_spm(tokens: list[str], scores: list[float], types: list[int], space_prefix: bool) -> Any:
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, normalizers

    vocab = {t: i for i, t in enumerate(tokens)}
    normal = [i for i, t in enumerate(types) if t == 1]
    # Merges as SentencePiece implies them: every split of a normal piece into two known pieces,
    # ordered by the merged piece's score.
    merges = []
    for i in normal:
        piece = tokens[i]
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                merges.append((-scores[i], vocab[left], vocab[right], left, right))
    merges.sort()
    unk = next((tokens[i] for i, t in enumerate(types) if t == 2), None)
    tok = HFTokenizer(models.BPE(vocab, [(m[3], m[4]) for m in merges], unk_token=unk, fuse_unk=True,
                                 byte_fallback=True))
    norm = [normalizers.Replace(" ", "\u2581")]
    if space_prefix:
        norm.insert(0, normalizers.Prepend("\u2581"))
    tok.normalizer = normalizers.Sequence(norm)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if space_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(steps)
    return tok


def _add_special(tok: Any, tokens: list[str], types: list[int]) -> None:
    """Control (3) and user-defined (4) tokens are matched whole in text; control ones are special."""
    from tokenizers import AddedToken

    control = [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t == 3]
    user = [AddedToken(tokens[i], special=False, normalized=False) for i, t in enumerate(types) if t == 4]
    tok.add_special_tokens(control)
    tok.add_tokens(user)


def _render(template: str, messages: list[dict[str, Any]], add_generation_prompt: bool, bos: str, eos: str) -> str:
    from jinja2 import TemplateError

    try:
        return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=bos, eos_token=eos)
    except InvalidParameterError:
        raise
    except TemplateError as e:
        raise InvalidParameterError(f"the model's chat template failed on these messages: {e}", "messages") from None


@lru_cache(maxsize=8)
def _compile(template: str) -> Any:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise InvalidParameterError(f"chat template: {message}", "messages")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent, ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def _plain_chat(messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
    """Fallback for models without a template: 'role: content' lines, then 'assistant:'."""
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
        if self.skip_special_tokens and self.tokenizer.is_special(token_id):
            return ""
        return self._emit(self._decoder.decode(self.tokenizer.id_to_bytes(token_id)))

    def flush(self) -> str:
        return self._emit(self._decoder.decode(b"", final=True))

    def _emit(self, text: str) -> str:
        if self._strip and text:
            text = text[1:] if text.startswith(" ") else text
            self._strip = False
        self.text += text
        return text
