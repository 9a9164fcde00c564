"""SpeculativeConfig: which proposer drafts tokens and how many, in vLLM's `speculative_config` shape."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ember.errors import InvalidParameterError

METHODS = ("ngram", "draft", "swift")
_ALIASES = {"draft_model": "draft", "[ngram]": "ngram"}  # vLLM's other spellings
MAX_SPECULATIVE_TOKENS = 32  # beyond this a chain is all rollback: acceptance decays geometrically


@dataclass
class SpeculativeConfig:
    """Options of speculative decoding; names follow vLLM's where one exists.

    ngram: the longest suffix of prompt + output (prompt_lookup_min..max tokens) that occurred before proposes
    the tokens that followed it. draft: `model` (a smaller model with the same tokenizer, or the same one
    quantized) drafts greedily. swift: the model drafts for itself with a set of its sub-layers skipped."""

    method: str = "ngram"
    num_speculative_tokens: int = 5  # most drafts per step (k)
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 4
    model: str | None = None  # draft: the draft model (a GGUF file or HF folder)
    quantization: str = "none"  # draft: its weights quantized at load, as --quantization
    # Per sequence, k follows its recent acceptance, down to 0 when speculation does not pay; False: always k.
    adaptive: bool = True
    # No speculation when this many sequences decode together (a full batch is compute-bound), as vLLM's
    # disable_by_batch_size; None: decided by the measured step cost alone.
    disable_by_batch_size: int | None = None
    # swift
    skip_ratio: float = 0.45  # share of the (L - 2) * 2 attention and MLP sub-layers skipped when drafting
    skip_layers: list[int] | None = None  # a fixed skip set (sub-layer ids: 2 * layer for attention, + 1 MLP)
    context_window: int = 32  # generated tokens the skip set is scored on
    max_score: float = 0.95  # tuning stops when the skip set predicts this share of them
    max_optimization_steps: int = 1000  # ... or after this many tried sets
    # Tuning tries (each a teacher-forced forward over context_window tokens: on a CPU about a prompt chunk's
    # cost) run only while they have taken at most this share of the time spent in steps and tries: what SWIFT
    # may cost where its drafts never pay (a quarter made open-ended chat 0.70x on SmolLM2-135M).
    max_tuning_share: float = 0.05
    draft_confidence: float = 0.8  # drafting stops when the top-1 probability falls below this
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.method = _ALIASES.get(self.method, self.method)
        self.validate()

    def validate(self) -> None:
        k = self.num_speculative_tokens
        checks = [
            (self.method in METHODS, "method", f"must be one of {', '.join(METHODS)}"),
            (isinstance(k, int) and 1 <= k <= MAX_SPECULATIVE_TOKENS, "num_speculative_tokens",
             f"must be an integer in [1, {MAX_SPECULATIVE_TOKENS}]"),
            (_int_at_least(self.prompt_lookup_min, 1), "prompt_lookup_min", "must be an integer >= 1"),
            (_int_at_least(self.prompt_lookup_max, 1) and self.prompt_lookup_max >= self.prompt_lookup_min,
             "prompt_lookup_max", "must be an integer >= prompt_lookup_min"),
            (self.method != "draft" or isinstance(self.model, str) and bool(self.model), "model",
             'names the draft model (a GGUF file or HF folder) for method "draft"'),
            (self.disable_by_batch_size is None or _int_at_least(self.disable_by_batch_size, 1),
             "disable_by_batch_size", "must be an integer >= 1 or null"),
            (isinstance(self.skip_ratio, (int, float)) and 0 < self.skip_ratio < 1, "skip_ratio", "must be in (0, 1)"),
            (self.skip_layers is None or isinstance(self.skip_layers, list)
             and all(_int_at_least(i, 0) for i in self.skip_layers), "skip_layers",
             "must be a list of sub-layer ids (2 * layer for attention, 2 * layer + 1 for the MLP)"),
            (_int_at_least(self.context_window, 4), "context_window", "must be an integer >= 4"),
            (isinstance(self.max_score, (int, float)) and 0 < self.max_score <= 1, "max_score", "must be in (0, 1]"),
            (_int_at_least(self.max_optimization_steps, 0), "max_optimization_steps", "must be an integer >= 0"),
            (isinstance(self.max_tuning_share, (int, float)) and 0 < self.max_tuning_share <= 1, "max_tuning_share",
             "must be in (0, 1]"),
            (isinstance(self.draft_confidence, (int, float)) and 0 <= self.draft_confidence < 1,
             "draft_confidence", "must be in [0, 1)"),
        ]
        for ok, name, why in checks:
            if not ok:
                raise InvalidParameterError(f"speculative_config: {name} {why}, got {getattr(self, name)!r}",
                                            "speculative_config")

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "extra"}


def _int_at_least(v: Any, lo: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def parse_speculative_config(value: str | dict[str, Any] | SpeculativeConfig | None) -> SpeculativeConfig | None:
    """A SpeculativeConfig from what a user passes: the JSON text of --speculative-config, a dict
    (LLM(speculative_config=...)), a config, or None (no speculation). Unknown keys are an error."""
    if value is None or isinstance(value, SpeculativeConfig):
        return value
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise InvalidParameterError(f"speculative_config is not valid JSON ({e.msg} at character {e.pos}); "
                                        'pass e.g. \'{"method": "ngram", "num_speculative_tokens": 5}\'',
                                        "speculative_config") from None
    if not isinstance(value, dict):
        raise InvalidParameterError("speculative_config must be a JSON object, e.g. "
                                    '{"method": "ngram", "num_speculative_tokens": 5}', "speculative_config")
    known = {f.name for f in fields(SpeculativeConfig)} - {"extra"}
    unknown = sorted(set(value) - known)
    if unknown:
        raise InvalidParameterError(f"speculative_config: unknown key(s) {', '.join(unknown)}; known: "
                                    f"{', '.join(sorted(known))}", "speculative_config")
    value = dict(value)
    if "method" not in value:  # vLLM: a draft model given alone means draft-model speculation
        value["method"] = "draft" if value.get("model") else "ngram"
    return SpeculativeConfig(**value)
