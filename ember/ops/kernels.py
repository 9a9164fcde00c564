"""Builds (once per source, compiler and torch version, cached under $EMBER_HOME/kernels) and loads ember's
C++ CPU kernels; None where they cannot run."""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import subprocess
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import torch

log = logging.getLogger("ember")
AVX2_CAPABILITIES = ("AVX2", "AVX512", "AVX512_VNNI", "AVX512_BF16")
SOURCES = sorted((Path(__file__).parent / "csrc").glob("*.cpp"))  # one extension, one file per concern
HEADERS = sorted((Path(__file__).parent / "csrc").glob("*.h"))
CFLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp")
# The integer dots' one-instruction multiply-add (vpdpbusd on 256-bit vectors), where the CPU has it; other code
# keeps to 256-bit vectors as without it. Same results either way (quant_gemm.cpp).
VNNI_CFLAGS = ("-mavx512vl", "-mavx512vnni", "-mprefer-vector-width=256")
LDFLAGS = ("-fopenmp",)
_LOADED: dict[str, Any] = {}  # extension name -> module, for the life of the process


def compiler_version() -> str:
    """The first line of the C++ compiler's --version (the one torch builds with), or '' when there is none."""
    cxx = os.environ.get("CXX", "c++")
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.splitlines()[0] if out.returncode == 0 and out.stdout else ""


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux names them (empty where /proc/cpuinfo is not there)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return next((set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")), set())


def cflags() -> tuple[str, ...]:
    """The compiler flags for this CPU (EMBER_NO_VNNI=1: as for a CPU without VNNI, for A/B runs)."""
    vnni = {"avx512_vnni", "avx512vl"} <= cpu_flags() and os.environ.get("EMBER_NO_VNNI") != "1"
    return CFLAGS + (VNNI_CFLAGS if vnni else ())


def build_key(compiler: str) -> str:
    """What a build depends on: the source, the compiler, torch, Python and the flags (which follow the CPU)."""
    h = hashlib.sha256()
    for path in SOURCES + HEADERS:
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    for part in (compiler, torch.__version__, platform.python_version(), " ".join(cflags() + LDFLAGS)):
        h.update(b"\0" + part.encode())
    return h.hexdigest()[:16]


def build_dir(key: str) -> Path:
    from ember.loading.registry import ember_home

    return ember_home() / "kernels" / key


@contextmanager
def _announce(folder: Path) -> Iterator[None]:
    """Say that a build runs (it takes a minute or two): a live elapsed-time line on a terminal, else one line."""
    msg = f"ember: compiling the CPU kernels once for this ember, compiler and torch (cached in {folder})"
    done = threading.Event()
    if sys.stderr.isatty():
        def tick() -> None:
            start = time.monotonic()
            while not done.wait(0.5):
                print(f"\r{msg} ... {time.monotonic() - start:.0f} s", end="", file=sys.stderr, flush=True)
        t = threading.Thread(target=tick, daemon=True)
        t.start()
    else:
        print(f"{msg} ...", file=sys.stderr, flush=True)
    start = time.monotonic()
    try:
        yield
    finally:
        done.set()
        end = "\r" if sys.stderr.isatty() else ""
        print(f"{end}{msg}: {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)


@contextmanager
def _build_lock(folder: Path) -> Iterator[None]:
    """One process at a time builds or loads the extension in `folder`. torch's own lock is a file whose mere
    presence makes every later load wait forever, and a build that was killed (Ctrl-C, OOM) leaves it behind;
    an flock is released by the OS when its holder dies, so under it a leftover torch lock is stale."""
    import fcntl

    with open(folder / "ember.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        (folder / "lock").unlink(missing_ok=True)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@lru_cache(maxsize=1)
def cpu_kernels() -> Any | None:
    """The compiled extension, or None (no AVX2, no compiler, or EMBER_NO_KERNELS=1): callers then
    use their PyTorch twins, which compute the same results, more slowly."""
    if os.environ.get("EMBER_NO_KERNELS") == "1":
        return None
    if torch.backends.cpu.get_cpu_capability() not in AVX2_CAPABILITIES:
        log.info("no AVX2 on this CPU: using the PyTorch fallbacks")
        return None
    compiler = compiler_version()
    if not compiler:
        log.warning("no C++ compiler found (%s): ember's CPU kernels cannot be built, so it runs its slower PyTorch "
                    "fallbacks; install one (e.g. apt install g++) for the fast path", os.environ.get("CXX", "c++"))
        return None
    key = build_key(compiler)
    folder, name = build_dir(key), f"ember_cpu_kernels_{key}"
    if name in _LOADED:  # loaded before a cache_clear(): a second load would register its types twice
        return _LOADED[name]
    try:
        from torch.utils.cpp_extension import load

        folder.mkdir(parents=True, exist_ok=True)
        with _build_lock(folder):
            built = (folder / f"{name}.so").is_file()
            with _announce(folder) if not built else nullcontext():
                _LOADED[name] = load(name=name, sources=[str(p) for p in SOURCES], build_directory=str(folder),
                                     extra_include_paths=[str(SOURCES[0].parent)], extra_cflags=list(cflags()),
                                     extra_ldflags=list(LDFLAGS), verbose=False)
                return _LOADED[name]
    except Exception as e:  # a failed build must not stop the engine
        log.warning("could not build ember's CPU kernels (%s); using the slower PyTorch fallbacks", e)
        return None
