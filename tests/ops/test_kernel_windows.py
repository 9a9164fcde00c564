"""The attention kernels' per-row key window (starts, sink): row b sees keys t < sink and starts[b] <= t <
lens[b] of its context, the hidden ones with exactly zero weight. Each kernel path against a dense PyTorch
softmax(q k^T * scale) with that mask: flash-decoding pieces (one long context), whole cache rows, per-head
rows, runs of consecutive rows of one sequence, the KIVI cache; and no window (starts=None) is the old call,
bit for bit."""
from __future__ import annotations

import shutil
from contextlib import contextmanager
from typing import Iterator

import pytest
import torch

from ember.ops.kernels import AVX2_CAPABILITIES, cpu_kernels
from ember.ops.quant import QuantLinear

pytestmark = pytest.mark.skipif(
    torch.backends.cpu.get_cpu_capability() not in AVX2_CAPABILITIES or shutil.which("c++") is None,
    reason="needs AVX2 and a C++ compiler")

BS, KVH, HEADS, SCALE = 16, 3, 9, 0.125


@pytest.fixture(scope="module")
def k():
    kern = cpu_kernels()
    assert kern is not None, "the kernels failed to build on an AVX2 machine with a compiler"
    return kern


@contextmanager
def threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def visible(lens: torch.Tensor, starts: torch.Tensor | None, sink: int) -> torch.Tensor:
    """[B, max len] bool: the keys each row sees."""
    t = torch.arange(int(lens.max()))[None, :]
    mask = t < lens[:, None]
    if starts is not None:
        mask &= (t < sink) | (t >= starts[:, None])
    return mask


def dense_attention(q: torch.Tensor, keys: list[torch.Tensor], vals: list[torch.Tensor], mask: torch.Tensor
                    ) -> torch.Tensor:
    """softmax(q k^T * SCALE) v per row over its keys [len, KVH, D] with mask [B, >= len]; query head j reads KV
    head j // (H / KVH). Hidden keys may hold anything (NaN included): they are zeroed before use."""
    out = []
    for b, (kb, vb) in enumerate(zip(keys, vals)):
        m = mask[b, : len(kb)]
        kb = torch.where(m[:, None, None], kb.double(), 0.0)
        vb = torch.where(m[:, None, None], vb.double(), 0.0)
        group = q.shape[1] // kb.shape[1]
        kh, vh = kb.repeat_interleave(group, dim=1), vb.repeat_interleave(group, dim=1)  # [len, H, D]
        s = torch.einsum("hd,thd->ht", q[b].double(), kh) * SCALE
        p = s.masked_fill(~m[None, :], float("-inf")).softmax(-1)
        out.append(torch.einsum("ht,thd->hd", p, vh))
    return torch.stack(out).float()


def paged_rows(cache: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor) -> tuple[list, list]:
    """Each row's keys and values [len, KVH, D] (float32) from a paged cache [2, blocks, BS, KVH, D]."""
    d = cache.shape[-1]
    keys = [cache[0][tables[b]].reshape(-1, KVH, d)[: int(lens[b])].float() for b in range(len(lens))]
    vals = [cache[1][tables[b]].reshape(-1, KVH, d)[: int(lens[b])].float() for b in range(len(lens))]
    return keys, vals


def windows(length: int) -> list[tuple[int, int]]:
    """(sink, start) pairs for a context of `length`: starts inside the first block, at block boundaries, in
    the middle, near the end and at the row's own key; sinks 0 to 5 (a start <= sink hides nothing)."""
    starts = [0, 1, 3, 7, BS, 2 * BS, 2 * BS + 5, length // 2, length // 2 + 1, length - BS, length - 20,
              length - 2, length - 1]
    starts = sorted({s for s in starts if 0 <= s <= length - 1})
    return [(sink, s) for s in starts for sink in (0, 1, 5)] + [(2, length - 1), (3, BS), (4, 9)]


def check_paged(k, cache: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor, starts: torch.Tensor | None,
                sink: int, q: torch.Tensor, poison: torch.Tensor | None = None) -> None:
    """The kernel with this window equals the dense reference. poison: [B, max len] bool, keys the kernel
    must not read (set to NaN in a copy of the cache: a hidden key skipped, not multiplied by zero)."""
    keys, vals = paged_rows(cache, tables, lens)
    mask = visible(lens, starts, sink)
    if poison is not None:
        cache = cache.clone()
        d = cache.shape[-1]
        for b in range(len(lens)):
            t = poison[b, : int(lens[b])].nonzero().flatten()
            blk, off = tables[b][t // BS], t % BS
            cache[:, blk, off] = float("nan")
            assert not (cache[:, tables[b]].reshape(2, -1, KVH, d)[:, : int(lens[b])][:, mask[b, : int(lens[b])]]
                        .isnan().any()), "the test poisons only hidden keys"
    out = k.paged_decode_attention(q, cache[0], cache[1], tables, lens, SCALE, starts, sink)
    ref = dense_attention(q, keys, vals, mask)
    tol = 2e-5 if cache.dtype == torch.float32 else 1e-4
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol, msg=lambda m: f"sink {sink}, starts {starts}: {m}")


def random_cache(nb: int, hd: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(2, nb, BS, KVH, hd).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hd", [64, 32])
@pytest.mark.parametrize("nthreads", [2, 1])
def test_one_long_context(k, dtype: torch.dtype, hd: int, nthreads: int) -> None:
    """One row of 1500 keys: at two threads its context is cut into pieces attended in parallel and merged
    (over whole cache rows at head size 64, one KV head per piece at 32), the pieces equal shares of the
    visible keys, so a piece may span the hidden range; at one thread, one (row, head) item each (values in
    registers at head size 64). Hidden keys are NaN in the cache: they are never read."""
    torch.manual_seed(0)
    nb, length = 120, 1500
    cache = random_cache(nb, hd, dtype)
    tables = torch.randperm(nb)[None, : (length + BS - 1) // BS]
    lens = torch.tensor([length])
    q = torch.randn(1, HEADS, hd)
    with threads(nthreads):
        for sink, start in windows(length):
            starts = torch.tensor([start])
            poison = ~visible(lens, starts, sink)
            check_paged(k, cache, tables, lens, starts, sink, q, poison)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hd", [64, 32])
@pytest.mark.parametrize("b", [16, 3])
def test_many_rows(k, dtype: torch.dtype, hd: int, b: int) -> None:
    """16 decodes of different lengths (whole cache rows shared out by work at head size 64, (row, KV head)
    items at 32) and 3 (pieces per context, or per-head items for the short ones), each row its own window:
    starts in the first block, on block boundaries, at the last key, hiding nothing. Hidden keys are NaN."""
    torch.manual_seed(1)
    nb = 40 * b
    cache = random_cache(nb, hd, dtype)
    tables = torch.randperm(nb)[: b * 40].reshape(b, 40)  # every row its own blocks
    for trial in range(12):
        lens = torch.randint(1, 40 * BS + 1, (b,))
        lens[0] = 40 * BS if trial % 2 else 300
        if b > 3:
            lens[1], lens[2] = 1, 17
        choices = [lambda n: 0, lambda n: n - 1, lambda n: min(n - 1, BS), lambda n: min(n - 1, 5),
                   lambda n: min(n - 1, 2 * BS), lambda n: (n - 1) // 2, lambda n: int(torch.randint(0, n, ()))]
        starts = torch.tensor([choices[(i + trial) % len(choices)](int(n)) for i, n in enumerate(lens)])
        sink = trial % 6
        q = torch.randn(b, HEADS, hd)
        with threads(2):
            check_paged(k, cache, tables, lens, starts, sink, q, ~visible(lens, starts, sink))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hd", [64, 32])
@pytest.mark.parametrize("many", [False, True])
def test_consecutive_rows_of_one_sequence(k, dtype: torch.dtype, hd: int, many: bool) -> None:
    """Rows of one sequence with contexts L, L + 1, ... and one table (a chunk run as one-query rows) are
    attended as runs of up to 8 rows; each row has its own window start. Keys every row of a run hides are
    NaN (never read); the rest of the hidden ones are masked per query lane."""
    torch.manual_seed(2)
    nb, L, n = 64, 127, 19
    cache = random_cache(nb, hd, dtype)
    chunk_table = torch.tensor([7, 3, 12, 9, 20, 21, 30, 31, 40, 41, 0, 0])
    other = torch.tensor([1, 2, 5, 6, 8, 10, 11, 13, 14, 15, 16, 17])
    cases = [  # (sink, starts of the chunk rows as a function of their context length)
        (0, lambda c, i: max(0, c - 64)),  # a sliding window: every row's start differs
        (4, lambda c, i: max(0, c - 64)),
        (1, lambda c, i: 40),  # the same start for every row
        (2, lambda c, i: c - 1),  # each row sees its sinks and itself
        (5, lambda c, i: [3, BS, 2 * BS, 50, 0, c - 1, 100][i % 7]),  # some rows hide nothing
        (0, lambda c, i: BS * (i % 4)),
        (3, lambda c, i: 0),  # nothing hidden
    ]
    for sink, start in cases:
        rows = [(other, 20, 5)]  # a decode, with its own window
        rows += [(chunk_table, L + 1 + i, start(L + 1 + i, i)) for i in range(n)]
        rows += [(other, 150, 60)]
        if many:
            rows += [((torch.arange(12) + 43 + i) % nb, 30 + 7 * i, (11 * i) % (30 + 7 * i)) for i in range(8)]
        tables = torch.stack([t for t, _, _ in rows])
        lens = torch.tensor([c for _, c, _ in rows])
        starts = torch.tensor([s for _, _, s in rows])
        seen = visible(lens, starts, sink)
        # Keys hidden from every row that shares them (the chunk rows, and the decodes on `other`).
        chunk = torch.arange(1, 1 + n)
        poison = torch.zeros_like(seen)
        poison[chunk] = ~seen[chunk].any(0) & (torch.arange(seen.shape[1]) < L + 1)
        q = torch.randn(len(rows), HEADS, hd)
        with threads(2):
            check_paged(k, cache, tables, lens, starts, sink, q, poison)


def test_no_window_is_bit_identical(k) -> None:
    """starts=None (positional or by name) is the call without a window, bit for bit; so is a window that
    hides nothing (every start <= sink)."""
    torch.manual_seed(3)
    for hd, b, length in ((64, 1, 1500), (32, 1, 1500), (64, 16, 300), (32, 16, 300), (64, 4, 90)):
        nb = b * 100
        cache = random_cache(nb, hd, torch.float32)
        tables = torch.randperm(nb)[: b * 100].reshape(b, 100)
        lens = torch.tensor([length - 7 * i for i in range(b)])
        q = torch.randn(b, HEADS, hd)
        with threads(2):
            plain = k.paged_decode_attention(q, cache[0], cache[1], tables, lens, SCALE)
            for out in (k.paged_decode_attention(q, cache[0], cache[1], tables, lens, SCALE, None),
                        k.paged_decode_attention(q, cache[0], cache[1], tables, lens, SCALE, None, 3),
                        k.paged_decode_attention(q, cache[0], cache[1], tables, lens, SCALE, starts=None, sink=0),
                        k.paged_decode_attention(q, cache[0], cache[1], tables, lens, SCALE,
                                                 torch.full((b,), 2), 2)):
                assert torch.equal(out, plain)
    # A chunk's rows (runs).
    cache = random_cache(64, 64, torch.float16)
    tables = torch.tensor([[7, 3, 12, 9, 20, 21, 30, 31, 40, 41]] * 12)
    lens = torch.arange(100, 112)
    q = torch.randn(12, HEADS, 64)
    plain = k.paged_decode_attention(q, cache[0], cache[1], tables, lens, SCALE)
    assert torch.equal(k.paged_decode_attention(q, cache[0], cache[1], tables, lens, SCALE, None, 0), plain)
    assert torch.equal(k.paged_decode_attention(q, cache[0], cache[1], tables, lens, SCALE, torch.zeros(12).long(),
                                                0), plain)


def test_bad_windows_are_refused(k) -> None:
    cache = random_cache(8, 64, torch.float32)
    tables, lens, q = torch.tensor([[0, 1]]), torch.tensor([20]), torch.randn(1, HEADS, 64)
    for starts, sink in ((torch.tensor([20]), 0), (torch.tensor([-1]), 0), (torch.tensor([3, 4]), 0),
                         (torch.tensor([3], dtype=torch.int32), 0), (torch.tensor([3]), -1)):
        with pytest.raises(RuntimeError):
            k.paged_decode_attention(q, cache[0], cache[1], tables, lens, SCALE, starts, sink)


# --- KIVI -----------------------------------------------------------------------------------------------

def kivi_cache(nb: int, hd: int, bits: int, num_residual: int, kvh: int = KVH):
    from ember.ops.kv_quant import BlockFill, QuantKVCache

    cache = QuantKVCache(nb, BS, kvh, hd, bits, num_residual=nb)
    cache.residual = torch.randn(2, nb, BS, kvh, hd) * 3  # stage every block's tokens, quantize them all
    cache.quantize_filled(None, None, BlockFill.from_residual(list(range(nb)), list(range(nb)), BS))
    cache.residual = torch.randn(2, num_residual, BS, kvh, hd)
    return cache


def kivi_rows(cache, full: torch.Tensor, lens: torch.Tensor, slots: torch.Tensor) -> tuple[list, list]:
    """Each row's dequantized keys and values [len, KVH, D]: its full blocks, then its residual block."""
    keys, vals = [], []
    for b in range(len(lens)):
        n = int(lens[b]) - 1
        nfull, rest = n // BS, n % BS + 1
        blocks = full[b, :nfull]
        keys.append(torch.cat([cache.keys(blocks).reshape(-1, KVH, cache.head_dim),
                               cache.residual[0, int(slots[b]), :rest]]))
        vals.append(torch.cat([cache.values(blocks).reshape(-1, KVH, cache.head_dim),
                               cache.residual[1, int(slots[b]), :rest]]))
    return keys, vals


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("hd", [64, 32])
def test_kivi_windows(k, bits: int, hd: int) -> None:
    """KIVI decode attention with windows: key t is token t over the full (quantized) blocks, then the
    residual block; hidden keys get zero weight, and blocks hidden whole are not dequantized (their scales
    are NaN here)."""
    torch.manual_seed(4)
    nb, b = 120, 5
    cache = kivi_cache(nb, hd, bits, num_residual=b)
    full = torch.randperm(nb)[: b * 24].reshape(b, 24)  # every row its own blocks
    lens = torch.tensor([24 * BS, 300, 33, 17, 1])  # residual tokens (this one included): 16, 12, 1, 1, 1
    slots = torch.tensor([2, 0, 4, 1, 3])
    q = torch.randn(b, HEADS, hd)
    keys, vals = kivi_rows(cache, full, lens, slots)
    plain = k.kivi_decode_attention(q, cache.tensors(), full, lens, slots, bits, SCALE)
    torch.testing.assert_close(plain, dense_attention(q, keys, vals, visible(lens, None, 0)), rtol=2e-5, atol=2e-5)
    assert torch.equal(k.kivi_decode_attention(q, cache.tensors(), full, lens, slots, bits, SCALE, None, 0), plain)
    assert torch.equal(k.kivi_decode_attention(q, cache.tensors(), full, lens, slots, bits, SCALE, starts=None),
                       plain)
    for trial, (sink, start) in enumerate(windows(24 * BS)):
        starts = torch.tensor([start] + [min(int(n) - 1, [start, 0, BS, 7, 2 * BS][(i + trial) % 5])
                                         for i, n in enumerate(lens[1:].tolist())])
        mask = visible(lens, starts, sink)
        k_scale, v_scale = cache.k_scale.clone(), cache.v_scale.clone()
        for r in range(b):  # full blocks the row's window hides whole
            for j in range((int(lens[r]) - 1) // BS):
                if not mask[r, j * BS:(j + 1) * BS].any():
                    cache.k_scale[full[r, j]] = float("nan")
                    cache.v_scale[full[r, j]] = float("nan")
        try:
            out = k.kivi_decode_attention(q, cache.tensors(), full, lens, slots, bits, SCALE, starts, sink)
        finally:
            cache.k_scale.copy_(k_scale)
            cache.v_scale.copy_(v_scale)
        torch.testing.assert_close(out, dense_attention(q, keys, vals, mask), rtol=2e-5, atol=2e-5,
                                   msg=lambda m: f"sink {sink}, starts {starts}: {m}")


# --- DecodeModel ----------------------------------------------------------------------------------------

def test_decode_model_takes_an_optional_window(k) -> None:
    """DecodeModel.forward and forward_kivi take (starts=None, sink=0) last: None is the call without them,
    bit for bit; a window that hides keys changes the result."""
    torch.manual_seed(5)
    H, kvh, D, hidden, inter, layers = 4, 2, 16, 64, 96, 2
    model = k.DecodeModel(H, kvh, D, 1e-5, torch.rand(hidden) + 0.5)
    none = torch.empty(0)

    def linear(n: int, m: int):
        return k.DecodeLinear(32, torch.randn(n, m) / m ** 0.5, none, none, none)

    for _ in range(layers):
        model.add_layer(torch.rand(hidden) + 0.5, torch.rand(hidden) + 0.5, linear((H + 2 * kvh) * D, hidden),
                        linear(hidden, H * D), linear(2 * inter, hidden), linear(hidden, inter))
    b, nb = 3, 30
    x = torch.randn(b, hidden)
    ang = torch.randn(b, D // 2)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    tables = torch.randperm(nb)[: b * 8].reshape(b, 8)
    lens = torch.tensor([100, 40, 7])
    slots = torch.stack([tables[i, (int(n) - 1) // BS] * BS + (int(n) - 1) % BS for i, n in enumerate(lens)])
    caches = [torch.randn(2, nb, BS, kvh, D) for _ in range(layers)]
    args = (x, cos, sin, caches, slots, tables, lens, SCALE)
    plain = model.forward(*args)
    assert torch.equal(model.forward(*args, None), plain)
    assert torch.equal(model.forward(*args, starts=None, sink=0), plain)
    windowed = model.forward(*args, torch.tensor([50, 3, 0]), 2)
    assert not torch.allclose(windowed, plain)
    assert torch.equal(model.forward(*args, torch.tensor([1, 1, 0]), 1), plain)  # hides nothing

    bits = 4
    kcaches = [kivi_cache(nb, D, bits, num_residual=b, kvh=kvh) for _ in range(layers)]
    full = tables
    res_slots = torch.tensor([0, 1, 2])
    res_index = torch.stack([res_slots[i] * BS + (int(n) - 1) % BS for i, n in enumerate(lens)])
    kargs = (x, cos, sin, [c.tensors() for c in kcaches], res_index, full, lens, res_slots, bits, SCALE)
    plain = model.forward_kivi(*kargs)
    assert torch.equal(model.forward_kivi(*kargs, None, 0), plain)
    assert torch.equal(model.forward_kivi(*kargs, starts=None), plain)
    assert not torch.allclose(model.forward_kivi(*kargs, torch.tensor([50, 3, 0]), 2), plain)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("first", [200, 62, 20])  # pieces for every row; across the split threshold; none
@pytest.mark.parametrize("window", [False, True])
def test_decode_model_alone_rows_are_their_one_row_calls(k, dtype: torch.dtype, first: int, window: bool) -> None:
    """alone=True (one sequence checking speculative candidates): each of its rows gives the bits of its own
    one-row forward, however the call shares the work out (one parallel region for rows whose one-row calls
    would split their contexts alike, row by row otherwise)."""
    torch.manual_seed(first)
    H, kvh, D, hidden, inter, layers, rows, nb = HEADS, KVH, 64, 96, 128, 2, 6, 40
    model = k.DecodeModel(H, kvh, D, 1e-5, torch.rand(hidden) + 0.5)
    none = torch.empty(0)

    def linear(n: int, m: int):  # int8: its rows do not round with their company (float GEMMs do)
        q = QuantLinear.from_float(torch.randn(n, m) / m ** 0.5, bits=8, group=32)
        return k.DecodeLinear(8, q.qweight, q.scales, none, none)

    for _ in range(layers):
        model.add_layer(torch.rand(hidden) + 0.5, torch.rand(hidden) + 0.5, linear((H + 2 * kvh) * D, hidden),
                        linear(hidden, H * D), linear(2 * inter, hidden), linear(hidden, inter))
    x = torch.randn(rows, hidden)
    ang = torch.randn(rows, D // 2)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    table = torch.randperm(nb)[:16]
    lens = torch.arange(first, first + rows)
    slots = torch.stack([table[(n - 1) // BS] * BS + (n - 1) % BS for n in lens.tolist()])
    caches = [torch.randn(2, nb, BS, kvh, D).to(dtype) for _ in range(layers)]
    starts = (lens - 40).clamp(min=1) if window else None

    def forward(i: slice, alone: bool, caches: list[torch.Tensor]) -> torch.Tensor:
        return model.forward(x[i], cos[i], sin[i], caches, slots[i],
                             table.expand(i.stop - i.start, -1), lens[i], SCALE,
                             None if starts is None else starts[i], 4 if window else 0, alone, None)

    with threads(2):  # one step per row, each writing its K/V for the next, as decoding does
        stepped = [c.clone() for c in caches]
        one_by_one = torch.cat([forward(slice(r, r + 1), False, stepped) for r in range(rows)])
        together = forward(slice(0, rows), True, [c.clone() for c in caches])
    assert torch.equal(together, one_by_one)
