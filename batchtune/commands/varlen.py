"""Variable-length data: the worst-case batch, and a token budget as the alternative to a fixed size.

The probe measures the ceiling on the worst-case batch (the longest samples, padded as the
spec's collate function pads them: :func:`~batchtune.engine.data.worst_case`). A fixed batch
of that size wastes the padding of every random batch and leaves memory unused on short
ones; a token budget (``max_tokens`` padded tokens per batch, samples bucketed by length)
fills memory evenly. :func:`token_budget` sizes the budget from the probe's safe size at
the longest length, runs both for a few timed steps, and reports their padding and tokens/s.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
from dataclasses import dataclass
from typing import Any

from batchtune.engine.data import PlannedBatches, padding_waste, random_batches, token_batches

log = logging.getLogger(__name__)

__all__ = ["Batching", "TokenBudget", "token_budget"]

#: Steps timed for each batching, after the first two (which carry the extreme batches and
#: count memory).
TIMED_STEPS = 6
MEMORY_STEPS = 2


@dataclass
class Batching:
    """One way of batching the training set, measured for a few steps."""

    name: str  # fixed | bucketed
    batches: int  # in one epoch
    mean_rows: float
    padding_waste: float  # share of padded tokens that are padding, over the epoch
    fits: bool | None = None  # every batch the timing run took fit (None: not run)
    peak_bytes: int | None = None
    tokens_per_s: float | None = None  # real (unpadded) tokens per second of training
    error: str | None = None


@dataclass
class TokenBudget:
    """What the probe says about variable-length data (``ProbeResult.variable_length``)."""

    samples: int
    longest: int  # tokens in the longest sample
    median_length: float
    worst_ceiling: int | None  # samples in the largest worst-case batch that fits
    random_longest: float | None  # median over random batches of the safe size of their longest sample
    max_tokens: int | None  # padded tokens per batch: the safe size at the longest length
    fixed: Batching | None
    bucketed: Batching | None
    notes: list[str]
    pads: bool = True  # the collate pads to the batch's longest (else it concatenates: no padding to count)
    max_rows: int | None = None  # samples per bucketed batch at most (None: no limit beside max_tokens)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def token_budget(spec: Any, components: Any, run_on: tuple[Any, Any, Any] | None, ceiling: int | None,
                 safe: int | None) -> TokenBudget:
    """The worst case's figures, the token budget, and both batchings measured on the probe's model.

    Args:
        spec: the spec (seed, precision, lr).
        components: the spec's components, training set unchanged (not the worst-case view).
        run_on: ``(model, backend, dist)`` to time both batchings on (the probe's model, on
            the device); None: only the padding figures.
        ceiling: the worst-case ceiling the probe found (None: nothing fits).
        safe: the safe size (None: none).
    """
    lengths = components.lengths()
    longest = max(lengths)
    out = TokenBudget(len(lengths), longest, statistics.median(lengths), ceiling, None, None, None, None, [],
                      components.pads())
    if safe is None:
        return out
    fixed_plan = random_batches(len(lengths), safe, spec.seed)
    out.random_longest = statistics.median(max(lengths[i] for i in b) for b in fixed_plan)
    out.max_tokens = safe * longest
    bucket_plan = token_batches(lengths, out.max_tokens, spec.seed)
    waste = padding_waste if out.pads else lambda *_: 0.0
    out.fixed = Batching("fixed", len(fixed_plan), safe, waste(lengths, fixed_plan))
    out.bucketed = Batching("bucketed", len(bucket_plan), len(lengths) / len(bucket_plan), waste(lengths, bucket_plan))
    if not out.pads:
        out.notes.append("the collate concatenates samples rather than padding them: no padding to save, and a "
                         "batch's memory follows its total length, which length-bucketing evens out")
    if run_on is None:
        return out
    for batching, plan in ((out.fixed, fixed_plan), (out.bucketed, _extremes_first(bucket_plan, lengths))):
        _time(spec, components, run_on, batching, plan, lengths)
    rows = max(map(len, bucket_plan))
    if out.bucketed.fits is False and rows > safe:
        # memory grows with a batch's samples as well as its tokens: at most the safe size's samples, each at most
        # the longest, is never more than the worst case the probe measured
        capped = token_batches(lengths, out.max_tokens, spec.seed, max_rows=safe)
        out.max_rows = safe
        out.bucketed = Batching("bucketed", len(capped), len(lengths) / len(capped), waste(lengths, capped))
        _time(spec, components, run_on, out.bucketed, _extremes_first(capped, lengths), lengths)
        out.notes.append(f"max_tokens {out.max_tokens:,} alone ran out of memory on a batch of {rows:,} short samples "
                         f"(more than the worst case's {safe:,}): the budget is capped at {safe:,} samples a batch "
                         "(max_rows)" + ("" if out.bucketed.fits else ", and still ran out of memory"))
    elif out.bucketed.fits is False:
        out.notes.append(f"max_tokens {out.max_tokens:,} ran out of memory on a length-bucketed batch: take a "
                         "smaller budget")
    return out


def _extremes_first(plan: list[list[int]], lengths: list[int]) -> list[list[int]]:
    """The plan with the batch of most rows and the one of the longest samples first, so that
    the memory-counted steps of the timing run carry them."""
    most_rows = max(range(len(plan)), key=lambda k: len(plan[k]))
    longest = max(range(len(plan)), key=lambda k: max(lengths[i] for i in plan[k]))
    first = [most_rows] + ([longest] if longest != most_rows else [])
    return [plan[k] for k in first] + [b for k, b in enumerate(plan) if k not in first]


def _time(spec: Any, components: Any, run_on: tuple[Any, Any, Any], batching: Batching, plan: list[list[int]],
          lengths: list[int]) -> None:
    """Train the model on ``plan`` for a few steps: memory over the first, real tokens/s after."""
    from batchtune.engine.shape import BatchShape
    from batchtune.engine.trial import Trainer, trial_config

    model, backend, dist = run_on
    planned = dataclasses.replace(components, train_set=PlannedBatches(components.train_set, plan))
    trainer = Trainer(planned, backend, spec.precision, dist)
    steps = MEMORY_STEPS + TIMED_STEPS
    rows = max(1, round(batching.mean_rows))
    config = trial_config(spec, BatchShape(rows, 1, dist.world_size), lr=spec.optimizer.lr, steps=steps,
                          timing_warmup_steps=MEMORY_STEPS, memory_steps=MEMORY_STEPS, grad_clip=None)
    log.info("  timing %s batching (%d batches an epoch) ...", batching.name, len(plan))
    result = trainer.run(config, model=model)
    batching.fits, batching.error = result.fits, result.error
    batching.peak_bytes = result.peak_bytes
    timed = result.data_seconds + result.compute_seconds
    if result.fits and timed > 0 and result.steps > MEMORY_STEPS:
        tokens = sum(lengths[i] for k in range(MEMORY_STEPS, result.steps) for i in plan[k % len(plan)])
        batching.tokens_per_s = tokens * dist.world_size / timed
