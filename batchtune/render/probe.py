"""Render a probe's result: the ceiling, the safe size, the memory model, every trial."""

from __future__ import annotations

from typing import Any

from tabulate import tabulate

from batchtune.render.text import count_of, device_text, format_bytes, to_json

__all__ = ["render_probe"]


def _device_line(result: Any) -> str:
    return f"{device_text(result.device, result.capacity_bytes)}, {result.precision}"


def _probe_summary(result: Any) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    g = result.granularity
    if result.ceiling is None:
        unsharded = " on one unsharded rank" if getattr(result, "sharding", None) else ""
        rows.append(("ceiling", f"none: even the smallest batch size runs out of memory{unsharded}"))
        return rows + (_sharding_rows(result.sharding) if getattr(result, "sharding", None) else [])
    estimated = result.strategy == "estimate"
    if result.capped:
        predicted = getattr(result, "predicted_ceiling", None)  # an outside t4 estimate's 270,993 was in the JSON alone
        near = (f"; the memory model puts the device's ceiling near {predicted:,.0f}" if predicted
                and predicted > result.ceiling else "")
        rows.append(("ceiling", f"{result.ceiling}   (the largest size allowed, see the notes: the device may hold "
                                f"more{near})"))
    elif estimated:
        rows.append(("ceiling", f"{result.ceiling}   (estimated, exact to {g}: {result.ceiling} fits, "
                                f"{result.ceiling + g} would run out of memory)"))
    else:
        rows.append(("ceiling", f"{result.ceiling}   (exact to {g}: {result.ceiling} fits, "
                                f"{result.ceiling + g} runs out of memory)"))
    if result.safe_batch_size is not None:
        detail = f"{'estimated ' if estimated else ''}peak {format_bytes(result.safe_peak_bytes)}"
        if result.safe_headroom is not None:
            detail += f", {result.safe_headroom:.1%} of capacity free"
        detail += f"; headroom asked {result.headroom:.0%}"
        if result.confirm_val_loss is not None:
            detail += (f"; confirmed with {result.confirm_steps} steps + validation "
                       f"(val loss {result.confirm_val_loss:.4g})")
        rows.append(("safe batch size", f"{result.safe_batch_size}   ({detail})"))
    rows.append(("power of two", str(result.power_of_two_batch_size or "-")))
    model = result.memory_model
    if model is not None:
        # of the forward and backward's peak, what grows with the batch: an outside Adam model's trials peaked 30-35%
        # above the line at batch 1, in the optimizer step, under a line said to be within 3.2%
        rows.append(("memory model", f"peak(b) = {format_bytes(model.fixed_bytes)} + "
                                     f"{format_bytes(model.per_sample_bytes)} × b   ({_fit_text(model)}; the forward "
                                     "and backward's peak: the optimizer step's can be higher at small batches)"))
    if estimated and result.estimate:
        rows.append(("estimate", _estimate_text(result.estimate)))
    if getattr(result, "variable_length", None):
        rows += _varlen_rows(result.variable_length)
    if getattr(result, "sharding", None):
        rows += _sharding_rows(result.sharding)
    if getattr(result, "bounding_rank", None):
        rows.append(("bounded by", _bound_text(result.bounding_rank)))
    return rows


def _estimated_sharding_rows(s: dict[str, Any]) -> list[tuple[str, str]]:
    """FSDP from the traced estimate: the unsharded line spread over more ranks."""
    rows = [("sharded (÷ ranks)", f"{format_bytes(s['divided_whole_bytes'])} of parameters and optimizer state; "
                                  f"gathered at once {format_bytes(s['gathered_bytes'])} ({len(s['units'])} units)")]
    for p in s["projection"]:
        ceiling = p["fsdp_ceiling"] if p["fsdp_ceiling"] is not None else "does not fit"
        rows.append((f"at {p['world_size']} ranks", f"fsdp ceiling {ceiling}   (estimated: per-rank peak(b) = "
                                                    f"{format_bytes(p['fsdp_fixed_bytes'])} + "
                                                    f"{format_bytes(s['per_sample_bytes'])} × b)"))
    return rows


def _sharding_rows(s: dict[str, Any]) -> list[tuple[str, str]]:
    """FSDP: what each rank keeps of what sharding divides, what it does not divide, other world sizes."""
    if s.get("estimated"):
        return _estimated_sharding_rows(s)
    d, world = s["divided_per_rank"], s["world_size"]
    rows = [("sharded (÷ ranks)", f"{format_bytes(d['total'])} a rank of {format_bytes(s['divided_whole_bytes'])}: "
                                  f"params {format_bytes(d['params'])}, grads {format_bytes(d['grads'])}, "
                                  f"optimizer state {format_bytes(d['optimizer'])} (÷ {world})")]
    kept = s.get("not_divided_fixed_bytes")
    text = f"the largest of {len(s['units'])} units is gathered whole: {format_bytes(s['gather_bytes'])}"
    if kept is not None:
        text = f"{format_bytes(kept)} fixed + activations {format_bytes(s['per_sample_bytes'])} × b ({text})"
    rows.append(("not sharded", text))
    for p in s.get("projection") or []:
        fsdp = p["fsdp_ceiling"] if p["fsdp_ceiling"] is not None else "does not fit"
        ddp = f"at most {p['ddp_ceiling_at_most']}" if p["ddp_ceiling_at_most"] is not None else "does not fit at all"
        mark = "  (this run's world)" if p["world_size"] == world else ""
        rows.append((f"at {p['world_size']} ranks", f"fsdp ceiling {fsdp}, ddp {ddp}   (predicted){mark}"))
    if s.get("projection"):
        single = s.get("single_rank_ceiling_at_most")
        single_text = f"at most {single}" if single else "does not fit at all"
        rows.append(("one rank", f"unsharded: {single_text}   (predicted)"))
    return rows


def _bound_text(b: dict[str, Any]) -> str:
    margins = ", ".join(f"rank {r}: {format_bytes(m) if m is not None else '?'}"
                        for r, m in enumerate(b["margin_bytes"]))
    failed = b["failed_themselves"]
    if len(failed) > 1:
        return f"ranks {', '.join(map(str, failed))} (each ran out of memory itself at {b['failing_size']}; " \
               f"free at the ceiling: {margins})"
    why = f"ran out of memory itself at {b['failing_size']}" if failed else "the least memory left at the ceiling"
    return f"rank {b['rank']} ({why}; free at the ceiling: {margins})"


def _varlen_rows(v: dict[str, Any]) -> list[tuple[str, str]]:
    """Variable-length data: what the ceiling counts, then the fixed batch against the token budget."""
    pads = v.get("pads", True)
    worst = (f"the ceiling counts samples of the longest batch: the longest samples ({v['longest']:,} tokens) "
             f"{'padded' if pads else 'concatenated'} as collated; {count_of(v['samples'], 'sample')}, median "
             f"{v['median_length']:g} tokens")
    if v.get("random_longest") is not None and pads:
        worst += f"; a random batch of the safe size pads to {v['random_longest']:g} (median)"
    rows = [("worst case", worst)]
    fixed, bucketed = v.get("fixed"), v.get("bucketed")
    if fixed is None or bucketed is None:
        return rows
    rows.append(("fixed batch", f"{fixed['mean_rows']:g} samples: {_batching_text(fixed)}"))
    speedup = (f" ({bucketed['tokens_per_s'] / fixed['tokens_per_s']:.2f}× the fixed batch)"
               if bucketed.get("tokens_per_s") and fixed.get("tokens_per_s") else "")
    cap = f" and at most {count_of(v['max_rows'], 'sample')}" if v.get("max_rows") else ""
    rows.append(("token budget", f"max_tokens {v['max_tokens']:,} (the safe size × the longest){cap}, "
                                 f"length-bucketed, {bucketed['mean_rows']:.0f} samples a batch on average: "
                                 f"{_batching_text(bucketed)}{speedup}"))
    return rows


def _batching_text(b: dict[str, Any]) -> str:
    if b.get("fits") is False:
        return f"padding {b['padding_waste']:.1%} of tokens; ran out of memory"
    rate = f", {b['tokens_per_s']:,.0f} tokens/s" if b.get("tokens_per_s") else ""
    peak = f", peak {format_bytes(b['peak_bytes'])}" if b.get("peak_bytes") else ""
    return f"padding {b['padding_waste']:.1%} of tokens{rate}{peak}"


def _fit_text(model: Any) -> str:
    """``R² 1.00000 over 4 runs, max error 10.61% at batch 1``: where the error is, as an R² of 1 with a 10% error
    reads as a contradiction (a residual of a few KiB on batch 1's small peak is a large share of it, and nothing
    to R², which the large batches' spread sets)."""
    fit = f"R² {model.r2:.5f}" if model.r2 is not None else "exact through 2 points"
    error = f"{model.max_relative_error:.2%}"
    at = getattr(model, "max_error_batch_size", None)
    where = f" at batch {at:g}" if at is not None and error != "0.00%" else ""
    return f"{fit} over {model.points} runs, max error {error}{where}"


def _estimate_text(e: dict[str, Any]) -> str:
    """What the estimate counted and what it cost: ``76,810 parameters (300.0 KiB), optimizer state ...``."""
    allocator = (f"CUDA allocator: {e['block_bytes']}-byte blocks + {format_bytes(e['context_bytes'])} context"
                 if e["allocator"] == "cuda" else "CPU simulation's byte count")
    buffers = e.get("buffer_bytes") or 0  # counted with the parameters: an outside model's 'parameters' held both
    held = (f"{format_bytes(e['parameter_bytes'] - buffers)}; buffers {format_bytes(buffers)}" if buffers
            else format_bytes(e["parameter_bytes"]))
    return (f"{e['parameters']:,} parameters ({held}), optimizer state "
            f"{format_bytes(e['optimizer_state_bytes'])}; {allocator}; {e['traced_steps']} traced steps in "
            f"{e['seconds']:.1f} s, process peak RSS {format_bytes(e['peak_rss_bytes'])}")


def _trial_rows(result: Any) -> list[list[Any]]:
    no = "no" if result.strategy == "estimate" else "OOM"
    return [[i, t.phase, t.batch_size, "yes" if t.fits else no, format_bytes(t.peak_bytes), f"{t.seconds:.2f}"]
            for i, t in enumerate(result.trials, 1)]


def _totals(result: Any) -> str:
    if result.strategy == "estimate":
        e = result.estimate
        return (f"{e['traced_steps']} traced steps ({result.search_trials} in the search), no training step, "
                f"{e['seconds']:.1f} s (estimate: fake tensors, no device memory)")
    return (f"{result.search_trials} search trials + {len(result.trials) - result.search_trials} confirmation, "
            f"{result.total_steps} training steps, {result.total_seconds:.1f} s ({result.strategy} search)")


_TRIAL_HEADERS = ["trial", "phase", "batch", "fits", "peak", "seconds"]


def render_probe(result: Any, fmt: str = "table", name: str = "") -> str:
    """Render a :class:`~batchtune.commands.probe.ProbeResult`."""
    if fmt == "json":
        return to_json(result.to_dict())
    totals = _totals(result)
    head = f"batchtune probe{': ' + name if name else ''} on {_device_line(result)}"
    if fmt == "markdown":
        lines = [f"### {head}", "", tabulate(_probe_summary(result), headers=["", "result"], tablefmt="github"), "",
                 tabulate(_trial_rows(result), headers=_TRIAL_HEADERS, tablefmt="github"), "", totals]
    else:
        width = max(len(k) for k, _ in _probe_summary(result))
        lines = [head, ""]
        lines += [f"  {k:<{width}}  {v}" for k, v in _probe_summary(result)]
        lines += ["", tabulate(_trial_rows(result), headers=_TRIAL_HEADERS, tablefmt="simple",
                               colalign=("right", "left", "right", "left", "right", "right")), "", totals]
    varlen = getattr(result, "variable_length", None) or {}
    lines += [f"note: {n}" for n in [*result.notes, *varlen.get("notes", [])]]
    return "\n".join(lines)

