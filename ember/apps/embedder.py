"""Sentence embedders for long-term memory: a dedicated embedding model (sentence-transformers; by default
all-MiniLM-L6-v2, fetched once like the default model) that SCM's retrieval uses instead of the chat model's
pooled hidden states, and the sentence splitter that lets a turn be found by any one of its sentences."""
from __future__ import annotations

import importlib.util
import logging
import re
import threading
from pathlib import Path
from typing import Any

import numpy as np

from ember.errors import EmberError, InvalidParameterError

log = logging.getLogger("ember")
MINILM = "minilm"  # the built-in choice: sentence-transformers' all-MiniLM-L6-v2
SERVED = "model"  # no dedicated embedder: the served model's pooled hidden states
INSTALL_HINT = "a memory embedder needs sentence-transformers, an optional extra: pip install 'ember[memory]'"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
MAX_SENTENCES = 256  # per turn: a pasted book chapter is found by its first 256 sentences


class SentenceEmbedder:
    """A sentence-transformers model on the CPU; `embed` returns L2-normalised float32 rows. `name` identifies
    the vectors' space (a session keeps the embedder its turns were stored with)."""

    def __init__(self, folder: str | Path, name: str | None = None, threads: int | None = None) -> None:
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise EmberError(INSTALL_HINT) from None
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise EmberError(f"memory embedder {str(folder)!r} is not a folder (a sentence-transformers model, or "
                             f"'{MINILM}' / '{SERVED}')")
        try:
            self.model: Any = SentenceTransformer(str(folder), device="cpu", local_files_only=True)
        except Exception as e:  # a folder sentence-transformers cannot read
            raise EmberError(f"memory embedder {str(folder)!r} could not be loaded: {e}") from None
        self.name = name or f"sentence-transformers:{folder.name}"
        self._lock = threading.Lock()  # one encode at a time (torch's threads serve it)

    def embed(self, texts: list[str]) -> np.ndarray:
        with self._lock:
            vectors = self.model.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True,
                                        show_progress_bar=False)
        return np.asarray(vectors, dtype=np.float32).reshape(len(texts), -1)


def resolve_embedder(choice: str | None) -> SentenceEmbedder | None:
    """--memory-embedder: None picks MINILM where sentence-transformers is installed, else SERVED; SERVED gives
    None (the served model embeds); MINILM fetches all-MiniLM-L6-v2 once; anything else is a model folder."""
    installed = importlib.util.find_spec("sentence_transformers") is not None
    if choice is None:
        if not installed:
            log.info("memory embeds with the served model (pip install 'ember[memory]' for a dedicated embedder)")
            return None
        choice = MINILM
    if choice == SERVED:
        return None
    if not installed:
        raise EmberError(INSTALL_HINT)
    if choice == MINILM:
        from ember.loading.registry import MINILM as KNOWN, pull_embedder

        return SentenceEmbedder(pull_embedder(progress=False), f"sentence-transformers:{KNOWN.name}")
    return SentenceEmbedder(choice)


def sentences(text: str) -> list[str]:
    """The text's sentences and lines (at most MAX_SENTENCES), for per-sentence vectors."""
    parts = [" ".join(p.split()) for p in _SENTENCE_END.split(text)]
    found = [p for p in parts if p]
    if not found:
        raise InvalidParameterError("a memory turn must contain text", "messages")
    return found[:MAX_SENTENCES]


def check_choice(choice: str) -> str:
    """A --memory-embedder value checked before anything loads (argparse reports the error)."""
    import argparse

    if choice == SERVED:
        return choice
    if importlib.util.find_spec("sentence_transformers") is None:
        raise argparse.ArgumentTypeError(INSTALL_HINT)
    if choice != MINILM and not Path(choice).expanduser().is_dir():
        raise argparse.ArgumentTypeError(f"{choice!r} is neither '{MINILM}', '{SERVED}' nor a sentence-transformers "
                                         "model folder")
    return choice
