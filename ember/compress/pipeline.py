"""`ember compress`: check every option first, then prune and/or quantize a model and write its folder."""
from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm import tqdm

import ember
from ember.compress import prune
from ember.compress.calibrate import calibration_ids
from ember.compress.export import source_sha256, write_folder
from ember.compress.quantize import AWQ_GRID, quantize_awq
from ember.models.quantize import QuantSpec, quantize_rtn
from ember.config import ModelConfig
from ember.errors import CompressionError
from ember.loading.tokenizer import Tokenizer
from ember.models.compressed import is_compressed
from ember.models.llama import Linear, LlamaModel
from ember.models.loader import DTYPES, load_config, load_model
from ember.ops.quant import BLOCK, QuantLinear

log = logging.getLogger("ember")
QUANT_METHODS = ("int8", "int4", "awq")
METHODS = QUANT_METHODS + prune.METHODS
CALIBRATED = ("awq", "wanda", "dsnot")
BITS = {"int8": (8,), "int4": (4,), "awq": (4, 8)}  # first: the default
AUTO_GROUPS = (128, 64, 32)  # int4's default: the largest that tiles every input dimension
DEFAULT_SPARSITY = 0.5


@dataclass
class CompressOptions:
    """Options of `ember compress`; None means the method's default."""

    bits: int | None = None
    group_size: int | None = None
    sparsity: float | None = None
    pattern: str | None = None  # "N:M"
    calib: str | Path | None = None
    calib_tokens: int = 4096
    seq_len: int = 512
    dtype: str = "float16"  # of the float tensors written (embedding, norms, unquantized layers)


@dataclass
class Plan:
    """What compress_model will do, with every option checked."""

    source: Path
    config: ModelConfig
    tokenizer: Tokenizer
    out_dir: Path
    methods: list[str]  # in the order they run
    prune: str | None
    quant: str | None
    spec: QuantSpec | None
    sparsity: float | None
    pattern: tuple[int, int] | None
    calib_file: Path | None
    calib_ids: torch.Tensor | None
    float_dtype: torch.dtype


def parse_methods(methods: str | Sequence[str]) -> tuple[str | None, str | None]:
    """'wanda,int4' -> ('wanda', 'int4'): at most one pruning and one quantization method."""
    names = [m.strip().lower() for m in (methods.split(",") if isinstance(methods, str) else methods)]
    names = [m for m in names if m]
    unknown = [m for m in names if m not in METHODS]
    if not names or unknown:
        raise CompressionError(f"unknown method {', '.join(unknown) or '(none given)'}; choose from "
                               f"{', '.join(METHODS)}, or one pruning and one quantization method, e.g. wanda,int4")
    prunes, quants = [m for m in names if m in prune.METHODS], [m for m in names if m in QUANT_METHODS]
    if len(prunes) > 1 or len(quants) > 1:
        raise CompressionError(f"methods {','.join(names)}: combine at most one pruning method ("
                               f"{', '.join(prune.METHODS)}) with one quantization method ({', '.join(QUANT_METHODS)})")
    return (prunes or [None])[0], (quants or [None])[0]


def plan_compression(model_path: str | Path | None, methods: str | Sequence[str], options: CompressOptions,
                     out_dir: str | Path) -> Plan:
    """Check every option (cheap: config, tokenizer and calibration text only); raises CompressionError."""
    pruner, quant = parse_methods(methods)
    bits = _check_bits(quant, options.bits)
    _check_flags(pruner, quant, options)
    out = _check_out_dir(Path(out_dir))
    calib = _check_calib_file(pruner, quant, options)
    if options.dtype not in DTYPES:
        raise CompressionError(f"dtype {options.dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    source, config, tokenizer = load_config(model_path, progress=True)
    if is_compressed(source):
        raise CompressionError(f"{source} is already compressed; compress the original model instead "
                               "(methods combine in one run, e.g. --method wanda,int4)")
    sparsity, pattern = _check_pruning(pruner, options, config) if pruner else (None, None)
    spec = None if bits is None else QuantSpec(bits, _group(bits, options.group_size, config), pruner is not None)
    ids = None
    if calib is not None:
        seq_len = min(options.seq_len, options.calib_tokens, config.max_position_embeddings)
        ids = calibration_ids(tokenizer, calib, options.calib_tokens, seq_len)
    return Plan(source, config, tokenizer, out, [m for m in (pruner, quant) if m], pruner, quant, spec, sparsity,
                pattern, calib, ids, DTYPES[options.dtype])


def _check_bits(quant: str | None, bits: int | None) -> int | None:
    if quant is None:
        if bits is not None:
            raise CompressionError(f"--bits applies to quantization methods ({', '.join(QUANT_METHODS)}); "
                                   "add one, e.g. --method wanda,int4")
        return None
    if bits is not None and bits not in (4, 8):
        raise CompressionError(f"{bits}-bit weights are not supported; ember stores 4- or 8-bit weights")
    if bits is not None and bits not in BITS[quant]:
        other = "int4 or awq" if bits == 4 else "int8 or awq --bits 8"
        raise CompressionError(f"method {quant} quantizes to {BITS[quant][0]} bits, not {bits}: use {other}")
    return bits or BITS[quant][0]


def _check_flags(pruner: str | None, quant: str | None, o: CompressOptions) -> None:
    if pruner is None and (o.sparsity is not None or o.pattern is not None):
        raise CompressionError(f"--sparsity and --pattern apply to pruning methods ({', '.join(prune.METHODS)}); "
                               "add one, e.g. --method wanda")
    if quant is None and o.group_size is not None:
        raise CompressionError("--group-size applies to quantization methods "
                               f"({', '.join(QUANT_METHODS)}); add one, e.g. --method int4")
    if o.group_size is not None and (o.group_size <= 0 or o.group_size % BLOCK):
        raise CompressionError(f"group size {o.group_size} must be a positive multiple of {BLOCK}")
    if o.calib_tokens < 1 or o.seq_len < 1:
        raise CompressionError(f"calibration tokens ({o.calib_tokens}) and sequence length ({o.seq_len}) "
                               "must be positive")


def _check_out_dir(out: Path) -> Path:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CompressionError(f"output {out} exists and is not an empty folder; choose a new folder")
    return out


def _check_calib_file(pruner: str | None, quant: str | None, o: CompressOptions) -> Path | None:
    needs = [m for m in (pruner, quant) if m in CALIBRATED]
    if not needs:
        if o.calib is not None:
            log.warning("--calib is ignored: only %s use calibration text", ", ".join(CALIBRATED))
        return None
    if o.calib is None:
        raise CompressionError(f"{' and '.join(needs)} need{'s' * (len(needs) == 1)} calibration text: pass "
                               f"--calib FILE (plain UTF-8 text of at least {o.calib_tokens} tokens, e.g. a book)")
    path = Path(o.calib).expanduser()
    if not path.is_file():
        raise CompressionError(f"calibration text {str(path)!r} not found: pass a plain-text file")
    return path


def _input_dims(config: ModelConfig) -> dict[str, int]:
    return {"hidden size (qkv_proj, gate_up_proj, lm_head)": config.hidden_size,
            "attention width (o_proj)": config.num_heads * config.head_dim,
            "intermediate size (down_proj)": config.intermediate_size}


def _group(bits: int, group: int | None, config: ModelConfig) -> int | None:
    """The group size to use: the one given (which must tile every input dimension that can be quantized at
    all), else one group per output channel for 8 bits and the largest of AUTO_GROUPS that fits for 4."""
    dims = {d: k for d, k in _input_dims(config).items() if k % BLOCK == 0}
    if group is None:
        return None if bits == 8 else next((g for g in AUTO_GROUPS if all(k % g == 0 for k in dims.values())), BLOCK)
    bad = [f"{d} {k}" for d, k in dims.items() if k % group]
    if bad:
        common = math.gcd(*dims.values())
        fits = [g for g in range(BLOCK, common + 1, BLOCK) if common % g == 0]
        raise CompressionError(f"group size {group} does not divide the {', '.join(bad)}; choose one of "
                               f"{', '.join(map(str, fits))}")
    return group


def _check_pruning(pruner: str, o: CompressOptions, config: ModelConfig) -> tuple[float, tuple[int, int] | None]:
    """(sparsity, N:M pattern or None); without either option, DEFAULT_SPARSITY unstructured."""
    pattern = prune.parse_pattern(o.pattern) if o.pattern else None
    default = None if pattern else DEFAULT_SPARSITY
    sparsity, pattern = prune.check_options(pruner, default if o.sparsity is None else o.sparsity, pattern)
    bad = [f"{d} {k}" for d, k in _input_dims(config).items() if pattern and k % pattern[1]]
    if pattern and bad:
        raise CompressionError(f"{pattern[0]}:{pattern[1]} sparsity needs input dimensions divisible by "
                               f"{pattern[1]}; this model has {', '.join(bad)}")
    return sparsity, pattern


def run_plan(model: LlamaModel, p: Plan, progress: bool = False) -> dict[str, Any]:
    """Compress a loaded float32 model in place as planned; returns what was done, for the manifest.
    progress: one bar over every layer of every method on stderr (where it is a terminal)."""
    with tqdm(total=len(model.layers) * len(p.methods), desc=f"compressing ({'+'.join(p.methods)})", unit="layer",
              file=sys.stderr, disable=None if progress else True) as bar:
        return _run_plan(model, p, lambda: bar.update())


def _run_plan(model: LlamaModel, p: Plan, on_layer: Callable[[], Any]) -> dict[str, Any]:
    done: dict[str, Any] = {}
    if p.prune:
        summary = prune.prune_model(model, p.prune, p.sparsity, p.pattern,
                                    None if p.prune == "magnitude" else p.calib_ids, on_layer=on_layer)
        for i, s in enumerate(summary.layers):
            log.debug("layer %d/%d: %.1f%% of weights pruned", i + 1, len(summary.layers), 100 * s)
        log.info("pruned (%s): %.1f%% of the layers' weights", p.prune, 100 * summary.overall)
        done["pruning"] = {"achieved_sparsity": summary.overall, "dsnot_swaps": summary.dsnot_swaps,
                           "seconds": round(summary.seconds, 2)}
    formats: dict[str, str] = {}
    if p.quant == "awq":
        formats, searches = quantize_awq(model, p.calib_ids, p.spec, on_layer=on_layer)  # type: ignore[arg-type]
        done["awq"] = {"grid": AWQ_GRID, "layers": searches}
    elif p.quant:
        formats = quantize_rtn(model, p.spec, on_layer)  # type: ignore[arg-type]
    for name, fmt in formats.items():
        if fmt.startswith("float"):
            log.warning("%s stays %s", name, fmt)
    _round_floats(model, p.float_dtype)
    done["layers"] = layer_report(model, formats)
    return done


def _round_floats(model: LlamaModel, dtype: torch.dtype) -> None:
    """Round float parameters to the dtype they are saved in, so the model in memory equals the saved one
    (QuantLinear biases are saved in float32)."""
    if dtype == torch.float32:
        return
    quant = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    for name, param in model.named_parameters():
        if name.rsplit(".", 1)[0] not in quant:
            param.data.copy_(param.data.to(dtype))


def layer_report(model: LlamaModel, formats: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Per linear layer: storage format, shape, and achieved sparsity (exact zeros in the weights it computes with)."""
    rows = {}
    for name, m in model.named_modules():
        if isinstance(m, (Linear, QuantLinear)):
            shape = [m.out_features, m.in_features] if isinstance(m, QuantLinear) else list(m.weight.shape)
            rows[name] = {"format": formats.get(name, "float"), "shape": shape,
                          "sparsity": round(_zeros(m) / (shape[0] * shape[1]), 6)}
    return rows


def _zeros(m: Linear | QuantLinear) -> int:
    if isinstance(m, Linear):
        return int((m.weight == 0).sum())
    if m.bits == 8:  # symmetric: exactly zero iff the code is
        return int((m.qweight == 0).sum())
    return int((m.dequantized() == 0).sum())


def compress(p: Plan) -> tuple[LlamaModel, dict[str, Any]]:
    """Load the planned model in float32 and compress it; returns the model and its manifest (less bytes)."""
    start = time.perf_counter()
    log.info("loading %s", p.source)
    model = load_model(p.source, "float32", progress=True).model
    done = run_plan(model, p, progress=True)
    return model, _manifest(p, done, time.perf_counter() - start)


def save(p: Plan, model: LlamaModel, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write the compressed-model folder; returns the manifest with the bytes on disk."""
    manifest = write_folder(p.out_dir, p.source, model, p.config, p.tokenizer, manifest, p.float_dtype)
    log.info("wrote %s: %.1f MB (weights %.1f MB)", p.out_dir, manifest["bytes"]["total"] / 1e6,
             manifest["bytes"]["weights"] / 1e6)
    return manifest


def compress_model(model_path: str | Path | None, methods: str | Sequence[str], options: CompressOptions | None,
                   out_dir: str | Path) -> dict[str, Any]:
    """Check every option, then load, compress and write out_dir; returns the manifest."""
    p = plan_compression(model_path, methods, options or CompressOptions(), out_dir)
    return save(p, *compress(p))


def model_bytes(path: Path) -> int:
    """Bytes of a model's weights on disk: the file, or a folder's *.safetensors files."""
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.glob("*.safetensors"))


def _manifest(p: Plan, done: dict[str, Any], seconds: float) -> dict[str, Any]:
    spec, ids = p.spec, p.calib_ids
    quant = None if spec is None else {
        "method": p.quant, "bits": spec.bits, "group_size": spec.group or "per-channel",
        "scheme": "symmetric" if spec.bits == 8 else
                  "asymmetric, integer zero point" if spec.keep_zeros else "asymmetric (scale, min)",
        "lm_head": done["layers"].get("lm_head", {}).get("format", "float")}
    pruning = None if p.prune is None else {
        "method": p.prune, "sparsity": p.sparsity, "pattern": f"{p.pattern[0]}:{p.pattern[1]}" if p.pattern else None,
        **done.get("pruning", {})}
    calib = None if ids is None else {
        "file": p.calib_file.name, "tokens": ids.numel(), "sequences": ids.shape[0], "seq_len": ids.shape[1]}
    return {
        "format": "ember-compressed", "format_version": 1, "ember_version": ember.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": {"path": str(p.source), "sha256": source_sha256(p.source), "arch": p.config.arch},
        "methods": p.methods, "quantization": quant, "pruning": pruning, "calibration": calib,
        "float_dtype": str(p.float_dtype).removeprefix("torch."), "seconds": round(seconds, 2),
        **({"awq": done["awq"]} if "awq" in done else {}), "layers": done["layers"],
    }
