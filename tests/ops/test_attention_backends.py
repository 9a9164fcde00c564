"""A mask variant through the attention backend seam: a sink + window mask (KeyWindow), run through each
backend (float paged and KIVI, C++ kernels and PyTorch twins, prompt chunks and decode rows), equals a dense
masked reference."""
from __future__ import annotations

import pytest
import torch

from ember.ops import paged_float, paged_kivi
from ember.ops.attention import KeyWindow, RowSpan
from ember.ops.kernels import cpu_kernels

H, KVH, D, BS, SCALE = 4, 2, 16, 4, 0.25
WINDOWS = [KeyWindow(1, 5), KeyWindow(4, 8), KeyWindow(0, 3), KeyWindow(2, 1000)]


def dense(q: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T * scale) v with a boolean mask, one query per row: q [n, H, D], keys [n, ctx, KVH, D]."""
    kk = keys.repeat_interleave(H // KVH, dim=2)
    vv = vals.repeat_interleave(H // KVH, dim=2)
    s = torch.einsum("nhd,nthd->nht", q, kk) * SCALE
    s = s.masked_fill(~mask[:, None, :], float("-inf"))
    return torch.einsum("nht,nthd->nhd", s.softmax(-1), vv)


def _paths(monkeypatch: pytest.MonkeyPatch, kernels: bool) -> None:
    if kernels and cpu_kernels() is None:
        pytest.skip("the C++ kernels are not available here")
    if not kernels:
        monkeypatch.setattr(paged_float, "cpu_kernels", lambda: None)
        monkeypatch.setattr(paged_kivi, "cpu_kernels", lambda: None)


class Seq:
    """One sequence's true keys and values, and its blocks."""

    def __init__(self, first_block: int) -> None:
        self.k, self.v = torch.empty(0, KVH, D), torch.empty(0, KVH, D)
        self.table = list(range(first_block, first_block + 16))

    def add(self, n: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        k, v = torch.randn(n, KVH, D), torch.randn(n, KVH, D)
        start = len(self.k)
        self.k, self.v = torch.cat([self.k, k]), torch.cat([self.v, v])
        return k, v, start


def _step(backend, seqs: list[Seq], counts: list[int], window: KeyWindow, keys_of, tol: float = 1e-4) -> None:
    """One step: `counts[i]` new tokens of seqs[i]; compares the backend's output with the dense reference
    whose keys for sequence s, query position p are keys_of(s, p) -> (keys [p + 1, KVH, D], values)."""
    ks, vs, spans = [], [], []
    for s, n in zip(seqs, counts):
        k, v, start = s.add(n)
        spans.append(RowSpan(s.table, start, n, sum(len(x) for x in ks)))
        ks.append(k)
        vs.append(v)
    q = torch.randn(sum(counts), H, D)
    plan = backend.plan(spans, window)
    out = backend.forward(0, q, torch.cat(ks), torch.cat(vs), plan, SCALE)
    for s, sp in zip(seqs, spans):
        for i in range(sp.n):
            p = sp.start + i
            keys, vals = keys_of(s, p, sp.start)
            mask = window.mask(torch.tensor([p]), p + 1)
            ref = dense(q[sp.row0 + i][None], keys[None], vals[None], mask)
            torch.testing.assert_close(out[sp.row0 + i][None], ref, rtol=0, atol=tol)


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("kernels", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_float_backend_honours_a_window(monkeypatch, window: KeyWindow, kernels: bool, dtype: torch.dtype) -> None:
    _paths(monkeypatch, kernels)
    torch.manual_seed(0)
    backend = paged_float.FloatPagedBackend(1, 64, BS, KVH, D, dtype)
    a, b = Seq(0), Seq(32)

    def keys_of(s: Seq, p: int, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        return s.k[: p + 1].to(dtype).float(), s.v[: p + 1].to(dtype).float()

    # (A first chunk through SDPA attends its own keys before they are rounded to float16.)
    tol = 1e-4 if dtype == torch.float32 else 3e-3
    _step(backend, [a], [40], window, keys_of, tol)  # a prompt chunk (rows, or SDPA beyond 32 without kernels)
    _step(backend, [b, a], [7, 1], window, keys_of, tol)  # a chunk beside a decode
    for _ in range(6):
        _step(backend, [a, b], [1, 1], window, keys_of, tol)


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("kernels", [True, False])
@pytest.mark.parametrize("bits", [8, 4])
def test_kivi_backend_honours_a_window(monkeypatch, window: KeyWindow, kernels: bool, bits: int) -> None:
    _paths(monkeypatch, kernels)
    torch.manual_seed(0)
    backend = paged_kivi.KiviBackend(1, 64, BS, KVH, D, bits, num_residual=4)
    cache = backend.caches[0]
    a, b = Seq(0), Seq(32)

    def keys_of(s: Seq, p: int, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """What KIVI reads: blocks full before this step dequantized, the rest (residual, new) in float."""
        full = start // BS
        blocks = torch.tensor(s.table[:full], dtype=torch.long)
        keys = torch.cat([cache.keys(blocks).flatten(0, 1), s.k[full * BS: p + 1]])
        vals = torch.cat([cache.values(blocks).flatten(0, 1), s.v[full * BS: p + 1]])
        return keys, vals

    _step(backend, [a], [18], window, keys_of)  # prefill: float within the chunk
    _step(backend, [b, a], [6, 1], window, keys_of)
    for _ in range(7):  # decode rows, crossing block boundaries
        _step(backend, [a, b], [1, 1], window, keys_of)
