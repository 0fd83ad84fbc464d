"""Find the OOM ceiling: the largest batch that completes full training steps on the device.

The probe asks a :class:`~batchtune.memory.source.DeviceMemorySource` for peak memory at
batch sizes; the search that source allows (:mod:`batchtune.memory.search`) finds the
exact ceiling. The probe then proves memory came back after every OOM, picks the safe
size (headroom under the capacity) and confirms it with a few optimizer steps plus a
validation pass.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from batchtune.memory.model import MemoryModel
from batchtune.memory.search import SearchOutcome, SearchSpace, align_down, search_ceiling, seeded_search
from batchtune.memory.source import DeviceMemorySource, DeviceTrial
from batchtune.render.text import apart, count_of, format_bytes

log = logging.getLogger(__name__)

__all__ = ["ProbeResult", "ProbeTrial", "run_probe", "run_probe_estimate", "safe_size"]

#: The confirmation runs at least this many optimizer steps, then a validation pass.
MIN_CONFIRM_STEPS = 3
CONFIRM_RETRIES = 3  # steps down a confirmed size that left less than the headroom free, at most this often


@dataclass
class ProbeTrial:
    batch_size: int
    fits: bool
    peak_bytes: int | None
    seconds: float
    steps: int  # training steps attempted (an OOM's unfinished step counts)
    phase: str  # anchor | explore | approach | predict | verify | bisect | grow | confirm (predict: the estimate-seeded guess too)
    leaked_bytes: int = 0
    error: str | None = None


@dataclass
class ProbeResult:
    """The ceiling, the batch size to use, and the evidence."""

    ceiling: int | None
    safe_batch_size: int | None
    power_of_two_batch_size: int | None
    capacity_bytes: int | None
    baseline_bytes: int
    headroom: float  # requested share of capacity left free
    granularity: int
    strategy: str  # model-guided | growth-bisect
    capped: bool
    memory_model: MemoryModel | None
    predicted_ceiling: float | None
    safe_peak_bytes: int | None  # measured by the confirmation run
    safe_headroom: float | None  # measured share of capacity left free at the safe size
    confirmed: bool
    confirm_val_loss: float | None
    memory_returned: bool  # after every OOM, memory came back to the baseline
    max_leaked_bytes: int
    trials: list[ProbeTrial]
    device: dict[str, Any]
    precision: str
    notes: list[str] = field(default_factory=list)
    confirm_steps: int | None = None  # optimizer steps the confirmation ran before its validation pass
    estimate: dict[str, Any] | None = None  # strategy "estimate": the traced steps' figures (memory/estimate.py)
    # variable-length data (data.collate / data.length_key): the ceiling is the worst case's; the token
    # budget and both batchings measured (commands/varlen.py TokenBudget.to_dict())
    variable_length: dict[str, Any] | None = None
    # distributed.strategy fsdp: what sharding divides per rank and what it does not, and the
    # per-rank ceilings projected to other world sizes (engine/sharding.py report())
    sharding: dict[str, Any] | None = None
    # several ranks: the rank whose memory bounds the agreed ceiling, and each rank's margin there
    bounding_rank: dict[str, Any] | None = None

    @property
    def search_trials(self) -> int:
        return sum(1 for t in self.trials if t.phase != "confirm")

    @property
    def total_steps(self) -> int:
        return sum(t.steps for t in self.trials)

    @property
    def total_seconds(self) -> float:
        return sum(t.seconds for t in self.trials)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["memory_model"] = self.memory_model.to_dict() if self.memory_model else None
        out["totals"] = {"trials": len(self.trials), "search_trials": self.search_trials,
                         "steps": self.total_steps, "seconds": round(self.total_seconds, 3)}
        return out


def safe_size(ceiling: int, model: MemoryModel | None, capacity: int | None, headroom: float,
              granularity: int, min_batch_size: int) -> int:
    """The largest size (multiple of granularity, at most the ceiling) that leaves ``headroom`` free.

    With a capacity and a memory model, headroom is a share of memory; without them it
    falls back to the same share of the ceiling.
    """
    if capacity is not None and model is not None and model.per_sample_bytes > 0:
        size = align_down(model.max_batch_size((1.0 - headroom) * capacity), granularity)
    else:
        size = align_down(ceiling * (1.0 - headroom), granularity)
    return max(min(size, ceiling), min_batch_size)


def run_probe(spec: Any, backend: Any = None, *, components: Any = None) -> ProbeResult:
    """Find the ceiling and the safe batch size for ``spec`` (a Spec or a path).

    Args:
        spec: a :class:`~batchtune.config.spec.Spec`, or a path to a spec file.
        backend: a device backend to use instead of the one the spec selects.
        components: the spec's components when the caller already built them (the sweep
            does), so that the data set is built once per command.
    """
    from batchtune.engine.distributed import current

    from batchtune.engine.host import LoadMeter, set_threads

    from batchtune.engine.data import worst_case

    spec, components, backend = _setup(spec, backend, components)
    data_components, components = components, worst_case(components)  # the longest samples, as collated
    log.info("probing %s ...", spec.name)
    meter, (threads, threads_from) = LoadMeter.start(), set_threads(spec.device.threads)
    dist = current()
    notes: list[str] = []
    source = _device_source(spec, components, backend, dist)
    # the model the search trains, not another one built
    p = probe_settings(spec, source.model, notes, _device_single_values(components, source.model, backend, dist))
    largest, cap_note = _largest(components, p)
    space = SearchSpace(p.min_batch_size, largest, p.granularity)
    estimate = _estimate_for(spec, notes) if p.from_estimate and source.knows_capacity else None
    if estimate is not None:
        per_sample = estimate.memory_model.per_sample_bytes if estimate.memory_model is not None else None
        strategy, outcome = SEEDED, seeded_search(source.measure, guess=estimate.ceiling,
                                                  min_batch_size=p.min_batch_size, max_batch_size=largest,
                                                  granularity=p.granularity, capacity_bytes=source.capacity_bytes,
                                                  per_sample_bytes=per_sample)
        outcome.model = outcome.model or estimate.memory_model  # two trials leave one point to fit
    else:
        strategy, outcome = search_ceiling(source, space)
    against_estimate = _against_estimate(estimate, source.trials, outcome.ceiling, notes) if estimate else None
    max_leak = _max_leaked_bytes(source.trials, dist)
    if max_leak > 0:
        notes.append(f"memory did not return to the baseline after an OOM: {max_leak} bytes still held "
                     "(references kept by user code?); later trials may under-report the ceiling")
    if outcome.capped:
        notes.append(cap_note or f"max_batch_size ({outcome.ceiling}) fits: the device may hold more; "
                                 "raise probe.max_batch_size")
    if outcome.ceiling is None and source.capacity_bytes:
        notes += _nothing_fits_notes(spec, components, p.min_batch_size, source.capacity_bytes)
    confirmation = _confirm(source, outcome, p, notes) if outcome.ceiling is not None else _Confirmation()
    notes += _loss_notes(source.trials, data_components, spec.seed)
    varlen = _variable_length(spec, data_components, (source.model, backend, dist), outcome.ceiling,
                              confirmation.batch_size)
    sharding, bound = _sharding_report(spec, source, dist), _bounding_rank(source, outcome, backend, dist)
    source.close()
    backend.cleanup()
    load = meter.reading(threads)
    if load["busy"]:
        from batchtune.render.check import busy_note

        notes.append(busy_note(load, "the trials' seconds are") + "; memory figures are unaffected")
    return ProbeResult(
        ceiling=outcome.ceiling, safe_batch_size=confirmation.batch_size,
        power_of_two_batch_size=_power_of_two(confirmation.batch_size, p.min_batch_size),
        capacity_bytes=source.capacity_bytes, baseline_bytes=source.baseline_bytes, headroom=p.headroom,
        granularity=p.granularity, strategy=strategy, capped=outcome.capped, memory_model=outcome.model,
        predicted_ceiling=outcome.predicted_ceiling, safe_peak_bytes=confirmation.peak_bytes,
        safe_headroom=confirmation.headroom, confirmed=confirmation.batch_size is not None,
        confirm_val_loss=confirmation.val_loss, confirm_steps=confirmation.steps,
        memory_returned=max_leak <= 0, max_leaked_bytes=max_leak, trials=_probe_trials(source.trials, outcome),
        device={**backend.describe(), "world_size": dist.world_size, "threads": threads, "threads_from": threads_from,
                "load": load}, precision=spec.precision, notes=notes, variable_length=varlen,
        sharding=sharding, bounding_rank=bound,
        estimate={**estimate.estimate, "vs_measured": against_estimate} if estimate and estimate.estimate else None,
    )


#: A traced peak further than this from the measured one is reported as a disagreement.
ESTIMATE_TOLERANCE = 0.05


def _against_estimate(estimate: ProbeResult, trials: list[DeviceTrial], ceiling: int | None,
                      notes: list[str]) -> dict[str, Any]:
    """The estimate seeded the search: compare its ceiling and its peak at the measured ceiling with
    the measurement, and say so in ``notes`` when they disagree (the measured figures stand)."""
    measured = next((t.result.peak_bytes for t in reversed(trials) if t.batch_size == ceiling and t.result.fits), None)
    model = estimate.memory_model
    predicted = round(model.predict(ceiling)) if model is not None and ceiling is not None else None
    error = (predicted - measured) / measured if predicted is not None and measured else None
    out = {"estimated_ceiling": estimate.ceiling, "measured_ceiling": ceiling, "estimated_peak_bytes": predicted,
           "measured_peak_bytes": measured, "peak_error": error}
    if (error is not None and abs(error) > ESTIMATE_TOLERANCE) or estimate.ceiling != ceiling:
        peaks = (f"; at batch {ceiling} it predicted a peak of {format_bytes(predicted)}, the device measured "
                 f"{format_bytes(measured)} ({error:+.1%})" if error is not None else "")
        notes.append(f"the estimate and the measurement disagree: estimated ceiling {estimate.ceiling}, measured "
                     f"{ceiling}{peaks}. The trace cannot see what only runs on the device (kernel workspaces, "
                     "code that takes another path on real tensors); the measured figures stand")
    return out


def _variable_length(spec: Any, components: Any, run_on: tuple[Any, Any, Any] | None, ceiling: int | None,
                     safe: int | None) -> dict[str, Any] | None:
    """For variable-length data, the worst case and the token budget, both batchings timed on
    ``(model, backend, dist)`` when given (an estimate: padding figures only); None otherwise."""
    if not components.variable_length:
        return None
    from batchtune.commands.varlen import token_budget

    return token_budget(spec, components, run_on, ceiling, safe).to_dict()


SEEDED = "estimate-seeded"


def _estimate_for(spec: Any, notes: list[str]) -> ProbeResult | None:
    """The traced estimate for this device, to seed the search (None, and a note, when there is none)."""
    from batchtune.memory.estimate import EstimateError

    try:
        estimate = run_probe_estimate(spec, fallback=False)  # its fallback would be this probe again
    except EstimateError as exc:
        notes.append(f"probe.from_estimate: no estimate ({exc}); searched without one")
        return None
    if estimate.ceiling is None:
        return None
    seconds = (estimate.estimate or {}).get("seconds")
    notes.append(f"searched from the traced estimate's ceiling {estimate.ceiling}"
                 + (f" ({seconds:.1f} s to trace)" if seconds is not None else ""))
    return estimate


def run_probe_estimate(spec: Any, *, device_memory: str | None = None, context_bytes: str | int | None = None,
                       fallback: bool = True, ranks: int | None = None) -> ProbeResult:
    """The ceiling and safe size predicted from training steps traced with fake tensors.

    No training step runs and no device memory is used (``strategy`` is ``"estimate"``,
    ``totals.steps`` 0); the search of :func:`run_probe` runs on the traced peaks instead.

    Args:
        spec: a :class:`~batchtune.config.spec.Spec`, or a path to a spec file.
        device_memory: the target's memory, a size (``80GiB``) or a device name
            (:data:`~batchtune.memory.estimate.DEVICE_MEMORY`); default the spec's limit.
        context_bytes: memory beside the tensors (default 1 GiB on CUDA, 0 on the CPU simulation).
        fallback: when the model cannot be traced and no ``device_memory`` names another
            device, measure with :func:`run_probe` instead, saying so in the notes.
        ranks: under ``distributed.strategy: fsdp``, a world size to give the per-rank figures
            for, beside 2, 4, 8 and 16.

    Raises:
        EstimateInputError: the device memory or context cannot be used.
        EstimateError: the model cannot be traced, and there is no fallback.
    """
    from batchtune.config.spec import Spec, load_spec
    from batchtune.memory.estimate import EstimateError, EstimatedMemorySource, StepTracer, resolve_target

    spec = spec if isinstance(spec, Spec) else load_spec(spec)
    target = resolve_target(spec, device_memory, context_bytes)  # bad input fails before any work
    spec, components = _estimate_setup(spec)
    log.info("estimating %s for %s ...", spec.name, target.name)
    try:
        tracer = StepTracer(spec, components, target)
        source = EstimatedMemorySource(tracer)
        return _estimated_result(spec, source, components, ranks)
    except EstimateError as exc:
        if not fallback or device_memory is not None:
            raise
        log.warning("%s; measuring instead", exc)
        result = run_probe(spec, components=components)
        result.notes.insert(0, f"{exc}; measured with training steps instead")
        return result


def probe_settings(spec: Any, model: Any, notes: list[str],
                   single_values: Callable[[], dict[str, tuple[int, ...]] | None] | None = None) -> Any:
    """``spec.probe``, its smallest size raised to 2 where a BatchNorm layer of ``model`` sees one value per channel
    on one sample: in training it cannot normalise it ('Expected more than 1 value per channel'), and the probe
    stopped at batch 1 with that error on an outside model that validate had passed.

    ``single_values`` runs the model on one sample and names those layers (see
    :func:`~batchtune.config.components.batchnorm_single_values`); where it is not given or cannot tell, any
    BatchNorm layer raises the size (an outside BatchNorm1d over (B, C, 16), which trains at 1, was said to be one
    over features)."""
    from batchtune.config.components import has_batchnorm

    p = spec.probe
    if p.min_batch_size >= 2 or not has_batchnorm(model):
        return p
    single = single_values() if single_values is not None else None
    if single == {}:  # every layer sees more than one value per channel: batch 1 trains
        return p
    if single:
        layers = ", ".join(f"{name} (input {tuple(shape)})" for name, shape in single.items())
        notes.append(f"probe.min_batch_size 2: on one sample the model's BatchNorm {layers} sees one value per "
                     "channel (no length or image axis), which cannot train ('Expected more than 1 value per "
                     "channel')")
    else:
        notes.append("probe.min_batch_size 2: the model has BatchNorm layers, and a forward on one sample could not "
                     "tell whether each channel sees more than one value (one over features cannot train on one "
                     "sample); set probe.min_batch_size: 1 where each does")
    return p.model_copy(update={"min_batch_size": 2})


def _one_sample(components: Any, device: Any) -> Any:
    """The first training sample, collated alone, on ``device``; None where reading it raises."""
    from batchtune.config.components import to_device

    try:
        return to_device(components.collate([components.train_set[0]]), device)
    except Exception:  # noqa: BLE001 - the user's data set: the trials say what is wrong with it
        return None


def _device_single_values(components: Any, model: Any, backend: Any, dist: Any) -> Any:
    """:func:`probe_settings`'s ``single_values`` for the model on the device: None (not told) under several ranks,
    whose wrapped model's forward is a collective."""
    from batchtune.config.components import batchnorm_single_values

    def run() -> dict[str, tuple[int, ...]] | None:
        batch = None if dist.enabled else _one_sample(components, backend.device)
        return None if batch is None else batchnorm_single_values(model, components.loss_fn, batch)

    return run


def _concatenated_notes(components: Any) -> list[str]:
    """The estimate traces every sample at the longest one's length; a collate that concatenates samples
    (flat ids with offsets) then counts more than the longest samples hold: its ceiling errs low (an outside
    EmbeddingBag: 2032 estimated, 2165 measured)."""
    if not getattr(components, "variable_length", False) or components.pads():
        return []
    return [f"the collate concatenates samples: the estimate counts each at the longest one's length "
            f"({max(components.lengths()):,}), so its ceiling errs low where the longest samples are shorter; "
            "batchtune probe on the device measures the worst case itself"]


def _estimate_setup(spec: Any) -> tuple[Any, Any]:
    """(spec, components), without selecting the spec's device: an estimate needs none."""
    from batchtune.engine.trial import prepare
    from batchtune.memory.device import CPUBackend

    spec, components, _ = prepare(spec, CPUBackend())  # a stand-in: the spec's device may be a GPU not here
    return spec, components


def _estimated_result(spec: Any, source: Any, components: Any, ranks: int | None = None) -> ProbeResult:
    """Search the traced peaks, trace the safe size, and say what the estimate is."""
    settings_notes: list[str] = []
    p = probe_settings(spec, source.tracer.model, settings_notes, source.tracer.batchnorm_single_values)
    tracer, capacity = source.tracer, source.capacity_bytes
    largest = align_down(p.max_batch_size, p.granularity)  # the default 2**20 need not be a multiple
    samples = len(components.train_set)
    if samples < largest:  # as the measured probe: a larger batch would repeat samples
        largest = max(align_down(samples, p.granularity), p.min_batch_size)
    _, outcome = search_ceiling(source, SearchSpace(p.min_batch_size, largest, p.granularity))
    trials = [ProbeTrial(b, m.fits, point.peak_bytes, round(point.seconds, 4), 0, phase)
              for (b, phase, m), point in zip(outcome.phases, tracer.points)]
    model, safe, safe_peak = outcome.model, None, None
    if outcome.ceiling is not None:
        model = _step_model(tracer, outcome.ceiling, p) or model
        safe = safe_size(outcome.ceiling, model, capacity, p.headroom, p.granularity, p.min_batch_size)
        safe_peak = tracer.trace(safe).peak_bytes
    return ProbeResult(
        ceiling=outcome.ceiling, safe_batch_size=safe, power_of_two_batch_size=_power_of_two(safe, p.min_batch_size),
        capacity_bytes=capacity, baseline_bytes=source.baseline_bytes, headroom=p.headroom,
        granularity=p.granularity, strategy="estimate", capped=outcome.capped, memory_model=model,
        predicted_ceiling=outcome.predicted_ceiling, safe_peak_bytes=safe_peak,
        safe_headroom=1.0 - safe_peak / capacity if safe_peak is not None else None, confirmed=False,
        confirm_val_loss=None, memory_returned=True, max_leaked_bytes=0, trials=trials,
        device={**tracer.target.describe(), "world_size": 1}, precision=spec.precision,
        notes=settings_notes + _estimate_notes(tracer.target, outcome, model, samples < p.max_batch_size)
        + _concatenated_notes(components)
        + (_fixed_need_notes(tracer, p.min_batch_size, capacity) if outcome.ceiling is None and capacity else []),
        estimate=tracer.summary(),
        variable_length=_variable_length(spec, components, None, outcome.ceiling, safe),
        sharding=_estimated_sharding(spec, tracer, model, capacity, ranks))


def _nothing_fits_notes(spec: Any, components: Any, smallest: int, capacity: int) -> list[str]:
    """Where not even the smallest batch fits on the device: what its step needs, traced (:func:`_fixed_need_notes`);
    nothing where the model cannot be traced."""
    from batchtune.memory.estimate import EstimateError, EstimateInputError, StepTracer, resolve_target

    try:
        tracer = StepTracer(spec, components, resolve_target(spec, f"{capacity}B"))
        return _fixed_need_notes(tracer, smallest, capacity)
    except (EstimateError, EstimateInputError) as exc:
        log.debug("no traced figures for the batch that does not fit: %s", exc)
        return []


def _fixed_need_notes(tracer: Any, smallest: int, capacity: int) -> list[str]:
    """What the smallest batch's step needs where it does not fit ``capacity``: the parameters, their gradients
    and the optimizer's state, which no batch size changes, against the rest, and what would make room. An outside
    probe with nothing fitting said only "even the smallest batch size runs out of memory"."""
    from batchtune.render.text import format_bytes

    point = tracer.trace(smallest)
    peak = point.peak_bytes
    grads = sum(p.numel() * p.element_size() for p in tracer.model.parameters() if p.requires_grad)
    state = tracer.state_bytes()
    fixed = tracer.parameter_bytes + grads + state
    parts = (f"the parameters{' and buffers' if tracer.buffer_bytes else ''} ({format_bytes(tracer.parameter_bytes)}),"
             f" their gradients ({format_bytes(grads)}) and the optimizer's state ({format_bytes(state)}) take "
             f"{format_bytes(fixed)} at any batch size")
    said = f"batch {smallest}'s training step needs about {format_bytes(peak)} (traced), the device has " \
           f"{format_bytes(capacity)}: {parts}"
    if fixed >= capacity:
        return [f"{said}, more than the device holds: no batch size fits; a smaller model, an optimizer with less "
                "state (plain SGD keeps none), or the parameters sharded over devices (distributed.strategy: fsdp) "
                "is needed"]
    rest = format_bytes(max(peak - fixed, 0))
    if point.optimizer_peak_bytes > point.compute_peak_bytes:
        return [f"{said}; the other {rest} is the optimizer step's temporaries (its peak is above the forward and "
                "backward's): an optimizer with less state (plain SGD keeps none) or a device with more memory is "
                "needed"]
    return [f"{said}; the other {rest} is batch {smallest}'s activations and temporaries: lower precision "
            "(precision: bf16), activation checkpointing in the model, or a device with more memory is needed"]


def _estimated_sharding(spec: Any, tracer: Any, model: MemoryModel | None, capacity: int | None,
                        ranks: int | None = None) -> dict | None:
    """``distributed.strategy: fsdp``: the traced (unsharded) line spread over 2-16 ranks; also when
    one unsharded rank cannot hold the smallest batch, which is when sharding matters most."""
    if spec.distributed.strategy != "fsdp":
        return None
    from batchtune.engine.sharding import estimate, layout_of

    if model is None:  # no unsharded ceiling to fit at: a line through sizes where activations show
        model = _step_model(tracer, max(64 * spec.probe.granularity, spec.probe.min_batch_size), spec.probe)
        if model is None:
            return None

    state = tracer.parameter_bytes + tracer.state_bytes()  # parameters (and buffers) and optimizer state
    out = estimate(layout_of(tracer.model, spec, 1), fixed_bytes=model.fixed_bytes,
                   per_sample_bytes=model.per_sample_bytes, state_bytes=state,
                   reshard_after_forward=spec.distributed.fsdp.reshard_after_forward, capacity_bytes=capacity,
                   worlds=sorted({2, 4, 8, 16, ranks or 2}), granularity=spec.probe.granularity)
    if capacity is not None:  # the line's ceiling, checked against traced steps: the line is not exact far out
        for row in out["projection"]:
            row["line_ceiling"] = row["fsdp_ceiling"]
            row["fsdp_ceiling"] = _traced_ceiling(tracer, row["fsdp_fixed_bytes"] - model.fixed_bytes, capacity,
                                                  row["line_ceiling"], spec.probe)
    return out


def _traced_ceiling(tracer: Any, offset: float, capacity: int, guess: int | None, p: Any) -> int | None:
    """The largest size whose traced forward and backward, plus ``offset`` (FSDP's shift of the
    unsharded step), fits ``capacity``: galloping from the line's ``guess``, then bisecting."""
    g, smallest, largest = p.granularity, p.min_batch_size, p.max_batch_size // p.granularity * p.granularity

    def fits(b: int) -> bool:
        return tracer.trace(b).compute_peak_bytes + offset <= capacity

    b, step = min(max((guess or smallest) // g * g, smallest), largest), g
    if fits(b):
        lo = b
        while (nxt := min(lo + step, largest)) > lo and fits(nxt):
            lo, step = nxt, step * 2
        if nxt == lo:
            return lo
        hi = nxt
    else:
        hi = b
        while (nxt := max(hi - step, smallest)) < hi and not fits(nxt):
            hi, step = nxt, step * 2
        if nxt == hi:
            return None
        lo = nxt
    while hi - lo > g:
        mid = lo + (hi - lo) // g // 2 * g
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def _step_model(tracer: Any, ceiling: int, p: Any) -> MemoryModel | None:
    """``peak(b) = fixed + per_sample·b`` of the whole step, fitted at a quarter, half and all of the
    ceiling (its error says how straight the line is); None below two distinct sizes."""
    from batchtune.memory.model import fit_memory_model

    sizes = sorted({max(align_down(ceiling * share, p.granularity), p.min_batch_size) for share in (0.25, 0.5)}
                   | {ceiling})
    if len(sizes) < 2:
        return None
    traced = {point.batch_size: point.peak_bytes for point in tracer.points}
    peaks = [traced[b] if b in traced else tracer.trace(b).peak_bytes for b in sizes]
    return fit_memory_model(sizes, peaks)


def _estimate_notes(target: Any, outcome: SearchOutcome, model: MemoryModel | None, data_capped: bool) -> list[str]:
    notes = ["estimated from training steps traced with fake tensors: no step ran and no device memory was used; "
             "batchtune probe on the device verifies it"]
    if target.allocator == "cuda":
        notes.append(f"CUDA allocator modelled as 512-byte blocks, plus {format_bytes(target.context_bytes)} for the "
                     "CUDA context and library workspaces (--context-bytes); memory the allocator reserves beyond "
                     "its allocated peak (fragmentation) is not modelled: the headroom has to cover it")
    if model is not None and model.max_relative_error > 0.01:
        notes.append(f"peak memory is not a straight line in the batch size up to the ceiling (up to "
                     f"{model.max_relative_error:.1%} off the fit): the ceiling comes from traced steps, not the line")
    if outcome.capped:
        notes.append("the largest size searched fits: the device may hold more" + (
            " (batches are capped at the training set's size)" if data_capped else "; raise probe.max_batch_size"))
    return notes


def _largest(components: Any, p: Any) -> tuple[int, str | None]:
    """probe.max_batch_size, capped at the training set's size and at what host memory can collate.

    Returns the cap and the note to show if the ceiling reaches it (None: not capped).
    """
    from batchtune.engine.data import batch_limit

    limit = batch_limit(components.train_set, components.spec.trial_timeout)
    if limit.batch_size is None or limit.batch_size >= p.max_batch_size:
        # a stated cap is a multiple (the spec refuses others); the default 2**20 is not one of granularity 3
        return align_down(p.max_batch_size, p.granularity), None
    largest = max(align_down(limit.batch_size, p.granularity), p.min_batch_size)
    if limit.reason == "data":
        return largest, (f"the training set has {count_of(limit.samples, 'sample')}: batches are capped there "
                         f"(not at probe.max_batch_size {p.max_batch_size:,}); a larger batch would only repeat "
                         "samples, so the device may hold more than this ceiling")
    return largest, (f"host memory caps batches at {largest:,}: collating one takes about "
                     f"{format_bytes(limit.bytes_for(largest))} ({format_bytes(limit.bytes_per_sample)} per "
                     f"sample) of the {format_bytes(limit.available_bytes)} available")


def _loss_notes(trials: list[DeviceTrial], components: Any, seed: int | None) -> list[str]:
    """A non-finite loss: memory figures stand, but training is broken (model, data or lr).

    Raises:
        SpecError: a first step's loss was not finite, and so is a fresh model's on the first training samples
            (validate's :meth:`~batchtune.config.components.Components.first_loss` names the data, the model or
            the loss): no lr made it so, and a probe of a job that cannot train is bad input, exit 2, as in
            validate, sweep and check. A probe whose NaN loss was a note exited 0 and printed a safe batch size.
    """
    from batchtune.config.components import ComponentError

    bad = [t for t in trials if t.result.diverged]
    if not bad:
        return []
    if any((t.result.divergence or "").startswith("non-finite loss at step 1") for t in bad):
        try:
            components.first_loss(components.build_model(seed))
        except ComponentError:  # the model or loss raised here alone (a GPU-only kernel on the host): no answer
            pass
    first = bad[0].result
    return [f"the loss was not finite in {len(bad)} of {len(trials)} trials ({first.divergence}, batch "
            f"{first.batch_size}): the memory figures stand, but this setup does not train; check the "
            "model, the data and optimizer.lr (batchtune check runs it)"]



def _setup(spec: Any, backend: Any, components: Any) -> tuple[Any, Any, Any]:
    """(spec, components, backend), building the components only when the caller has none."""
    from batchtune.engine.trial import prepare

    if components is None:
        return prepare(spec, backend)
    from batchtune.config.spec import Spec, load_spec
    from batchtune.memory.device import backend_for_spec

    if not isinstance(spec, Spec):
        spec = load_spec(spec)
    return spec, components, backend if backend is not None else backend_for_spec(spec)


def _device_source(spec: Any, components: Any, backend: Any, dist: Any) -> DeviceMemorySource:
    """A source that trains one model on the device, its parameters and buffers the baseline."""
    from batchtune.engine.shape import BatchShape
    from batchtune.engine.trial import Trainer, trial_config

    trainer = Trainer(components, backend, spec.precision, dist)
    model = trainer.build_model(spec.seed)  # agreed: a factory that raised on one rank alone stops every rank
    if trainer.strategy == "fsdp":  # sharded before the baseline: each rank keeps its shards
        trainer.data_parallel(model)
    backend.track(list(model.parameters()) + list(model.buffers()))

    def config_for(batch_size: int, steps: int, validate: bool) -> Any:
        return trial_config(spec, BatchShape(batch_size, 1, dist.world_size), lr=spec.optimizer.lr, steps=steps,
                            validate=validate, eval_samples=batch_size, grad_clip=None)

    return DeviceMemorySource(trainer=_Stopping(trainer), model=model,
                              backend=backend, dist=dist, config_for=config_for,
                              steps_per_trial=spec.probe.steps_per_trial)


def _sharding_report(spec: Any, source: DeviceMemorySource, dist: Any) -> dict[str, Any] | None:
    """fsdp: the shards each rank keeps, the memory line near the ceiling, projected ceilings (the tightest rank's)."""
    trainer = source.trainer.trainer
    if trainer.strategy != "fsdp" or trainer.sharding is None or trainer.local_state_bytes is None:
        return None
    from batchtune.engine.sharding import report

    keys = sorted(trainer.local_state_bytes)
    local = dict(zip(keys, (int(v) for v in dist.max(*(trainer.local_state_bytes[k] for k in keys)))))
    # search trials only (the same steps each; the confirmation runs more), the same on every rank
    fits = [t for t in source.trials if t.phase != "confirm" and t.result.fits and t.result.compute_peak_bytes]
    peaks = dist.max(*(t.result.compute_peak_bytes for t in fits)) if fits else []
    largest = max((t.batch_size for t in fits), default=None)
    slope = dist.broadcast(_activation_slope(spec, trainer.components, largest) if dist.is_main and largest else None)
    return report(trainer.sharding, local, [(t.batch_size, peak) for t, peak in zip(fits, peaks)],
                  capacity_bytes=source.capacity_bytes, granularity=spec.probe.granularity, activation_bytes=slope)


def _activation_slope(spec: Any, components: Any, near: int) -> float | None:
    """Bytes per sample of the activations, from the step traced with fake tensors at 2× and 4×
    ``near`` (no device memory, a second or so), where they dominate its peak; None where the model
    cannot be traced."""
    from batchtune.memory.estimate import EstimateError, EstimateInputError, StepTracer, resolve_target

    try:
        tracer = StepTracer(spec, components, resolve_target(spec, None, None))
        low, high = tracer.trace(2 * near).compute_peak_bytes, tracer.trace(4 * near).compute_peak_bytes
    except (EstimateError, EstimateInputError) as exc:
        log.info("activations per sample not traced (%s): the projection uses the measured line", exc)
        return None
    return (high - low) / (2 * near)


def _bounding_rank(source: DeviceMemorySource, outcome: SearchOutcome, backend: Any, dist: Any) -> dict[str, Any] | None:
    """Which rank bounds the agreed ceiling: the ones that failed themselves (not by agreement) at
    the smallest size that failed; without such a failure, the least memory left at the ceiling."""
    if not dist.enabled or outcome.ceiling is None:
        return None
    at = [t.result for t in source.trials if t.batch_size == outcome.ceiling and t.result.fits]
    failed = sorted((t for t in source.trials if not t.result.fits and t.batch_size > outcome.ceiling),
                    key=lambda t: t.batch_size)
    ranks = list(failed[0].result.failed_ranks) if failed else []  # the same on every rank: agreed in the trial
    capacity = backend.capacity_bytes()
    margin = capacity - at[0].peak_bytes if at and capacity is not None and at[0].peak_bytes else math.inf
    margins = dist.gather(margin)
    rank = ranks[0] if ranks else min(range(len(margins)), key=lambda r: margins[r])
    return {"rank": rank, "failed_themselves": ranks, "failing_size": failed[0].batch_size if failed else None,
            "margin_bytes": [None if math.isinf(m) else int(m) for m in margins]}


class _Stopping:
    """The trainer, but a trial that timed out ends the probe: a hang says nothing about memory."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer

    def run(self, config: Any, model: Any = None, on_step: Any = None) -> Any:
        from batchtune.engine.watchdog import stop_if_timed_out

        return stop_if_timed_out(self.trainer.run(config, model=model, on_step=on_step))


def _max_leaked_bytes(trials: list[DeviceTrial], dist: Any) -> int:
    """The most memory any OOM left behind (over the ranks): 0 when memory always came back."""
    leaks = [t.result.leaked_bytes for t in trials if not t.result.fits]
    return int(dist.max(max(leaks, default=0))[0])


@dataclass
class _Confirmation:
    """The safe size that a confirmation run completed (all None when none did)."""

    batch_size: int | None = None
    peak_bytes: int | None = None
    headroom: float | None = None  # measured share of capacity left free
    val_loss: float | None = None
    steps: int | None = None


def _confirm(source: DeviceMemorySource, outcome: SearchOutcome, p: Any, notes: list[str]) -> _Confirmation:
    """Run the safe size for a few optimizer steps plus a validation pass.

    Steps down a granule at a time if it fails (it should not: it is below a measured fit).
    """
    capacity = source.capacity_bytes
    # The memory model fits allocated bytes; capacity must also hold what the caching
    # allocator reserves beyond them (CUDA's rounding and split segments; 0 on CPU).
    gap = max((t.result.reserved_gap_bytes for t in source.trials if t.result.fits), default=0)
    usable = capacity - gap if capacity is not None else None
    if gap:
        notes.append(f"the allocator reserved up to {format_bytes(gap)} beyond the allocated peak; "
                     "the safe size leaves room for it")
    safe = safe_size(outcome.ceiling, outcome.model, usable, p.headroom, p.granularity, p.min_batch_size)
    if outcome.capped and usable is None:  # the cap binds, not memory: a share of it off is no memory's headroom
        safe = outcome.ceiling  # (an outside probe's ceiling was its 80-sample training set, and it said 72)
    safe = _below_unexplained_oom(safe, outcome, usable, p, notes)
    retries, last = CONFIRM_RETRIES, None  # last: (size, bytes used) of the previous confirmation that fit
    while safe >= p.min_batch_size:
        result = source.run(safe, phase="confirm", steps=max(p.steps_per_trial, MIN_CONFIRM_STEPS), validate=True)
        if not result.fits:
            notes.append(f"confirmation at {safe} ran out of memory; stepping down")
            safe -= p.granularity
            continue
        used = result.peak_bytes + result.reserved_gap_bytes if result.peak_bytes is not None else None
        free = 1.0 - used / capacity if capacity and used is not None else None
        if free is None or free >= p.headroom - 1e-9:
            return _Confirmation(safe, result.peak_bytes, free, result.final_val_loss, result.steps)
        secant = (used - last[1]) / (safe - last[0]) if last is not None and last[0] != safe else None
        smaller = _short_of_headroom(safe, free, capacity, outcome.model, p, secant)
        last = (safe, used)
        if smaller is None or retries == 0:
            why = ("even min_batch_size is close to the limit" if safe == p.min_batch_size
                   else "the sizes below it were not tried")
            left, asked = apart(free, p.headroom, lambda x: f"{x:.1%}")
            notes.append(f"the safe size leaves {left} free, less than the {asked} asked: {why}")
            return _Confirmation(safe, result.peak_bytes, free, result.final_val_loss, result.steps)
        left, asked = apart(free, p.headroom, lambda x: f"{x:.1%}")
        notes.append(f"confirmation at {safe} left {left} free, less than the {asked} asked (the "
                     f"memory model's line is not exact there); stepping down to {smaller}")
        safe, retries = smaller, retries - 1
    return _Confirmation()


def _short_of_headroom(safe: int, free: float, capacity: int, model: MemoryModel | None, p: Any,
                       secant: float | None = None) -> int | None:
    """A size that frees the headroom's missing bytes at ``secant``, the bytes per sample between the last
    two confirmations, where there were two (on an outside SparseAdam model the line's 1.1 KiB a sample
    stepped 1157 down to 1136, still 9.7% free of the 10% asked, where the sizes confirmed lost 0.7 KiB a
    sample), else at the model's bytes per sample (the confirmation's own without a model); None where no
    smaller size is allowed."""
    per_sample = secant if secant is not None and secant > 0 else None
    per_sample = per_sample or (model.per_sample_bytes if model is not None and model.per_sample_bytes > 0 else None)
    per_sample = per_sample or (1.0 - free) * capacity / safe
    smaller = align_down(safe - math.ceil((p.headroom - free) * capacity / per_sample), p.granularity)
    smaller = max(min(smaller, safe - p.granularity), p.min_batch_size)
    return smaller if smaller < safe else None


def _below_unexplained_oom(safe: int, outcome: SearchOutcome, usable: int | None, p: Any, notes: list[str]) -> int:
    """``safe``, or the headroom's share below the ceiling when the size above the ceiling ran out of memory
    while the count says it had room to spare: something the count does not see ran out there (a kernel's
    workspace, another process, a limit in the model's own code), and memory headroom is no margin against it.
    An outside model raising OOM above batch 100 got a safe size of 100 with 45% of memory free."""
    model, above = outcome.model, outcome.ceiling + p.granularity
    if usable is None or model is None or outcome.capped or model.predict(above) >= (1.0 - p.headroom) * usable:
        return safe
    below = max(align_down(int(outcome.ceiling * (1.0 - p.headroom)), p.granularity), p.min_batch_size)
    if below >= safe:
        return safe
    notes.append(f"batch {above} ran out of memory where the count predicts {format_bytes(model.predict(above))} "
                 f"({model.predict(above) / usable:.0%} of capacity): something it does not count ran out (a kernel "
                 f"workspace, another process, a limit in the model's code); the safe size keeps {p.headroom:.0%} "
                 "below the ceiling instead")
    return below


def _power_of_two(safe: int | None, min_batch_size: int) -> int | None:
    """The largest power of two at most ``safe``, if it is a size the probe allows."""
    if not safe or safe < 1:
        return None
    power = 1 << (safe.bit_length() - 1)
    return power if power >= min_batch_size else None


def _probe_trials(trials: list[DeviceTrial], outcome: SearchOutcome) -> list[ProbeTrial]:
    """The source's trials as evidence, each search run named by the phase that chose it."""
    out = [ProbeTrial(t.batch_size, t.result.fits, t.result.peak_bytes, round(t.result.seconds, 4),
                      t.result.steps + (0 if t.result.fits else 1), t.phase, t.result.leaked_bytes, t.result.error)
           for t in trials]
    for trial, (_, phase, _) in zip(out, outcome.phases):
        trial.phase = phase  # the search's own name for why it ran each size
    return out
