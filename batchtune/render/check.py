"""Render a check report: table, markdown (CI step summaries), JSON and JUnit XML.

The engine's verdicts carry a code and figures; :func:`check_reason` words them, one line
each, the same in every format (and in JSON as ``checks[i].reason``).
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Callable
from typing import Any

from tabulate import tabulate

from batchtune.commands.check_verdicts import SLOW_START
from batchtune.render.text import count, count_of, device_text, format_bytes, format_shape, to_json

__all__ = ["TIME_SKIP", "bad_input_junit", "busy_note", "check_notes", "check_reason", "render_check"]

TIME_SKIP = "skipped to stay within --max-seconds"
_CHECK_ICONS = {"pass": "✅", "warn": "⚠️", "fail": "❌", "skip": "⏭"}


def _pct(x: float) -> str:
    return f"{x:.1%}" if abs(x) < 0.0995 else f"{x:.0%}"


def _signed_pct(x: float) -> str:
    return f"{x:+.1%}" if abs(x) < 0.0995 else f"{x:+.0%}"


# ---------------------------------------------------------------------------- reasons, by check


def _peak(f: dict[str, Any]) -> str:
    on = f" on rank {f['rank']}" if f.get("rank") is not None else ""  # several ranks: the one with the least room
    return (f"peak {format_bytes(f['peak_bytes'])} of {format_bytes(f['capacity_bytes'])}{on}, "
            f"{_pct(f['headroom'])} free")


def _oom(f: dict[str, Any]) -> str:
    ranks = f.get("failed_ranks") or []
    on = f" on rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}" if ranks else ""
    return f"out of memory{on} ({f['error']}){_what_fits(f)}"


def _what_fits(f: dict[str, Any]) -> str:
    """What would fit, as the fits run's figures know it (check's ``_what_fits``); '' where they say nothing."""
    if "ceiling" not in f:  # an estimate's, or a report from before these figures
        return ""
    safe, k = f.get("safe_batch_size"), f.get("suggest_accum_steps")
    if safe is None:
        spec = shlex.quote(f["spec_path"]) if f.get("spec_path") else "SPEC"
        return (f"; the largest batch that fits is not known here: batchtune probe {spec} finds it (--estimate: "
                "predicted, without training), then --accum-steps K runs the batch as K micro-batches within it")
    ceiling = f"ceiling {count(f['ceiling'])}, " if f.get("ceiling") is not None else ""
    probed = f"; on this device the baseline sweep's probe found {ceiling}safe batch size {count(safe)}"
    if k is None:
        return probed
    held = (f" (accumulating, {count(f['accum_safe_batch_size'])} beside the gradients held between micro-batches)"
            if f.get("accum_safe_batch_size") else "")
    return f"{probed}{held}: --accum-steps {k} ({f['suggest_micro_batch_size']}×{k}) fits within it"


def _weights(f: dict[str, Any]) -> str:
    """The device ran out building the model: no batch size can fit, whatever the check's."""
    held = (f", {format_bytes(f['weights_bytes'])} of parameters and buffers ({f['weights_bytes']:,} bytes),"
            if f.get("weights_bytes") else " (its parameters and buffers)")
    room = f"the {format_bytes(f['capacity_bytes'])} the device has" if f.get("capacity_bytes") else "the device"
    return (f"out of memory building the model, before any batch: its own weights{held} do not fit in {room}, so "
            f"no batch size fits ({f['error']})")


def _lr_text(f: dict[str, Any]) -> str:
    return f" at lr {f['lr']:.3g}" if f.get("lr") is not None else ""


def _trend(f: dict[str, Any]) -> str:
    return (f"loss {f['first_mean']:.4g} → {f['last_mean']:.4g} ({f['change']:+.1%}) over {f['steps']} steps"
            + _lr_text(f))


def _data_text(f: dict[str, Any]) -> str:
    loader = f" ({f['loader']})" if f.get("loader") else ""
    return f"{_pct(f['data_share'])} of step time waiting for data{loader}"


# A batch's fetch that used less than this share of a core waited (a disk, a network, a sleep): not a CPU's work,
# and a machine busy enough to slow a CPU-bound fetch to it would have starved the training as well.
FETCH_WAITS = 0.25


def _data_hint(f: dict[str, Any]) -> str:
    """What would help the loader keep up, on the machine the check ran on (``_loader_options``' figures): never
    data.num_workers where no core is idle for its processes (on 2 cores, 1 worker made an outside check 47%
    slower) unless its fetch waits more than it computes, and batched fetching where a batch indexed at once from
    in-memory tensors took under half the wait."""
    workers, idle = f.get("num_workers", 0), f.get("idle_cores")
    if f.get("per_sample") is False:
        return "; its batches are in-memory tensors indexed once per batch already (data.num_workers would fetch " \
            "them sample by sample: slower)"
    hints, share = [], f.get("fetch_cpu_share")
    waits = share is not None and share < FETCH_WAITS  # on a disk, say: its data is not in memory, and workers overlap
    indexed, wait = f.get("indexed_s"), f.get("wait_s")
    if indexed is not None and wait and indexed < wait / 2 and not waits:
        how = "with data.num_workers 0 its TensorDataset is indexed so" if f.get("tensor_dataset") else \
            "for data held in memory, give a TensorDataset of its tensors (indexed once per batch)"
        hints.append(f"a batch of its samples as in-memory tensors, indexed at once, took {indexed * 1e3:.2g} ms "
                     f"against the {wait * 1e3:.2g} ms each batch waited: {how}")
    threads, cores = f.get("training_threads") or 1, f.get("cores")
    if idle is None:
        hints.append("raise data.num_workers" if workers == 0 else "speed up the data pipeline")
    elif workers and workers + threads > cores and not waits:
        hints.append(f"its {count_of(workers, 'worker')} and the training's {count_of(threads, 'thread')} want more "
                     f"than this machine's {cores} cores: fewer workers may be faster")
    elif workers:
        hints.append("speed up the data pipeline")
    elif waits:
        hints.append(f"raise data.num_workers: a batch's fetch waits more than it computes ({share:.0%} of a core), "
                     "waiting that worker processes overlap")
    elif idle >= 1:
        hints.append(f"raise data.num_workers ({idle} of this machine's {cores} cores idle)")
    else:
        other = f" and other work ({f['other_cores']:.1f} cores)" if (f.get("other_cores") or 0) >= 0.25 else ""
        hints.append(f"not data.num_workers: worker processes would compete with the training "
                     f"({count_of(threads, 'thread')}){other} for this machine's {cores} cores")
    return "; " + "; ".join(hints)


_BASES: dict[str, Callable[[dict[str, Any]], str]] = {
    "baseline.steps_to_target": lambda f: "the baseline sweep's steps-to-target fit",
    "baseline.extrapolated": lambda f: "the baseline sweep's steps-to-target fit, an extrapolation past 4× its "
                                       "largest size that the sweep did not adopt",
    "baseline.above_largest": lambda f: "no bend in the baseline sweep's steps up to its largest size",
    "baseline.below_smallest": lambda f: "the baseline sweep's steps did not fall from its smallest size",
    "baseline.noise_scale": lambda f: "the baseline sweep's noise scale" + (
        f" at val loss {f['basis_val_loss']:.4g}" if f.get("basis_val_loss") else ""),
    "baseline.trials": lambda f: f"the median of {f['basis_trials']} baseline trials' noise scales, each where its "
                                 "budget ended",
    "run.noise_scale": lambda f: f"this run's noise scale over {f['basis_steps']} steps",
}


def _estimate(f: dict[str, Any]) -> str:
    """``~227 (this run's noise scale over 7 steps; 90% band 148–350)``."""
    if f["basis"] == "baseline.above_largest":
        return f"above {count(f['b_crit'])} (the baseline sweep's steps show no bend up to its largest size)"
    if f["basis"] == "baseline.below_smallest":
        return f"below {count(f['b_crit'])} ({_BASES[f['basis']](f)})"
    low, high = f.get("low"), f.get("high")
    has_low = isinstance(low, (int, float)) and math.isfinite(low) and low > 0
    bounded = has_low and high is not None and math.isfinite(high)
    band = f"; 90% band {count(low)}–{count(high)}" if bounded else ("; band unbounded above" if has_low else "")
    return f"~{count(f['b_crit'])} ({_BASES[f['basis']](f)}{band})"


def _what(f: dict[str, Any]) -> str:
    """The check's own first steps read a lower bound of the critical batch, not the critical batch itself."""
    return "noise scale of the first steps (a lower bound of the critical batch)" if f["basis"] == "run.noise_scale" \
        else "critical batch"


def _critical_above(f: dict[str, Any]) -> str:
    if f["basis"] == "baseline.below_smallest":  # an upper bound of B_crit: the waste is at least this
        return (f"{f['batch_size']} is more than {f['ratio']:.1f}× the critical batch, {_estimate(f)}: at least "
                f"~{f['wasted_share']:.0%} of its compute wasted")
    return (f"{f['batch_size']} is {f['ratio']:.1f}× the critical batch {_estimate(f)}: ~{f['wasted_share']:.0%} "
            f"of its compute wasted ({f['compute_vs_critical']:.2f}× what B_crit needs)")


def _critical_early(f: dict[str, Any]) -> str:
    return (f"not decided: {f['batch_size']} is {f['ratio']:.1f}× the noise scale of the first steps "
            f"{_estimate(f)}, but it grows as the loss falls, so a batch above it can still be below the critical "
            f"batch at your target{_pass_baseline(f)}")


def _critical_rough(f: dict[str, Any]) -> str:
    """Raw noise-scale readings of a sweep that reached no estimate of its own: an order of magnitude only."""
    return (f"not decided: {f['batch_size']} is {f['ratio']:.1f}× the noise scale {_estimate(f)}, an "
            "order-of-magnitude reading without a band or a target, not the critical batch (B_simple read "
            "0.08–0.17× B_crit on AdamW MLPs, 1.8–2.5× on a char LM); the baseline sweep reached no estimate of "
            "its own (interrupted?): pass a finished sweep's run folder")


def _ranks(world_size: int | None) -> str:
    """' × 2 ranks', '' on one (an outside 1- against 2-rank comparison named shapes that hid the difference)."""
    return f" × {world_size} ranks" if world_size and world_size > 1 else ""


def _pass_baseline(f: dict[str, Any]) -> str:
    if f.get("other_job"):  # one was given, of another job (its critical batch is not this job's)
        return "; pass --baseline with a sweep of this job (the one given is another job's)"
    return "; pass --baseline with a sweep's run folder" + (" that has one" if f.get("has_baseline") else "")


_THROUGHPUT_SKIPS: dict[str | None, Callable[[dict[str, Any]], str]] = {
    None: lambda f: "not measured",
    "time_budget": lambda f: TIME_SKIP,
    "train_unfinished": lambda f: "the training run did not finish",
    "threads": lambda f: f"baseline used {f['baseline_threads']} CPU threads, this check {f['threads']}",
}


def _comparison(f: dict[str, Any]) -> str:
    """``throughput 900 vs 1,000 samples/s (-10%), peak 1.0 KiB vs 1000 B (+5.0%)``."""
    if f["throughput_change"] is not None:
        parts = [f"throughput {f['samples_per_s']:,.0f} vs {f['baseline_samples_per_s']:,.0f} samples/s "
                 f"({_signed_pct(f['throughput_change'])}{_timings(f)}{_pooled(f)})"]
    else:
        parts = [f"throughput not compared ({_THROUGHPUT_SKIPS[f.get('throughput_skip')](f)})"]
    if f["memory_change"] is not None:
        parts.append(f"peak {format_bytes(f['peak_bytes'])} vs {format_bytes(f['baseline_peak_bytes'])} "
                     f"({_signed_pct(f['memory_change'])})")
    else:
        parts.append("peak memory not compared")
    return ", ".join(parts)


def _pooled(f: dict[str, Any]) -> str:
    """What the baseline's rate is: the median over its timed trials at the size, every lr and seed, calm and not
    diverged where it has such (:func:`~batchtune.commands.sweep_analysis.timed_rates`; the rate the
    sweep's times to target use; an outside check compared 490,808 against a table row showing 467,058)."""
    n = f.get("baseline_timed_trials") or 0
    return f"; the baseline's median over {n} timed trials at this size, every lr and seed" if n > 1 else ""


def _timings(f: dict[str, Any]) -> str:
    """A drop timed twice (check times a run again before failing it on throughput)."""
    timings = f.get("timings") or []
    if len(timings) == 2:
        return f"; timed twice, {timings[0]:,.0f} and {timings[1]:,.0f} samples/s, the faster counted"
    return "; not timed again: no time left in --max-seconds" if timings else ""


def _regressed(*what: str) -> Callable[[dict[str, Any]], str]:
    def reason(f: dict[str, Any]) -> str:
        failed = {"throughput": f"throughput fell more than {f['throughput_tolerance']:.0%}",
                  "memory": f"peak memory grew more than {f['memory_tolerance']:.0%}"}
        return "; ".join(failed[w] for w in what) + ": " + _comparison(f)

    return reason


def _within_noise(f: dict[str, Any]) -> str:
    """A throughput drop past the tolerance that the noise (or a busy machine) cannot tell from none."""
    why = []
    if f.get("throughput_noise") is not None and f["throughput_change"] >= -2 * f["throughput_noise"]:
        why.append(f"inside the measured noise (±{2 * f['throughput_noise']:.0%}: the run's windows and the "
                   "baseline's trials)")
    if f.get("contention"):
        why.append(f"other work on the machine could take {f['contention']:.0%} of it")
    spread = f.get("baseline_spread")
    if spread and 1 + f["throughput_change"] >= (1 - spread) * (1 - f["throughput_tolerance"]):
        low, high = f["baseline_spread_rates"]
        why.append(f"within {f['throughput_tolerance']:.0%} of the baseline's slowest trial (its rate is its one calm "
                   f"trial; its {f['baseline_trials']} trials at this size ran {low:,.0f}-{high:,.0f} samples/s)")
    text = (f"throughput fell more than {f['throughput_tolerance']:.0%}, but {' and '.join(why) or 'noisily'}: "
            f"not failed; rerun on a quiet machine to tell: {_comparison(f)}")
    if f.get("memory_change") is not None and f["memory_change"] <= f["memory_tolerance"]:
        text += " (memory within tolerance)"
    return text


def _batchnorm(f: dict[str, Any]) -> str:
    return "; the model has BatchNorm, whose statistics over each half- or micro-batch bias it" \
        if f.get("batchnorm") else ""


def _spike(f: dict[str, Any]) -> str:
    start = f.get("starting_loss", f["first_loss"])
    return (f"loss {start:.4g} rose to {f['peak_loss']:.4g} at step {f['peak_step']} "
            f"({f['peak_loss'] / start:.1f}× where it started, above {f['spike_factor']:g}×){_lr_text(f)}")


def _spike_survived(f: dict[str, Any]) -> str:
    peak = f.get("baseline_peak_ratio")
    went = f", their validation loss up to {peak:.1f}× their start" if peak else ""
    reached = f" ({f['baseline_reached']} seeds)" if f.get("baseline_reached") else ""
    return (f"{_spike(f)}, and came back to {f['last_mean']:.4g}: a spike, not a divergence; the baseline sweep's "
            f"{count_of(f['baseline_trials'], 'trial')} at this size and lr trained on to its target{reached} "
            f"without diverging{went}")


def _nonfinite(value: Any) -> str:
    """A non-finite loss as it was (nan, inf), or 'non-finite' once JSON wrote it as null."""
    return "non-finite" if value is None else f"{value}"


def _val_nonfinite(f: dict[str, Any]) -> str:
    """The memory fits, and the validation pass that ends the fits run gave a NaN (or infinite) loss: not
    'validated' (a NaN validation loss passed fits as if all were well)."""
    memory = _REASONS[f.get("memory_code") or "fits.ok"](f)
    return (f"{memory}; but its validation pass gave a {_nonfinite(f.get('val_loss'))} loss: the batch fits in "
            "memory, its validation does not check out (the model in eval mode, the loss or the validation data is "
            "not finite)")


def _val_too(f: dict[str, Any]) -> str:
    """A failed fit whose validation pass gave a non-finite loss too, said (JSON's null is not told from no pass)."""
    value = f.get("val_loss")
    return f"; its validation pass gave a {value} loss too" if isinstance(value, float) and not math.isfinite(value) \
        else ""


def _fits_skip(f: dict[str, Any]) -> str:
    if f.get("weights"):
        return "not run: the model's own weights do not fit in memory"
    b, micro, k = f["batch_size"], f["micro_batch_size"], f["accum_steps"]
    return f"not run: batch {f'{b} ({micro}×{k})' if k > 1 else b} does not fit in memory"


# One entry per verdict code (check_verdicts.CODES): figures in, one line out.
_REASONS: dict[str, Callable[[dict[str, Any]], str]] = {
    "fits.ok": lambda f: f"{_peak(f)} (at least {f['headroom_required']:.0%} required)",
    "fits.headroom": lambda f: f"{_peak(f)}: less than the {f['headroom_required']:.0%} headroom required "
                               f"(probe.headroom){_val_too(f)}",
    "fits.oom": _oom,
    "fits.weights": _weights,
    "fits.no_capacity": lambda f: f"runs, peak {format_bytes(f['peak_bytes'])}; the device capacity is unknown, "
                                  "so the headroom is not checked",
    "fits.crashed": lambda f: f"the training step {'failed: ' if f.get('said') else 'raised '}{f['error']}",
    "fits.val_nonfinite": _val_nonfinite,
    "fits.unrun": lambda f: (f"batch {f['requested']:,} was not run: the training set is smaller, and the check ran "
                             f"the largest batch it fills, {f['checked']:,}: "
                             f"{_REASONS[f['memory_code']](f)}"),
    "trains.falling": lambda f: f"{_trend(f)}, no divergence",
    "trains.converged": lambda f: (f"loss {f['untrained_loss']:.4g} untrained → {f['last_mean']:.4g} over "
                                   f"{f['steps']} steps{_lr_text(f)}, at its floor from the first steps (noise "
                                   f"±{f['noise']:.2g}): converged early, no divergence"),
    "trains.slow_start": lambda f: (f"{_trend(f)}: no clear decrease yet (noise ±{f['noise']:.2g}), as in the "
                                    f"baseline sweep's {count_of(f['baseline_trials'], 'trial')} at this size and lr, "
                                    f"which stayed within {SLOW_START:.0%} of their start until step "
                                    f"{f['baseline_fell_at']:g} (median) and fell after it"),
    # either way: an outside check at lr 12.8, past the lr its baseline saw fail, was told it 'may be too low'
    "trains.flat": lambda f: f"{_trend(f)}: no clear decrease (noise ±{f['noise']:.2g}); the lr may be too low, or too "
                             "high for the loss to settle, or the run too short to tell (--lr tries another)",
    "trains.rising": lambda f: f"{_trend(f)}: rising beyond its noise (±{f['noise']:.2g}); the lr is likely too high",
    "trains.diverged": lambda f: f"diverged{_lr_text(f)}: {f.get('divergence') or 'non-finite loss'}",
    "trains.spiked": lambda f: f"{_spike(f)}, and ended at {f['last_mean']:.4g}: the lr is too high for the "
                               "start of the run (lower it, or warm up longer)",
    "trains.spike_recovered": lambda f: (f"{_spike(f)}, and came back to {f['last_mean']:.4g}: a spike, not a "
                                         "divergence (the loss did not stay up); the lr is near its edge at the start "
                                         "of the run (a longer warm-up gives it margin)"),
    "trains.spike_survived": _spike_survived,
    "trains.too_few": lambda f: f"only {f['steps']} training steps ran: too few to judge the loss",
    "trains.crashed": lambda f: f"the training run {'failed: ' if f.get('said') else 'raised '}{f['error']}",
    "trains.oom": lambda f: f"out of memory in the training run ({f['error']}), though the fits run passed",
    "data.ok": lambda f: f"{_data_text(f)} (warn at {f['warn_share']:.0%})",
    "data.slow": lambda f: f"{_data_text(f)} (warn at {f['warn_share']:.0%}){_data_hint(f)}",
    "data.bound": lambda f: f"{_data_text(f)} (fail at {f['fail_share']:.0%}): the job is data-bound{_data_hint(f)}",
    "data.unmeasured": lambda f: "no timed steps to measure",
    "critical.below": lambda f: f"{f['batch_size']} is at or below the {_what(f)} {_estimate(f)}",
    "critical.within": lambda f: f"{f['batch_size']} is within the uncertainty of the {_what(f)} "
                                 f"{_estimate(f)}: not clearly above it",
    "critical.extrapolated": lambda f: (f"{f['batch_size']} is above the {_what(f)} {_estimate(f)}, but the baseline "
                                        "sweep's steps barely bent up to its largest size: the critical batch lies "
                                        "somewhere above the sizes it ran, so this decides nothing; a sweep up to "
                                        f"{f['batch_size']} (sweep.max_batch_size) measures it"),
    "critical.below_sizes": lambda f: f"the {_what(f)} {_estimate(f)} lies below every size the baseline measured, "
                                      f"and {f['batch_size']} is at or below its smallest ({f['smallest_measured']}): "
                                      "nothing smaller was measured to reach the target sooner",
    "critical.above": _critical_above,
    "critical.early": _critical_early,
    "critical.rough": _critical_rough,
    "critical.none": lambda f: "no critical-batch estimate",
    "critical.odd_micro": lambda f: "the micro-batch is odd, so it cannot be split into halves for the noise scale"
                                    + _pass_baseline(f),
    "critical.no_noise_steps": lambda f: "no noise-scale steps ran" + _pass_baseline(f),
    "critical.unsplittable": lambda f: f"no noise scale: {f['reason']}" + _pass_baseline(f),
    "critical.diverged": lambda f: "no noise scale from a run that diverged (see trains)",
    "critical.unreliable": lambda f: f"the noise-scale estimate is not reliable after {f['noise_steps']} measured "
                                     f"steps (|G|² ≤ 0 so far){_batchnorm(f)}" + _pass_baseline(f),
    "regression.ok": lambda f: _comparison(f) + " within tolerance",
    "regression.throughput": _regressed("throughput"),
    "regression.memory": _regressed("memory"),
    "regression.throughput_memory": _regressed("throughput", "memory"),
    "regression.throughput_noise": _within_noise,
    "regression.uncompared": _comparison,
    "regression.other_device": lambda f: f"not comparable: baseline ran on {f['baseline_device']}, "
                                         f"this check on {f['device']}",
    "regression.other_job": lambda f: "not comparable: the baseline is a sweep of another job (baseline → this "
                                      f"spec: {'; '.join(f['changes'])})",
    "regression.other_precision": lambda f: f"not comparable: baseline ran in {f['baseline_precision']}, "
                                            f"this check in {f['precision']}",
    "regression.no_row": lambda f: f"the baseline has no row for batch {f['batch_size']} (it ran {f['baseline_sizes']})",
    "regression.other_shape": lambda f: f"the baseline ran {f['batch_size']} as {f['baseline_micro_batch_size']}×"
                                        f"{f['baseline_accum_steps']}{_ranks(f.get('baseline_world_size'))}, this "
                                        f"check as {f['micro_batch_size']}×{f['accum_steps']}"
                                        f"{_ranks(f.get('world_size'))}: not comparable",
    "regression.unusable": lambda f: f"every baseline trial at {f['batch_size']} ran out of memory or diverged",
    "skip.time_budget": lambda f: f"{TIME_SKIP} ({f['left_s']:.2f} s left, about {f['needed_s']:.2f} s needed"
                                  + (f"; {f['reserve_s']:.2g} s of the budget is kept for start-up and output"
                                     if f.get("reserve_s") else "") + ")",
    "skip.time_budget_steps": lambda f: f"{TIME_SKIP}: only {f['steps']} steps ran",
    "skip.time_budget_noise": lambda f: f"{TIME_SKIP} (the noise scale comes from the training run)",
    "skip.fits_oom": _fits_skip,
    "skip.fits_crashed": lambda f: "not run: the training step crashed",
    "skip.train_crashed": lambda f: "not measured: the training run crashed",
    "skip.train_oom": lambda f: "not measured: the training run ran out of memory",
    "skip.train_unfinished": lambda f: "not measured: the training run did not finish",
    "skip.no_baseline": lambda f: "no --baseline given",
    "skip.interrupted": lambda f: f"not finished: interrupted ({_stop_name()}) before this check had its verdict",
}


def check_reason(check: Any) -> str:
    """One check's verdict in one line: its code worded with its figures.

    ``check`` is a :class:`~batchtune.commands.check_verdicts.CheckResult` (or a mapping
    with ``code``, ``status`` and ``figures``). Raises KeyError for a code with no wording.
    """
    get = check.get if isinstance(check, dict) else lambda key: getattr(check, key)
    code, status, f = get("code"), get("status"), get("figures")
    text = _REASONS[code](f)
    if f.get("estimate"):  # check --estimate: a traced step, not a measured one
        text = f"estimated: {text}"
    if code.startswith("trains.") and status != "fail" and f.get("truncated"):
        text += f" (stopped after {f['steps']} of {f['steps_planned']} steps to stay within --max-seconds)"
    if code.startswith("regression.") and status == "fail" and f.get("spec_changes"):
        text += f" (the spec differs from the baseline's in: {', '.join(f['spec_changes'])})"
    return text


def busy_note(load: dict[str, Any], affected: str = "throughput and data-share figures are") -> str | None:
    """A warning when other work competed for the cores (a ``host.LoadMeter`` reading), else None."""
    if not load or not load.get("busy"):
        return None
    others = (f"other processes used {load['other_cores']:.1f} of {load['cores']} cores"
              if load.get("other_cores") is not None else f"load average {load['load_1m']:.1f} on {load['cores']} cores")
    used = load["other_cores"] if load.get("other_cores") is not None else load["load_1m"]
    ranks = load.get("ranks") or 1  # under torchrun each rank on this machine runs its threads
    fewer = max(1, int(load["cores"] - used) // ranks)  # the cores the others left, per rank
    advice = (f"device.threads: {fewer}, or a quiet machine" if fewer < load["threads"] else "run on a quiet machine")
    each = f" on each of {ranks} ranks" if ranks > 1 else ""
    return (f"the machine was busy: {others} while this ran with {load['threads']} torch "
            f"thread{'s' if load['threads'] != 1 else ''}{each}; "
            f"{affected} not trustworthy ({advice})")


def check_notes(report: Any) -> list[str]:
    """What the reader should know beside the verdicts: a capped batch, a busy machine, where the lr came
    from, a budget overrun."""
    notes = list(getattr(report, "notes", []))
    busy = busy_note(getattr(report, "load", {}))
    if busy:
        notes.append(busy)
    if not getattr(report, "lr_from_baseline", False):  # else the report's own notes say where it came from
        auto = getattr(report, "lr_auto", None)  # lr_scaling: auto's choice and its evidence, as the sweep says it
        notes.append(f"lr {report.lr:.4g}: the spec's, not scaled (lr_scaling: none)" if report.lr_rule == "none"
                     else f"lr {report.lr:.4g}: the {report.lr_rule} rule from {report.base_lr:g} at batch "
                     f"{report.base_batch_size}" + (f" (auto: {auto})" if auto else ""))
    if report.seconds > report.max_seconds:
        notes.append(f"took {report.seconds:.1f} s, over the {report.max_seconds:g} s budget (the fits run, which "
                     f"always runs, took {report.check('fits').seconds:.1f} s)")
    return notes


def _check_dict(report: Any) -> dict[str, Any]:
    """The report as JSON data, each check with its reason, and the notes."""
    out: dict[str, Any] = {}
    for key, value in report.to_dict().items():
        if key == "notes":  # check_notes holds them, with the rest
            continue
        out[key] = value
        if key == "baseline":  # where the notes always stood
            out["notes"] = check_notes(report)
    out["checks"] = [{"name": c.name, "status": c.status, "reason": check_reason(c), "code": c.code,
                      "figures": c.figures, "seconds": c.seconds} for c in report.checks]
    return out


# ---------------------------------------------------------------------------- the report


def _capacity_rank(device: dict[str, Any]) -> str:
    """Several ranks with different capacities: whose the tightest is, which the fits run is judged against."""
    each = device.get("capacity_by_rank") or []
    if device.get("capacity_rank") is None or len(set(each)) < 2:
        return ""
    others = ", ".join(f"rank {r} has {format_bytes(c)}" for r, c in enumerate(each) if r != device["capacity_rank"])
    return f": rank {device['capacity_rank']}'s, the tightest; {others}"


def _check_head(report: Any) -> str:
    where = device_text(report.device, report.device.get("capacity_bytes"))
    whose = _capacity_rank(report.device)
    if whose and where.endswith(")"):  # inside device_text's "(simulated capacity 72.0 MiB)"
        where = f"{where[:-1]}{whose})"
    shape = format_shape(report.shape, "long")
    estimate = " (estimate: no training step ran)" if report.device.get("estimate") else ""
    partial = ", PARTIAL: interrupted" if getattr(report, "interrupted", False) else ""
    return (f"batchtune check{estimate}: {report.name} — batch {shape}, lr {report.lr:.4g}, {where}, "
            f"{report.precision}{partial}")


def _check_verdict(report: Any, strict: bool) -> str:
    counts = {s: sum(c.status == s for c in report.checks) for s in ("fail", "warn", "skip")}
    word = ("INTERRUPTED (partial: the checks finished before it)" if getattr(report, "interrupted", False)
            else "FAIL" if report.exit_code(strict) else "PASS")
    extra = [text for n, text in ((counts["fail"], f"{counts['fail']} failed"),
                                  (counts["warn"], f"{counts['warn']} warning{'s' if counts['warn'] != 1 else ''}"),
                                  (counts["skip"], f"{counts['skip']} skipped")) if n]
    failing = [what for n, what in ((counts["warn"], "warnings"), (len(report.skipped), "checks skipped for time"))
               if strict and n]
    strict_text = f" (--strict: {' and '.join(failing)} fail)" if failing else ""
    return (f"verdict: {word}{strict_text}" + (f" — {', '.join(extra)}" if extra else "")
            + f"; {len(report.checks)} check{'s' if len(report.checks) != 1 else ''} in {report.seconds:.1f} s "
              f"(budget {report.max_seconds:g} s)")


def _check_junit(report: Any, strict: bool) -> str:
    import xml.etree.ElementTree as ET

    def failed(c: Any) -> bool:
        return c.status == "fail" or strict and (c.status == "warn" or c.name in report.skipped)

    def unfinished(c: Any) -> bool:  # an error, not a skip: an interrupted check's file read green on a dashboard
        return c.code == "skip.interrupted"

    fails = sum(map(failed, report.checks))
    errors = sum(map(unfinished, report.checks))
    skips = sum(c.status == "skip" and not failed(c) and not unfinished(c) for c in report.checks)
    attrs = {"name": "batchtune check", "tests": str(len(report.checks)), "failures": str(fails), "errors": str(errors),
             "skipped": str(skips), "time": f"{report.seconds:.3f}"}
    root = ET.Element("testsuites", attrs)
    suite = ET.SubElement(root, "testsuite", attrs)
    props = ET.SubElement(suite, "properties")
    for key, value in (("name", report.name), *report.shape.to_dict().items(), ("lr", report.lr),
                       ("precision", report.precision), ("baseline", report.baseline)):
        if value is not None:
            ET.SubElement(props, "property", {"name": key, "value": str(value)})
    ET.SubElement(props, "property", {"name": "device", "value": str(report.device.get("name")
                                                                        or report.device.get("device"))})
    for c in report.checks:
        reason = check_reason(c)
        case = ET.SubElement(suite, "testcase", {"name": c.name, "classname": f"batchtune.commands.check.{report.name}",
                                                 "time": f"{c.seconds:.3f}"})
        figures = to_json({k: v for k, v in c.figures.items() if k != "traceback"})
        if failed(c):
            node = ET.SubElement(case, "failure", {"message": reason, "type": c.status})
            node.text = reason + ("\n" + c.figures["traceback"] if c.figures.get("traceback") else "")
        elif unfinished(c):
            ET.SubElement(case, "error", {"message": reason, "type": "interrupted"}).text = reason
        elif c.status == "skip":
            ET.SubElement(case, "skipped", {"message": reason})
        out = ET.SubElement(case, "system-out")
        out.text = (f"WARNING: {reason}\n" if c.status == "warn" else f"{c.status}: {reason}\n") + figures
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode")


def _stop_name() -> str:
    """What stopped the process: SIGTERM (a CI cancel, a scheduler) or Ctrl-C (an outside CI's SIGTERM read
    'Ctrl-C')."""
    from signal import SIGTERM

    from batchtune.errors import STOPPING

    return "SIGTERM" if SIGTERM in STOPPING else "Ctrl-C"


def bad_input_junit(message: str, name: str = "spec", kind: str = "usage") -> str:
    """JUnit XML for a check that ended in bad input (exit 2; or ``kind`` ``interrupted``) before any verdict: one
    test case, ``name``, in error of type ``kind`` with ``message``, so that CI's test-report step finds a file that
    says why (it found none)."""
    import xml.etree.ElementTree as ET

    attrs = {"name": "batchtune check", "tests": "1", "failures": "0", "errors": "1", "skipped": "0", "time": "0.000"}
    root = ET.Element("testsuites", attrs)
    case = ET.SubElement(ET.SubElement(root, "testsuite", attrs), "testcase",
                         {"name": name, "classname": "batchtune.commands.check", "time": "0.000"})
    ET.SubElement(case, "error", {"message": message, "type": kind}).text = message
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode")


def render_check(report: Any, fmt: str = "table", strict: bool = False) -> str:
    """Render a :class:`~batchtune.commands.check.CheckReport` as table, markdown, json or junit (XML).

    ``strict`` counts warnings as failures in the verdict line and in JUnit, as the exit code does.
    """
    if fmt == "json":
        return to_json({**_check_dict(report), "exit_code": report.exit_code(strict), "strict": strict})
    if fmt == "junit":
        return _check_junit(report, strict)
    head = _check_head(report)
    verdict = _check_verdict(report, strict)
    if fmt == "markdown":
        rows = [[f"`{c.name}`", f"{_CHECK_ICONS[c.status]} {c.status}", check_reason(c).replace("|", "\\|")]
                for c in report.checks]
        icon = "❌" if report.exit_code(strict) else _CHECK_ICONS["warn" if report.status == "warn" else "pass"]
        lines = [f"### {icon} {head}", "", tabulate(rows, headers=["check", "status", "reason"], tablefmt="github",
                                                    disable_numparse=True), "", f"**{verdict}**"]
    else:
        rows = [[c.name, c.status, check_reason(c)] for c in report.checks]
        lines = [head, "", tabulate(rows, headers=["check", "status", "reason"], tablefmt="simple",
                                    disable_numparse=True), "", verdict]
    extra = []
    if report.skipped:
        extra.append(f"skipped to stay within --max-seconds {report.max_seconds:g}: {', '.join(report.skipped)}")
    if report.baseline:
        extra.append(f"baseline: {report.baseline}")
    extra += [f"note: {n}" for n in check_notes(report)]
    if fmt == "markdown" and extra:
        lines += [""] + [f"- {e}" for e in extra]
    else:
        lines += extra
    return "\n".join(lines)
