"""PoolingParams: a request that reads what the model computes over its prompt instead of generating: a pooled
hidden-state vector, and/or the attention a span of its tokens pays to every earlier token."""
from __future__ import annotations

from dataclasses import dataclass

from ember.errors import InvalidParameterError

POOLING_TYPES = ("last", "mean")


@dataclass
class PoolingParams:
    """`pooling`: "last" (the final token's hidden state, as vLLM pools decoder models), "mean" (over every
    prompt token) or None (no vector). `attention_span`: prompt positions [start, end) whose attention
    probabilities over all earlier tokens are captured, summed over heads and over `attention_layers`
    (None: every layer), in float32. `normalize`: L2-normalise the pooled vector."""

    pooling: str | None = "last"
    normalize: bool = False
    attention_span: tuple[int, int] | None = None
    attention_layers: list[int] | None = None

    def __post_init__(self) -> None:
        if self.pooling is not None and self.pooling not in POOLING_TYPES:
            raise InvalidParameterError(f"pooling must be one of {', '.join(POOLING_TYPES)} or None, "
                                        f"got {self.pooling!r}", "pooling")
        if self.pooling is None and self.attention_span is None:
            raise InvalidParameterError("a pooling request needs pooling or attention_span", "pooling")
        if self.attention_span is not None:
            span = tuple(self.attention_span)
            if len(span) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in span) \
                    or not 0 <= span[0] < span[1]:
                raise InvalidParameterError(f"attention_span must be [start, end) with 0 <= start < end, "
                                            f"got {self.attention_span!r}", "attention_span")
            self.attention_span = (span[0], span[1])

    def resolve(self, num_prompt_tokens: int, num_layers: int) -> "PoolingParams":
        """Check against the prompt and model; fill in every layer for attention_layers=None."""
        if self.attention_span is not None and self.attention_span[1] > num_prompt_tokens:
            raise InvalidParameterError(f"attention_span {list(self.attention_span)} reaches past the prompt's "
                                        f"{num_prompt_tokens} tokens", "attention_span")
        layers = list(range(num_layers)) if self.attention_layers is None else list(self.attention_layers)
        bad = [i for i in layers if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < num_layers]
        if bad or not layers:
            raise InvalidParameterError(f"attention_layers must be layer indices in [0, {num_layers}), "
                                        f"got {self.attention_layers!r}", "attention_layers")
        return PoolingParams(self.pooling, self.normalize, self.attention_span, sorted(set(layers)))

    def depth(self, num_layers: int) -> int | None:
        """How many layers the forward must run for this (resolved) request: a request that reads only
        attention stops after its last captured layer; None: all of them."""
        if self.pooling is not None or not self.attention_layers or max(self.attention_layers) + 1 >= num_layers:
            return None
        return max(self.attention_layers) + 1

    def first_computed(self, num_prompt_tokens: int) -> int:
        """The first prompt position whose rows must be computed (not taken from the prefix cache): all for a
        pooled vector (its value must not depend on what the cache held: the last token computed alone rounds
        differently from the same token in its prompt's chunk), else the attention span's."""
        if self.pooling is not None or self.attention_span is None:
            return 0
        return min(num_prompt_tokens - 1, self.attention_span[0])
