"""Names of ember's weight and KV-cache formats, free of torch: the CLI's choices come from here without
slowing `--help`."""
from __future__ import annotations

# KV cache storage -> bits of a KIVI code; None: a float cache, in the model's dtype ("auto") or float16 (half
# a float32 model's bytes, llama.cpp's default cache type).
KV_CACHE_DTYPES: dict[str, int | None] = {"auto": None, "float16": None, "int8": 8, "int4": 4, "int2": 2}
# `--quantization`: weights quantized at load (round-to-nearest; see ember.compress.quantize).
QUANT_METHODS = ("none", "int8", "int4")
