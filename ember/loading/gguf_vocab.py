"""The GGUF vocabulary (tokenizer.ggml.*) as a `tokenizers` tokenizer: byte-level BPE ("gpt2") or
SentencePiece-style BPE ("llama"), every array checked against the vocabulary before it is built."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ember.errors import ModelLoadError
from ember.loading.values import Fields, foreign_errors, show

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
IGNORE_MERGES = _LLAMA3_PRES + ("tekken",)  # whole words in the vocabulary skip BPE (and BOS is on by default)
_DIGIT_SPLIT = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
SUPPORTED_GGUF_TOKENIZERS = ("gpt2", "llama")
CONTROL, USER_DEFINED = 3, 4  # GGUF token types matched whole in text
SPM_MAX_PIECE, SPM_MAX_MERGES_PER_PIECE = 512, 32


@dataclass
class GGUFVocab:
    tok: Any  # tokenizers.Tokenizer
    kind: str  # "gpt2" or "llama"
    size: int
    pre: str
    space_prefix: bool  # SentencePiece's leading space


def build(path: str | Path, meta: dict[str, Any]) -> GGUFVocab:
    """The tokenizer a GGUF header describes; wrong types, lengths or references are a ModelLoadError."""
    f = Fields(meta, str(path), "tokenizer.ggml.")
    kind, tokens = meta.get("tokenizer.ggml.model"), f.list("tokens", "strings", None)
    if kind not in SUPPORTED_GGUF_TOKENIZERS:
        raise ModelLoadError(f"{path}: tokenizer model {show(kind)} is not supported; "
                             f"supported: {', '.join(SUPPORTED_GGUF_TOKENIZERS)}")
    if not tokens:
        raise ModelLoadError(f"{path}: GGUF has no tokenizer.ggml.tokens vocabulary (re-convert the model "
                             "with its tokenizer, or load the Hugging Face folder instead)")
    types = _per_token(f, "token_type", "integers", 1, len(tokens))
    pre = f.str("pre", "default")
    space_prefix = kind == "llama" and f.bool("add_space_prefix", True)
    merges = _merges(f, tokens) if kind == "gpt2" else []
    scores = _per_token(f, "scores", "numbers", 0.0, len(tokens)) if kind == "llama" else []
    with foreign_errors(path, "the GGUF vocabulary cannot be made into a tokenizer"):
        tok = _gguf_bpe(tokens, merges, pre) if kind == "gpt2" else _gguf_spm(tokens, scores, types, space_prefix)
        _add_special(tok, tokens, types)
    return GGUFVocab(tok, kind, len(tokens), pre, space_prefix)


def _per_token(f: Fields, key: str, of: str, default: Any, n: int) -> list[Any]:
    """A per-token GGUF array (scores, token types), checked against the vocabulary's length."""
    values = f.list(key, of, None) or [default] * n
    if len(values) != n:
        raise ModelLoadError(f"{f.source}: {f.name(key)} has {len(values)} entries but the vocabulary has {n}; "
                             "the file is corrupt (re-convert it)")
    return values


def _merges(f: Fields, tokens: list[str]) -> list[tuple[str, str]]:
    """BPE merges "a b": both halves and their join in the vocabulary (tokenizers panics otherwise)."""
    vocab, out = set(tokens), []
    for i, merge in enumerate(f.list("merges", "strings", [])):
        a, space, b = merge.partition(" ")
        if not (space and a and b):
            raise f.error("merges", f"entry {i} {show(merge)} is not two tokens separated by a space")
        if a not in vocab or b not in vocab or a + b not in vocab:
            raise f.error("merges", f"entry {i} {show(merge)} names tokens not in the vocabulary")
        out.append((a, b))
    return out


def token_id(f: Fields, name: str, n: int) -> int | None:
    value = f.int(f"{name}_token_id", None)
    if value is not None and not 0 <= value < n:
        raise ModelLoadError(f"{f.source}: {f.name(name + '_token_id')} is {value}, outside the vocabulary "
                             f"(0..{n - 1}); the file is corrupt (re-convert it)")
    return value


def _gguf_bpe(tokens: list[str], merges: list[tuple[str, str]], pre: str) -> Any:
    """Byte-level BPE (llama.cpp's "gpt2" model), split as `tokenizer.ggml.pre` says (GPT-2's regex if unknown)."""
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(tokens)}
    tok = HFTokenizer(models.BPE(vocab, merges, ignore_merges=pre in IGNORE_MERGES))
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
    # A crafted vocabulary could make this quadratic (every run of "a"s splits every way): pieces longer than
    # SPM_MAX_PIECE are not split (SentencePiece's own default cap is 16) and the merges are capped per piece.
    merges = []
    for i, piece in enumerate(tokens):
        if types[i] == 1 and len(piece) <= SPM_MAX_PIECE:
            splits = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
            merges += [(-scores[i], -len(a), -len(b), vocab[a], vocab[b], a, b) for a, b in splits]
        if len(merges) > SPM_MAX_MERGES_PER_PIECE * (i + 1) + 4096:
            raise ValueError(f"its pieces split into over {SPM_MAX_MERGES_PER_PIECE} known pairs each (by piece "
                             f"{i}); that is not a SentencePiece vocabulary")
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
