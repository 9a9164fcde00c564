"""SWIFT self-speculation (hemingkx/SWIFT): the model drafts for itself with a set of its attention and MLP
sub-layers left out, on its own KV cache; the set is tuned on the fly from what the model generates."""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ember.engine.kv_cache import BlockManager
from ember.engine.runner import ModelRunner
from ember.engine.sampling_params import SamplingParams
from ember.engine.sequence import Sequence, Status
from ember.errors import InvalidParameterError
from ember.ops.formats import KV_CACHE_DTYPES
from ember.spec.config import SpeculativeConfig
from ember.spec.draft import GREEDY
from ember.spec.proposer import Proposer

if TYPE_CHECKING:
    from ember.engine.engine import LLMEngine

log = logging.getLogger("ember")
_SCORING = SamplingParams(max_tokens=None, temperature=0, prompt_logprobs=0)  # logits for every row
BAYES_INTERVAL = 25  # every this many tried sets, a Bayesian-optimisation suggestion instead of a random one
PATIENCE = 300  # tuning also stops after this many tries without a better set


def candidate_sublayers(num_layers: int) -> list[int]:
    """Sub-layers that may be skipped: attention (2i) and MLP (2i + 1) of every layer but the first and last."""
    return [j for i in range(1, num_layers - 1) for j in (2 * i, 2 * i + 1)]


def initial_skip(num_layers: int, count: int) -> frozenset[int]:
    """SWIFT's starting set: the sub-layers of every other (odd) layer, up to `count` of them."""
    odd = [j for j in candidate_sublayers(num_layers) if (j // 2) % 2 == 1]
    return frozenset(odd[:count])


@dataclass
class SkipTuner:
    """Random search over skip sets of a fixed size with a periodic Bayesian-optimisation suggestion (a
    Gaussian process with UCB over one score in [0, 1] per candidate sub-layer; the `count` highest are
    skipped), keeping the best set by its score. Stops at `max_score`, after `budget` tries or PATIENCE tries
    without improvement."""

    candidates: list[int]
    count: int
    max_score: float
    budget: int
    seed: int = 0
    best: frozenset[int] = frozenset()
    best_score: float = -1.0
    tries: int = 0
    since_better: int = 0
    history: list[float] = field(default_factory=list)  # every score, in order
    _rng: random.Random = field(init=False)
    _bo: Any = field(init=False, default=None)
    _pending: tuple[frozenset[int], list[float]] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._bo = _bayes(len(self.candidates), self.seed)

    @property
    def done(self) -> bool:
        return (self.best_score >= self.max_score or self.tries >= self.budget
                or self.since_better >= PATIENCE)

    def propose(self) -> frozenset[int]:
        """The next set to score (the current best first, if it was never scored)."""
        if self.best_score < 0:
            vec = [1.0 if c in self.best else 0.0 for c in self.candidates]
        elif self._bo is not None and self.tries % BAYES_INTERVAL == BAYES_INTERVAL - 1:
            vec = self._suggest()
        else:
            vec = [self._rng.random() for _ in self.candidates]
        top = sorted(range(len(vec)), key=lambda i: -vec[i])[: self.count]
        skip = frozenset(self.candidates[i] for i in top)
        self._pending = (skip, vec)
        return skip

    def score(self, skip: frozenset[int], value: float) -> None:
        self.tries += 1
        self.history.append(value)
        if self._pending is not None and self._pending[0] == skip and self._bo is not None:
            self._bo.register(params=_params(self._pending[1]), target=value)
        self._pending = None
        if value > self.best_score:
            self.best, self.best_score, self.since_better = skip, value, 0
        else:
            self.since_better += 1

    def _suggest(self) -> list[float]:
        try:
            point = self._bo.suggest()
            return [float(point[f"x{i:03d}"]) for i in range(len(self.candidates))]
        except Exception as e:  # a degenerate GP (all scores equal): fall back to random search
            log.debug("skip-set suggestion failed (%s); trying a random set", e)
            return [self._rng.random() for _ in self.candidates]


def _params(vec: list[float]) -> dict[str, float]:
    return {f"x{i:03d}": v for i, v in enumerate(vec)}


def _bayes(dims: int, seed: int) -> Any:
    """bayes_opt's optimiser as SWIFT configures it (UCB kappa 2.5, GP alpha 1e-2), its acquisition searched
    with fewer random points than the library's default, which took seconds per suggestion here; None when
    bayesian-optimization is not installed (random search alone)."""
    try:
        from bayes_opt import BayesianOptimization, acquisition
    except ImportError:
        log.warning("SWIFT: bayesian-optimization is not installed (pip install 'ember[spec]'); tuning "
                    "the skip set by random search alone")
        return None

    class _UCB(acquisition.UpperConfidenceBound):  # type: ignore[misc, name-defined]
        def suggest(self, gp: Any, target_space: Any, n_random: int = 512, n_smart: int = 2, fit_gp: bool = True,
                    random_state: Any = None) -> Any:
            return super().suggest(gp, target_space, n_random=n_random, n_smart=n_smart, fit_gp=fit_gp,
                                   random_state=random_state)

    bo = BayesianOptimization(f=None, pbounds={f"x{i:03d}": (0.0, 1.0) for i in range(dims)},
                              acquisition_function=_UCB(kappa=2.5), random_state=seed, verbose=0,
                              allow_duplicate_points=True)
    bo.set_gp_params(alpha=1e-2)
    return bo


class SwiftProposer(Proposer):
    """Drafts with the target model itself, sub-layers left out, on the target's own KV cache: a draft token's
    KV goes to the positions its verification overwrites, so only the blocks they need are taken. Drafting
    stops at k tokens or where the top-1 probability falls below `confidence`. While the tuner is not done,
    each step it scores one candidate set on the last `window` tokens a sequence generated (one teacher-forced
    forward, into scratch blocks), as SWIFT's optimisation phase does; the best set stays for later requests."""

    def __init__(self, runner: ModelRunner, blocks: BlockManager, num_layers: int, config: SpeculativeConfig,
                 max_len: int) -> None:
        self.runner, self.blocks, self.max_len = runner, blocks, max_len
        self.window = config.context_window
        self.confidence = config.draft_confidence
        self.tuning_share = config.max_tuning_share
        self.tuning_s = 0.0  # seconds spent scoring candidate sets
        self.generating_s = 0.0  # seconds of the engine's steps observed (idle time between requests is not)
        cands = candidate_sublayers(num_layers)
        count = int(len(cands) * config.skip_ratio)
        self.tuner = SkipTuner(cands, count, config.max_score, config.max_optimization_steps, config.seed)
        if config.skip_layers is not None:
            bad = sorted(set(config.skip_layers) - set(cands))
            if bad:
                raise InvalidParameterError(f"speculative_config: skip_layers {bad} are not sub-layers that may be "
                                            f"skipped (2i and 2i + 1 for layers 1..{num_layers - 2})",
                                            "speculative_config")
            self.tuner.best, self.tuner.best_score = frozenset(config.skip_layers), 1.0  # fixed: no tuning
            self.tuner.budget = 0
        else:
            self.tuner.best = initial_skip(num_layers, count)

    @classmethod
    def for_engine(cls, config: SpeculativeConfig, engine: "LLMEngine") -> "SwiftProposer":
        if KV_CACHE_DTYPES.get(engine.args.kv_cache_dtype) is not None:
            raise InvalidParameterError(
                'speculative_config: method "swift" writes draft KV into the cache it shares with the model, '
                f"which a quantized KV cache ({engine.args.kv_cache_dtype}) would quantize; use "
                '--kv-cache-dtype auto or float16, or method "ngram" or "draft"', "speculative_config")
        if engine.config.num_layers < 4:
            raise InvalidParameterError("speculative_config: SWIFT needs a model of at least 4 layers (it never "
                                        "skips the first and the last)", "speculative_config")
        return cls(engine.runner, engine.blocks, engine.config.num_layers, config, engine.max_model_len)

    @property
    def skip(self) -> frozenset[int]:
        return self.tuner.best

    def observe(self, seqs: list[Sequence], seconds: float = 0.0) -> None:
        """While the skip set is not tuned: one try per step, whether or not drafting paid this step, as long as
        tuning has taken at most `tuning_share` of the time spent in steps and tries."""
        if self.tuner.done:
            return
        self.generating_s += seconds
        if self.tuning_s > self.tuning_share * (self.generating_s + self.tuning_s):
            return
        began = time.perf_counter()
        self._tune([s for s in seqs if s.output_ids])
        self.tuning_s += time.perf_counter() - began

    def propose(self, seqs: dict[Sequence, int]) -> dict[Sequence, list[int]]:
        shadows = {}
        for seq, k in seqs.items():
            if k > 0 and len(seq) + k <= self.max_len:
                shadows[_shadow(seq)] = (seq, k)
        out: dict[Sequence, list[int]] = {}
        while shadows:
            batch = {s: 1 for s in shadows if self.blocks.can_allocate(s, 1)}
            if not batch:
                break
            for s in batch:
                self.blocks.allocate(s, 1)  # into the target's own table: its verification needs them anyway
            result = self.runner.run(batch, skip=self.skip)
            logits = self.runner.model.compute_logits(result.hidden[: result.num_logit_rows])
            probs = torch.softmax(logits.float(), dim=-1)
            for s in list(shadows):
                if s not in batch:
                    del shadows[s]
                    continue
                s.num_computed += 1
                row = result.sample_rows[s][-1]
                p, token = probs[row].max(dim=-1)
                seq, k = shadows[s]
                if float(p) < self.confidence:
                    del shadows[s]
                    continue
                drafts = out.setdefault(seq, [])
                drafts.append(int(token))
                s.prompt_ids.append(int(token))
                if len(drafts) >= k:
                    del shadows[s]
        return out

    def _tune(self, seqs: list[Sequence]) -> None:
        """One optimisation step: score a candidate set on the sequence with the most generated tokens."""
        seq = max(seqs, key=lambda s: len(s.output_ids), default=None)
        if seq is None or len(seq.output_ids) < self.window or seq.num_computed < self.window + 1:
            return
        skip = self.tuner.propose()
        value = self._matchness(seq, skip)
        if value is not None:
            self.tuner.score(skip, value)
            if self.tuner.done:
                log.info("SWIFT: skip set of %d sub-layers tuned in %d tries, %.2f of %d tokens predicted: %s",
                         len(self.tuner.best), self.tuner.tries, self.tuner.best_score, self.window,
                         sorted(self.tuner.best))

    def _matchness(self, seq: Sequence, skip: frozenset[int]) -> float | None:
        """Share of the sequence's last `window` tokens the skipping model predicts, teacher-forced in one
        forward into scratch blocks (the full blocks before them are shared, only read), or None without room."""
        bs = self.blocks.block_size
        end = seq.num_computed  # positions whose KV the full model wrote; token `end` is the newest
        first = (end - self.window) // bs * bs  # recomputed from a block boundary
        scratch = Sequence(seq.request_id, 0, seq.token_ids[:end], _SCORING, 0.0)
        scratch.status = Status.RUNNING
        self.blocks.share(scratch, seq.block_table[: first // bs])
        scratch.num_computed = first
        n = end - first
        try:
            if not self.blocks.can_allocate(scratch, n):
                return None
            self.blocks.allocate(scratch, n)
            result = self.runner.run({scratch: n}, skip=skip)
            # Rows: positions first .. end - 1 (prompt-logprob rows, then the sampled one), each predicting the next.
            logits = self.runner.model.compute_logits(result.hidden[: result.num_logit_rows])
            predicted = logits[-self.window:].argmax(dim=-1).tolist()
            actual = seq.token_ids[end - self.window + 1: end + 1]
            return sum(p == a for p, a in zip(predicted, actual)) / self.window
        finally:
            self.blocks.free_seq(scratch)


def _shadow(seq: Sequence) -> Sequence:
    """A stand-in for a decoding sequence that drafts on its KV blocks: the same block table (list) and
    progress, its own token list; blocks it takes are the sequence's."""
    s = Sequence(seq.request_id, 0, list(seq.token_ids), GREEDY, 0.0)
    s.status = Status.RUNNING
    s.block_table, s.num_computed = seq.block_table, seq.num_computed
    return s
