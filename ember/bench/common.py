"""Shared benchmark pieces: percentiles, machine facts, prompt synthesis, table/JSON output."""
from __future__ import annotations

import json
import os
import platform
import random
from pathlib import Path
from typing import Any, Iterable, Iterator

from ember.errors import InvalidParameterError

WORDS = ("time river light garden window morning letter answer question country village evening "
         "history family season mountain silence journey promise kingdom harbour candle").split()


def percentiles(values: list[float], prefix: str, unit_scale: float = 1000.0) -> dict[str, float]:
    """mean/p50/p95/p99 of `values` (seconds), reported in ms by default."""
    if not values:
        return {f"{prefix}_{k}": float("nan") for k in ("mean", "p50", "p95", "p99")}
    s = sorted(values)

    def pct(p: float) -> float:
        k = (len(s) - 1) * p
        lo, hi = int(k), min(int(k) + 1, len(s) - 1)
        return s[lo] + (s[hi] - s[lo]) * (k - lo)

    return {f"{prefix}_mean": sum(s) / len(s) * unit_scale, f"{prefix}_p50": pct(0.5) * unit_scale,
            f"{prefix}_p95": pct(0.95) * unit_scale, f"{prefix}_p99": pct(0.99) * unit_scale}


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    import torch

    return {"nproc": os.cpu_count(), "cpu": cpu, "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__}


def synthetic_prompt(rng: random.Random, approx_tokens: int) -> str:
    """Plain English-like text of about `approx_tokens` tokens (one common word is about one token)."""
    return " ".join(rng.choice(WORDS) for _ in range(max(1, approx_tokens)))


def sample_lengths(rng: random.Random, n: int, mean: int, range_ratio: float) -> list[int]:
    """Lengths uniform in [mean*(1-r), mean*(1+r)] (all equal to `mean` when r = 0)."""
    lo, hi = max(1, int(mean * (1 - range_ratio))), max(1, int(mean * (1 + range_ratio)))
    return [rng.randint(lo, hi) for _ in range(n)]


def emit(result: dict[str, Any], as_json: bool, title: str) -> None:
    if as_json:
        print(json.dumps(result, indent=1))
        return
    print(f"== {title} ==")
    width = max(len(k) for k in result)
    for key, value in result.items():
        if isinstance(value, float):
            value = f"{value:,.2f}"
        elif isinstance(value, dict):
            value = json.dumps(value)
        print(f"{key:<{width}}  {value}")


def parse_names(text: str, known: Iterable[str], what: str, param: str) -> list[str]:
    """A comma-separated option (--methods, --conditions): names from `known`, each once, in the order given."""
    known = list(known)
    out: list[str] = []
    for name in (n.strip() for n in text.split(",")):
        if name not in known:
            raise InvalidParameterError(f"unknown {what} {name!r}: choose from {', '.join(known)}", param)
        if name not in out:
            out.append(name)
    return out


def read_lines(path: str | Path, what: str, param: str) -> list[str]:
    """A UTF-8 text file's lines; a one-line error naming `what` when it is missing or not UTF-8."""
    p = Path(path)
    if not p.is_file():
        raise InvalidParameterError(f"{what} {str(path)!r} not found", param)
    try:
        return p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise InvalidParameterError(f"{what} {path} is not UTF-8 text ({e})", param) from None


def json_lines(lines: list[str], source: str | Path, param: str, hint: str = "") -> Iterator[tuple[int, Any]]:
    """(line number, value) of each non-blank line parsed as JSON; an error naming the line (plus `hint`, what
    a line should hold) at the first that is not."""
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise InvalidParameterError(f"{source}:{n}: not JSON ({e.msg}){hint}", param) from None
