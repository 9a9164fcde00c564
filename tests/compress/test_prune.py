"""Pruning: exact sparsity and N:M patterns, Wanda vs magnitude, DSnoT never worse than its initial mask on real
calibration inputs, a pruned model still generates, and bad options fail before any work."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ember import LLM, SamplingParams
from ember.compress import prune
from ember.compress.calibrate import LINEARS, LayerInputs, calibration_ids, layerwise
from ember.compress.prune import check_options, dsnot, parse_pattern, prune_model, prune_weight
from ember.errors import CompressionError
from ember.models.loader import load_model
from tests.conftest import DATA

TEXT_FILE = DATA / "pride-and-prejudice-ch1.txt"


def _weight(rows: int = 37, cols: int = 96) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.77])
def test_unstructured_sparsity_is_exact_per_row(sparsity: float) -> None:
    w = _weight()
    for method, norms in (("magnitude", None), ("wanda", torch.rand(96) + 0.1)):
        mask = prune_weight(w, method, sparsity, norms=norms)
        assert mask.dtype == torch.bool and mask.shape == w.shape
        assert ((~mask).sum(1) == round(sparsity * 96)).all()


@pytest.mark.parametrize("pattern", [(2, 4), (1, 4), (4, 8)])
def test_n_m_pattern(pattern: tuple[int, int]) -> None:
    n, m = pattern
    mask = prune_weight(_weight(), "wanda", pattern=pattern, norms=torch.rand(96) + 0.1)
    assert ((~mask).view(37, 96 // m, m).sum(-1) == n).all()
    scores = _weight().abs()
    kept = prune_weight(_weight(), "magnitude", pattern=pattern).view(37, -1, m)
    # within each group, every pruned weight scores no higher than every kept one
    groups = scores.view(37, -1, m)
    assert (groups.masked_fill(kept, -1).amax(-1) <= groups.masked_fill(~kept, 1e9).amin(-1)).all()


def test_wanda_weighs_by_activation_norms() -> None:
    w = _weight()
    w[:, :8] = 0.01  # small weights on outlier channels: magnitude prunes them, Wanda keeps them
    magnitude = prune_weight(w, "magnitude", 0.5)
    assert torch.equal(prune_weight(w, "wanda", 0.5, norms=torch.full((96,), 3.0)), magnitude)
    norms = torch.ones(96)
    norms[:8] = 1000.0
    wanda = prune_weight(w, "wanda", 0.5, norms=norms)
    assert not torch.equal(wanda, magnitude)
    assert wanda[:, :8].all() and not magnitude[:, :8].any()


class _Enough(Exception):
    pass


@pytest.fixture(scope="module")
def real_inputs(default_gguf: Path) -> list[tuple[str, torch.Tensor, LayerInputs]]:
    """Weights and captured calibration inputs of layers 0, 1 and 4 of the real default model."""
    loaded = load_model(default_gguf)
    ids = calibration_ids(loaded.tokenizer, TEXT_FILE, 4 * 128, 128)
    out = []

    def keep(i: int, layer: torch.nn.Module, inputs: LayerInputs) -> None:
        if i in (0, 1, 4):
            for name in LINEARS:
                out.append((f"layers.{i}.{name}", layer.get_submodule(name).weight.data.clone(), inputs))
        if i == 4:
            raise _Enough  # the later layers are not needed

    with pytest.raises(_Enough):
        layerwise(loaded.model, ids, keep)
    return out


@pytest.mark.parametrize("init,pattern", [("wanda", None), ("magnitude", None), ("wanda", (2, 4))])
def test_dsnot_never_increases_reconstruction_error(real_inputs: list, init: str,
                                                    pattern: tuple[int, int] | None) -> None:
    swaps = 0
    for name, w, inputs in real_inputs:
        x = inputs[name.split(".", 2)[2]]
        stats = inputs.stats(name.split(".", 2)[2], gram=True)
        before = prune_weight(w, init, 0.5, pattern, stats.sq_norm.sqrt())
        after = dsnot(w, before, stats, pattern)
        assert torch.equal(after.sum(1), before.sum(1)), name  # same sparsity in every row
        if pattern:
            assert ((~after).view(w.shape[0], -1, 4).sum(-1) == 2).all(), name

        def error(mask: torch.Tensor) -> float:
            return float((x @ w.T - x @ (w * mask).T).double().square().sum())

        assert error(after) <= error(before) * (1 + 1e-6), name
        swaps += int((after != before).sum()) // 2
    assert swaps > 100  # the refinement really changed the masks


def test_prune_model_and_generate(tiny_llama3: Path) -> None:
    llm = LLM(tiny_llama3, kv_cache_memory=0.01)
    model = llm.engine.loaded.model
    embed = model.embed_tokens.weight.clone()
    ids = calibration_ids(llm.get_tokenizer(), TEXT_FILE, 8 * 64, 64)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    dense = llm.generate("It is a truth universally", params)[0].outputs[0].token_ids
    summary = prune_model(model, "dsnot", 0.5, None, ids)
    assert summary.overall == 0.5 and summary.layers == [0.5, 0.5] and len(summary.linears) == 8
    assert summary.dsnot_swaps > 0 and summary.calib_tokens == 512
    assert torch.equal(model.embed_tokens.weight, embed)  # embedding / tied head untouched
    assert (model.layers[1].mlp.down_proj.weight == 0).float().mean() == 0.5
    sparse = llm.generate("It is a truth universally", params)[0].outputs[0].token_ids
    assert len(sparse) == 16 and sparse != dense


def test_prune_model_2_4_and_magnitude_without_calibration(tiny_llama3: Path) -> None:
    model = load_model(str(tiny_llama3)).model
    summary = prune_model(model, "magnitude", pattern=(2, 4))
    assert summary.sparsity == 0.5 and summary.calib_tokens == 0
    for layer in model.layers:
        for name in LINEARS:
            w = layer.get_submodule(name).weight
            assert ((w == 0).view(w.shape[0], -1, 4).sum(-1) == 2).all()


def test_bad_options_fail_before_any_work(tiny_llama3: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = load_model(str(tiny_llama3)).model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(prune, "layerwise", lambda *a: pytest.fail("calibration started"))
    ids = torch.zeros(2, 16, dtype=torch.long)
    cases = [
        (dict(method="wanda", sparsity=1.0), r"sparsity must be a fraction in \[0, 1\)"),
        (dict(method="wanda", sparsity=-0.1), "sparsity must be"),
        (dict(method="wanda", sparsity=None), "sparsity must be"),
        (dict(method="sparsegpt", sparsity=0.5), "unknown pruning method 'sparsegpt'"),
        (dict(method="wanda", pattern=(4, 2)), "must be N:M with integers 0 < N < M"),
        (dict(method="wanda", pattern=(2, 2)), "0 < N < M"),
        (dict(method="wanda", pattern=(0, 4)), "0 < N < M"),
        (dict(method="wanda", sparsity=0.6, pattern=(2, 4)), "fixes the sparsity at 0.5"),
        (dict(method="wanda", pattern=(2, 3)), "divisible by 3"),
        (dict(method="wanda", sparsity=0.5, calib_ids=None), "needs calibration sequences"),
        (dict(method="dsnot", sparsity=0.5, init="sparsegpt"), "initial mask must be one of"),
    ]
    for kwargs, message in cases:
        kwargs.setdefault("calib_ids", ids)
        with pytest.raises(CompressionError, match=message):
            prune_model(model, **kwargs)
    model.layers[1].mlp.down_proj = torch.nn.Identity()  # stands in for a QuantLinear
    with pytest.raises(CompressionError, match="prune before quantizing"):
        prune_model(model, "wanda", 0.5, None, ids)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items() if k in model.state_dict())


def test_option_helpers() -> None:
    assert parse_pattern("2:4") == (2, 4) and check_options("dsnot", 0.5, None) == (0.5, None)
    for bad in ("2-4", "4:2", "a:b"):
        with pytest.raises(CompressionError, match="N:M"):
            parse_pattern(bad)
    with pytest.raises(CompressionError, match="DSnoT refines a mask"):
        prune_weight(_weight(), "dsnot", 0.5)
    with pytest.raises(CompressionError, match="input-channel norms"):
        prune_weight(_weight(), "wanda", 0.5)
    with pytest.raises(CompressionError, match="divisible by 4"):
        prune_weight(_weight(4, 6), "magnitude", pattern=(2, 4))
