"""Sweep plots (matplotlib, the optional ``plots`` extra): log2 batch-size axes.

Each figure is rendered in memory and written atomically, so a full disk or a read-only
folder fails with the path named and leaves no half-written PNG.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

__all__ = ["plot_noise", "plot_sweep"]


def plot_sweep(result: Any, path: Path) -> Path:
    """Throughput, final validation loss and time to target against batch size, in one PNG.

    The ceiling (when known) and the recommended size are marked.

    Raises:
        ImportError: matplotlib is not installed.
        OSError: the file cannot be written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result.summary
    s = s[s["samples_per_s"].notna()].sort_values("batch_size")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = [("samples_per_s", "samples_per_s_std", "throughput (samples/s)"),
              ("final_val_loss", "final_val_loss_std", "final validation loss"),
              ("seconds_to_target", None, "seconds to target loss")]
    rec = result.recommendation["batch_size"] if result.recommendation else None
    ceiling = result.meta.get("ceiling")
    for ax, (col, err, title) in zip(axes, panels):
        data = s[s[col].notna()]
        ax.errorbar(data["batch_size"], data[col], yerr=data[err].fillna(0) if err else None, marker="o", capsize=3)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if rec is not None:
            ax.axvline(rec, color="tab:green", linestyle="--", label=f"recommended {rec}")
        if ceiling and not math.isnan(ceiling):
            ax.axvline(ceiling, color="tab:red", linestyle=":", label=f"ceiling {ceiling}")
    if axes[0].get_legend_handles_labels()[0]:  # nothing recommended and no ceiling: no legend
        axes[0].legend(loc="best", fontsize=8)
    fig.suptitle(f"batchtune sweep: {result.name}")
    return _save(fig, path)


def plot_noise(run: Any, path: Path) -> Path:
    """B_simple with its band, and the validation loss, against training steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = [p for p in run.history if p["b_simple"] is not None]
    fig, ax = plt.subplots(figsize=(8, 4.2))
    steps = [p["step"] for p in h]
    ax.plot(steps, [p["b_simple"] for p in h], marker="o", label="B_simple")
    high = [p["high"] if p["high"] is not None and math.isfinite(p["high"]) else float("nan") for p in h]
    ax.fill_between(steps, [p["low"] or 0 for p in h], high, alpha=0.25, label="90% band")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("simple noise scale (examples)")
    ax.grid(alpha=0.3)
    loss = ax.twinx()
    validated = [p for p in run.history if p["val_loss"] is not None]  # not the reading an interrupt took between
    loss.plot([p["step"] for p in validated], [p["val_loss"] for p in validated], color="tab:red",
              linestyle="--", label="val loss")
    loss.set_ylabel("validation loss")
    ax.legend(loc="upper left", fontsize=8)
    loss.legend(loc="upper right", fontsize=8)
    ax.set_title(f"batchtune noise: {run.name}, batch {run.batch_size}")
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    """Write the figure as a PNG at ``path`` and close it.

    Raises:
        OSError: the file cannot be written, naming ``path``.
    """
    import matplotlib.pyplot as plt

    from batchtune.render.run_folder import atomic_write

    fig.tight_layout()
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=110, metadata={"Software": "batchtune"})  # an output of ours
    finally:
        plt.close(fig)
    atomic_write(Path(path), buffer.getvalue())
    return Path(path)
