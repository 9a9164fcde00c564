"""Calibration for training-free compression: token windows from a text file, and a layer-by-layer
pass that hands each decoder layer's linear-layer inputs to a compression callback."""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ember.errors import CompressionError
from ember.loading.tokenizer import Tokenizer
from ember.models.llama import DecoderLayer, LlamaModel

# The linear layers of a decoder layer, by their path inside it (what LayerInputs is keyed by).
LINEARS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


def calibration_ids(tokenizer: Tokenizer, path: str | Path, n_tokens: int, seq_len: int) -> torch.Tensor:
    """The first n_tokens // seq_len consecutive windows of seq_len tokens of a text file: [S, seq_len].

    The whole file is tokenized without special tokens (no BOS). The full requested amount is required,
    so a compression result always states the calibration it really used.
    """
    if seq_len < 1 or n_tokens < seq_len:
        raise CompressionError(f"calibration needs at least one window: got {n_tokens} tokens with "
                               f"sequences of {seq_len} (n_tokens must be >= seq_len >= 1)")
    path = Path(path)
    if not path.is_file():
        raise CompressionError(f"calibration text {str(path)!r} not found: pass a plain-text file "
                               f"(an English book of about {n_tokens} tokens or more works well)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CompressionError(f"calibration text {path} is not UTF-8 text ({e})") from None
    ids = tokenizer.encode(text, add_special_tokens=False)
    n_seqs = n_tokens // seq_len
    need = n_seqs * seq_len
    if len(ids) < need:
        raise CompressionError(f"calibration text {path} has {len(ids)} tokens but {n_seqs} sequences x "
                               f"{seq_len} tokens = {need} are required: use a longer file, or fewer "
                               f"calibration tokens (the full amount is needed, not just one window)")
    return torch.tensor(ids[:need], dtype=torch.long).view(n_seqs, seq_len)


@dataclass
class ChannelStats:
    """Per-input-channel statistics of a linear layer's calibration inputs X [N, in]."""

    mean: torch.Tensor  # [in] E[x_j]
    var: torch.Tensor  # [in] Var[x_j] (biased)
    sq_norm: torch.Tensor  # [in] ||x_j||^2 = sum over tokens
    n: int  # tokens
    gram: torch.Tensor | None = None  # [in, in] X^T X, when asked for

    @classmethod
    def of(cls, x: torch.Tensor, gram: bool = False) -> "ChannelStats":
        mean = x.mean(0)
        sq = x.square().sum(0)
        var = (sq / x.shape[0] - mean.square()).clamp_min(0)
        return cls(mean, var, sq, x.shape[0], x.T @ x if gram else None)


class LayerInputs(Mapping[str, torch.Tensor]):
    """Inputs of one decoder layer's linear layers over all calibration tokens: name -> float32
    [tokens, in_features] (names as in LINEARS), plus `hidden`, the decoder layer's own input
    [sequences, seq_len, hidden] in the model's dtype."""

    def __init__(self, inputs: dict[str, torch.Tensor], hidden: torch.Tensor) -> None:
        self._inputs = inputs
        self.hidden = hidden

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._inputs[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._inputs)

    def __len__(self) -> int:
        return len(self._inputs)

    def sq_norms(self, name: str) -> torch.Tensor:
        """sum over tokens of x_j^2, per input channel [in]."""
        return self._inputs[name].square().sum(0)

    def norms(self, name: str) -> torch.Tensor:
        """||x_j||_2 per input channel [in] (Wanda's activation norm)."""
        return self.sq_norms(name).sqrt()

    def mean_abs(self, name: str) -> torch.Tensor:
        """E|x_j| per input channel [in] (AWQ's activation scale)."""
        return self._inputs[name].abs().mean(0)

    def stats(self, name: str, gram: bool = False) -> ChannelStats:
        return ChannelStats.of(self._inputs[name], gram)


CompressLayer = Callable[[int, DecoderLayer, LayerInputs], None]


def layerwise(model: LlamaModel, ids: torch.Tensor, compress_layer: CompressLayer) -> None:
    """Compress `model` one decoder layer at a time on calibration sequences ids [S, T].

    For each layer i: run it on the current hidden states with forward pre-hooks recording the inputs
    of its linear layers into a LayerInputs, call compress_layer(i, layer, inputs) (which may modify
    the weights in place or swap modules with setattr on their parent, e.g. layer.mlp.down_proj =
    QuantLinear(...)), then run the compressed layer to get the next layer's inputs, so compression
    errors propagate as they will at inference. Memory: one layer's activations at a time.
    Everything runs under torch.inference_mode: tensors the callback creates are inference tensors
    (fine for modules it builds; copy into existing parameters in place rather than rebinding them).
    """
    if ids.dim() != 2 or ids.shape[1] < 1 or ids.dtype != torch.long:
        raise CompressionError(f"calibration ids must be a [sequences, seq_len] long tensor, got "
                               f"{tuple(ids.shape)} {ids.dtype}")
    if ids.shape[1] > model.max_positions:
        raise CompressionError(f"calibration sequences of {ids.shape[1]} tokens exceed the model's "
                               f"{model.max_positions} positions")
    with torch.inference_mode():
        hidden = model.embed_tokens(ids)  # [S, T, D]
        backend, plan = model.dense_context(ids.shape[1])
        rope = model.rope(torch.arange(ids.shape[1]), hidden.dtype)
        for i, layer in enumerate(model.layers):
            inputs = _capture(layer, hidden, rope, backend, plan)
            compress_layer(i, layer, inputs)
            del inputs
            hidden = torch.stack([layer(h, rope, backend, plan) for h in hidden])


def _capture(layer: DecoderLayer, hidden: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
             backend: object, plan: object) -> LayerInputs:
    s, t = hidden.shape[:2]
    bufs: dict[str, torch.Tensor] = {}
    row = [0]

    def hook(name: str) -> Callable[..., None]:
        def record(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0]
            if name not in bufs:  # allocated once: no list-then-cat copy of the whole capture
                bufs[name] = torch.empty(s * t, x.shape[-1], dtype=torch.float32)
            bufs[name][row[0]:row[0] + t] = x.reshape(t, -1)
        return record

    handles = [layer.get_submodule(n).register_forward_pre_hook(hook(n)) for n in LINEARS]
    try:
        for j in range(s):
            row[0] = j * t
            layer(hidden[j], rope, backend, plan)
    finally:
        for h in handles:
            h.remove()
    return LayerInputs({n: bufs[n] for n in LINEARS}, hidden)
