"""Adapters that run :class:`~batchtune.monitor.NoiseScaleMonitor` inside the loops people use.

* :mod:`batchtune.integrations.huggingface`: ``NoiseScaleCallback``, a transformers
  ``TrainerCallback`` (``pip install "batchtune[hf]"``).
* :mod:`batchtune.integrations.lightning`: ``NoiseScaleCallback``, a Lightning ``Callback``
  (``pip install "batchtune[lightning]"``).

Both are thin over :class:`NoiseScaleWatch`, which this package defines without importing
either library (nothing in batchtune's core imports this package). The watch keeps the
readings (``history``) and warns, through ``logging`` on rank zero, when the global batch is
clearly above the current critical-batch estimate (more than 20% above it and above its band),
when it has stayed well below it (the band's lower end over twice the batch, several readings in
a row), when no reading has been possible for several measured steps, and (given a ``schedule`` from
``batchtune plan``) when the schedule says it is time to grow the batch; while the schedule says so, the
schedule the user chose governs and the batch warnings are held back. The batch warnings follow the
reading: once its condition clears, the watch says so (info) and warns again at once if it recurs.
B_simple stands in for the critical
batch here: McCandlish et al. find B_crit ≈ B_simple up to a factor of a few (B_noise's
Hessian weighting), so the warning says "you are likely past the point of diminishing
returns", not a measured B_crit (``batchtune sweep`` measures that). Under an adaptive optimizer it is not even
that (:meth:`NoiseScaleWatch.judge_optimizer`): there the batch warnings wait for a measured ``critical_ratio``.
"""

from __future__ import annotations

import logging
import math
from typing import Any

__all__ = ["OVER_CRITICAL", "UNDER_CRITICAL", "UNDER_READINGS", "UNRESOLVED_AFTER", "NoiseScaleWatch"]

OVER_CRITICAL = 1.2  # warn when the batch exceeds the estimate by more than 20% (and its band)
UNDER_CRITICAL = 2.0  # advise a larger batch when the band's lower end exceeds the batch this many times ...
UNDER_READINGS = 3  # ... on this many reliable readings in a row (one reading is noise)
UNRESOLVED_AFTER = 5  # say why there is no reading after this many measured steps in a row without one

log = logging.getLogger(__name__)


def require(module: str, extra: str) -> Any:
    """Import ``module`` or raise an ImportError that names batchtune's extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"batchtune.integrations needs {module!r}: pip install \"batchtune[{extra}]\"") from error


class NoiseScaleWatch:
    """A monitor, the readings it gave and the warnings on them, for one training run.

    Args:
        every: measure every n-th optimizer step (None: the monitor's default for a module, 8).
        ema_decay: smoothing of the estimate, per optimizer step: about ``1 / (1 - ema_decay)`` optimizer steps
            whatever ``every`` is (see ``NoiseScaleMonitor``).
        confidence: coverage of the band (0.9: the 90% band ``low``..``high``).
        warn_after: measured steps before a reading may warn (early readings are noisy).
        warn_every: optimizer steps between repeated warnings while their condition lasts (a batch too big,
            too small, or no reading).
        max_examples: per-example norms on at most this many examples (one backward per step).
        schedule: a :class:`~batchtune.schedule.BatchSchedule` (or its file, from ``batchtune plan
            --schedule-out``): warn when the samples seen pass a stage that grows the batch and
            this run has not grown.
        critical_ratio: the critical batch over B_simple, measured (``1 / critical_batch_size.ratio`` of a
            ``batchtune sweep`` JSON at your target): the batch warnings then compare the batch with this
            multiple of B_simple. Without it they compare with B_simple itself, and are held back under an
            adaptive optimizer (:meth:`judge_optimizer`), where B_simple is not the critical batch.

    Raises:
        ValueError: an argument out of range, named (checked here: ``every=0`` used to be accepted and
            only log "not measured" when training began).
        SpecError: the schedule file has problems (:meth:`~batchtune.schedule.BatchSchedule.load`).
    """

    def __init__(self, *, every: int | None = None, ema_decay: float = 0.99, confidence: float = 0.9,
                 warn_after: int = 10, warn_every: int = 1000, max_examples: int | None = None,
                 schedule: Any = None, critical_ratio: float | None = None) -> None:
        from batchtune.monitor import _check_arguments
        from batchtune.stats.noise import NoiseScaleEstimator

        _check_arguments(every=every, max_examples=max_examples, warn_after=warn_after, warn_every=warn_every)
        if critical_ratio is not None and not (isinstance(critical_ratio, (int, float))
                                               and not isinstance(critical_ratio, bool)
                                               and math.isfinite(critical_ratio) and critical_ratio > 0):
            raise ValueError(f"critical_ratio must be a positive number, the critical batch over B_simple; found "
                             f"critical_ratio={critical_ratio!r}")
        self.critical_ratio = critical_ratio
        self.optimizer_family: tuple[str, str] | None = None  # (sgd, adaptive or unknown; the evidence), once judged
        NoiseScaleEstimator(ema_decay=ema_decay, confidence=confidence)  # raises naming either when out of range
        self.options = {"every": every, "ema_decay": ema_decay, "confidence": confidence,
                        "max_examples": max_examples}
        self.warn_after = warn_after
        self.warn_every = warn_every
        self.history: list[dict[str, float | int | None]] = []
        self.warnings: list[int] = []  # optimizer steps at which the batch warning was logged
        self.below_warnings: list[int] = []  # ... the advice that a larger batch would take fewer steps
        self.unresolved_warnings: list[int] = []  # ... that no reading was possible for a while
        self.grow_warnings: list[int] = []  # ... and the schedule's time-to-grow warning
        self.unjudged_warnings: list[int] = []  # ... that readings above the batch's estimate are too wide to warn on
        self._above = False  # the batch warning was given and its condition has not cleared since
        self._below = False  # ... the larger-batch advice
        self._below_streak = 0  # reliable readings in a row whose band lies above UNDER_CRITICAL x the batch
        self._unjudged_streak = 0  # readings in a row with the batch past the estimate but inside the band
        self._unresolved_streak = 0  # measured steps in a row with no reading
        self.monitor = None
        self.batch_size = 0
        self.samples = 0  # samples seen, counted at this run's batch
        self.step_start_samples = 0  # ... before the step just run: the schedule's stage is that sample's
        if schedule is not None and not hasattr(schedule, "batch_size_at"):
            from batchtune.schedule import BatchSchedule

            schedule = BatchSchedule.load(schedule)
        self.schedule = schedule

    def start(self, model: Any, *, micro_batch_size: int, accum_steps: int, world_size: int) -> None:
        """Attach a fresh monitor to ``model`` (before its first backward pass).

        A model the monitor cannot measure logs a warning and trains unmeasured.
        """
        from batchtune.monitor import NoiseScaleMonitor

        self.close()
        self.batch_size = micro_batch_size * accum_steps * world_size
        # a second run (trainer.train() again) is watched anew: the first run's armed warnings, counted in its own
        # steps, had held the second's back (its steps restart below the last warning's); history stays whole
        self._above = self._below = False
        self._below_streak = self._unresolved_streak = self._unjudged_streak = 0
        self.optimizer_family = None  # judged anew: another run may train with another optimizer
        try:
            self.monitor = NoiseScaleMonitor(model, micro_batch_size=micro_batch_size, accum_steps=accum_steps,
                                             world_size=world_size, **self.options)
        except ValueError as error:  # e.g. one backward per step and no Linear layer of its own
            self.monitor = None
            log.warning("noise scale not measured in this run: %s", error)

    def judge_optimizer(self, optimizer: Any, *, rank_zero: bool = True) -> None:
        """Judge the run's optimizer once (the callbacks call this at its first step): under an adaptive one
        (Adam-like, :func:`~batchtune.engine.optimizer.built_optimizer_family`) and without ``critical_ratio``,
        the batch warnings are held back, and it says so once. The simple noise scale is SGD's critical batch;
        under Adam it is not: on batchtune's AdamW ground truths it read 0.06-0.2x the critical batch that steps
        to target measure, so a Trainer at the fastest batch was told it was past the point of diminishing
        returns. The readings are logged all the same."""
        if self.optimizer_family is not None or optimizer is None:
            return
        from batchtune.engine.optimizer import built_optimizer_family

        self.optimizer_family = built_optimizer_family(optimizer)
        if self._held() and rank_zero:
            log.warning("noise scale: no batch warnings in this run: %s, an adaptive optimizer, under which the "
                        "simple noise scale B_simple is not the critical batch (on batchtune's AdamW ground truths it "
                        "read 0.06-0.2x the critical batch that steps to target measure; on a character LM "
                        "1.5-2.5x); the readings are logged as before. To be warned, give critical_ratio=, the "
                        "critical batch over B_simple measured at your loss (1 / critical_batch_size.ratio in a "
                        "`batchtune sweep --format json` result)", self.optimizer_family[1])

    def _held(self) -> bool:
        """Whether the batch warnings are held back: an adaptive optimizer and no measured ``critical_ratio``."""
        return self.critical_ratio is None and (self.optimizer_family or ("",))[0] == "adaptive"

    def reshape(self, *, micro_batch_size: int, accum_steps: int, world_size: int) -> None:
        """The coming step's shape, when it may differ from the last (a growing batch, an accumulation schedule).

        A shape the monitor cannot measure logs a warning, and the run goes on unmeasured.
        """
        self.batch_size = micro_batch_size * accum_steps * world_size
        if self.monitor is None:
            return
        try:
            self.monitor.set_batch(micro_batch_size, accum_steps)
        except ValueError as error:
            self.close()
            self.monitor = None
            log.warning("noise scale no longer measured in this run: %s", error)

    def step(self, global_step: int, *, rank_zero: bool = True, samples: int | None = None) -> dict[str, float] | None:
        """Call after the last backward of an optimizer step; the logs of a measured step, else None.

        The logs hold ``noise_scale/b_simple``, ``/low`` and ``/high``, each only when finite (an unbounded
        band has no ``high``), with ``noise_scale/reliable`` (1.0 where the reading is, :class:`MonitorReading`'s
        ``reliable``), and ``noise_scale/resolved``: 1.0 with a reading, 0.0 without one, when the
        measured steps' mean |G|² is not above zero (the gradient's noise swamps its mean). :attr:`history`
        keeps every value, such an entry with ``b_simple`` None. An outside Trainer's readings vanished from
        its logs for over half a run, unsaid: after :data:`UNRESOLVED_AFTER` such steps in a row the watch says
        why (:meth:`_note_resolution`), and ``resolved`` keeps the series from vanishing.

        Args:
            global_step: the optimizer step just computed, counted from 1.
            rank_zero: whether this process logs (warnings only on rank zero).
            samples: the examples the step took over all ranks, where counted; None: the shape's batch size.
        """
        self.step_start_samples = self.samples
        self.samples += self.batch_size if samples is None else samples
        if self.schedule is not None and rank_zero:
            self._maybe_grow(global_step)
        if self.monitor is None:
            return None
        measured = self.monitor.measured_steps
        self.monitor.step()
        reading = self.monitor.reading()
        if self.monitor.measured_steps == measured:
            return None
        entry = {"step": global_step, "b_simple": reading.b_simple, "low": reading.low, "high": reading.high,
                 "measured_steps": reading.steps, "batch_size": self.batch_size, "reliable": reading.reliable,
                 "coverage": reading.coverage}
        self.history.append(entry)
        if rank_zero:
            self._note_resolution(entry)
        if rank_zero and reading.b_simple is not None:
            self._maybe_warn(entry)
        # an unbounded band's high end (inf) stays out of the logs: it read as a number in log_history and broke plots
        logs = {f"noise_scale/{key}": float(entry[key]) for key in ("b_simple", "low", "high")
                if entry[key] is not None and math.isfinite(entry[key])}
        if entry["b_simple"] is not None:  # dashboards filter on it: early readings of 935 and 74,279 set one's axis
            logs["noise_scale/reliable"] = float(entry["reliable"])
        return {**logs, "noise_scale/resolved": float(entry["b_simple"] is not None)}

    def _maybe_warn(self, entry: dict[str, Any]) -> None:
        """The batch warnings on a reading, never while the run follows a schedule (:meth:`_on_schedule`) or the
        schedule says grow: the schedule the user chose governs; its grow warning mentions the estimate. A band
        unbounded above (not ``reliable``) never says the batch is too big, but its lower end still says it is
        too small: an outside GPT-2 run's band read 70-inf ... 152-inf at batch 32 for its last 100 steps."""
        if self._held() or self._schedule_ahead() is not None or self._on_schedule():
            return
        entry = self._scaled(entry)
        self._watch_above(entry)
        self._watch_unjudged(entry)
        self._watch_below(entry)

    def _watch_above(self, entry: dict[str, Any]) -> None:
        """Warn that the batch is past the critical-batch estimate: more than 20% above B_simple and above its
        band's upper end (a band holding the batch is no evidence); again every ``warn_every`` steps while it
        stays so. Once the batch is no longer more than 20% above, say so and re-arm: an outside GPT-2 run was
        warned at step 22 that 32 was 74% above B_simple=18.38, which then grew to 368, unsaid."""
        if self._above and self.batch_size <= OVER_CRITICAL * entry["b_simple"]:
            self._above = False
            log.info("step %d: batch %d is no longer more than 20%% above %s (%s band %.4g-%.4g): the "
                     "smaller-batch warning no longer holds (it is given again if the batch is clearly above once "
                     "more)", entry["step"], self.batch_size, self._named(entry), self._band_name(), entry["low"],
                     entry["high"])
            return
        due = not self._above or entry["step"] - self.warnings[-1] >= self.warn_every
        if not (self._clearly_above(entry) and due and entry["measured_steps"] >= self.warn_after):
            return
        self._above = True
        self.warnings.append(entry["step"])
        log.warning("step %d: batch %d is %.0f%% above %s and above its %s band (%.4g-%.4g)%s; a smaller batch would "
                    "likely reach the loss in fewer samples", entry["step"], self.batch_size,
                    (self.batch_size / entry["b_simple"] - 1) * 100, self._named(entry), self._band_name(),
                    entry["low"], entry["high"], "" if self.critical_ratio else ", the critical-batch estimate")

    def _watch_unjudged(self, entry: dict[str, Any]) -> None:
        """Say why no smaller-batch warning comes where the batch is past the estimate but inside its band, for
        :data:`UNRESOLVED_AFTER` readings in a row; again every ``warn_every`` steps while it lasts. An outside
        batch-1024 run read B_simple 138-205 (x1.7, its critical_ratio) with bands open above for 150 steps at
        every=8, and said nothing, where check called 1024 4.6x its critical batch; every=1 warned at step 20."""
        past = self.batch_size > OVER_CRITICAL * entry["b_simple"] and not self._clearly_above(entry)
        self._unjudged_streak = self._unjudged_streak + 1 if past else 0
        streak = self._unjudged_streak
        due = self._streak_due(streak, self.unjudged_warnings, entry["step"])
        if not due or entry["measured_steps"] < self.warn_after:
            return
        self.unjudged_warnings.append(entry["step"])
        log.warning("step %d: batch %d is %.0f%% above %s, but its %s band (%.4g-%.4g) has held the batch for %d "
                    "readings: too wide to say it is too big; measure every step (every=1), accumulate more backward "
                    "passes per step, or read over a longer window (ema_decay nearer 1) to narrow it",
                    entry["step"], self.batch_size, (self.batch_size / entry["b_simple"] - 1) * 100,
                    self._named(entry), self._band_name(), entry["low"], entry["high"], streak)

    def _watch_below(self, entry: dict[str, Any]) -> None:
        """Advise a larger batch when the band's lower end has stayed above twice the batch for
        :data:`UNDER_READINGS` readings in a row; again every ``warn_every`` steps while it does. Once B_simple
        itself is no more than twice the batch, say so and re-arm."""
        below = entry["low"] > UNDER_CRITICAL * self.batch_size
        self._below_streak = self._below_streak + 1 if below else 0
        if self._below and entry["b_simple"] <= UNDER_CRITICAL * self.batch_size:
            self._below = False
            log.info("step %d: %s is no longer well above batch %d: the larger-batch advice no longer holds",
                     entry["step"], self._named(entry), self.batch_size)
            return
        due = not self._below or entry["step"] - self.below_warnings[-1] >= self.warn_every
        if not (self._below_streak >= UNDER_READINGS and due and entry["measured_steps"] >= self.warn_after):
            return
        self._below = True
        self.below_warnings.append(entry["step"])
        # an unreliable reading's own value may be an outlier (an outside run's 1,817 among readings of 80-160):
        # the band's lower end, which the advice rests on, is the size to grow to; and a gradient near zero (a model
        # that stopped learning) reads a large B_simple too (an outside collapsed run was told to grow)
        up_to = entry["b_simple"] if entry["reliable"] else entry["low"]
        unsure = ("" if entry["reliable"] else "; the readings are not reliable (a band open above or over 10x "
                  "wide), and a gradient near zero, as in a model that has stopped learning, reads a large B_simple "
                  "too: check that the loss still falls")
        log.warning("step %d: batch %d is well below %s: its %s band (%.4g-%.4g) has stayed above %gx the batch "
                    "for %d readings. %s estimates the critical batch, so a larger batch (up to about %.4g) would "
                    "likely reach the loss in fewer steps at little extra cost in samples%s", entry["step"],
                    self.batch_size, self._named(entry), self._band_name(), entry["low"], entry["high"],
                    UNDER_CRITICAL, self._below_streak, "It" if self.critical_ratio else "B_simple", up_to, unsure)

    def _note_resolution(self, entry: dict[str, Any]) -> None:
        """Say why there is no reading once :data:`UNRESOLVED_AFTER` measured steps in a row gave none, then every
        ``warn_every`` steps while none comes; once one does, say so and re-arm."""
        if entry["b_simple"] is not None:
            if self._unresolved_streak >= UNRESOLVED_AFTER:
                log.info("step %d: the noise scale is read again (B_simple=%.4g) after %d measured steps without a "
                         "reading", entry["step"], entry["b_simple"], self._unresolved_streak)
            self._unresolved_streak = 0
            return
        self._unresolved_streak += 1
        streak = self._unresolved_streak
        due = self._streak_due(streak, self.unresolved_warnings, entry["step"])
        if not due:
            return
        self.unresolved_warnings.append(entry["step"])
        every = getattr(self.monitor, "every", None)
        log.warning("step %d: noise scale: no reading for the last %d measured steps (noise_scale/resolved 0): the "
                    "gradient's mean |G|^2 is not resolved against its noise at batch %d and every=%s; "
                    "measure every step (every=1), accumulate more backward passes per step, or average over a "
                    "longer window (ema_decay nearer 1)", entry["step"], streak, self.batch_size, every)

    def _streak_due(self, streak: int, said: list[int], step: int) -> bool:
        """Whether a condition that has held for ``streak`` readings is to be said at ``step``: once it reaches
        :data:`UNRESOLVED_AFTER`, then every ``warn_every`` steps after the last time (``said``)."""
        return streak == UNRESOLVED_AFTER or (streak > UNRESOLVED_AFTER and step - said[-1] >= self.warn_every)

    def _maybe_grow(self, step: int) -> None:
        stage = self._schedule_ahead()
        due = not self.grow_warnings or step - self.grow_warnings[-1] >= self.warn_every
        if stage is None or not due:
            return
        self.grow_warnings.append(step)
        latest = self._scaled(self.history[-1]) if self.history else None
        estimate = ""
        if latest is not None and latest["reliable"] and not self._held() and self._clearly_above(latest):
            estimate = (f"; {self._named(latest)} ({self._band_name()} band {latest['low']:.4g}-{latest['high']:.4g}) "
                        "is below this batch, but the schedule you chose governs: no smaller-batch warning while it "
                        "says to grow")
        log.warning("step %d: the schedule grows the batch to %d (micro-batch %d x %d accumulation, lr %.3g) from "
                    "sample %d; this run is still at %d after %d samples%s", step, stage.batch_size,
                    stage.micro_batch_size, stage.accum_steps, stage.lr, stage.start_samples, self.batch_size,
                    self.samples, estimate)

    def _scaled(self, entry: dict[str, Any]) -> dict[str, Any]:
        """``entry`` with its estimate and band in critical-batch terms: ``critical_ratio`` times B_simple's (the
        raw reading kept as ``b_simple_read``); as it is without a ratio."""
        ratio = self.critical_ratio or 1.0
        return {**entry, "b_simple_read": entry["b_simple"],
                **{key: entry[key] * ratio for key in ("b_simple", "low", "high") if entry[key] is not None}}

    def _named(self, entry: dict[str, Any]) -> str:
        """The estimate a :meth:`_scaled` entry holds, in words."""
        if not self.critical_ratio:
            return f"the noise scale B_simple={entry['b_simple']:.4g}"
        return (f"the critical-batch estimate {entry['b_simple']:.4g} (critical_ratio {self.critical_ratio:g} x the "
                f"noise scale B_simple={entry['b_simple_read']:.4g})")

    def _clearly_above(self, entry: dict[str, Any]) -> bool:
        """More than 20% above the estimate and above its band's upper end."""
        return self.batch_size > OVER_CRITICAL * entry["b_simple"] and self.batch_size > entry["high"]

    def _schedule_ahead(self) -> Any:
        """The schedule's stage for the step just run when its batch is bigger than that step's, else None (not
        the coming step's: a run whose schedule's sampler grew the batch at the next step was told it had not)."""
        if self.schedule is None:
            return None
        stage = self.schedule.stage_at(self.step_start_samples)
        return stage if stage.batch_size > self.batch_size else None

    def _on_schedule(self) -> bool:
        """Whether the run follows its schedule here: in the lr warmup, or at (or below) the stage's batch. The
        schedule chose that batch knowing the critical batch is small early on and grows; an outside Trainer on
        plan's own schedule was told, during warmup at the stage's 32, that 32 was 450% above the noise scale."""
        if self.schedule is None:
            return False
        return (self.samples <= getattr(self.schedule, "warmup_samples", 0)
                or self.batch_size <= self.schedule.stage_at(self.step_start_samples).batch_size)

    def _band_name(self) -> str:
        return f"{self.options['confidence']:.0%}"

    def end(self, *, rank_zero: bool = True) -> None:
        """At the end of training: remove the hooks, and say when no step was measured (a run of 3 steps at
        every=8 ended with an empty history, unsaid). ``rank_zero``: whether this process logs."""
        self.close()
        if self.monitor is not None and not self.monitor.measured_steps and rank_zero:
            every, steps = self.monitor.every, self.monitor.steps_seen
            why = (f"the run took {steps} optimizer steps and every={every} measures steps {every}, {2 * every}, ..."
                   if steps < every else "every measured step was skipped (see the warnings above)")
            log.warning("noise scale: no step was measured, so there is no reading: %s", why)

    def close(self) -> None:
        """Remove the monitor's hooks."""
        if self.monitor is not None:
            self.monitor.close()
