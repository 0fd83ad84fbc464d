"""Render ``batchtune noise``: B_simple with its band at each validation point."""

from __future__ import annotations

from typing import Any

from tabulate import tabulate

from batchtune.render.text import count, count_of, format_shape, to_json

__all__ = ["render_noise"]


def render_noise(run: Any, fmt: str = "table") -> str:
    """Render :func:`~batchtune.commands.noise.run_noise`'s :class:`NoiseRun`."""
    if fmt == "json":
        return to_json(run.to_dict())
    shape = format_shape(run.shape) if run.shape.accum_steps > 1 or run.shape.world_size > 1 \
        else f"{run.batch_size} (two halves per step)"
    steps = (f"{run.steps} steps" if not run.interrupted else
             f"PARTIAL: interrupted after {run.steps} of {run.steps_planned} steps")
    head = f"batchtune noise: {run.name} at batch {shape}, lr {run.lr:.3g}, {steps}"
    rows = [[h["step"], h["samples"], _loss(h["val_loss"]), count(h["b_simple"]),
             f"{count(h['low'])}–{count(h['high'])}" if h["low"] is not None else "-",
             "yes" if h["reliable"] else "no (band reaches 0)" if _reaches_zero(h) else
             "no (band too wide)" if h.get("wide") else "no"]
            for h in run.history]
    headers = ["step", "samples", "val loss", "B_simple", "90% band", "reliable"]
    table = tabulate(rows, headers=headers, tablefmt="github" if fmt == "markdown" else "simple",
                     disable_numparse=True)
    lines = [f"### {head}" if fmt == "markdown" else head, "", table, ""]
    final = run.final
    if run.diverged:
        lines.append(f"diverged: {run.diverged}. No noise scale comes from a run that diverged: "
                     "check the model and the data, or lower optimizer.lr")
    elif run.out_of_memory:
        lines.append(_out_of_memory(run))
    elif final and final.get("b_simple"):
        tokens = (f" = {final['b_simple'] * run.tokens_per_sample:,.0f} tokens" if run.tokens_per_sample > 1 else "")
        unsure = ("" if final["reliable"] else "; not reliable: the band reaches 0" if _reaches_zero(final) else
                  "; not reliable: the band spans more than 10×" if final.get("wide") else
                  "; not reliable: the band is open above")
        at = "at the last reading before the interrupt" if run.interrupted else "at the end"
        where = (f"at val loss {final['val_loss']:.4g}" if final["val_loss"] is not None else
                 f"over the {final['noise_steps']} steps measured before the first validation")
        lines.append(f"B_simple {at}: {count(final['b_simple'])} examples{tokens} {where} "
                     f"(90% band {count(final['low'])}–{count(final['high'])}{unsure}).")
        lines.append(_trend(run.history))
    else:
        lines.append("no reliable estimate yet: run more steps (--steps)")
    lines += [f"note: {n}" for n in run.notes]
    return "\n".join(lines)


def _loss(value: float | None) -> str:
    """A reading's validation loss; ``-`` for the one an interrupt read between validations."""
    return "-" if value is None else f"{value:.4g}"


def _reaches_zero(h: dict[str, Any]) -> bool:
    """A band bounded above that reaches down to 0 (tr Σ not clearly above 0): wider than any factor."""
    return h.get("wide", False) and not (h["low"] or 0) > 0


def _out_of_memory(run: Any) -> str:
    """The step ran out of memory: the micro-batch (what one backward pass holds) is what must fit, unless the
    model's own weights did not (no smaller batch helps there)."""
    if run.weights_oom:
        return (f"out of memory building the model, before any batch ({run.out_of_memory}). No noise scale: the "
                "model's own weights do not fit on the device, so no batch size does")
    micro = run.shape.micro_batch_size // (2 if run.shape.accum_steps == 1 and run.shape.world_size == 1 else 1)
    return (f"out of memory with {count_of(micro, 'sample')} in a backward pass ({run.out_of_memory}). No noise "
            "scale: that micro-batch is what must fit; lower --batch-size, or raise --accum-steps to split each batch "
            "into smaller micro-batches (batchtune probe finds the largest that fits)")


def _trend(history: list[dict[str, Any]]) -> str:
    """How the reliable readings moved over the run, said from their bands rather than assumed."""
    readings = [h for h in history if h["reliable"] and h["b_simple"] and h["low"] and h["high"]
                and h["val_loss"] is not None]  # not the reading an interrupt took between validations
    if not readings:
        return "No reading is reliable yet: run more steps (--steps) for the band to close."
    if len(readings) == 1:
        return (f"One reliable reading ({count(readings[0]['b_simple'])} at val loss {readings[0]['val_loss']:.4g}): "
                "run more steps to see how it moves as the loss falls." + _beyond_reliable(readings[0], history))
    return _trend_of(readings) + _beyond_reliable(readings[-1], history)


def _beyond_reliable(last: dict[str, Any], history: list[dict[str, Any]]) -> str:
    """The readings after the last reliable one, where their bands' lower ends rose past its band: an outside run's
    summary said the noise scale 'grew ... to 34' where its last readings were 18,901 (4,455–inf)."""
    later = [h for h in history[history.index(last) + 1:] if h["low"] and h["val_loss"] is not None]
    top = max(later, key=lambda h: h["low"], default=None)
    if top is None or not top["low"] > last["high"]:
        return ""
    return (f" Past it the bands are unbounded or too wide to be reliable, but their lower ends rose to "
            f"{count(top['low'])} (at val loss {top['val_loss']:.4g}), above that reading's band: the noise scale "
            "grew beyond it, by more than the readings can say.")


def _trend_of(readings: list[dict[str, Any]]) -> str:
    """How the reliable ``readings`` (two or more) moved, said from their bands."""
    last = readings[-1]
    # against every earlier reading, not the first alone: an outside run's first band (14–33) held its last
    # reading's (25–216) while later ones (12–17) did not, and it said 'no growth shows yet'
    below = next((h for h in readings[:-1] if h["high"] < last["low"]), None)
    above = next((h for h in readings[:-1] if h["low"] > last["high"]), None)

    def span(first: dict[str, Any]) -> str:
        return (f"from {count(first['b_simple'])} at val loss {first['val_loss']:.4g} to {count(last['b_simple'])} "
                f"at {last['val_loss']:.4g}")
    if below is not None and above is None:
        return (f"It grew {span(below)}: an estimate taken early under-states the critical batch size later in "
                "training.")
    if above is not None and below is None:
        return f"It fell {span(above)}, against the usual growth as the loss falls: read it again later in the run."
    return (f"It moved {span(readings[0])}, within the bands: no growth shows yet over this run (the critical batch "
            "usually grows as the loss falls).")
