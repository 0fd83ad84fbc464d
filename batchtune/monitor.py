"""The gradient noise scale, measured alongside any training loop.

:class:`NoiseScaleMonitor` is the whole measurement in one object: the gradient hooks
(:class:`~batchtune.stats.noise.MicroBatchGradNorms`), the two-batch-size estimator
(:class:`~batchtune.stats.noise.NoiseScaleEstimator`), the cadence (every n-th step) and
the reading. batchtune's own trainer drives it; so can a hand-written loop::

    monitor = NoiseScaleMonitor(model.parameters(), micro_batch_size=32, accum_steps=4, every=4)
    for step in range(steps):
        measured = monitor.due(step)
        if measured:
            monitor.begin()
        for x, y in micro_batches:                  # accum_steps of them
            if measured:
                monitor.start_micro_batch()
            (loss_fn(model(x), y) / accum_steps).backward()
            if measured:
                monitor.end_micro_batch(grad_multiplier=accum_steps)
        if measured:
            monitor.step()                           # after the last backward, before clipping
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    print(monitor.reading())

**In your own loop** pass the model itself: the monitor then arms its hooks on its own, and
the loop's only call is :meth:`NoiseScaleMonitor.step` after the last backward of each
optimizer step, before clipping and ``optimizer.step()``::

    monitor = NoiseScaleMonitor(model, micro_batch_size=32, accum_steps=4)
    for step in range(steps):
        for x, y in micro_batches:                  # accum_steps of them, loss / accum_steps
            (loss_fn(model(x), y) / accum_steps).backward()
        monitor.step()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    reading = monitor.reading()                     # b_simple, low, high (90% band), steps

Two batch sizes come from what the loop already does (see :class:`NoiseScaleMonitor` for the
three cases): each backward pass against the accumulated step, each rank's local gradient
against the all-reduced one (DDP), and with one backward on one process each example against
the batch (per-example gradient norms of the ``nn.Linear`` layers, from their inputs and
output gradients). Hooks never change a gradient, so training is bit-identical with and
without the monitor.

With one accumulation step on one process there is no second batch size inside a step:
measured steps must run their batch as two halves (:attr:`NoiseScaleMonitor.splits_batches`).
Under several ranks the small batch is one rank's local gradient and the big one the
all-reduced gradient; no hooks are needed, but the monitor must see the gradients on both
sides of the reduction (:meth:`NoiseScaleMonitor.before_reduce`, then :meth:`step`).
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any, Protocol

import torch

from batchtune.stats.noise import (MicroBatchGradNorms, NoiseScaleEstimate, NoiseScaleEstimator, _sq_norm, _sum,
                                   decay_per_measured_step, narrow_band, noise_batch_sizes, unbiased_estimates)

__all__ = ["MODULE_EVERY", "MonitorReading", "NoiseScaleMonitor"]

MODULE_EVERY = 8  # default cadence of a monitor given a module (one in 8 optimizer steps measured)
SKIP_WARN_EVERY = 100  # while measured steps are skipped for one reason, warn again every this many
PER_EXAMPLE_CHUNK_ELEMENTS = 1 << 22  # per-example norms: examples per chunk so one intermediate has about this many
LOW_COVERAGE = 0.5  # warn when the per-example path measures less than this share of the parameters


@dataclass(frozen=True)
class MonitorReading(NoiseScaleEstimate):
    """A :class:`~batchtune.stats.noise.NoiseScaleEstimate` with the share of the model it measures.

    ``reliable`` is as ``batchtune noise`` has it: the estimator's, and a band above 0 no wider than
    :data:`~batchtune.stats.noise.WIDE_BAND` (10×) (an outside loop's readings were 'reliable' in 180–11,927); and
    of the model: ``coverage`` at least :data:`LOW_COVERAGE` (an outside CNN's per-example reading of its Linear
    head alone, 6% of its parameters, read 56 'reliable' where its whole gradient's read 9.4).

    Attributes:
        coverage: share of the model's trainable parameters (by count) whose gradients the
            reading measures (:attr:`NoiseScaleMonitor.coverage`); below 1, B_simple is theirs.
    """

    coverage: float = 1.0


def _warn_batchnorm(model: torch.nn.Module) -> None:
    """Say that BatchNorm biases the reading, as ``batchtune noise`` does: an outside loop's monitor read about half
    of what ``noise`` read on the same BatchNorm model, and said nothing."""
    from batchtune.config.components import has_batchnorm

    if has_batchnorm(model):
        warnings.warn("noise scale: the model has BatchNorm: its micro-batch (or per-example) gradients see batch "
                      "statistics that differ from the full batch's, which biases B_simple; read it as an order of "
                      "magnitude", stacklevel=3)


class Ranks(Protocol):
    """What the monitor needs of the data-parallel ranks (a ``DistContext`` has it)."""

    @property
    def enabled(self) -> bool: ...

    world_size: int

    def mean(self, *values: float) -> list[float]: ...


class NoiseScaleMonitor:
    """Measures B_simple = tr(Σ)/|G|² on every ``every``-th step of a training loop.

    Hooks exist only during a measured step (:meth:`begin` to :meth:`step`): between
    measurements the loop runs at full speed.

    Given a module instead of parameters, the monitor drives itself and the loop calls only
    :meth:`step`, once per optimizer step (it arms its hooks at the end of the step before a
    measured one). The two batch sizes are then, by the shape of the step:

    * ``accum_steps >= 2``: each backward pass (``micro_batch_size`` examples, seen by
      parameter hooks) against the accumulated ``.grad`` (``micro_batch_size × accum_steps
      × world_size``). The loss is taken to be divided by ``accum_steps``, as Hugging Face
      and Lightning do; B_simple does not depend on it (only ``g2`` and ``trace_sigma`` do).
    * several ranks (DDP, ``torch.distributed`` initialised, or ``world_size``): the same
      hooks see each rank's local gradient before the reduction, ``.grad`` holds the
      all-reduced one. Each rank reads its own micro-batches; log rank 0's reading.
    * one backward on one process: each example against the batch. Forward hooks on every
      ``nn.Linear`` (or transformers' ``Conv1D``) whose parameters no other module shares
      keep its input; a hook on its output gradient turns both into per-example squared
      gradient norms
      (``|a_n|²·|δ_n|²`` for one row per example; for sequences ``Σ_ts (a_t·a_s)(δ_t·δ_s)``
      or ``|Σ_t δ_t a_tᵀ|²``, whichever needs fewer elements, T² or d_in·d_out). B_simple is then
      that of those layers' parameters (exact for a model of Linear layers; :attr:`coverage` gives
      their share of the parameters); ``max_examples`` caps the examples per measured step whose
      norms are computed (the batch gradient always uses them all). A layer's examples lie on its
      input's dim 0 where that has ``micro_batch_size``,
      else on its one other axis of that size (dim 1 for a time-first ``(T, B, C)``; with T == B
      a time-first layer is read on dim 0, wrongly); a layer with none, or several past dim 0, is left out with
      a warning. Each such layer must run once per step (a layer applied twice would need
      cross terms; the step is skipped, with a warning repeated every
      :data:`SKIP_WARN_EVERY` skipped steps).

    Args:
        params: the parameters whose gradients are measured (``model.parameters()``), or
            the model itself for a monitor that drives itself (only :meth:`step` is called).
        micro_batch_size: examples per backward pass on one rank (before any halving).
        accum_steps: backward passes accumulated into one optimizer step.
        every: measure steps ``every - 1``, ``2·every - 1``, ... (1: every step). None: 1 given
            parameters, :data:`MODULE_EVERY` (8) given a module: a measured step costs roughly a fixed
            0.2-0.3 ms on one CPU core plus a share of its backward pass (the per-example path the most), so
            +0.5-2% at every 8th on steps of tens of ms, but +10-16% on a 0.2-0.6 ms step
            (``benchmarks/monitor_overhead.py``).
        ema_decay: weight of the past per OPTIMIZER step: the reading spans about ``1 / (1 - ema_decay)``
            optimizer steps (100) whatever ``every`` is, and at least about 10 measured steps
            (:func:`~batchtune.stats.noise.decay_per_measured_step`); a sparser cadence reads the same
            steps with fewer measurements, in a wider band. A noise scale that moves within it is read
            at the latest step, flagged ``drifting`` (see :class:`NoiseScaleEstimator`).
        confidence: coverage of the reported band.
        ranks: the data-parallel ranks (a ``DistContext``); None for one process.
        world_size: ranks for a monitor given a module; None reads ``torch.distributed``.
        max_examples: per-example norms on at most this many examples of a measured step
            (module given, one backward pass, one process); None for all.

    Raises:
        TypeError: ``params`` is neither a module nor parameters, or a number is not one (named, with what was
            given).
        ValueError: the sizes cannot give two batch sizes (:meth:`can_measure`), an argument is
            out of range (named), or nothing given is trainable (no parameter requires grad).
    """

    def __init__(self, params: Iterable[torch.nn.Parameter] | torch.nn.Module, *, micro_batch_size: int,
                 accum_steps: int = 1, every: int | None = None, ema_decay: float = 0.99, confidence: float = 0.9,
                 ranks: Ranks | None = None, world_size: int | None = None,
                 max_examples: int | None = None) -> None:
        _check_arguments(micro_batch_size=micro_batch_size, accum_steps=accum_steps, every=every,
                         world_size=world_size, max_examples=max_examples)
        _check_fractions(ema_decay=ema_decay, confidence=confidence)
        params = _checked_params(params)
        _check_trainable(params)
        every = (MODULE_EVERY if isinstance(params, torch.nn.Module) else 1) if every is None else every
        # the estimator checks ema_decay's and confidence's ranges: before any warning of the model's (an outside
        # ema_decay=1.5 gave the coverage warning, then the ValueError)
        self.estimator = NoiseScaleEstimator(ema_decay=decay_per_measured_step(ema_decay, every),
                                             confidence=confidence)
        self._auto: _AutoMeasure | None = None
        if isinstance(params, torch.nn.Module):
            self._auto = _AutoMeasure(params, micro_batch_size, accum_steps, world_size, max_examples)
            _warn_batchnorm(params)
            params, ranks = params.parameters(), None
        world_size = ranks.world_size if ranks is not None and ranks.enabled else 1
        if self._auto is None and not self.can_measure(micro_batch_size, accum_steps, world_size):
            raise ValueError(f"one rank at one accumulation step splits the batch in halves: "
                             f"micro_batch_size={micro_batch_size} must be even and at least 2")
        self.params = [p for p in params if p.requires_grad]
        self.every = every
        self.accum_steps = accum_steps
        self.measured_steps = 0  # steps folded in, including any the estimator skipped as non-finite
        self.last: tuple[float, float] | None = None  # the last step's unbiased (|G|², tr Σ), when finite
        self._ranks = ranks if world_size > 1 else None
        self._norms: MicroBatchGradNorms | None = None
        self._local_sq_norm: float | None = None
        self.steps_seen = 0  # optimizer steps seen by step() of a monitor given a module
        self._folded_at = 0  # ... when the last measured step was folded in
        if self._auto is not None:
            self.batch_sizes = self._auto.batch_sizes
            self._auto.arm_if(self.due(0))
        elif self._ranks is None:
            self.batch_sizes = noise_batch_sizes(micro_batch_size, accum_steps)
        else:
            per_rank = micro_batch_size * accum_steps
            self.batch_sizes = (per_rank, per_rank * world_size)

    def set_batch(self, micro_batch_size: int, accum_steps: int | None = None) -> None:
        """The shape of the steps from now on, when the batch changes mid-run (e.g. on batchtune's schedule).

        Call before the first backward pass of the first step at the new shape. The readings so far stand
        (B_simple is the gradient's, not the batch's); the measured steps from here use the new sizes. Without
        it a micro-batch grown from 32 to 64 read half the truth under accum_steps=4, silently.

        Args:
            micro_batch_size: examples per backward pass on one rank from now on.
            accum_steps: backward passes per optimizer step from now on; None keeps the current.

        Raises:
            ValueError: the sizes are out of range or cannot give two batch sizes (as in the constructor).
        """
        accum_steps = self.accum_steps if accum_steps is None else accum_steps
        _check_arguments(micro_batch_size=micro_batch_size, accum_steps=accum_steps)
        if self._auto is not None:
            old = self._auto
            if (old.micro_batch_size, old.accum_steps) != (micro_batch_size, accum_steps):
                self._auto = _AutoMeasure(old.model, micro_batch_size, accum_steps, old.world_size, old.max_examples,
                                          old._coverage_warned)
                armed = old._armed is not None
                old.disarm()
                self.batch_sizes = self._auto.batch_sizes
                self._auto.arm_if(armed)
        elif self._ranks is None:
            if not self.can_measure(micro_batch_size, accum_steps):
                raise ValueError(f"one rank at one accumulation step splits the batch in halves: "
                                 f"micro_batch_size={micro_batch_size} must be even and at least 2")
            self.batch_sizes = noise_batch_sizes(micro_batch_size, accum_steps)
        else:
            per_rank = micro_batch_size * accum_steps
            self.batch_sizes = (per_rank, per_rank * self._ranks.world_size)
        self.accum_steps = accum_steps

    @staticmethod
    def can_measure(micro_batch_size: int, accum_steps: int, world_size: int = 1) -> bool:
        """Whether a step of this shape gives two batch sizes (halves need an even micro-batch)."""
        return accum_steps > 1 or world_size > 1 or (micro_batch_size % 2 == 0 and micro_batch_size >= 2)

    @property
    def splits_batches(self) -> bool:
        """Whether a measured step must run each batch as two halves (one rank, one accumulation step)."""
        return self._ranks is None and self.accum_steps == 1

    def due(self, step: int) -> bool:
        """Whether ``step`` (counted from 0) is one to measure."""
        return step % self.every == self.every - 1

    def begin(self) -> None:
        """Prepare to measure this step: call before its first backward pass."""
        if self._ranks is None and self._norms is None:
            self._norms = MicroBatchGradNorms(self.params)

    def start_micro_batch(self) -> None:
        """Right before a micro-batch's backward pass (one process only; a no-op across ranks)."""
        if self._norms is not None:
            self._norms.start_micro_batch()

    def end_micro_batch(self, grad_multiplier: float = 1.0) -> None:
        """Right after it: ``grad_multiplier × gradient`` is the micro-batch's mean-loss gradient.

        For a loss divided by ``n`` backward passes and scaled by a GradScaler at ``S``: ``n / S``.
        """
        if self._norms is not None:
            self._norms.end_micro_batch(grad_multiplier)

    def before_reduce(self, grad_multiplier: float = 1.0) -> None:
        """Across ranks: record the ranks' local gradients before they are averaged (a collective)."""
        if self._ranks is not None:
            (self._local_sq_norm,) = self._ranks.mean(_grad_sq_norm(self.params) * grad_multiplier**2)

    def step(self, grad_multiplier: float = 1.0) -> None:
        """Fold the measured step in: after the last backward (and the reduction), before clipping.

        A monitor given a module is called on every optimizer step; it folds in the steps
        it armed for and arms for the next one when that is due.

        Args:
            grad_multiplier: ``m`` such that ``m × .grad`` is the gradient of the step's mean
                loss (``1 / S`` under a GradScaler at scale ``S`` before unscaling).
        """
        if self._auto is not None:
            self._auto_step(grad_multiplier)
            return
        if self._ranks is not None:
            small, self._local_sq_norm = self._local_sq_norm, None
            big = _grad_sq_norm(self.params) * grad_multiplier**2
        else:
            if self._norms is None:
                raise RuntimeError("a monitor given parameters measures the steps it is told about: call begin() "
                                   "before the step's first backward pass, start_micro_batch() and "
                                   "end_micro_batch() around each, then step(); or give it the model "
                                   "(NoiseScaleMonitor(model, ...)) and call only step()")
            norms, self._norms = self._norms, None
            try:  # the hooks go whatever happens: left registered, the next step() repeated this error
                if not norms.micro_batches:
                    raise RuntimeError("step() found no micro-batch recorded since begin(): call start_micro_batch() "
                                       "right before each backward pass and end_micro_batch() right after it (this "
                                       "step is not measured; the hooks are removed)")
                small, big = norms.small_and_big(grad_multiplier=grad_multiplier)
            finally:
                norms.remove()
        self._fold(small, big, self.batch_sizes)

    def _fold(self, small: float, big: float, batch_sizes: tuple[int, int]) -> None:
        self.estimator.update(small, big, *batch_sizes)
        self.measured_steps += 1
        g2, trace_sigma = unbiased_estimates(small, big, *batch_sizes)
        self.last = (g2, trace_sigma) if math.isfinite(g2) and math.isfinite(trace_sigma) else None

    def _auto_step(self, grad_multiplier: float) -> None:
        measured = self._auto.collect(grad_multiplier)
        if measured is not None:
            small, big, batch_sizes = measured
            self._fold(small, big, batch_sizes)
        self.steps_seen += 1
        if measured is not None:
            self._folded_at = self.steps_seen
        self._auto.arm_if(self.due(self.steps_seen))

    def reading(self) -> MonitorReading:
        """The estimate so far (b_simple, low, high, reliable, steps; unreliable before any step).

        ``steps`` counts the measured steps folded in; the EMA weighs those of the last
        ``~1 / (1 - ema_decay)`` optimizer steps (at least ~10 measured steps; :attr:`steps_seen`
        counts optimizer steps for a monitor given a module), and ``drifting`` says the noise scale
        moves, read at the latest step. ``coverage`` is the share of the model's trainable parameters
        the reading measures.
        """
        estimate = self.estimator.estimate()
        return MonitorReading(**{f.name: getattr(estimate, f.name) for f in fields(estimate)
                                 if f.name != "reliable"}, reliable=estimate.reliable and narrow_band(estimate.low,
                                                                                                      estimate.high)
                              and self.coverage >= LOW_COVERAGE and not self.stale, coverage=self.coverage)

    @property
    def stale(self) -> bool:
        """Whether the last measured step folded in lies further back than the reading's horizon (``every /
        (1 - decay per measured step)`` optimizer steps): every step since was skipped, so the reading is of an
        earlier model, and not ``reliable``. An outside loop that grew its batch without :meth:`set_batch` had
        768 steps skipped, with warnings, while ``reading()`` still gave its last value as reliable."""
        horizon = round(self.every / (1.0 - self.estimator.ema_decay))  # 1 / (1 - 0.99) is 99.99999999999991
        return self._auto is not None and self.measured_steps > 0 and self.steps_seen - self._folded_at > horizon

    @property
    def coverage(self) -> float:
        """The share of the trainable parameters (by count) whose gradients the last measured step read
        (before one has, the share it is set to read; ``reading().steps`` says whether any has):
        1.0 but for one micro-batch per step on one process, whose per-example norms cover the
        ``nn.Linear`` (and GPT-2 ``Conv1D``) layers only, not convolutions, embeddings or norms. Hooks go on
        the parameters trainable when a measured step is armed (at the end of the step before it), so a
        parameter unfrozen after that is measured from the next measured step on and lowers this meanwhile."""
        return self._auto.coverage if self._auto is not None else 1.0

    def close(self) -> None:
        """Remove the hooks (after an interrupted step too); idempotent.

        A monitor given a module re-arms at its next :meth:`step` when a measurement is due.
        """
        if self._auto is not None:
            self._auto.disarm()
        if self._norms is not None:
            self._norms.remove()
            self._norms = None


# (name, smallest value, what None means) of the monitor's whole-number arguments
_COUNTS = {"micro_batch_size": (1, None), "accum_steps": (1, None), "every": (1, "the default cadence"),
           "world_size": (1, "torch.distributed's"), "max_examples": (1, "every example"),
           "warn_after": (0, None), "warn_every": (1, None)}  # the last two: the callbacks' NoiseScaleWatch


def _check_arguments(**values: int | None) -> None:
    """A ValueError naming the first whole-number argument (of :data:`_COUNTS`) that is not one or is out of
    range; None stands for the default where one exists. The monitor and the callbacks' watch check at
    construction: max_examples=0 was accepted and crashed in the user's loss.backward() with a reshape error."""
    for name, value in values.items():
        least, none_means = _COUNTS[name]
        if value is None and none_means is not None:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f"{name} must be a whole number, got {value!r} ({type(value).__name__})")
        if value < least:
            default = f" (None: {none_means})" if none_means else ""
            raise ValueError(f"{name} must be >= {least}{default}; found {name}={value}")


def _check_fractions(**values: Any) -> None:
    """A TypeError naming a fraction argument (``ema_decay``, ``confidence``) that is not a real number: ``None``
    raised "'<' not supported between instances of 'float' and 'NoneType'" from the estimator. Their ranges are
    the estimator's to check."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")


def _checked_params(params: Any) -> torch.nn.Module | list[torch.nn.Parameter]:
    """The module, or the parameters as a list; a TypeError naming ``params`` and what it was given where it is
    neither: ``None`` raised "'NoneType' object is not iterable", a state_dict "'str' object has no attribute
    'requires_grad'"."""
    if isinstance(params, torch.nn.Module):
        return params
    wanted = "params must be the model (an nn.Module) or its parameters (model.parameters())"
    if isinstance(params, torch.Tensor):  # iterating a tensor gives its rows, not parameters
        raise TypeError(f"{wanted}, got one {type(params).__name__} of shape {tuple(params.shape)}: pass [it]")
    if isinstance(params, dict):
        raise TypeError(f"{wanted}, got a mapping ({type(params).__name__}, {len(params)} entries): a "
                        "state_dict holds detached tensors, not the parameters trained")
    if isinstance(params, (str, bytes)) or not isinstance(params, Iterable):
        raise TypeError(f"{wanted}, got {_short(params)} ({type(params).__name__})")
    given = list(params)
    for i, p in enumerate(given):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{wanted}: item {i} of those given is {_short(p)} ({type(p).__name__}), not a tensor")
    return given


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_trainable(params: torch.nn.Module | list[torch.nn.Parameter]) -> None:
    """A model with nothing to train has no gradient to measure: it warned "0 backward passes" on every
    measured step (accum_steps >= 2), or said it had no nn.Linear layer of its own (one backward per step)."""
    given = list(params.parameters()) if isinstance(params, torch.nn.Module) else params
    if not any(p.requires_grad for p in given):
        what = (f"the model has no trainable parameters (none of its {len(given)} requires grad)"
                if isinstance(params, torch.nn.Module) else
                f"no trainable parameters among the {len(given)} given (none requires grad)")
        raise ValueError(f"{what}: the noise scale is read from gradients, so there is nothing to measure")


def _grad_sq_norm(params: list[torch.nn.Parameter]) -> float:
    """|g|² over all gradients, summed in float64."""
    total = 0.0
    for p in params:
        if p.grad is not None:
            total += float(p.grad.detach().double().pow(2).sum())
    return total


# ------------------------------------------------------------------ a monitor given a module
class _AutoMeasure:
    """The hooks of a monitor given a module: armed for a measured step, read by its step()."""

    def __init__(self, model: torch.nn.Module, micro_batch_size: int, accum_steps: int,
                 world_size: int | None, max_examples: int | None, coverage_warned: bool = False) -> None:
        if accum_steps < 1 or micro_batch_size < 1:
            raise ValueError(f"accum_steps and micro_batch_size must be >= 1; found {accum_steps=}, "
                             f"{micro_batch_size=}")
        self.model = model
        self.accum_steps = accum_steps
        self.world_size = _world_size() if world_size is None else world_size
        self.per_example = accum_steps == 1 and self.world_size == 1
        self.max_examples = max_examples
        self.micro_batch_size = micro_batch_size
        self._armed: _PassNorms | _PerExampleNorms | None = None
        self._skipped: dict[str, int] = {}  # measured steps skipped, by why
        self._left_out: set[str] = set()  # layers already said to be left out
        self._coverage_warned = coverage_warned  # the low-coverage warning is given once, a new shape's included
        self.coverage = 1.0
        if self.per_example:
            if micro_batch_size < 2:
                raise ValueError(f"per-example norms need at least 2 examples; found {micro_batch_size=}")
            self.layers = _per_example_layers(model)
            if not self.layers:
                raise ValueError("one backward pass per step on one process measures per-example norms of "
                                 "nn.Linear layers, and this model has none whose parameters are its own; "
                                 "use accum_steps >= 2")
            self.names = {m: name or type(m).__name__ for name, m in model.named_modules()}
            self.coverage = _numel(self.layers) / self._trainable_numel()
            self._warn_coverage(stacklevel=4)
            self.batch_sizes = (1, micro_batch_size)
        else:
            self.batch_sizes = (micro_batch_size, micro_batch_size * accum_steps * self.world_size)

    def _trainable_numel(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad) or 1

    def arm_if(self, due: bool) -> None:
        """Register the hooks for the coming step when it is to be measured, on the parameters trainable now
        (frozen or unfrozen mid-run: a hook on a frozen one raised torch's RuntimeError in the user's loop)."""
        if due and self._armed is None and self.per_example:
            self.layers = _per_example_layers(self.model)
            self._armed = _PerExampleNorms(self.layers, self.max_examples, self.micro_batch_size, self.names)
        elif due and self._armed is None:
            self._armed = _PassNorms([p for p in self.model.parameters() if p.requires_grad], self.model,
                                     self.micro_batch_size, self.accum_steps)

    def disarm(self) -> None:
        if self._armed is not None:
            self._armed.remove()
            self._armed = None

    def collect(self, grad_multiplier: float) -> tuple[float, float, tuple[int, int]] | None:
        """(s_small, s_big, batch sizes) of the step just run, or None when it was not measured."""
        armed, self._armed = self._armed, None
        if armed is None:
            return None
        armed.remove()
        problem = armed.problem(self.accum_steps)
        if isinstance(armed, _PerExampleNorms) and not armed.ran_twice:  # else the other run's shapes may be
            self._warn_left_out(armed.all_left_out, bool(armed.read))    # another batch's (a validation's)
        if problem is not None:
            self._warn_skipped(problem)
            return None
        m2 = grad_multiplier * grad_multiplier
        if isinstance(armed, _PerExampleNorms):
            small, big, batch = armed.small_and_big()
            self.coverage = _numel(list(armed.read)) / self._trainable_numel()
            self._warn_coverage(stacklevel=5, observed=True)
            return small * m2, big * m2, (1, batch)
        small = armed.total() / self.accum_steps * self.accum_steps**2  # each pass's loss was / accum_steps
        self.coverage = sum(p.numel() for p in armed.params if p.requires_grad) / self._trainable_numel()
        # one process: .grad as the last backward left it, so clipping before step() does no harm;
        # across ranks .grad is all-reduced only after backward: step() must come before clipping
        big = armed.last_pass_sq_norm() if self.world_size == 1 else _blocked_grad_sq_norm(armed.params)
        return small * m2, big * m2, self.batch_sizes

    def _warn_skipped(self, problem: str) -> None:
        """Warn on the first skipped step, then every SKIP_WARN_EVERY-th while it persists (not every step)."""
        n = self._skipped[problem] = self._skipped.get(problem, 0) + 1
        if n == 1 or n % SKIP_WARN_EVERY == 0:
            warnings.warn(f"noise scale: a measured step was skipped: {problem} ({n} measured step"
                          f"{'s' if n > 1 else ''} skipped for this so far; warned again every {SKIP_WARN_EVERY})",
                          RuntimeWarning, stacklevel=5)

    def _warn_left_out(self, left_out: dict[str, str], others: bool = True) -> None:
        """Say once for each layer that the per-example norms leave it out, and why (``others``: whether the step
        read any other layer; a one-layer model's smaller last batch was said to leave 'the other layers')."""
        new = {name: why for name, why in left_out.items() if name not in self._left_out}
        if new:
            self._left_out |= set(new)
            listed = "; ".join(f"{name!r}: {why}" for name, why in list(new.items())[:5])
            more = f"; and {len(new) - 5} more" if len(new) > 5 else ""
            covers = ("the reading covers the other layers (reading().coverage)" if others else
                      "no other layer was read, so the step is skipped")
            warnings.warn(f"noise scale: left out of the per-example norms (warned once per layer): {listed}{more}; "
                          f"{covers}, or use accum_steps >= 2, which needs no example axis",
                          RuntimeWarning, stacklevel=5)

    def _warn_coverage(self, stacklevel: int, observed: bool = False) -> None:
        """Warn once when the per-example norms cover under :data:`LOW_COVERAGE` of the parameters: at construction
        from the layers set to be read, and on a measured step from those it read (``observed``). An outside ViT's
        layers that never ran (an ``nn.Linear`` whose weight the model uses directly) took it from 0.55 at
        construction to 0.44 measured, unwarned."""
        if self.coverage >= LOW_COVERAGE or self._coverage_warned:
            return
        self._coverage_warned = True
        read = ("a measured step read per-example norms of nn.Linear layers holding only" if observed else
                "one micro-batch per step on one process measures per-example norms of the nn.Linear layers only,")
        unread = (" (a layer whose weight the model applies itself, one left out, or one frozen when the step was "
                  "armed gives none)" if observed else "")
        warnings.warn(f"noise scale: {read} {self.coverage:.0%} of the model's trainable parameters{unread}: B_simple "
                      "is theirs (reading().coverage); accum_steps >= 2 measures them all", RuntimeWarning,
                      stacklevel=stacklevel)


def _numel(layers: list[torch.nn.Module]) -> int:
    return sum(p.numel() for layer in layers for p in layer.parameters() if p.requires_grad)


class _PassNorms:
    """Each backward pass's own squared gradient norm, summed over passes and parameters."""

    def __init__(self, params: list[torch.nn.Parameter], model: torch.nn.Module, micro_batch_size: int,
                 accum_steps: int = 1) -> None:
        self.params = params
        self.micro_batch_size = micro_batch_size
        self.accum_steps = accum_steps  # |.grad|² is read after the last pass only (a step of fewer is skipped)
        self.unsized_input: list[int] | None = None  # a model input with no axis of the micro-batch's size
        self._pending: list[int] | None = None  # the last forward's input, where unsized: counts once backpropagated
        self._norms: list[torch.Tensor] = []
        self._calls = [0] * len(params)
        self._accumulated: dict[int, torch.Tensor] = {}  # |.grad|² after each parameter's latest pass
        self._handles = [p.register_hook(self._hook(i)) for i, p in enumerate(params)]
        self._handles += [p.register_post_accumulate_grad_hook(self._after(i)) for i, p in enumerate(params)]
        self._handles.append(model.register_forward_pre_hook(self._check_input, with_kwargs=True))

    def _check_input(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        """Keep the model's first tensor input's shape when no axis has the micro-batch's size: the batch changed
        size (a grown batch read B_simple x old/new, silently) or a last batch is smaller. It counts once a
        backward pass follows (:meth:`_hook`): a validation forward with grad enabled on another batch size,
        never backpropagated, had every measured step skipped, blamed on the batch size."""
        first = next((t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and t.dim() > 0), None)
        unsized = torch.is_grad_enabled() and first is not None and self.micro_batch_size not in first.shape
        self._pending = list(first.shape) if unsized else None

    def _hook(self, index: int):
        def record(grad: torch.Tensor) -> None:
            self._norms.append(_sq_norm(grad))
            self._calls[index] += 1
            if self._pending is not None:  # this pass is of the last forward's graph, whose input was unsized
                self.unsized_input = self.unsized_input or self._pending
        return record

    def _after(self, index: int):
        def record(param: torch.nn.Parameter) -> None:  # each pass's would be read: a quarter of the cost at 8 x 4
            if self._calls[index] >= self.accum_steps:  # (its tensor hook counted this pass already)
                self._accumulated[index] = _sq_norm(param.grad)
        return record

    def last_pass_sq_norm(self) -> float:
        """|.grad|² as the last backward pass left it (before any clipping), float64."""
        return float(_sum(list(self._accumulated.values()))) if self._accumulated else 0.0

    def problem(self, accum_steps: int) -> str | None:
        passes = max(self._calls, default=0)
        if passes != accum_steps:
            return f"{passes} backward passes for accum_steps={accum_steps}"
        if self.unsized_input is not None:
            return (f"no axis of the model's input {self.unsized_input} has micro_batch_size={self.micro_batch_size} "
                    "(a smaller last batch, or a batch that changed size: tell the monitor with set_batch())")
        return None

    def total(self) -> float:
        """Σ over passes of |g_pass|², in float64 (tensor hooks see a parameter once per pass)."""
        return float(_sum(self._norms)) if self._norms else 0.0

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class _PerExampleNorms:
    """Per-example squared gradient norms of nn.Linear layers, from inputs and output gradients.

    A layer's output gradient row ``δ_n`` and input row ``a_n`` give example n's weight
    gradient ``δ_nᵀa_n``; for sequences its squared norm is taken from whichever is smaller, the
    time-by-time Gram form or that gradient itself (:func:`_linear_per_example_sq_norms`).
    ``.grad`` is the sum of the per-example contributions whatever the loss's reduction, so
    ``N²·mean_n |c_n|²`` against ``|.grad|²`` are the norms at batch sizes 1 and N.

    The examples lie on the input's one axis of the micro-batch's size: dim 0 for ``(B, C)`` and
    ``(B, T, C)``, dim 1 for the time-first ``(T, B, C)`` of ``batch_first=False`` layers. A layer
    whose input has no such axis, or several (T == B), is left out (:attr:`left_out` says why):
    reading it on the wrong axis would give a wrong number (B_simple near 1).
    """

    def __init__(self, layers: list[torch.nn.Linear], max_examples: int | None, micro_batch_size: int,
                 names: dict[torch.nn.Module, str] | None = None) -> None:
        self.layers = layers
        self.max_examples = max_examples
        self.micro_batch_size = micro_batch_size
        self.names = names or {}
        self.left_out: dict[str, str] = {}  # layer name: why its examples could not be told apart
        self._unread: set[torch.nn.Linear] = set()
        self._calls: dict[torch.nn.Linear, int] = {}
        self._per_example: dict[torch.nn.Linear, torch.Tensor] = {}
        self._accumulated: dict[torch.nn.Parameter, torch.Tensor] = {}  # |.grad|² before any clipping
        self._handles = [layer.register_forward_hook(self._forward) for layer in layers]
        self._handles += [p.register_post_accumulate_grad_hook(self._after) for layer in layers
                          for p in layer.parameters() if p.requires_grad]

    @property
    def read(self) -> list[torch.nn.Linear]:
        """The layers whose per-example norms the step gave."""
        return list(self._per_example)

    @property
    def all_left_out(self) -> dict[str, str]:
        """:attr:`left_out`, and the layers that ran forward but got no output gradient while others did: their
        output does not feed the loss (an auxiliary head kept for later). Such a layer made every measured step
        be skipped ("no nn.Linear layer ran forward and backward"); it is left out as one that never ran."""
        if not self._per_example:
            return dict(self.left_out)  # no backward reached any layer: the step is skipped, not these blamed
        unused = [m for m in self._calls if m not in self._unread and m not in self._per_example]
        return {**self.left_out, **{self._name(m): "ran forward, but no gradient reached its output (the output "
                                    "does not feed the loss)" for m in unused}}

    @property
    def ran_twice(self) -> list[str]:
        """The layers that ran forward with grad enabled more than once in the step."""
        return [self._name(m) for m, calls in self._calls.items() if calls > 1]

    def _name(self, module: torch.nn.Module) -> str:
        return self.names.get(module, type(module).__name__)

    def _after(self, param: torch.nn.Parameter) -> None:
        self._accumulated[param] = _sq_norm(param.grad)

    def _forward(self, module: torch.nn.Linear, inputs: tuple, output: torch.Tensor) -> None:
        if not (torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad):
            return
        if module in self._calls and _in_backward():
            return  # activation checkpointing recomputes the forward inside backward: the step's own one stands
        self._calls[module] = self._calls.get(module, 0) + 1  # (reentrant checkpointing's first is without grad)
        a, has_bias = inputs[0].detach(), module.bias is not None and module.bias.requires_grad
        axis, why = _example_axis(tuple(a.shape), self.micro_batch_size)
        if axis is None:
            self.left_out[self._name(module)] = why
            self._unread.add(module)
            return

        def record(grad: torch.Tensor) -> None:
            self._per_example[module] = _linear_per_example_sq_norms(a.movedim(axis, 0), grad.movedim(axis, 0),
                                                                     has_bias, self.max_examples)
        output.register_hook(record)

    def problem(self, accum_steps: int) -> str | None:
        """Why the step cannot be read: a layer run twice, or no layer read.

        Layers whose forward never ran (e.g. ``nn.MultiheadAttention.out_proj``, whose weight
        the attention uses directly) are left out of both norms, as are those in :attr:`all_left_out`
        (no example axis, or an output that does not feed the loss).
        """
        if self.ran_twice:
            layers = f"layer{'s' if len(self.ran_twice) > 1 else ''} {', '.join(map(repr, self.ran_twice))}"
            return (f"{layers} ran forward more than once with grad enabled in the step, where one micro-batch per "
                    "step needs one forward and one backward: backward passes accumulated but not declared (give "
                    "accum_steps= the passes per optimizer step), a forward with grad enabled outside the step "
                    "(e.g. validation without torch.no_grad()), or a layer applied twice in the model")
        if not self._per_example and self.left_out:
            return "no nn.Linear layer's examples could be told apart (see the warning on the layers left out)"
        if not self._per_example:
            return "no nn.Linear layer ran forward and backward in the step"
        return None

    def small_and_big(self) -> tuple[float, float, int]:
        batch = self.micro_batch_size
        per_example = torch.stack(list(self._per_example.values())).sum(0)
        small = float(per_example.mean()) * batch * batch
        params = [p for layer in self._per_example for p in layer.parameters() if p.requires_grad]
        big = float(_sum([self._accumulated[p] for p in params if p in self._accumulated]))
        return small, big, batch

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _in_backward() -> bool:
    """Whether autograd is running a backward node now (where checkpointing re-runs forwards)."""
    current = getattr(torch._C, "_current_autograd_node", None)
    return current is not None and current() is not None


def _example_axis(shape: tuple[int, ...], micro_batch_size: int) -> tuple[int | None, str]:
    """The input's example axis: dim 0 where it has the micro-batch's size (batch-first, the convention of
    everything but the recurrent and transformer modules' ``batch_first=False``; a batch-first language
    model whose sequence length equals its micro-batch got no reading at all when a tie was left out), else
    the one other axis but the last (the features) of that size (time-first ``(T, B, C)``); else None and
    why. A time-first layout with T == B is read on dim 0, wrongly: give it ``accum_steps`` >= 2."""
    matches = [d for d in range(len(shape) - 1) if shape[d] == micro_batch_size]
    if matches and (matches[0] == 0 or len(matches) == 1):
        return matches[0], ""
    if matches:
        return None, (f"axes {', '.join(map(str, matches))} of its input {list(shape)} all have the micro-batch size "
                      f"{micro_batch_size}, so which one holds the examples is ambiguous")
    return None, (f"no axis of its input {list(shape)} has the micro-batch size {micro_batch_size} (examples "
                  "flattened with another axis, a smaller last batch, or a batch that changed size: "
                  "tell the monitor with set_batch())")


def _linear_per_example_sq_norms(a: torch.Tensor, grad: torch.Tensor, has_bias: bool,
                                 max_examples: int | None) -> torch.Tensor:
    """Σ over the layer's parameters of each example's squared gradient norm, float64, shape (m,).

    Per example, the weight's squared norm is the Gram form over time steps (T² elements) or the
    per-example gradient itself (d_out·d_in), whichever is smaller; chunks of examples keep the
    extra memory near :data:`PER_EXAMPLE_CHUNK_ELEMENTS` (the Gram form alone was O(m·T²): +775 MiB at T=4096).
    """
    if a.dim() == 1:
        a, grad = a[None], grad[None]
    m = a.shape[0] if max_examples is None else min(a.shape[0], max_examples)
    a = a[:m].reshape(m, -1, a.shape[-1])
    g = grad.detach()[:m].reshape(m, -1, grad.shape[-1])
    steps, per_example = a.shape[1], min(a.shape[1] ** 2, a.shape[2] * g.shape[2])
    chunk = max(1, PER_EXAMPLE_CHUNK_ELEMENTS // per_example)
    parts = []
    for i in range(0, m, chunk):
        a_i, g_i = a[i:i + chunk].float(), g[i:i + chunk].float()
        if steps == 1:
            sq = a_i.square().sum((1, 2)) * g_i.square().sum((1, 2))
        elif steps * steps > a.shape[2] * g.shape[2]:  # the per-example gradients Σ_t δ_t a_tᵀ are smaller
            sq = (g_i.transpose(1, 2) @ a_i).square().sum((1, 2))
        else:  # |Σ_t δ_t a_tᵀ|² = Σ_ts (a_t·a_s)(δ_t·δ_s)
            sq = (a_i @ a_i.transpose(1, 2) * (g_i @ g_i.transpose(1, 2))).sum((1, 2))
        if has_bias:
            sq = sq + g_i.sum(1).square().sum(1)
        parts.append(sq.double())
    return torch.cat(parts)


def _per_example_layers(model: torch.nn.Module) -> list[torch.nn.Linear]:
    """The nn.Linear layers with trainable weights that no other module shares (a tied weight's
    gradient has contributions the layer's hooks cannot see), but for those whose forward never runs:
    ``nn.MultiheadAttention.out_proj``, whose weight the attention applies itself (counted, it put an outside
    ViT's coverage at 0.55 where every measured step read 0.44)."""
    owners: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    never_run = {id(m.out_proj) for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention)
                 and type(m).forward is torch.nn.MultiheadAttention.forward}
    return [m for m in model.modules() if _linear_like(m) and m.weight.requires_grad and id(m) not in never_run
            and all(owners[id(p)] == 1 for p in m.parameters(recurse=False))]


def _linear_like(module: torch.nn.Module) -> bool:
    """nn.Linear, or transformers' Conv1D (GPT-2's ``x @ W + b``, the weight stored transposed:
    the per-example norms from input and output gradient are the same)."""
    return isinstance(module, torch.nn.Linear) or (type(module).__name__ == "Conv1D" and hasattr(module, "nf"))


def _blocked_grad_sq_norm(params: Iterable[torch.nn.Parameter]) -> float:
    """|g|² over all gradients: float32 blocks summed in float64 (see ``MicroBatchGradNorms``)."""
    norms = [_sq_norm(p.grad) for p in params if p.grad is not None]
    return float(_sum(norms)) if norms else 0.0


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
