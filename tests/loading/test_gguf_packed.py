"""A GGUF's Q8_0 / Q4_0 / Q4_1 layers load packed (dtype auto) as exactly the file's weights, fall back to float
where they cannot, and run close to the float32 path (greedy-equal wherever float32 is not a near tie)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ember.models.loader import load_model
from ember.ops.quant import KERNEL_MAX_ROWS, QuantLinear
from tests.reliability.gguf_bytes import T_Q8_0, GGUFSpec, tiny_llama

TYPES = {"Q8_0": 8, "Q4_0": 2, "Q4_1": 3}  # GGML type ids, of the types that load packed exactly
TYPE_IDS = {**TYPES, "Q5_0": 6, "Q5_1": 7}


def _requantized(spec: GGUFSpec, type_name: str, skip: tuple[str, ...] = ()) -> GGUFSpec:
    """The spec with every matrix (but those named in skip) re-encoded in type_name from its float values."""
    import gguf

    from ember.loading.gguf_reader import TensorInfo
    from ember.loading.gguf import _dequantize

    qtype = gguf.GGMLQuantizationType[type_name]
    for t in spec.tensors:
        if len(t.dims) == 2 and t.name not in skip:
            shape = tuple(reversed(t.dims))
            info = TensorInfo(t.name, t.ttype, shape, np.frombuffer(t.data, np.uint8))
            t.data = gguf.quants.quantize(_dequantize("spec", info).astype(np.float32), qtype).tobytes()
            t.ttype = TYPE_IDS[type_name]
    return spec


def _write(tmp_path: Path, spec: GGUFSpec) -> Path:
    path = tmp_path / "m.gguf"
    path.write_bytes(spec.to_bytes())
    return path


def _weight(model: torch.nn.Module, name: str) -> torch.Tensor:
    if name == "lm_head" and model.lm_head is None:  # tied: the packed head is the embedding's copy
        return model.embed_tokens.weight
    return model.get_submodule(name).weight


def _assert_exact(path: Path, expect_packed: int) -> None:
    packed, dense = load_model(path, "auto").model, load_model(path, "float32").model
    quant = {n: m for n, m in packed.named_modules() if isinstance(m, QuantLinear)}
    assert len(quant) == expect_packed
    assert not any(isinstance(m, QuantLinear) for m in dense.modules())
    for name, m in quant.items():
        assert torch.equal(m.dequantized(), _weight(dense, name)), name
    for name, p in packed.named_parameters():  # everything else (norms, biases, the embedding) as float32 loads it
        assert torch.equal(p, dense.get_parameter(name)), name


@pytest.mark.parametrize("type_name", list(TYPES))
@pytest.mark.parametrize("arch,tied", [("llama", False), ("llama", True), ("qwen2", False)])
def test_packed_layers_are_the_files_weights(tmp_path: Path, type_name: str, arch: str, tied: bool) -> None:
    spec = _requantized(tiny_llama(layers=2, tied=tied, arch=arch), type_name)
    _assert_exact(_write(tmp_path, spec), expect_packed=2 * 4 + 1)  # 4 projections per layer and the head


@pytest.mark.parametrize("type_name", ["Q5_0", "Q5_1"])
def test_5_bit_layers_load_as_int8_close_to_the_file(tmp_path: Path, type_name: str) -> None:
    path = _write(tmp_path, _requantized(tiny_llama(layers=2), type_name))
    packed, dense = load_model(path, "auto").model, load_model(path, "float32").model
    quant = {n: m for n, m in packed.named_modules() if isinstance(m, QuantLinear)}
    assert len(quant) == 2 * 4 + 1 and all(m.bits == 8 and m.group == 32 for m in quant.values())
    for name, m in quant.items():
        w = _weight(dense, name)
        assert 0 < (m.dequantized() - w).abs().max() <= w.abs().max() / 127 / 2 * 1.01, name  # half an int8 step


def test_a_layer_mixing_int8_and_int4_rows_stays_float(tmp_path: Path) -> None:
    spec = _requantized(tiny_llama(layers=2), "Q4_1", skip=("blk.0.attn_v.weight",))  # v: F32 -> Q8_0 below
    spec = _requantized(spec, "Q8_0", skip=tuple(t.name for t in spec.tensors if t.name != "blk.0.attn_v.weight"))
    path = _write(tmp_path, spec)
    _assert_exact(path, expect_packed=2 * 4 + 1 - 1)
    assert not isinstance(load_model(path, "auto").model.layers[0].self_attn.qkv_proj, QuantLinear)


def test_q8_0_codes_of_minus_128_stay_float(tmp_path: Path) -> None:
    spec = _requantized(tiny_llama(layers=1), "Q8_0")
    t = next(t for t in spec.tensors if t.name == "blk.0.ffn_down.weight")
    assert t.ttype == T_Q8_0
    raw = bytearray(t.data)
    raw[2] = 0x80  # the first code of the first block: -128, which the kernels' sign trick cannot take
    t.data = bytes(raw)
    path = _write(tmp_path, spec)
    _assert_exact(path, expect_packed=4 + 1 - 1)


def test_float32_dtype_opts_out_and_bfloat16_dequantizes(tmp_path: Path) -> None:
    path = _write(tmp_path, _requantized(tiny_llama(layers=1), "Q4_1"))
    for dtype in ("float32", "bfloat16"):
        assert not any(isinstance(m, QuantLinear) for m in load_model(path, dtype).model.modules())


@pytest.mark.slow
def test_default_model_packed_follows_float32_wherever_it_is_not_a_near_tie(default_gguf: Path) -> None:
    """The packed path quantizes activations to int8 per block of 32 (as llama.cpp does with this file), a
    small noise on the logits: at every position of a text where float32's best token leads the next by
    more than a logit, the packed path picks the same token; and it mostly agrees where it does not."""
    packed, dense = load_model(default_gguf, "auto"), load_model(default_gguf, "float32")
    assert sum(isinstance(m, QuantLinear) for m in packed.model.modules()) == 30 * 4 + 1
    text = (Path(__file__).parents[1] / "data" / "pride-and-prejudice-ch1.txt").read_text()[:2000]
    # At most KERNEL_MAX_ROWS rows: beyond, prompt chunks run a float GEMM on the dequantized weights.
    ids = torch.tensor(packed.tokenizer.encode(text)[:KERNEL_MAX_ROWS])
    lp = packed.model.compute_logits(packed.model.forward_dense(ids))
    lf = dense.model.compute_logits(dense.model.forward_dense(ids))
    top2 = lf.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1.0
    assert clear.sum() > 50
    agree = lp.argmax(-1) == lf.argmax(-1)
    assert bool(agree[clear].all())
    assert agree.float().mean() > 0.9
    kl = torch.nn.functional.kl_div(lp.log_softmax(-1), lf.log_softmax(-1), log_target=True, reduction="batchmean")
    assert 0 < kl < 0.02  # not 0: the int8 kernels ran
