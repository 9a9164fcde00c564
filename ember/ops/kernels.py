"""Builds (once, cached by torch) and loads ember's C++ CPU kernels; None where they cannot run."""
from __future__ import annotations

import logging
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("ember")
AVX2_CAPABILITIES = ("AVX2", "AVX512", "AVX512_VNNI", "AVX512_BF16")


@lru_cache(maxsize=1)
def cpu_kernels() -> Any | None:
    """The compiled extension, or None (no AVX2, no compiler, or EMBER_NO_KERNELS=1): callers then
    use their PyTorch twins, which compute the same results."""
    if os.environ.get("EMBER_NO_KERNELS") == "1":
        return None
    if torch.backends.cpu.get_cpu_capability() not in AVX2_CAPABILITIES:
        log.info("no AVX2 on this CPU: using the PyTorch fallbacks")
        return None
    try:
        from torch.utils.cpp_extension import load

        src = Path(__file__).with_name("cpu_kernels.cpp")
        log.debug("loading ember's CPU kernels (compiled on first use, then cached)")
        return load(name="ember_cpu_kernels", sources=[str(src)], verbose=False,
                    extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"], extra_ldflags=["-fopenmp"])
    except Exception as e:  # a missing compiler must not stop the engine
        log.warning("could not build ember's CPU kernels (%s); using the PyTorch fallbacks", e)
        return None
