"""Inference batch size under a latency budget, and the dynamic batcher for a request rate.

``batchtune serve`` answers what a serving system needs to be told:

1. **The inference ceiling**: the probe's search (:mod:`batchtune.memory.search`) on the
   forward-only workload (:class:`~batchtune.engine.workload.ForwardOnly`: ``eval()``,
   ``torch.inference_mode()``, the spec's precision). No gradients, no optimizer state and
   no saved activations, so it lies far above the training ceiling.
   Only the batch's inputs go to the device (:func:`serve_inputs`): a server's requests have no labels.
2. **Latency per batch size** up to that ceiling: each size's batch, as the data set gives
   it, its inputs copied to the device and run forward ``repeats`` times after warm-up, the
   device synchronised around each pass (a pass the OS switched out for another process
   timed again, up to 4× ``repeats`` within the size's time cap; past that a size keeps its clean
   passes, or, short of 20, keeps switched-out ones, counted and said); p50/p90/p99 and throughput. Powers of two first,
   stopping at the first size past the budget, then a bisection of that last doubling to
   about 1.5% of the size, one granule for small sizes (latency grows with the batch, so one
   crossing is assumed).
   ``max_batch_size`` is the largest size measured whose chosen percentile meets the budget.
3. **Dynamic batching at a rate** (``rate``): the measured curve goes into the batcher
   simulation of :mod:`batchtune.stats.batching`.
4. **Request lengths**: samples' lengths (``data.length_key`` when the spec has one, else
   each sample's largest dimension that varies across samples) and, when they vary, latency by length bucket.

:func:`run_serve_check` (``check --serve``) runs one serving batch: does it fit forward only,
and does it meet the budget. Nothing here prints; :mod:`batchtune.render.serve` words the result.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from batchtune.errors import interrupted_exit_code
from batchtune.render.text import count_of, duration_ms

log = logging.getLogger(__name__)

__all__ = ["LatencyPoint", "ServeCheck", "ServeInputError", "ServeInterrupted", "ServeResult", "dynamic_batching",
           "inference_ceiling", "latency_curve", "length_buckets", "measure_latency", "parse_duration", "run_serve",
           "run_serve_check", "serve_forward", "serve_inputs", "serve_workload"]

WARMUP_PASSES = 5
MIN_REPEATS = 20  # a size gets at least this many timed passes, whatever its time cap
RETIMES_PER_REPEAT = 4  # passes the OS switched out are timed again up to this many times --repeats (within the cap)
VARIABLE_BATCHES = 8  # variable-length data: batches per size (and per length bucket), taken in turn
QUIET_OTHER_CORES = 0.25  # other work above this share of a core while timing is named in a note


class ServeInputError(ValueError):
    """A command-line value serve cannot use (the CLI exits 2)."""


class ServeInterrupted(KeyboardInterrupt):
    """Ctrl-C after the inference ceiling; ``result`` (a :class:`ServeResult` or :class:`ServeCheck`, its
    ``interrupted`` set) holds what was measured before it."""

    def __init__(self, result: Any) -> None:
        super().__init__()
        self.result = result


INTERRUPTED = "not finished: interrupted (Ctrl-C) before this check had its verdict"


def parse_duration(text: str, option: str = "--latency-budget") -> float:
    """``"45ms"``, ``"0.045s"``, ``"500us"`` or a bare number of milliseconds → seconds.

    Raises:
        ServeInputError: not a positive, finite duration.
    """
    from batchtune.config.spec import parse_duration as duration

    try:
        return duration(text, default_unit="ms", example="45ms, 0.1s or 500us")
    except ValueError as exc:
        raise ServeInputError(f"{option}: {exc}") from None


@dataclass
class LatencyPoint:
    """One batch size's measured latency (milliseconds) and throughput."""

    batch_size: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    at_percentile_ms: float  # at the percentile asked for
    repeats: int
    samples_per_s: float  # batch_size / mean latency
    meets_budget: bool
    phase: str  # power | bisect | ceiling
    preempted: int = 0  # passes the OS switched out for other work, timed again (not in the figures)
    preempted_kept: int = 0  # passes switched out that are in the figures: the re-timing ran out short of MIN_REPEATS

    def percentile_unreliable(self, percentile: float) -> bool:
        """Fewer passes than it takes to see one beyond the percentile."""
        return percentile < 100 and self.repeats < 100 / (100 - percentile)


@dataclass
class ServeResult:
    """The inference ceiling, the latency curve, the static and dynamic batch sizes, and the evidence."""

    name: str
    budget_ms: float
    percentile: float
    ceiling: int | None  # None: not even the smallest size fits for inference
    capped: bool  # the ceiling is the largest size searched (probe.max_batch_size or the data set)
    granularity: int
    capacity_bytes: int | None
    memory_model: Any  # the search's MemoryModel, or None
    ceiling_trials: list[dict[str, Any]]
    max_batch_size: int | None  # largest measured size whose percentile meets the budget
    points: list[LatencyPoint]
    overhead_ms: float  # the timing loop's own cost per pass (synchronise + clock), measured empty
    device: dict[str, Any]
    precision: str
    rate: float | None = None
    dynamic: dict[str, Any] | None = None
    dynamic_reason: str | None = None
    lengths: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # wall time by phase
    load: dict[str, Any] = field(default_factory=dict)  # other work on the machine while timing (host.LoadMeter)
    ceiling_searched: bool = True  # False: the device's capacity is unknown, the ceiling is the largest size allowed
    interrupted: bool = False  # Ctrl-C: the sizes timed before it (partial)

    def point(self, batch_size: int) -> LatencyPoint | None:
        return next((p for p in self.points if p.batch_size == batch_size), None)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["memory_model"] = self.memory_model.to_dict() if self.memory_model is not None else None
        return out


def serve_inputs(loss: Any) -> Any:
    """``inputs(batch)``: what of a host batch a server has, and so all that goes to the device: the model's inputs.

    With ``loss: model_output`` the batch is the model's arguments whole (Hugging Face style); otherwise the
    targets are split off (a ``(inputs, targets)`` pair, or a dict without its ``labels``): inference has no
    labels, and counting them put 8 B a sample of int64 class labels into the inference ceiling. A one-item
    batch is its item; a bare tensor, or a dict without targets, is the inputs as it is.
    """
    from batchtune.config.components import _split

    def inputs(batch: Any) -> Any:
        if loss == "model_output":
            return batch
        if isinstance(batch, (list, tuple)) and len(batch) == 1:
            return batch[0]
        if isinstance(batch, (list, tuple, dict)):
            try:
                return _split(batch)[0]
            except (TypeError, ValueError):
                return batch
        return batch

    return inputs


def serve_forward(loss: Any) -> Any:
    """``forward(model, inputs)``: the model on a batch's inputs (as :func:`serve_inputs` gives them), as a server
    calls it: a dict as keyword arguments, a tuple as positional ones (``model_output``: a list too)."""
    from batchtune.config.components import _call

    def forward(model: Any, inputs: Any) -> Any:
        if loss == "model_output":
            return model(**inputs) if isinstance(inputs, dict) else model(*inputs)
        return _call(model, inputs)

    return forward


def serve_workload(loss: Any) -> Any:
    """The forward-only workload a server runs: the inputs alone moved to the device, the model on them."""
    from batchtune.engine.trial import ForwardOnly

    return functools.partial(ForwardOnly, forward=serve_forward(loss), inputs=serve_inputs(loss))


# ---------------------------------------------------------------------------- the ceiling


def inference_ceiling(spec: Any, components: Any, backend: Any, model: Any) -> tuple[Any, list[Any]]:
    """The probe's search on the forward-only workload: (SearchOutcome, the source's trials).

    ``model`` (on the device, tracked by ``backend``) runs every trial; its parameters and
    buffers are the baseline. Exact to ``probe.granularity``: the ceiling fits, one granule
    above it runs out of memory (unless the ceiling is the largest size searched).
    """
    from batchtune.commands.probe import _largest, _Stopping
    from batchtune.engine.distributed import current
    from batchtune.engine.shape import BatchShape
    from batchtune.engine.trial import Trainer, trial_config
    from batchtune.memory.search import SearchSpace, search_ceiling
    from batchtune.memory.source import DeviceMemorySource

    p, dist = spec.probe, current()
    trainer = Trainer(components, backend, spec.precision, dist, workload=serve_workload(spec.loss))

    def config_for(batch_size: int, steps: int, validate: bool) -> Any:
        return trial_config(spec, BatchShape(batch_size, 1, dist.world_size), lr=0.0, steps=steps, grad_clip=None)

    # a trial that hangs past spec.trial_timeout ends the command (exit 2), as it ends the probe
    source = DeviceMemorySource(trainer=_Stopping(trainer), model=model, backend=backend, dist=dist,
                                config_for=config_for, steps_per_trial=p.steps_per_trial)
    largest, _ = _largest(components, p)
    _, outcome = search_ceiling(source, SearchSpace(serve_min(p), largest, p.granularity))
    trials = source.trials
    source.close()
    backend.cleanup()
    return outcome, trials


# ---------------------------------------------------------------------------- latency


def _preemptions() -> int:
    """Times the OS has switched this process out for another (involuntary context switches); 0 where unknown."""
    try:
        import resource
    except ImportError:  # not on Windows
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw


@dataclass
class _Timer:
    """Times forward passes of one model on one device, like a benchmark."""

    model: Any
    forward: Any
    backend: Any
    precision: str
    repeats: int
    max_seconds: float  # per size: stop repeating past this (after MIN_REPEATS)
    inputs: Any = None  # inputs(batch): what of a batch goes to the device (serve_inputs); None: all of it

    def passes(self, batches: list[Any]) -> list[float]:
        """Seconds of each timed pass: a batch copied to the device and run forward, synchronised.

        The passes take ``batches`` in turn (several for variable-length data, whose padded
        length changes from batch to batch; one otherwise).
        """
        from batchtune.config.components import to_device
        from batchtune.engine.workload import autocast

        import torch

        backend, device = self.backend, self.backend.device
        batches = [self.inputs(b) for b in batches] if self.inputs is not None else batches
        times: list[float] = []
        self.preempted = self.preempted_kept = 0
        with torch.inference_mode(), autocast(device.type, self.precision):
            for i in range(WARMUP_PASSES):
                self.forward(self.model, to_device(batches[i % len(batches)], device))
            backend.synchronize()
            started = time.perf_counter()
            while len(times) < self.repeats:
                batch = batches[len(times) % len(batches)]
                switches = _preemptions()
                t0 = time.perf_counter()
                self.forward(self.model, to_device(batch, device))
                backend.synchronize()
                elapsed = time.perf_counter() - t0
                over_time = time.perf_counter() - started > self.max_seconds
                # A pass the OS switched out for another process times that process: on a busy machine such passes,
                # 4 ms against a 0.04 ms median, set the p99. Timed again, while re-timing has passes and time left.
                if _preemptions() > switches:
                    if self.preempted < RETIMES_PER_REPEAT * self.repeats and not over_time:
                        self.preempted += 1
                        continue
                    if len(times) >= MIN_REPEATS:  # out of re-timing: the clean passes so far are the figures
                        break
                    self.preempted_kept += 1  # too few clean ones: it counts, and the output says so
                times.append(elapsed)
                if len(times) >= MIN_REPEATS and over_time:
                    break
        return times

    preempted: int = 0  # the last passes(): passes switched out and timed again
    preempted_kept: int = 0  # ... and passes switched out kept in its figures (re-timing ran out before MIN_REPEATS)

    def overhead(self) -> float:
        """Seconds the loop itself takes per pass (clock and synchronisation around nothing)."""
        times = []
        for _ in range(200):
            t0 = time.perf_counter()
            self.backend.synchronize()
            times.append(time.perf_counter() - t0)
        times.sort()
        return times[len(times) // 2]


def measure_latency(timer: _Timer, batches: list[Any], batch_size: int, budget_s: float, percentile: float,
                    phase: str) -> tuple[LatencyPoint, list[float]]:
    """One size's latency distribution over ``batches`` taken in turn; also the raw seconds (for
    the simulation's spread)."""
    import numpy as np

    from batchtune.engine.trial import forward_error
    from batchtune.memory.device import is_oom

    try:
        times = np.asarray(timer.passes(batches))
    except Exception as exc:  # noqa: BLE001 - an OOM goes on as it is; anything else is the user's model
        if is_oom(exc, timer.backend):
            raise
        raise forward_error(exc, batch_size) from exc
    p50, p90, p99, chosen = np.percentile(times, [50, 90, 99, percentile])
    mean = float(times.mean())
    point = LatencyPoint(batch_size, 1e3 * float(p50), 1e3 * float(p90), 1e3 * float(p99), 1e3 * mean,
                         1e3 * float(chosen), len(times), batch_size / mean, bool(chosen <= budget_s), phase,
                         timer.preempted, timer.preempted_kept)
    log.info("  %-7s batch %7d: p50 %.2f ms, p%g %.2f ms (%d passes)", phase, batch_size, point.p50_ms,
             percentile, point.at_percentile_ms, len(times))
    return point, list(times)


class _Curve:
    """The latency curve as it is measured: each size once, its batch drawn from the data set."""

    def __init__(self, timer: _Timer, dataset: Any, seed: int, budget_s: float, percentile: float,
                 collate_fn: Any = None) -> None:
        self.timer, self.dataset, self.seed, self.collate_fn = timer, dataset, seed, collate_fn
        self.budget_s, self.percentile = budget_s, percentile
        self.points: dict[int, LatencyPoint] = {}
        self.raw: dict[int, list[float]] = {}

    def batches(self, batch_size: int) -> list[Any]:
        """Batches of ``batch_size`` samples as the data set gives them (with replacement past its size):
        one for fixed-length data, :data:`VARIABLE_BATCHES` shuffled ones, each padded to its own
        longest sample, when a collate function pads variable-length samples."""
        import itertools

        from batchtune.engine.data import batches

        padding = {"collate_fn": self.collate_fn} if self.collate_fn is not None else {}
        stream = batches(self.dataset, batch_size, seed=self.seed, **padding)
        return list(itertools.islice(stream, VARIABLE_BATCHES if self.collate_fn is not None else 1))

    def meets(self, batch_size: int, phase: str) -> bool:
        if batch_size not in self.points:
            point, raw = measure_latency(self.timer, self.batches(batch_size), batch_size, self.budget_s,
                                         self.percentile, phase)
            self.points[batch_size], self.raw[batch_size] = point, raw
        return self.points[batch_size].meets_budget


def serve_min(p: Any) -> int:
    """The smallest batch serve times: one granule (1 by default). probe.min_batch_size is a training bound
    (BatchNorm cannot train on one sample): an outside CNN with min_batch_size 2 was told no size met a budget
    that batch 1 met, never timed."""
    return p.granularity


def latency_curve(curve: _Curve, min_batch_size: int, ceiling: int, granularity: int, *,
                  full: bool = False) -> int | None:
    """Measure powers of two (× ``min_batch_size``) up to the first size past the budget or the
    ceiling, then bisect the crossing to about 1.5%; the largest size that meets the budget.
    ``full``: then also the powers of two past the crossing, up to the ceiling (for the plot)."""
    from batchtune.memory.search import align_down

    last_ok, first_bad, size = None, None, min_batch_size
    while size <= ceiling:
        if not curve.meets(size, "power"):
            first_bad = size
            break
        last_ok, size = size, size * 2
    if first_bad is None and last_ok is not None and last_ok < ceiling:
        if curve.meets(ceiling, "ceiling"):
            last_ok = ceiling
        else:
            first_bad = ceiling
    # Latency is noisy: bisect to about 1.5% of the size (one granule for small sizes), not below it.
    while last_ok is not None and first_bad is not None and first_bad - last_ok > max(
            granularity, align_down(last_ok / 64, granularity)):
        mid = min(max(align_down((last_ok + first_bad) / 2, granularity), last_ok + granularity),
                  first_bad - granularity)
        if curve.meets(mid, "bisect"):
            last_ok = mid
        else:
            first_bad = mid
    answer = largest_meeting(curve.points, 1e3 * curve.budget_s)
    while full and first_bad is not None and size * 2 <= ceiling:  # past the answer: shape only
        size *= 2
        curve.meets(size, "power")
    return answer


def largest_meeting(points: dict[int, LatencyPoint], budget_ms: float) -> int | None:
    """The largest measured size whose latency meets the budget on the curve's best non-decreasing fit.

    Latency does not fall as a batch grows; a measured tail that does is noise (a pass other work
    delayed), and one lucky size above an unlucky one must not decide the answer.
    """
    from batchtune.commands.sweep_analysis import decreasing_fit

    sizes = sorted(points)
    fitted = [-v for v in decreasing_fit([-points[b].at_percentile_ms for b in sizes])]
    meeting = [b for b, v in zip(sizes, fitted) if v <= budget_ms]
    return max(meeting) if meeting else None


# ---------------------------------------------------------------------------- dynamic batching


def dynamic_batching(points: list[LatencyPoint], raw: dict[int, list[float]], max_batch_size: int | None, *,
                     rate: float, budget_s: float, percentile: float, seed: int) -> tuple[dict[str, Any] | None,
                                                                                             str | None]:
    """The simulated batcher setting for ``rate`` on the measured curve: (JSON ``dynamic``, or None
    and why not). The curve is the sizes' mean times, as the table's samples/s: a backlogged batcher
    sustains a rate only below batch ÷ mean service time (a median ignores the slow passes that
    also take device time). Each batch's time is scaled by a latency-over-mean ratio drawn from
    the nearest measured size's passes, so the simulation keeps their spread."""
    import numpy as np

    from batchtune.stats.batching import ServiceCurve, choose_setting

    sizes = sorted(p.batch_size for p in points if p.phase != "bisect" or p.batch_size == max_batch_size)
    means = {b: float(np.mean(raw[b])) for b in sizes}
    ratios = [np.asarray(raw[b]) / means[b] for b in sizes]
    curve = ServiceCurve.from_points(sizes, [means[b] for b in sizes], ratios)
    grid = [b for b in sizes if max_batch_size is None or b <= max_batch_size] or sizes[:1]
    choice = choose_setting(curve, grid, rate=rate, budget_s=budget_s, percentile=percentile, seed=seed)
    summary = {"rate": rate, "settings_simulated": len(choice.settings), "requests": choice.requests,
               "simulation_seconds": round(choice.seconds, 3), "capacity": choice.capacity,
               "capacity_batch": choice.capacity_batch}
    if choice.best is None:
        return None, _no_setting(choice, summary)
    best = choice.best
    return {"max_batch_size": best.max_batch_size, "max_queue_delay_ms": 1e3 * best.max_queue_delay,
            "p50_ms": 1e3 * best.p50, "p90_ms": 1e3 * best.p90, "p99_ms": 1e3 * best.p99,
            "at_percentile_ms": 1e3 * best.at_percentile, "throughput": best.served_per_busy_s,
            "utilisation": best.utilisation, "mean_batch": best.mean_batch,
            "frontier": _frontier(choice), **summary}, None


def _no_setting(choice: Any, summary: dict[str, Any]) -> str:
    if choice.reason == "rate":
        devices = math.ceil(choice.rate / choice.capacity) if choice.capacity > 0 else None
        return (f"no setting sustains {choice.rate:g} requests/s: full batches of {choice.capacity_batch} serve at "
                f"most {choice.capacity:,.0f}/s on one device (batch ÷ mean latency)"
                + (f"; {devices} devices would" if devices else ""))
    sustaining = [s for s in choice.settings if s.sustains]
    best = min(sustaining, key=lambda s: s.at_percentile)
    return (f"settings sustain {choice.rate:g} requests/s, but none keeps p{choice.percentile:g} within "
            f"{duration_ms(1e3 * choice.budget_s)} (best: {1e3 * best.at_percentile:.1f} ms at max batch "
            f"{best.max_batch_size}, delay {1e3 * best.max_queue_delay:.2f} ms)")


def _frontier(choice: Any) -> list[dict[str, float]]:
    """Each simulated setting's (latency at the percentile, throughput per device), for the plot."""
    return [{"max_batch_size": s.max_batch_size, "max_queue_delay_ms": 1e3 * s.max_queue_delay,
             "at_percentile_ms": 1e3 * s.at_percentile, "throughput": s.served_per_busy_s, "sustains": s.sustains}
            for s in choice.settings]


# ---------------------------------------------------------------------------- request lengths


def _lengths(components: Any, limit: int = 4096) -> tuple[list[int], str]:
    """Samples' lengths and where they come from: the components' own reading for variable-length
    data (``data.length_key``, else the largest varying dimension), else the first ``limit`` samples' largest
    tensor dimension."""
    if getattr(components, "variable_length", False):
        key = components.length_key
        return list(components.lengths()), (f"data.length_key {key!r}" if key is not None
                                             else "each sample's largest dimension that varies across samples")
    from batchtune.engine.data import tensors

    dataset = components.train_set
    n = min(len(dataset), limit)
    out = [max((max(t.shape, default=1) for t in tensors(dataset[i])), default=1) for i in range(n)]
    return out, f"each sample's largest tensor dimension (first {count_of(n, 'sample')})"


def length_buckets(curve: _Curve, components: Any, batch_size: int) -> dict[str, Any]:
    """Latency at ``batch_size`` by length bucket (quartiles of the lengths), the worst case (the
    longest samples) and a random mix; the gain of bucketing is the mix's median latency over the
    buckets' share-weighted medians (the same requests, padded to their bucket instead of their batch)."""
    import numpy as np

    from batchtune.engine.data import padding_waste

    lengths, source = _lengths(components)
    arr = np.asarray(lengths)
    out: dict[str, Any] = {"source": source, "samples": len(lengths), "min": int(arr.min()), "max": int(arr.max()),
                           "median": float(np.median(arr)), "batch_size": batch_size, "buckets": []}
    collate = getattr(components, "collate", None)
    if arr.min() == arr.max() or collate is None or not getattr(components, "variable_length", False):
        out["note"] = ("every request has the same length: one bucket, nothing to gain from bucketing"
                       if arr.min() == arr.max() else
                       "lengths vary, but the spec names no data.collate to pad them: not measured by bucket")
        return out
    out["pads"] = components.pads()  # a collate that concatenates requests pads nothing
    padding = padding_waste if out["pads"] else lambda *_: 0.0
    edges = sorted({int(np.percentile(arr, q, method="lower")) for q in (25, 50, 75)} | {int(arr.max())})
    rng = np.random.default_rng(curve.seed)
    low, bucketed_plans = int(arr.min()) - 1, []
    for edge in edges:
        members = np.flatnonzero((arr > low) & (arr <= edge))
        if members.size:
            plans = [rng.choice(members, size=batch_size, replace=members.size < batch_size)
                     for _ in range(VARIABLE_BATCHES)]
            bucketed_plans += plans
            point = _measured(curve, collate, plans, batch_size, f"bucket≤{edge}")
            out["buckets"].append({"lengths": [low + 1, edge], "share": members.size / arr.size,
                                   **_bucket_row(point), "padding": padding(arr, plans)})
        low = edge
    longest = [np.argsort(-arr, kind="stable")[:batch_size]]
    out["worst"] = {**_bucket_row(_measured(curve, collate, longest, batch_size, "longest")),
                    "padding": padding(arr, longest)}
    mixed = [rng.choice(arr.size, size=batch_size) for _ in range(VARIABLE_BATCHES)]
    out["mixed"] = {**_bucket_row(_measured(curve, collate, mixed, batch_size, "mixed")),
                    "padding": padding(arr, mixed)}
    # Medians, not means: a pass that other work delayed would otherwise decide the gain.
    bucketed = sum(b["share"] * b["p50_ms"] for b in out["buckets"])
    out["bucketed_p50_ms"] = bucketed
    out["bucketed_mean_ms"] = sum(b["share"] * b["mean_ms"] for b in out["buckets"])
    out["bucketed_padding"] = padding(arr, bucketed_plans)
    out["gain"] = out["mixed"]["p50_ms"] / bucketed if bucketed > 0 else None
    return out


def _measured(curve: _Curve, collate: Any, plans: list[Any], batch_size: int, phase: str) -> LatencyPoint:
    """Latency over the batches of ``plans`` (lists of sample indices), each collated (padded) once."""
    dataset = curve.dataset
    batches = [collate([dataset[int(i)] for i in plan]) for plan in plans]
    point, _ = measure_latency(curve.timer, batches, batch_size, curve.budget_s, curve.percentile, phase)
    return point


def _bucket_row(point: LatencyPoint) -> dict[str, Any]:
    return {"p50_ms": point.p50_ms, "p99_ms": point.p99_ms, "at_percentile_ms": point.at_percentile_ms,
            "mean_ms": point.mean_ms, "meets_budget": point.meets_budget, "samples_per_s": point.samples_per_s}


# ---------------------------------------------------------------------------- the command


def _setup(spec: Any, backend: Any) -> tuple[Any, Any, Any, Any]:
    """(spec, components, backend, model): the model built once, on the device, counted as the baseline."""
    from batchtune.config.components import build_components
    from batchtune.config.spec import Spec, load_spec
    from batchtune.engine.distributed import current
    from batchtune.engine.host import set_threads, steady_malloc
    from batchtune.engine.trial import agreed
    from batchtune.memory.device import backend_for_spec

    if not isinstance(spec, Spec):
        spec = load_spec(spec, training=False)
    set_threads(spec.device.threads)
    steady_malloc()
    components = agreed(current(), lambda: build_components(spec), "building the data")  # as prepare's
    backend = backend if backend is not None else backend_for_spec(spec)
    model = components.build_model(spec.seed).to(backend.device)
    backend.track(list(model.parameters()) + list(model.buffers()))
    return spec, components, backend, model


def _check_options(percentile: float, rate: float | None, repeats: int, budget_s: float) -> None:
    if not (0 < percentile <= 100):
        raise ServeInputError(f"--percentile must be in (0, 100], got {percentile:g}")
    if rate is not None and not (math.isfinite(rate) and rate > 0):
        raise ServeInputError(f"--rate must be a positive number of requests per second, got {rate:g}")
    if repeats < MIN_REPEATS:
        raise ServeInputError(f"--repeats must be at least {MIN_REPEATS}, got {repeats}")
    if not (math.isfinite(budget_s) and budget_s > 0):
        raise ServeInputError(f"--latency-budget must be a positive duration, got {budget_s!r} s")


def run_serve(spec: Any, *, latency_budget: float, percentile: float = 99.0, rate: float | None = None,
              repeats: int = 100, max_seconds_per_size: float = 5.0, buckets: bool = True,
              full_curve: bool = False, backend: Any = None) -> ServeResult:
    """The inference ceiling, the latency curve and the batch sizes for a latency budget.

    Args:
        spec: a Spec, or a path (loaded without the training keys: only model and data are needed).
        latency_budget: seconds the chosen percentile of a batch's latency may take.
        percentile: which latency percentile the budget bounds.
        rate: requests per second (Poisson) for the dynamic batcher; None: no simulation.
        repeats: timed passes per size after warm-up (fewer past ``max_seconds_per_size``, at least 20).
        buckets: report request lengths (and measure by length bucket when they vary).
        full_curve: also time the powers of two past the budget, up to the ceiling.
        backend: a device backend instead of the spec's.

    Raises:
        ServeInputError: an option out of range. SpecError: the spec.
    """
    import torch

    from batchtune.engine.host import LoadMeter

    _check_options(percentile, rate, repeats, latency_budget)
    started = time.perf_counter()
    spec, components, backend, model = _setup(spec, backend)
    p = spec.probe
    searched = backend.capacity_bytes() is not None
    if searched:
        log.info("serve %s: inference ceiling ...", spec.name)
        outcome, trials = inference_ceiling(spec, _worst_case(components), backend, model)
    else:  # no capacity to run out of: a search would grow to the data set's size (9.5 GiB for the char LM)
        from batchtune.commands.probe import _largest
        from batchtune.memory.search import SearchOutcome

        outcome, trials = SearchOutcome(_largest(components, p)[0], True, None, None), []
    result = ServeResult(spec.name, 1e3 * latency_budget, percentile, outcome.ceiling, outcome.capped, p.granularity,
                         backend.capacity_bytes(), outcome.model, _trial_rows(trials, outcome), None, [], 0.0,
                         backend.describe(), spec.precision, rate=rate, ceiling_searched=searched)
    result.seconds["ceiling"] = time.perf_counter() - started
    if outcome.ceiling is None:
        result.notes.append(f"not even batch {serve_min(p)} fits for inference")
        return result
    model.eval()
    meter = LoadMeter.start()
    timer = _Timer(model, serve_forward(spec.loss), backend, spec.precision, repeats, max_seconds_per_size,
                   serve_inputs(spec.loss))
    result.overhead_ms = 1e3 * timer.overhead()
    curve = _Curve(timer, components.train_set, spec.seed, latency_budget, percentile,
                   getattr(components, "collate_fn", None))
    log.info("serve %s: latency up to %d ...", spec.name, outcome.ceiling)
    try:
        result.max_batch_size = latency_curve(curve, serve_min(p), outcome.ceiling, p.granularity, full=full_curve)
        result.points = sorted(curve.points.values(), key=lambda q: q.batch_size)
        result.seconds["latency"] = time.perf_counter() - started - result.seconds["ceiling"]
        if rate is not None:
            result.dynamic, result.dynamic_reason = dynamic_batching(
                result.points, curve.raw, result.max_batch_size, rate=rate, budget_s=latency_budget,
                percentile=percentile, seed=spec.seed)
        if buckets:
            result.lengths = length_buckets(curve, components, result.max_batch_size or serve_min(p))
    except KeyboardInterrupt:  # Ctrl-C had discarded the sizes already timed
        raise ServeInterrupted(_interrupted(result, curve, started)) from None
    result.load = meter.reading(torch.get_num_threads())
    result.notes += _notes(result, p)
    result.seconds["total"] = time.perf_counter() - started
    return result


def _interrupted(result: ServeResult, curve: _Curve, started: float) -> ServeResult:
    """The result as Ctrl-C left it: the sizes timed so far, and the largest of them meeting the budget."""
    result.interrupted = True
    if not result.points:  # interrupted while timing the curve
        result.points = sorted(curve.points.values(), key=lambda q: q.batch_size)
        result.max_batch_size = largest_meeting(curve.points, result.budget_ms) if curve.points else None
        result.notes.append(f"PARTIAL: interrupted while timing the latency curve, after "
                            f"{count_of(len(result.points), 'size')}: max batch size is the largest of them meeting "
                            "the budget; the search had not finished")
    else:
        result.notes.append("PARTIAL: interrupted after the latency curve: what comes after it (the --rate "
                            "simulation, the request lengths) may be missing")
    result.seconds["total"] = time.perf_counter() - started
    return result


def _worst_case(components: Any) -> Any:
    """Variable-length data: the components whose batches hold the longest samples (the memory worst case)."""
    try:
        from batchtune.engine.data import worst_case
    except ImportError:  # fixed-length data only
        return components
    return worst_case(components)


def _trial_rows(trials: list[Any], outcome: Any) -> list[dict[str, Any]]:
    rows = [{"batch_size": t.batch_size, "fits": t.result.fits, "peak_bytes": t.result.compute_peak_bytes,
             "seconds": round(t.result.seconds, 4), "phase": t.phase} for t in trials]
    for row, (_, phase, _) in zip(rows, outcome.phases):
        row["phase"] = phase
    return rows


def _notes(result: ServeResult, p: Any) -> list[str]:
    notes = []
    if not result.ceiling_searched:
        notes.append("the device's memory is unknown (a cpu device without device.memory_limit): the inference "
                     f"ceiling was not searched, and sizes up to {result.ceiling:,} (probe.max_batch_size or the "
                     "training set's size) were bounded by latency alone; set device.memory_limit to search it")
    elif result.capped:
        notes.append(f"the inference ceiling is the largest size searched ({result.ceiling:,}: probe.max_batch_size "
                     "or the training set's size); the device may hold more")
    if result.max_batch_size is None and result.points:
        first = result.points[0]
        notes.append(f"even batch {first.batch_size} takes {first.at_percentile_ms:.2f} ms at p{result.percentile:g}, "
                     f"over the {duration_ms(result.budget_ms)} budget")
    elif result.max_batch_size == result.ceiling:
        notes.append("memory, not the latency budget, sets the largest batch: every size up to the ceiling meets it")
    worst = (result.lengths or {}).get("worst")
    if worst is not None and not worst["meets_budget"]:
        notes.append(f"a batch of the {result.lengths['batch_size']} longest requests takes "
                     f"{worst['at_percentile_ms']:.1f} ms at p{result.percentile:g}, over the budget: bucket requests "
                     "by length, or cap the batch for long ones")
    from batchtune.render.check import busy_note

    busy = busy_note(result.load, "latencies, above all the tails, are")
    others = result.load.get("other_cores") or 0.0
    if busy:
        notes.append(busy)
    elif others >= QUIET_OTHER_CORES:  # not enough to slow throughput much, enough for a pass to wait
        notes.append(f"other processes used {others:.1f} of {result.load['cores']} cores while timing: a pass that "
                     "waited for a core shows in the tails (p99 most); rerun on a quiet machine to confirm")
    notes += _switched_notes(result)
    small = [q.batch_size for q in result.points if q.percentile_unreliable(result.percentile)]
    if result.percentile >= 100:  # an outside --percentile 100 picked 24 at 33.7 ms, its random batches' p100 43 ms
        notes.append("p100 is each size's slowest pass, which only grows with more passes (or another run): no number "
                     "of them measures it, so the pick moves between runs; a percentile below 100 (99.9 with "
                     "--repeats 1000) is one a measurement can hold")
    elif small:
        notes.append(f"{_percentile_warning(result.percentile)}; {len(small)} of {len(result.points)} sizes had fewer "
                     "(--repeats, the time cap per size, or passes the OS switched out left out): their "
                     f"p{result.percentile:g} is in effect their slowest pass, rough")
    return notes


def _switched_notes(result: ServeResult) -> list[str]:
    """What the passes the OS switched out did to the figures. Each is timed again while a size has re-timing left
    (:data:`RETIMES_PER_REPEAT` × its passes, within its time cap); past that, a size short of
    :data:`MIN_REPEATS` clean passes keeps switched-out ones. An outside ViT on a loaded 2-core machine was told
    every one 'was timed again and left out, so the figures are the model's own' beside p99s they had set (batch
    16: p50 1.55 ms, p99 17.89 ms)."""
    retimed = sum(q.preempted for q in result.points)
    kept = [q for q in result.points if q.preempted_kept]
    if not retimed and not kept:
        return []
    q = f"p{result.percentile:g}"
    if not kept:
        return [f"the OS switched {retimed:,} passes out for other processes while timing: each was timed again and "
                "left out, so the figures are the model's own; a server sharing its cores like this would see longer "
                "tails"]
    sizes = ", ".join(f"{p.batch_size} ({p.preempted_kept} of {p.repeats})" for p in kept)
    notes = [f"the OS switched {retimed + sum(p.preempted_kept for p in kept):,} passes out for other processes while "
             f"timing; {retimed:,} were timed again and left out, but re-timing ran out at {len(kept)} of "
             f"{len(result.points)} sizes, whose figures include switched-out passes (batch {sizes}): those figures, "
             f"the tails ({q}) most, are this machine's, not the model's own: rough"
             + (", and so is the --rate simulation's spread, drawn from them" if result.rate is not None else "")
             + "; rerun on a quiet machine"]
    decided = _deciding(result)
    if decided is not None and decided.preempted_kept:
        answer = (f"max batch {result.max_batch_size}" if result.max_batch_size is not None else
                  "no size meeting the budget")
        notes.append(f"the budget's answer ({answer}) rests on a tail that includes switched-out passes: batch "
                     f"{decided.batch_size}, over the budget at {q} {decided.at_percentile_ms:.2f} ms. Switched-out "
                     "passes only lengthen a tail, so the answer may be too small, not too large")
    return notes


def _deciding(result: ServeResult) -> LatencyPoint | None:
    """The measured size that stopped the answer from being larger: the smallest over the budget above it."""
    above = [p for p in result.points if not p.meets_budget
             and (result.max_batch_size is None or p.batch_size > result.max_batch_size)]
    return min(above, key=lambda p: p.batch_size, default=None)


# ---------------------------------------------------------------------------- check --serve


@dataclass
class ServeCheck:
    """``check --serve``: does the intended serving batch fit, and does it meet the latency budget?"""

    name: str
    batch_size: int
    budget_ms: float
    percentile: float
    checks: list[dict[str, Any]]  # name, status (pass | warn | fail | skip), reason, figures
    device: dict[str, Any]
    precision: str
    capacity_bytes: int | None
    seconds: float
    point: LatencyPoint | None = None
    interrupted: bool = False  # Ctrl-C: the checks not finished before it are skipped

    def exit_code(self, strict: bool = False) -> int:
        """1 when a check failed (or, with ``strict``, warned), as ``check``'s other failures; else 0
        (130 when interrupted, 143 when SIGTERM stopped it)."""
        if self.interrupted:
            return interrupted_exit_code()
        return 1 if any(c["status"] == "fail" or (strict and c["status"] == "warn") for c in self.checks) else 0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["status"] = "interrupted" if self.interrupted else "fail" if self.exit_code() else "pass"
        return out


def _serving_batch(spec: Any, batch_size: int | None) -> int:
    if batch_size is not None:
        return batch_size
    if spec.train is not None and spec.train.batch_size is not None:
        return spec.train.batch_size
    raise ServeInputError("check --serve needs the serving batch: give --batch-size (or train.batch_size in the spec)")


def run_serve_check(spec: Any, *, latency_budget: float, percentile: float = 99.0, batch_size: int | None = None,
                    repeats: int = 100, backend: Any = None) -> ServeCheck:
    """Run the serving batch forward only on the device (memory counted), then time it.

    Checks: ``serve_fits`` (fails on an out-of-memory) and ``latency`` (fails when the chosen
    percentile is over the budget; skipped when the batch does not fit).
    """
    from batchtune.engine.shape import BatchShape
    from batchtune.engine.trial import Trainer, trial_config
    from batchtune.engine.watchdog import stop_if_timed_out

    _check_options(percentile, None, repeats, latency_budget)
    started = time.perf_counter()
    spec, components, backend, model = _setup(spec, backend)
    size = _serving_batch(spec, batch_size)
    trainer = Trainer(_worst_case(components), backend, spec.precision, workload=serve_workload(spec.loss))
    checks: list[dict[str, Any]] = []
    capacity, point = None, None
    try:
        trial = stop_if_timed_out(trainer.run(trial_config(spec, BatchShape(size, 1, 1), lr=0.0, grad_clip=None,
                                                           steps=spec.probe.steps_per_trial), model=model))
        capacity = backend.capacity_bytes()
        checks.append(_fits_verdict(trial, capacity))
        if trial.fits:
            point = _latency_checks(spec, components, backend, model, size, latency_budget, percentile, repeats, checks)
        else:
            checks.append({"name": "latency", "status": "skip", "reason": "not measured: the batch does not fit",
                           "figures": {}})
    except KeyboardInterrupt:  # Ctrl-C had discarded the verdicts already reached: the others are skipped
        names = ["serve_fits", "latency"] + (["worst_case_latency"] if components.collate_fn is not None else [])
        checks += [{"name": n, "status": "skip", "reason": INTERRUPTED, "figures": {}} for n in names
                   if n not in {c["name"] for c in checks}]
        raise ServeInterrupted(ServeCheck(spec.name, size, 1e3 * latency_budget, percentile, checks, backend.describe(),
                                          spec.precision, capacity, time.perf_counter() - started,
                                          interrupted=True)) from None
    return ServeCheck(spec.name, size, 1e3 * latency_budget, percentile, checks, backend.describe(), spec.precision,
                      capacity, time.perf_counter() - started, point)


def _latency_checks(spec: Any, components: Any, backend: Any, model: Any, size: int, latency_budget: float,
                    percentile: float, repeats: int, checks: list[dict[str, Any]]) -> LatencyPoint:
    """Time the serving batch (``latency``) and, for variable-length requests, the longest (``worst_case_latency``);
    each verdict appended to ``checks`` as it is reached. Returns the serving batch's latency."""
    model.eval()
    timer = _Timer(model, serve_forward(spec.loss), backend, spec.precision, repeats, 10.0, serve_inputs(spec.loss))
    curve = _Curve(timer, components.train_set, spec.seed, latency_budget, percentile,
                   getattr(components, "collate_fn", None))
    point, _ = measure_latency(timer, curve.batches(size), size, latency_budget, percentile, "check")
    q = f"p{percentile:g}"
    reason = (f"{q} {_fmt_ms(point.at_percentile_ms)} ms {'≤' if point.meets_budget else '>'} "
              f"{duration_ms(1e3 * latency_budget)} budget (p50 {_fmt_ms(point.p50_ms)} ms over "
              f"{point.repeats} passes; {point.samples_per_s:,.0f} samples/s)")
    if point.percentile_unreliable(percentile):
        reason += f"; {_percentile_warning(percentile)}: p{percentile:g} of {point.repeats} passes is in effect the " \
                  "slowest, rough"
    if point.preempted_kept:
        reason += (f"; {point.preempted_kept} of the {point.repeats} passes were switched out by the OS for other "
                   f"processes (timing them again ran out): {q} is this machine's, not the model's own, rough")
    checks.append({"name": "latency", "status": "pass" if point.meets_budget else "fail", "reason": reason,
                   "figures": asdict(point)})
    if components.collate_fn is not None:  # variable-length requests, padded as collated
        checks.append(_worst_case_check(curve, components, size, q))
    return point


def _worst_case_check(curve: _Curve, components: Any, size: int, q: str) -> dict[str, Any]:
    """Variable-length requests: the batch of the ``size`` longest, padded as collated. Random
    batches decide ``latency``; this one is rare, so breaking the budget warns (fails with --strict)."""
    import numpy as np

    lengths = np.asarray(_lengths(components)[0])
    longest = [np.argsort(-lengths, kind="stable")[:size]]
    point = _measured(curve, components.collate, longest, size, "longest")
    verdict = "≤" if point.meets_budget else "> the"
    return {"name": "worst_case_latency", "status": "pass" if point.meets_budget else "warn", "figures": asdict(point),
            "reason": f"the {size} longest requests (length {int(lengths[longest[0]].min())}–{int(lengths.max())}): "
                      f"{q} {_fmt_ms(point.at_percentile_ms)} ms {verdict} {duration_ms(1e3 * curve.budget_s)} budget"
                      + ("" if point.meets_budget else "; bucket requests by length, or cap the batch for long ones")}


def _percentile_warning(percentile: float) -> str:
    return (f"p{percentile:g} needs at least {math.ceil(round(100 / (100 - percentile), 6))} passes to see one beyond "
            "it")


def _fmt_ms(x: float) -> str:
    return f"{x:.3g}" if x < 1 else f"{x:.2f}"


def _fits_verdict(trial: Any, capacity: int | None) -> dict[str, Any]:
    from batchtune.render.text import format_bytes

    figures = {"peak_bytes": trial.compute_peak_bytes, "capacity_bytes": capacity, "error": trial.error}
    if not trial.fits:
        return {"name": "serve_fits", "status": "fail", "figures": figures,
                "reason": f"out of memory at batch {trial.batch_size} running forward only ({trial.error})"}
    room = f" of {format_bytes(capacity)}, {1 - trial.compute_peak_bytes / capacity:.0%} free" if capacity else ""
    return {"name": "serve_fits", "status": "pass", "figures": figures,
            "reason": f"forward-only peak {format_bytes(trial.compute_peak_bytes)}{room}"}
