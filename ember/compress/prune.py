"""Weight pruning without training: magnitude and Wanda masks (unstructured or N:M), refined by DSnoT,
applied to every projection of every decoder layer with layer-by-layer calibration."""
from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from tqdm import tqdm

from ember.compress.calibrate import LINEARS, ChannelStats, LayerInputs, layerwise
from ember.errors import CompressionError
from ember.models.llama import DecoderLayer, Linear, LlamaModel

METHODS = ("magnitude", "wanda", "dsnot")
MASK_METHODS = ("magnitude", "wanda")  # the initial masks prune_weight computes (and DSnoT starts from)
# DSnoT's stopping threshold on the per-row expected error |sum_j W_ij E[x_j]| over pruned j. The
# reference implementation's 0.1 is on sums over 2048-token sequences; this is the per-token equivalent.
THRESHOLD = 0.1 / 2048


def parse_pattern(text: str) -> tuple[int, int]:
    """'2:4' -> (2, 4)."""
    try:
        n, m = (int(p) for p in text.split(":"))
    except ValueError:
        raise CompressionError(f"sparsity pattern {text!r} is not N:M (e.g. 2:4)") from None
    return check_options("wanda", None, (n, m))[1]  # type: ignore[return-value]


def check_options(method: str, sparsity: float | None,
                  pattern: tuple[int, int] | None) -> tuple[float, tuple[int, int] | None]:
    """Validate pruning options; returns (sparsity, pattern) with the sparsity an N:M pattern implies."""
    if method not in METHODS:
        raise CompressionError(f"unknown pruning method {method!r}; choose one of {', '.join(METHODS)}")
    if pattern is not None:
        if (len(pattern) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pattern)
                or not 0 < pattern[0] < pattern[1]):
            raise CompressionError(f"sparsity pattern {pattern!r} must be N:M with integers 0 < N < M "
                                   f"(N of every M consecutive weights pruned), e.g. 2:4")
        implied = pattern[0] / pattern[1]
        if sparsity is not None and abs(sparsity - implied) > 1e-9:
            raise CompressionError(f"pattern {pattern[0]}:{pattern[1]} fixes the sparsity at {implied:g}; "
                                   f"leave the sparsity out or set it to {implied:g}")
        return implied, (pattern[0], pattern[1])
    if sparsity is None or isinstance(sparsity, bool) or not 0 <= sparsity < 1:
        raise CompressionError(f"sparsity must be a fraction in [0, 1) (e.g. 0.5 prunes half the "
                               f"weights), got {sparsity!r}")
    return float(sparsity), None


def prune_weight(w: torch.Tensor, method: str, sparsity: float | None = None,
                 pattern: tuple[int, int] | None = None, norms: torch.Tensor | None = None) -> torch.Tensor:
    """Keep-mask (bool, True = kept) for w [out, in]: the lowest-scored weights of each output row are
    pruned, exactly round(sparsity * in) per row, or N in every M consecutive inputs with pattern=(N, M).
    Scores: magnitude |W_ij|; wanda |W_ij| * ||X_j||_2 with norms = ||X_j||_2 [in] from calibration."""
    if method not in MASK_METHODS:
        hint = "; DSnoT refines a mask: see dsnot()" if method == "dsnot" else ""
        raise CompressionError(f"prune_weight method must be one of {', '.join(MASK_METHODS)}, "
                               f"got {method!r}{hint}")
    sparsity, pattern = check_options(method, sparsity, pattern)
    score = w.detach().float().abs()
    if method == "wanda":
        if norms is None or norms.shape != (w.shape[1],):
            raise CompressionError(f"wanda needs the input-channel norms [{w.shape[1]}] from calibration, "
                                   f"got {None if norms is None else tuple(norms.shape)}")
        score = score * norms.float()
    return lowest_mask(score, sparsity, pattern)


def lowest_mask(score: torch.Tensor, sparsity: float, pattern: tuple[int, int] | None) -> torch.Tensor:
    """Keep-mask pruning the lowest scores per row (unstructured) or per group of M inputs (N:M)."""
    rows, cols = score.shape
    if pattern is not None:
        n, m = pattern
        if cols % m:
            raise CompressionError(f"{n}:{m} sparsity needs input sizes divisible by {m}, got {cols}")
        idx = score.view(rows, cols // m, m).topk(n, dim=-1, largest=False).indices
        return torch.ones(rows, cols // m, m, dtype=torch.bool).scatter_(-1, idx, False).view(rows, cols)
    idx = score.topk(round(sparsity * cols), dim=1, largest=False).indices
    return torch.ones(rows, cols, dtype=torch.bool).scatter_(1, idx, False)


def dsnot(w: torch.Tensor, mask: torch.Tensor, stats: ChannelStats, pattern: tuple[int, int] | None = None,
          cycles: int = 50, threshold: float = THRESHOLD, var_power: float = 1.0) -> torch.Tensor:
    """Refine a keep-mask with DSnoT's training-free grow/prune cycles (Zhang et al., ICLR 2024).

    Per output row i the expected error of the pruned row is e_i = sum over pruned j of W_ij E[x_j].
    Each cycle, for all rows at once: revive the pruned weight whose contribution W_ij E[x_j] / Var[x_j]^p
    most reduces |e_i|, and prune the kept weight of least Wanda importance whose contribution has the
    opposite sign (with pattern: the least important kept weight of the revived weight's M-block), if
    e_i keeps its sign and shrinks. A row stops at its first rejected swap, when |e_i| < threshold, or
    after `cycles`. Per-row sparsity and the N:M pattern are unchanged. With stats.gram (X^T X) given,
    rows whose exact calibration error ||X (W_i - W_i*M_i)||^2 would grow keep their initial mask, so
    the result never reconstructs the calibration inputs worse than `mask`.
    """
    w = w.detach().float()
    contrib = w * stats.mean
    importance = w.abs() * stats.sq_norm.sqrt()
    e = (contrib * ~mask).sum(1)
    sign = torch.sign(e)
    signed = contrib * sign[:, None]  # > 0: reviving it shrinks |e|, pruning it grows |e|
    # Candidates only ever leave these orders (a revived weight never qualifies for pruning and vice
    # versa), so sorting once and walking a pointer per row is the same as re-ranking every cycle.
    grow = torch.where(~mask & (signed > 0), signed / stats.var.clamp_min(1e-10) ** var_power, -torch.inf)
    grow_val, grow_order = grow.sort(dim=1, descending=True, stable=True)
    n_grow = (grow_val > -torch.inf).sum(1)
    if pattern is None:
        cut = torch.where(mask & (signed < 0), importance, torch.inf)
        cut_val, cut_order = cut.sort(dim=1, stable=True)
        n_cut = (cut_val < torch.inf).sum(1)
    kept, changed = mask.clone(), torch.zeros_like(mask)
    steps = torch.zeros(w.shape[0], dtype=torch.long)  # accepted swaps = pointer into both orders
    last = w.shape[1] - 1
    active = e.abs() > threshold
    for _ in range(cycles):
        a = active.nonzero()[:, 0]
        if not len(a):
            break
        j = grow_order[a, steps[a].clamp(max=last)]
        ok = steps[a] < n_grow[a]
        if pattern is None:
            k = cut_order[a, steps[a].clamp(max=last)]
            ok &= steps[a] < n_cut[a]
        else:
            k, k_ok = _block_choice(kept, changed, importance, a, j, pattern[1])
            ok &= k_ok
        e_after = e[a] - contrib[a, j] + contrib[a, k]
        ok &= (e[a] * sign[a] > threshold) & (e_after * sign[a] > 0) & (e_after * sign[a] < e[a] * sign[a])
        r = a[ok]
        kept[r, j[ok]], kept[r, k[ok]] = True, False
        changed[r, j[ok]], changed[r, k[ok]] = True, True
        e[r], steps[r] = e_after[ok], steps[r] + 1
        active[a[~ok]] = False
    if stats.gram is not None:
        _keep_if_worse(w, mask, kept, stats.gram)
    return kept


def _block_choice(kept: torch.Tensor, changed: torch.Tensor, importance: torch.Tensor, a: torch.Tensor,
                  j: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For rows a, the least important unchanged kept weight in the M-block of j (and whether there is one)."""
    cols = (j // m * m)[:, None] + torch.arange(m)
    rows = a[:, None]
    p = torch.where(kept[rows, cols] & ~changed[rows, cols], importance[rows, cols], torch.inf)
    kk = p.argmin(1, keepdim=True)
    return cols.gather(1, kk)[:, 0], p.gather(1, kk)[:, 0] < torch.inf


def _keep_if_worse(w: torch.Tensor, old: torch.Tensor, new: torch.Tensor, gram: torch.Tensor) -> None:
    """Reset (in place) rows of `new` whose exact calibration error exceeds that of `old`."""
    r = (old != new).any(1).nonzero()[:, 0]
    if not len(r):
        return
    d_old = w[r] * ~old[r]
    delta = w[r] * ~new[r] - d_old
    # ||X(d+D)||^2 - ||Xd||^2 = D^T G (2d + D): exact in the few changed weights, no cancellation.
    worse = ((delta @ gram) * (2 * d_old + delta)).sum(1) > 0
    new[r[worse]] = old[r[worse]]


@dataclass
class PruneSummary:
    """What prune_model did: achieved sparsity (fraction of zero weights) per linear, layer, overall."""

    method: str
    sparsity: float
    pattern: tuple[int, int] | None
    calib_tokens: int
    linears: dict[str, float] = field(default_factory=dict)  # "layers.3.mlp.down_proj" -> sparsity
    layers: list[float] = field(default_factory=list)
    overall: float = 0.0
    dsnot_swaps: int = 0  # weights revived (= weights newly pruned) by DSnoT
    seconds: float = 0.0

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def prune_model(model: LlamaModel, method: str, sparsity: float | None = None,
                pattern: tuple[int, int] | None = None, calib_ids: torch.Tensor | None = None, *,
                init: str = "wanda", cycles: int = 50, progress: bool = False,
                on_layer: Callable[[], Any] = lambda: None) -> PruneSummary:
    """Prune every projection of every decoder layer (not the embedding or LM head) in place.

    method: magnitude (no calibration needed), wanda, or dsnot (DSnoT refining the `init` mask).
    calib_ids [S, T] (see calibration_ids) drive a layerwise pass: each layer is pruned from inputs
    produced by the already-pruned layers before it. All options are checked before any work.
    """
    sparsity, pattern = check_options(method, sparsity, pattern)
    if init not in MASK_METHODS:
        raise CompressionError(f"DSnoT's initial mask must be one of {', '.join(MASK_METHODS)}, got {init!r}")
    if cycles < 0:
        raise CompressionError(f"DSnoT cycles must be >= 0, got {cycles}")
    _check_model(model, pattern)
    if method != "magnitude" and (calib_ids is None or calib_ids.dim() != 2 or calib_ids.numel() == 0):
        raise CompressionError(f"{method} needs calibration sequences [S, T] (see calibration_ids)")
    start = time.perf_counter()
    summary = PruneSummary(method, sparsity, pattern, 0 if method == "magnitude" else calib_ids.numel())
    bar = tqdm(total=len(model.layers), desc=f"pruning ({method})", unit="layer", leave=False,
               file=sys.stderr, disable=None if progress else True)

    def compress(i: int, layer: DecoderLayer, inputs: LayerInputs | None) -> None:
        summary.dsnot_swaps += _prune_layer(layer, inputs, method, sparsity, pattern, init, cycles)
        bar.update()
        on_layer()

    with bar:
        if method == "magnitude":
            with torch.inference_mode():
                for i, layer in enumerate(model.layers):
                    compress(i, layer, None)
        else:
            layerwise(model, calib_ids, compress)  # type: ignore[arg-type]
    _fill_sparsity(model, summary)
    summary.seconds = time.perf_counter() - start
    return summary


def _check_model(model: LlamaModel, pattern: tuple[int, int] | None) -> None:
    for i, layer in enumerate(model.layers):
        for name in LINEARS:
            lin = layer.get_submodule(name)
            if not isinstance(lin, Linear):
                raise CompressionError(f"layers.{i}.{name} is a {type(lin).__name__}, not a float Linear: "
                                       f"prune before quantizing")
            if pattern is not None and lin.weight.shape[1] % pattern[1]:
                raise CompressionError(f"{pattern[0]}:{pattern[1]} sparsity needs input sizes divisible by "
                                       f"{pattern[1]}; layers.{i}.{name} has {lin.weight.shape[1]}")


def _prune_layer(layer: DecoderLayer, inputs: LayerInputs | None, method: str, sparsity: float,
                 pattern: tuple[int, int] | None, init: str, cycles: int) -> int:
    """Prune one decoder layer's projections in place; returns the number of DSnoT swaps."""
    swaps = 0
    for name in LINEARS:
        w = layer.get_submodule(name).weight.data
        if inputs is None:
            mask = prune_weight(w, "magnitude", sparsity, pattern)
        else:
            stats = inputs.stats(name, gram=method == "dsnot")
            mask = prune_weight(w, init if method == "dsnot" else method, sparsity, pattern, stats.sq_norm.sqrt())
            if method == "dsnot":
                refined = dsnot(w, mask, stats, pattern, cycles)
                swaps += int((refined != mask).sum()) // 2
                mask = refined
        w.mul_(mask)  # in place: the parameter stays an ordinary (non-inference) tensor
    return swaps


def _fill_sparsity(model: LlamaModel, summary: PruneSummary) -> None:
    zeros = total = 0
    for i, layer in enumerate(model.layers):
        lz = lt = 0
        for name in LINEARS:
            w = layer.get_submodule(name).weight
            z = int((w == 0).sum())
            summary.linears[f"layers.{i}.{name}"] = z / w.numel()
            lz, lt = lz + z, lt + w.numel()
        summary.layers.append(lz / lt)
        zeros, total = zeros + lz, total + lt
    summary.overall = zeros / max(total, 1)
