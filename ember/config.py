"""ModelConfig: the dimensions and flags of a Llama-family model, from GGUF metadata or config.json."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ember.errors import ModelLoadError, UnsupportedArchitectureError

SUPPORTED_ARCHS = ("llama", "qwen2", "mistral")
# Hugging Face `architectures` entries -> ember's family flags.
_HF_ARCHS = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "MistralForCausalLM": "mistral"}


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

    def validate(self, source: str) -> "ModelConfig":
        if self.arch not in SUPPORTED_ARCHS:
            raise UnsupportedArchitectureError(
                f"{source}: architecture {self.arch!r} is not supported; "
                f"ember runs {', '.join(SUPPORTED_ARCHS)}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ModelLoadError(f"{source}: {name} must be positive, found {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(f"{source}: {self.num_heads} attention heads are not a multiple of "
                                 f"{self.num_kv_heads} KV heads")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("llama3", "linear", "default", None):
                raise ModelLoadError(f"{source}: rope_scaling type {kind!r} is not supported; "
                                     "supported: llama3, linear")
        return self

    @classmethod
    def from_gguf(cls, meta: dict[str, Any], source: str) -> "ModelConfig":
        arch = meta.get("general.architecture")
        if arch is None:
            raise ModelLoadError(f"{source}: GGUF metadata has no general.architecture key")
        if arch not in SUPPORTED_ARCHS:
            raise UnsupportedArchitectureError(
                f"{source}: architecture {arch!r} is not supported; ember runs {', '.join(SUPPORTED_ARCHS)}")

        def get(key: str, default: Any = None) -> Any:
            value = meta.get(f"{arch}.{key}", default)
            if value is None:
                raise ModelLoadError(f"{source}: GGUF metadata lacks {arch}.{key}")
            return value

        hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
        vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens", []))
        head_dim = int(meta.get(f"{arch}.attention.key_length") or meta.get(f"{arch}.rope.dimension_count")
                       or hidden // heads)
        scaling = None
        if meta.get(f"{arch}.rope.scaling.type") == "linear":
            scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
        return cls(
            arch=arch, vocab_size=int(vocab), hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")), num_layers=int(get("block_count")),
            num_heads=heads, num_kv_heads=int(get("attention.head_count_kv", heads)), head_dim=head_dim,
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=float(get("rope.freq_base", 10000.0)), rope_scaling=scaling,
            max_position_embeddings=int(get("context_length", 4096)),
            tie_word_embeddings=False,  # decided by the presence of output.weight at load time
            attention_bias=arch == "qwen2",
            sliding_window=meta.get(f"{arch}.attention.sliding_window"),
            name=str(meta.get("general.name", "")),
        ).validate(source)

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], source: str) -> "ModelConfig":
        archs = cfg.get("architectures") or []
        arch = next((_HF_ARCHS[a] for a in archs if a in _HF_ARCHS), None)
        if arch is None:
            found = archs or cfg.get("model_type")
            raise UnsupportedArchitectureError(
                f"{source}: architecture {found!r} is not supported; ember runs "
                f"{', '.join(_HF_ARCHS)}")
        try:
            hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
            return cls(
                arch=arch, vocab_size=int(cfg["vocab_size"]), hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]), num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads, num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=float(cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))),
                rope_scaling=_hf_rope_scaling(cfg),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                attention_bias=arch == "qwen2" or bool(cfg.get("attention_bias", False)),
                sliding_window=cfg.get("sliding_window") if cfg.get("use_sliding_window", arch == "mistral") else None,
                name=str(cfg.get("_name_or_path", "")),
            ).validate(source)
        except KeyError as e:
            raise ModelLoadError(f"{source}: config.json lacks the key {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ModelLoadError(f"{source}: config.json has a malformed value ({e})") from None

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


def _hf_rope_scaling(cfg: dict[str, Any]) -> dict[str, Any] | None:
    scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters")
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type"))
    return None if kind in (None, "default") else dict(scaling)


def load_hf_config(folder: Path) -> ModelConfig:
    import json

    path = folder / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{folder}: no config.json (a Hugging Face model folder needs config.json, "
                             "*.safetensors and tokenizer.json)")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path}: not valid JSON ({e})") from None
    return ModelConfig.from_hf(cfg, str(path))
