"""ModelConfig: the dimensions and flags of a Llama-family model, from GGUF metadata or config.json."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ember.errors import ModelLoadError, UnsupportedArchitectureError
from ember.loading.values import FIX, Fields, check_range, read_json_object, show

SUPPORTED_ARCHS = ("llama", "qwen2", "mistral")
# Hugging Face `architectures` entries -> ember's family flags.
_HF_ARCHS = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "MistralForCausalLM": "mistral"}
# Bounds about 8x beyond the largest released Llama-family models (Llama 3.1 405B: 126 layers, hidden 16384,
# FFN 53248, 128 heads; vocabularies to 262k; contexts to 4M tokens): past them a header is corrupt, and these
# numbers size what is allocated before any weight is read (the memory check in the loader does the rest).
_INT_RANGES = {
    "vocab_size": (1, 1 << 22), "hidden_size": (1, 1 << 17), "intermediate_size": (1, 1 << 20),
    "num_layers": (1, 1024), "num_heads": (1, 1024), "num_kv_heads": (1, 1024), "head_dim": (2, 1024),
    "max_position_embeddings": (1, 1 << 24),
}
# Finite and positive, with room around what models use (rope base 1e4..1e8, norm epsilon 1e-6..1e-5).
_FLOAT_RANGES = {"rope_theta": (1.0, 1e12), "rms_norm_eps": (1e-12, 0.1)}
_FACTOR_RANGE = (1e-3, 1e3)  # rope scaling factors (Llama 3: 8; linear: 2..32)
ROPE_SCALINGS = ("llama3", "linear")
# GGUF keys (after "{arch}.") of the fields, for messages.
_GGUF_KEYS = {"vocab_size": "vocab_size", "hidden_size": "embedding_length",
              "intermediate_size": "feed_forward_length", "num_layers": "block_count",
              "num_heads": "attention.head_count", "num_kv_heads": "attention.head_count_kv",
              "rms_norm_eps": "attention.layer_norm_rms_epsilon", "rope_theta": "rope.freq_base",
              "max_position_embeddings": "context_length", "sliding_window": "attention.sliding_window"}
_HF_KEYS = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
            "num_kv_heads": "num_key_value_heads"}


@dataclass
class ModelConfig:
    """Everything the decoder needs to know about its shape; differences between families are flags."""

    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projections carry biases (Qwen2)
    sliding_window: int | None = None
    name: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self, source: str, keys: dict[str, str] | None = None) -> "ModelConfig":
        """Ranges and consistency; keys maps field names to the file's key names for messages."""
        keys = keys or {}
        if self.arch not in SUPPORTED_ARCHS:
            raise UnsupportedArchitectureError(
                f"{source}: architecture {self.arch!r} is not supported; "
                f"ember runs {', '.join(SUPPORTED_ARCHS)}")
        for name, (lo, hi) in {**_INT_RANGES, **_FLOAT_RANGES}.items():
            check_range(source, keys.get(name, name), getattr(self, name), lo, hi)
        if self.sliding_window is not None:
            check_range(source, keys.get("sliding_window", "sliding_window"), self.sliding_window, 1, 1 << 24)
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(f"{source}: {self.num_heads} attention heads are not a multiple of "
                                 f"{self.num_kv_heads} KV heads")
        if self.head_dim % 2:
            raise ModelLoadError(f"{source}: head dimension {self.head_dim} is odd; rotary embeddings turn pairs of "
                                 f"dimensions, so it must be even; {FIX}")
        _check_scaling(source, self.rope_scaling)
        return self

    @classmethod
    def from_gguf(cls, meta: dict[str, Any], source: str) -> "ModelConfig":
        top = Fields(meta, source)
        arch = top.str("general.architecture", None)
        if arch is None:
            raise ModelLoadError(f"{source}: GGUF metadata has no general.architecture key")
        if arch not in SUPPORTED_ARCHS:
            raise UnsupportedArchitectureError(
                f"{source}: architecture {arch!r} is not supported; ember runs {', '.join(SUPPORTED_ARCHS)}")
        g = Fields(meta, source, f"{arch}.")
        hidden, heads = g.int("embedding_length"), g.int("attention.head_count")
        head_dim = g.int("attention.key_length", None)
        head_dim = g.int("rope.dimension_count", None) if head_dim is None else head_dim
        if head_dim is None:
            head_dim = _derived_head_dim(source, hidden, heads, g.name("embedding_length"),
                                         g.name("attention.head_count"))
        vocab = g.int("vocab_size", None)
        return cls(
            arch=arch, vocab_size=len(top.list("tokenizer.ggml.tokens", "strings", [])) if vocab is None else vocab,
            hidden_size=hidden, intermediate_size=g.int("feed_forward_length"), num_layers=g.int("block_count"),
            num_heads=heads, num_kv_heads=g.int("attention.head_count_kv", heads), head_dim=head_dim,
            rms_norm_eps=g.float("attention.layer_norm_rms_epsilon", 1e-6),
            rope_theta=g.float("rope.freq_base", 10000.0), rope_scaling=_gguf_rope_scaling(g),
            max_position_embeddings=g.int("context_length", 4096),
            tie_word_embeddings=False,  # decided by the presence of output.weight at load time
            attention_bias=arch == "qwen2",
            sliding_window=g.int("attention.sliding_window", None),
            name=str(meta.get("general.name", "")),
        ).validate(source, {k: g.name(v) for k, v in _GGUF_KEYS.items()})

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], source: str) -> "ModelConfig":
        if not isinstance(cfg, dict):
            raise ModelLoadError(f"{source}: config.json must be a JSON object, found {type(cfg).__name__}; {FIX}")
        f = Fields(cfg, source)
        archs = f.list("architectures", "strings", [])
        arch = next((_HF_ARCHS[a] for a in archs if a in _HF_ARCHS), None)
        if arch is None:
            found = archs or cfg.get("model_type")
            raise UnsupportedArchitectureError(
                f"{source}: architecture {found!r} is not supported; ember runs "
                f"{', '.join(_HF_ARCHS)}")
        hidden, heads = f.int("hidden_size"), f.int("num_attention_heads")
        head_dim = f.int("head_dim", None)
        if head_dim is None:
            head_dim = _derived_head_dim(source, hidden, heads, "hidden_size", "num_attention_heads")
        window = f.int("sliding_window", None) if f.bool("use_sliding_window", arch == "mistral") else None
        return cls(
            arch=arch, vocab_size=f.int("vocab_size"), hidden_size=hidden,
            intermediate_size=f.int("intermediate_size"), num_layers=f.int("num_hidden_layers"),
            num_heads=heads, num_kv_heads=f.int("num_key_value_heads", heads), head_dim=head_dim,
            rms_norm_eps=f.float("rms_norm_eps", 1e-6), rope_theta=_hf_rope_theta(f),
            rope_scaling=_hf_rope_scaling(f), max_position_embeddings=f.int("max_position_embeddings", 4096),
            tie_word_embeddings=f.bool("tie_word_embeddings", False),
            attention_bias=arch == "qwen2" or f.bool("attention_bias", False),
            sliding_window=window, name=str(cfg.get("_name_or_path", "")),
        ).validate(source, _HF_KEYS)

    def to_hf(self) -> dict[str, Any]:
        """config.json contents that from_hf reads back into this config (for GGUF-sourced models)."""
        arch = next(a for a, e in _HF_ARCHS.items() if e == self.arch)
        return {
            "architectures": [arch], "model_type": self.arch, "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads, "head_dim": self.head_dim, "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta, "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_position_embeddings, "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias, "sliding_window": self.sliding_window,
            "use_sliding_window": self.sliding_window is not None, "_name_or_path": self.name,
        }


def _derived_head_dim(source: str, hidden: int, heads: int, hidden_key: str, heads_key: str) -> int:
    """hidden // heads, for files that give no head dimension (heads checked first: it divides)."""
    check_range(source, heads_key, heads, *_INT_RANGES["num_heads"])
    if hidden % heads:
        raise ModelLoadError(f"{source}: {hidden_key} {hidden} is not a multiple of {heads_key} {heads}, and the "
                             f"file gives no head dimension; {FIX}")
    return hidden // heads


def _gguf_rope_scaling(g: Fields) -> dict[str, Any] | None:
    kind = g.str("rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind != "linear":
        raise ModelLoadError(f"{g.source}: {g.name('rope.scaling.type')} is {kind!r}; rope scaling type {kind!r} "
                             "is not supported (ember reads none and linear from GGUF files)")
    factor = g.float("rope.scaling.factor")
    check_range(g.source, g.name("rope.scaling.factor"), factor, *_FACTOR_RANGE)
    return {"rope_type": "linear", "factor": factor}


def _hf_rope_theta(f: Fields) -> float:
    """rope_theta, or rope_parameters.rope_theta (where transformers 5 writes it)."""
    theta = f.float("rope_theta", None)
    if theta is None:
        params = Fields(_object(f, "rope_parameters") or {}, f.source, parent="rope_parameters.")
        theta = params.float("rope_theta", 10000.0)
    return theta


def _hf_rope_scaling(f: Fields) -> dict[str, Any] | None:
    scaling = _object(f, "rope_scaling")
    scaling = _object(f, "rope_parameters") if scaling is None else scaling
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type"))
    return None if kind in (None, "default") else dict(scaling)


def _object(f: Fields, key: str) -> dict[str, Any] | None:
    value = f.get(key, None)
    if value is not None and not isinstance(value, dict):
        raise f.error(key, f"must be an object, found {show(value)}")
    return value


def _check_scaling(source: str, scaling: dict[str, Any] | None) -> None:
    """A supported rope scaling with finite, positive factors (Llama 3's high above low: it divides by the gap)."""
    if scaling is None:
        return
    f = Fields(scaling, source, parent="rope_scaling.")
    kind = f.str("rope_type", None)
    kind = f.str("type", None) if kind is None else kind
    if kind in (None, "default"):
        return
    if kind not in ROPE_SCALINGS:
        raise ModelLoadError(f"{source}: rope_scaling type {kind!r} is not supported; "
                             f"supported: {', '.join(ROPE_SCALINGS)}")
    for key in ("factor", "low_freq_factor", "high_freq_factor") if kind == "llama3" else ("factor",):
        check_range(source, f.name(key), f.float(key), *_FACTOR_RANGE)
    if kind == "llama3":
        check_range(source, f.name("original_max_position_embeddings"), f.int("original_max_position_embeddings"),
                    *_INT_RANGES["max_position_embeddings"])
        low, high = f.float("low_freq_factor"), f.float("high_freq_factor")
        if high <= low:
            raise ModelLoadError(f"{source}: rope_scaling.high_freq_factor {high} must be greater than "
                                 f"low_freq_factor {low} (Llama 3 scaling divides by their difference); {FIX}")


def load_hf_config(folder: Path) -> ModelConfig:
    path = folder / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{folder}: no config.json (a Hugging Face model folder needs config.json, "
                             "*.safetensors and tokenizer.json)")
    return ModelConfig.from_hf(read_json_object(path), str(path))
