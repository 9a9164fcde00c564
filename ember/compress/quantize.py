"""Weight quantization passes: swap a model's linear layers for QuantLinear modules."""
from __future__ import annotations

from torch import nn

from ember.models.llama import Linear, LlamaModel
from ember.ops.quant import GROUP, QuantLinear

METHODS = ("none", "int8")


def quantize_int8(model: LlamaModel) -> LlamaModel:
    """Round-to-nearest int8 weights in groups of 32 for every projection and the LM head.

    A tied LM head gets its own int8 copy of the embedding table (the lookup stays float).
    """
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Linear) and child.weight.shape[1] % GROUP == 0:
                setattr(parent, name, QuantLinear.from_float(child.weight.data, _bias(child)))
    if model.lm_head is None and model.embed_tokens.weight.shape[1] % GROUP == 0:
        model.lm_head = QuantLinear.from_float(model.embed_tokens.weight.data)
    return model


def _bias(layer: nn.Module) -> object:
    return None if layer.bias is None else layer.bias.data


def apply(model: LlamaModel, method: str) -> LlamaModel:
    if method == "int8":
        return quantize_int8(model)
    return model
