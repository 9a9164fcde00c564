"""Draft-model speculation: a second model with the same tokenizer drafts greedily in its own paged KV cache,
which follows each target sequence and is rolled back where the target rejected its drafts."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ember.engine.kv_cache import BlockManager
from ember.engine.runner import ModelRunner
from ember.engine.sampling_params import SamplingParams
from ember.engine.sequence import Sequence, Status
from ember.errors import EmberError, InvalidParameterError
from ember.spec.config import SpeculativeConfig
from ember.spec.proposer import Proposer

if TYPE_CHECKING:
    from ember.engine.engine import LLMEngine

GREEDY = SamplingParams(max_tokens=None, temperature=0)  # what a drafting stand-in sequence carries


class GreedyDrafter:
    """Mirrors of target sequences in a runner's KV cache, extended greedily (the draft model's mechanics).
    `catch_up` chunk size bounds the first (prompt) pass."""

    def __init__(self, runner: ModelRunner, blocks: BlockManager, max_len: int, catch_up: int = 512) -> None:
        self.runner, self.blocks, self.max_len, self.catch_up = runner, blocks, max_len, catch_up
        self.mirrors: dict[Sequence, Sequence] = {}

    def sync(self, seq: Sequence) -> Sequence:
        """The mirror of `seq`, its KV kept for the longest prefix it shares with seq's tokens (rollback)."""
        tokens = seq.token_ids
        m = self.mirrors.get(seq)
        if m is None:
            m = self.mirrors[seq] = Sequence(seq.request_id, 0, [], GREEDY, 0.0)
            m.status = Status.RUNNING
        keep = _common_prefix(m.prompt_ids, tokens, m.num_computed)
        if keep < m.num_computed:
            self.blocks.truncate(m, keep)
        m.prompt_ids = list(tokens)
        return m

    def release(self, seq: Sequence) -> None:
        m = self.mirrors.pop(seq, None)
        if m is not None:
            self.blocks.free_seq(m)

    def draft(self, ks: dict[Sequence, int]) -> dict[Sequence, list[int]]:
        """Up to k greedy tokens per sequence; none where its mirror gets no KV blocks. A mirror first catches
        up on what the target accepted (the first time, its whole prompt) in chunks of at most `catch_up`."""
        mirrors = {self.sync(seq): seq for seq, k in ks.items() if k > 0 and len(seq) + k <= self.max_len}
        out: dict[Sequence, list[int]] = {seq: [] for seq in mirrors.values()}
        while mirrors:
            batch = self._fit({m: min(m.num_remaining, self.catch_up) for m in mirrors}, mirrors, out)
            if not batch:
                break
            result = self.runner.run(batch)
            rows = [result.sample_rows[m][-1] for m in batch if m in result.sample_rows]
            logits = self.runner.model.compute_logits(result.hidden[: result.num_logit_rows]) if rows else None
            for m, n in batch.items():
                m.num_computed += n
                if m.num_remaining or logits is None:  # still catching up
                    continue
                seq = mirrors[m]
                token = int(logits[result.sample_rows[m][-1]].argmax())
                out[seq].append(token)
                m.prompt_ids.append(token)
                if len(out[seq]) >= ks[seq]:
                    del mirrors[m]
        return {s: d for s, d in out.items() if d}

    def _fit(self, batch: dict[Sequence, int], mirrors: dict[Sequence, Sequence],
             out: dict[Sequence, list[int]]) -> dict[Sequence, int]:
        """Blocks for the batch; a mirror that gets none is dropped (its KV freed: it catches up next time)."""
        fitted = {}
        for m, n in batch.items():
            if self.blocks.can_allocate(m, n):
                self.blocks.allocate(m, n)
                fitted[m] = n
            else:
                seq = mirrors.pop(m)
                out.pop(seq, None)
                self.release(seq)
        return fitted


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class DraftProposer(Proposer):
    """A smaller model with the same tokenizer (or the target itself, quantized differently) drafts k tokens
    greedily per step in its own KV cache."""

    def __init__(self, drafter: GreedyDrafter) -> None:
        self.drafter = drafter

    @classmethod
    def for_engine(cls, config: SpeculativeConfig, engine: "LLMEngine") -> "DraftProposer":
        from ember.engine.engine import EngineArgs, LLMEngine, load_for

        target = engine.args
        assert config.model is not None
        args = EngineArgs(model=config.model, dtype=target.dtype, quantization=config.quantization,
                          max_num_seqs=target.max_num_seqs, block_size=target.block_size,
                          enable_prefix_caching=False, max_model_len=None)
        same = (_same_path(config.model, target.model) and config.quantization == target.quantization)
        if same:  # the target's weights as it runs them (already quantized, if it is)
            args.quantization = "none"
        try:
            loaded = engine.loaded if same else load_for(args)
        except EmberError as e:
            raise type(e)(f"speculative_config: the draft model: {e}") from None
        _check_vocab(engine, loaded.tokenizer, config.model)
        args.max_model_len = min(engine.max_model_len, loaded.model.max_positions)
        draft = LLMEngine(args, loaded=loaded)
        return cls(GreedyDrafter(draft.runner, draft.blocks, draft.max_model_len))

    def propose(self, seqs: dict[Sequence, int]) -> dict[Sequence, list[int]]:
        return self.drafter.draft(seqs)

    def release(self, seq: Sequence) -> None:
        self.drafter.release(seq)


def _same_path(a: str | Path | None, b: str | Path | None) -> bool:
    if a is None or b is None:
        return a is b
    try:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    except OSError:
        return str(a) == str(b)


def _check_vocab(engine: "LLMEngine", tokenizer: object, name: str) -> None:
    """A draft's tokens are the target's token ids: the vocabularies must be the same, piece for piece."""
    target = engine.tokenizer
    size = getattr(tokenizer, "vocab_size", None)
    same = size == target.vocab_size and all(
        tokenizer.id_to_piece(i) == target.id_to_piece(i)  # type: ignore[attr-defined]
        for i in range(0, target.vocab_size, max(1, target.vocab_size // 512)))
    if not same:
        raise InvalidParameterError(f"speculative_config: the draft model {name} has a different tokenizer "
                                    f"({size} tokens) from the target's ({target.vocab_size}); a draft model must "
                                    "share the target's vocabulary", "speculative_config")
