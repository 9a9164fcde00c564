"""Typed, range-checked reads of model metadata (GGUF keys, JSON files): a wrong value is a ModelLoadError
naming the file, the key, what was found and what is allowed."""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

from ember.errors import EmberError, ModelLoadError

FIX = "the file is corrupt or was written by a broken converter; re-download or re-convert it"
_REQUIRED = object()


def show(value: Any, limit: int = 60) -> str:
    """repr() cut to a readable length (a corrupt value can be megabytes)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_range(source: str, key: str, value: int | float, lo: int | float, hi: int | float) -> None:
    """lo <= value <= hi, and finite; NaN fails every comparison, so it is refused too."""
    if not lo <= value <= hi:
        kind = "an integer" if isinstance(value, int) else "a number"
        raise ModelLoadError(f"{source}: {key} is {show(value)}; it must be {kind} in [{lo}, {hi}]; {FIX}")


def read_json_object(path: Path, missing_ok: bool = False) -> dict[str, Any]:
    """A JSON file whose top level is an object ({} when absent and missing_ok)."""
    if missing_ok and not path.is_file():
        return {}
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read it ({e})") from None
    except UnicodeDecodeError as e:
        raise ModelLoadError(f"{path}: not valid UTF-8 ({e}); {FIX}") from None
    except (ValueError, RecursionError) as e:  # ValueError: bad JSON, or a number of over 4300 digits
        raise ModelLoadError(f"{path}: not valid JSON ({str(e)[:200]}); {FIX}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: the top level must be a JSON object, found {type(data).__name__}; {FIX}")
    return data


@contextmanager
def foreign_errors(path: str | Path, problem: str) -> Iterator[None]:
    """Last resort around third-party parsers (tokenizers, safetensors, gguf): whatever they raise, Rust panics
    included, becomes a ModelLoadError naming the file. The precise checks before them say what is wrong."""
    try:
        yield
    except EmberError:
        raise
    except BaseException as e:  # pyo3's PanicException derives from BaseException
        if not isinstance(e, Exception) and type(e).__name__ != "PanicException":
            raise
        raise ModelLoadError(f"{path}: {problem} ({type(e).__name__}: {str(e)[:300]})") from None


class Fields:
    """Typed reads of one mapping's keys (prefix + key); JSON null counts as absent. Messages name a key as
    parent + prefix + key (parent: where a nested object sits, e.g. "rope_scaling.")."""

    def __init__(self, data: Mapping[str, Any], source: str, prefix: str = "", parent: str = "") -> None:
        self.data, self.source, self.prefix, self.parent = data, source, prefix, parent

    def name(self, key: str) -> str:
        return self.parent + self.prefix + key

    def error(self, key: str, problem: str) -> ModelLoadError:
        return ModelLoadError(f"{self.source}: {self.name(key)} {problem}; {FIX}")

    def get(self, key: str, default: Any = _REQUIRED) -> Any:
        value = self.data.get(self.prefix + key)
        if value is None:
            if default is _REQUIRED:
                raise ModelLoadError(f"{self.source}: lacks {self.name(key)}, which is required; {FIX}")
            return default
        return value

    def int(self, key: str, default: Any = _REQUIRED) -> Any:
        value = self.get(key, default)
        if isinstance(value, float) and value.is_integer():  # JSON writers turn 4096 into 4096.0
            value = int(value)
        if value is not default and (not isinstance(value, int) or isinstance(value, bool)):
            raise self.error(key, f"must be an integer, found {show(value)}")
        return value

    def float(self, key: str, default: Any = _REQUIRED) -> Any:
        value = self.get(key, default)
        if value is default:
            return value
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise self.error(key, f"must be a number, found {show(value)}")
        return float(value)

    def bool(self, key: str, default: Any = _REQUIRED) -> Any:
        value = self.get(key, default)
        if value in (0, 1) and not isinstance(value, float):  # GGUF writers store some flags as u8
            return bool(value)
        if value is not default:
            raise self.error(key, f"must be a boolean, found {show(value)}")
        return value

    def str(self, key: str, default: Any = _REQUIRED) -> Any:
        value = self.get(key, default)
        if value is not default and not isinstance(value, str):
            raise self.error(key, f"must be a string, found {show(value)}")
        return value

    def list(self, key: str, of: str, default: Any = _REQUIRED) -> Any:
        """A list whose items are all strings, integers or numbers (of: "strings", "integers", "numbers")."""
        value = self.get(key, default)
        if value is default:
            return value
        ok = {"strings": (str,), "integers": (int,), "numbers": (int, float)}[of]
        if not isinstance(value, list) or not all(isinstance(v, ok) and not isinstance(v, bool) for v in value):
            raise self.error(key, f"must be a list of {of}, found {show(value)}")
        return value
