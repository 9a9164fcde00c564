"""Coverage-guided, structure-aware fuzzing of model loading. The property: for any mutated GGUF file or model
folder, load_model either loads it or raises an EmberError (ModelLoadError) -- never another exception -- within
a time limit. Inputs that reach new lines of ember (traced arcs) join the corpus and are mutated further.

    python -m tests.reliability.fuzz_models --seconds 600 [--target gguf|folders|all] [--seed N] [--out DIR]
"""
from __future__ import annotations

import argparse
import random
import re
import resource
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Callable, Union

import ember
from ember.errors import EmberError
from tests.reliability.folders import compressed_folder, hf_folder
from tests.reliability.gguf_bytes import GGUFSpec, spec_from_file, tiny_llama
from tests.reliability.mutate_folders import Folder, mutate_folder, read_folder, write_folder
from tests.reliability.mutate_gguf import mutate_bytes, mutate_spec

EMBER = str(Path(ember.__file__).parent)
MAX_CORPUS = 1500
# A mutation the test writers cannot encode (a value too big for its type, a list where a dict was): skipped.
_MUTATOR_ERRORS = (struct.error, OverflowError, ValueError, UnicodeError, TypeError, IndexError, KeyError,
                   AttributeError)


class Hang(BaseException):
    """Raised by the alarm in a load that runs past the limit (a BaseException: no `except Exception` hides it)."""


class Coverage:
    """(file, previous line, line) arcs executed inside the ember package, via sys.settrace."""

    def __init__(self) -> None:
        self.seen: set[tuple[str, int, int]] = set()
        self.run: set[tuple[str, int, int]] = set()

    def _call(self, frame: FrameType, event: str, arg: Any) -> Callable | None:
        path = frame.f_code.co_filename
        if not path.startswith(EMBER):
            return None
        last = frame.f_lineno
        run = self.run

        def line(frame: FrameType, event: str, arg: Any) -> Callable:
            nonlocal last
            if event == "line":
                run.add((path, last, frame.f_lineno))
                last = frame.f_lineno
            return line
        return line

    def __enter__(self) -> "Coverage":
        self.run, self.previous = set(), sys.gettrace()
        sys.settrace(self._call)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.settrace(self.previous)  # a coverage tool's tracer, if one was running

    def novel(self) -> int:
        """Arcs of the last run never seen before (and now seen)."""
        new = self.run - self.seen
        self.seen |= new
        return len(new)


@dataclass
class GGUFInput:
    spec: GGUFSpec | None
    raw: bytes | None = None  # None: the spec serialized (kept as a spec, so real models stay cheap to hold)

    @property
    def data(self) -> bytes:
        return self.spec.to_bytes() if self.raw is None else self.raw  # type: ignore[union-attr]

    @property
    def keep(self) -> bool:
        """Worth a place in the corpus (byte-level children of big files are not: each holds the whole file)."""
        return self.raw is None or len(self.raw) < 8 << 20

    def mutate(self, rng: random.Random, outside: Path) -> "GGUFInput | None":
        try:
            if self.spec is not None and self.raw is None and rng.random() < 0.7:
                spec = mutate_spec(rng, self.spec)
                spec.to_bytes()  # fails here, not in write, on a value the writer cannot encode
                return GGUFInput(spec)
            return GGUFInput(self.spec, mutate_bytes(rng, self.data, self.spec))
        except _MUTATOR_ERRORS:
            return None

    def write(self, path: Path) -> Path:
        path = path.with_suffix(".gguf")
        path.write_bytes(self.data)
        return path


@dataclass
class FolderInput:
    files: Folder
    keep = True

    def mutate(self, rng: random.Random, outside: Path) -> "FolderInput | None":
        try:
            return FolderInput(mutate_folder(rng, self.files, outside))
        except _MUTATOR_ERRORS:
            return None

    def write(self, path: Path) -> Path:
        return write_folder(self.files, path)


Input = Union[GGUFInput, FolderInput]


@dataclass
class Report:
    iterations: int = 0
    seconds: float = 0.0
    loaded: int = 0
    refused: int = 0
    skipped: int = 0
    corpus: int = 0
    arcs: int = 0
    findings: dict[str, tuple[int, str, str]] = field(default_factory=dict)  # kind -> (count, traceback, saved as)
    reasons: Counter = field(default_factory=Counter)  # refusal messages, paths and numbers blanked

    def line(self) -> str:
        rate = self.iterations / max(self.seconds, 1e-9)
        return (f"{self.seconds:6.0f}s  {self.iterations} inputs ({rate:.1f}/s)  loaded {self.loaded}  refused "
                f"{self.refused}  skipped {self.skipped}  corpus {self.corpus}  arcs {self.arcs}  "
                f"failure kinds {len(self.findings)}")

    def summary(self, reasons: int = 0) -> str:
        out = [self.line()]
        out += [f"  {n:7d}  {why}" for why, n in self.reasons.most_common(reasons)]
        for kind, (count, tb, saved) in self.findings.items():
            out.append(f"\n== {kind}: {count}x, input saved as {saved or '(not saved)'}\n{tb}")
        return "\n".join(out)


def _kind(e: BaseException) -> str:
    """Exception type and the innermost ember line it passed through (how findings are told apart)."""
    frames = traceback.extract_tb(e.__traceback__)
    ours = [f for f in frames if f.filename.startswith(EMBER)] or frames
    where = f"{Path(ours[-1].filename).name}:{ours[-1].lineno}" if ours else "?"
    return f"{type(e).__name__} at {where}"


def _reason(message: str, tmp: Path) -> str:
    """A refusal message with the temporary paths and the numbers blanked, for counting kinds of refusal."""
    text = re.sub(r"input-\d+(\.gguf)?", "<input>", message.replace(str(tmp), ""))
    return re.sub(r"\d+", "N", text)[:110]


def _alarm(signum: int, frame: FrameType | None) -> None:
    raise Hang()


def use(loaded: Any) -> None:
    """What a server does first with a model: encode, template, a forward step, detokenize every id."""
    import torch

    from ember.loading.tokenizer import IncrementalDetokenizer

    tok = loaded.tokenizer
    ids = tok.encode("ab abc\nde", add_special_tokens=True) or [0]
    tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True)
    ids = [i % loaded.config.vocab_size for i in ids][:loaded.model.max_positions]  # as the engine caps prompts
    loaded.model.compute_logits(loaded.model.forward_dense(torch.tensor(ids)))
    detok = IncrementalDetokenizer(tok)
    for i in range(loaded.config.vocab_size):
        detok.add(i)
    tok.decode(list(range(loaded.config.vocab_size)))


def check_load(path: Path, limit_s: float, then_use: bool = False, config_only: bool = False
               ) -> tuple[str, str | None]:
    """("loaded", None), ("refused", message), or (failure kind, traceback) for any other exception or a hang;
    with then_use, failures of `use` on a loaded model are reported as "use: <kind>"; config_only stops at
    load_config (header, tokenizer and tensor table; no weights), for big seed files."""
    from ember.models.loader import load_config, load_model

    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, limit_s)
    try:
        if config_only:
            load_config(path)
            return "loaded", None
        loaded = load_model(path)
        if then_use:
            try:
                use(loaded)
            except EmberError:
                pass
            except (Exception, RecursionError) as e:
                return f"use: {_kind(e)}", traceback.format_exc()
        return "loaded", None
    except EmberError as e:
        return "refused", str(e)
    except Hang:
        return "hang", f"loading {path} took more than {limit_s} s"
    except (Exception, RecursionError, MemoryError) as e:
        return _kind(e), traceback.format_exc()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def seeds(tmp: Path, target: str, files: list[Path]) -> list[Input]:
    out: list[Input] = [GGUFInput(spec_from_file(str(f))) for f in files]
    if target in ("gguf", "all"):
        for kw in ({}, {"arch": "qwen2"}, {"tokenizer": "llama"}, {"layers": 1, "tied": True}):
            spec = tiny_llama(**kw)  # type: ignore[arg-type]
            out.append(GGUFInput(spec))
    if target in ("folders", "all"):
        built = [hf_folder(tmp / "seed-hf"), hf_folder(tmp / "seed-sharded", shards=2),
                 compressed_folder(tmp / "seed-compressed")]
        out += [FolderInput(read_folder(f)) for f in built]
    return out


def _save(child: Input, path: Path, out: Path | None, n: int, tb: str) -> str:
    if out is None:
        return ""
    out.mkdir(parents=True, exist_ok=True)
    dest = out / (f"finding-{n}.gguf" if path.is_file() else f"finding-{n}")
    if path.is_file():
        shutil.copyfile(path, dest)
    else:
        shutil.copytree(path, dest, symlinks=True)
    (out / f"finding-{n}.txt").write_text(tb)
    return str(dest)


def fuzz(seconds: float, target: str = "all", seed: int = 0, out: Path | None = None,
         max_iterations: int | None = None, limit_s: float = 10.0, then_use: bool = False,
         seed_files: list[Path] | None = None, config_only: bool = False,
         log: Callable[[str], None] | None = print) -> Report:
    rng, report, cov = random.Random(seed), Report(), Coverage()
    with tempfile.TemporaryDirectory(prefix="ember-fuzz-") as tmp_name:
        tmp = Path(tmp_name)
        corpus = seeds(tmp, target, seed_files or [])
        outside = tmp / "outside.safetensors"
        if (tmp / "seed-hf").is_dir():
            shutil.copyfile(tmp / "seed-hf" / "model.safetensors", outside)
        for warm in corpus[:1]:  # first-use costs (kernel build, imports) are not the input's
            check_load(warm.write(tmp / "warm-up"), 600, then_use, config_only)
        start = last_log = time.perf_counter()
        while time.perf_counter() - start < seconds and report.iterations != max_iterations:
            child = rng.choice(corpus).mutate(rng, outside)
            if child is None:
                report.skipped += 1
                continue
            path = child.write(tmp / f"input-{report.iterations}")
            with cov:
                outcome, tb = check_load(path, limit_s, then_use, config_only)
            report.iterations += 1
            if outcome in ("loaded", "refused"):
                setattr(report, outcome, getattr(report, outcome) + 1)
                if tb:
                    report.reasons[_reason(tb, tmp)] += 1
            else:
                count, first_tb, saved = report.findings.get(outcome, (0, tb or "", ""))
                saved = saved or _save(child, path, out, len(report.findings), first_tb)
                report.findings[outcome] = (count + 1, first_tb, saved)
            if cov.novel() and len(corpus) < MAX_CORPUS and child.keep:
                corpus.append(child)
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            report.seconds, report.corpus, report.arcs = time.perf_counter() - start, len(corpus), len(cov.seen)
            if log and time.perf_counter() - last_log > 10:
                last_log = time.perf_counter()
                log(report.line())
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--target", choices=["gguf", "folders", "all", "none"], default="all",
                    help="built-in seeds to mutate (none: only --seed-file)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("fuzz-findings"), help="where failing inputs are written")
    ap.add_argument("--limit", type=float, default=10.0, help="seconds one load may take")
    ap.add_argument("--seed-file", type=Path, action="append", default=[],
                    help="a real .gguf to mutate as well (e.g. the default model in ~/.cache/ember/models)")
    ap.add_argument("--config-only", action="store_true",
                    help="stop at load_config (no weights): fast on big seed files")
    ap.add_argument("--use", action="store_true",
                    help="also use each loaded model (encode, template, forward, detokenize) and report its failures")
    ap.add_argument("--max-memory-gb", type=float, default=8.0,
                    help="address-space limit, so a runaway allocation fails instead of swapping the machine")
    a = ap.parse_args(argv)
    warnings.filterwarnings("ignore", "invalid value encountered", RuntimeWarning)  # NaN in mutated weights
    limit = int(a.max_memory_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    report = fuzz(a.seconds, a.target, a.seed, a.out, limit_s=a.limit, then_use=a.use, seed_files=a.seed_file,
                  config_only=a.config_only)
    print(report.summary(reasons=40))
    return 1 if report.findings else 0


if __name__ == "__main__":
    sys.exit(main())
