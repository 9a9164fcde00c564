"""Speculative decoding: proposers draft tokens (n-gram prompt lookup, a draft model, SWIFT layer skipping), the
engine verifies them in its next step (LLMEngine.set_candidates' seam); the Speculator sizes the drafts."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ember.spec.config import SpeculativeConfig, parse_speculative_config
from ember.spec.proposer import Proposer, Speculator

if TYPE_CHECKING:
    from ember.engine.engine import LLMEngine

__all__ = ["Proposer", "SpeculativeConfig", "Speculator", "build_speculator", "parse_speculative_config"]


def build_speculator(config: SpeculativeConfig | None, engine: "LLMEngine") -> Speculator | None:
    """The Speculator for `config` on this engine's model (None: no speculation)."""
    if config is None:
        return None
    proposer: Proposer
    if config.method == "ngram":
        from ember.spec.ngram import NgramProposer
        proposer = NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
    elif config.method == "draft":
        from ember.spec.draft import DraftProposer
        proposer = DraftProposer.for_engine(config, engine)
    else:
        from ember.spec.swift import SwiftProposer
        proposer = SwiftProposer.for_engine(config, engine)
    return Speculator(proposer, config.num_speculative_tokens, config.adaptive, config.disable_by_batch_size)
