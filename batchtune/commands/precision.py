"""Compare precisions on the sweep's top sizes: how much larger a batch fits, how much faster it runs.

Mixed precision roughly halves activation memory, so the ceiling should rise; whether
throughput rises depends on the hardware (bf16 matrix units on GPUs, AMX on recent
CPUs). Both are measured here, side by side in one process, never assumed.
"""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd

__all__ = ["compare_precision"]

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16")


def compare_precision(spec: Any, sweep_result: Any, *, top: int = 2, steps: int = 30) -> pd.DataFrame:
    """Ceiling and throughput in fp32 and bf16 for the sweep's ``top`` ranked sizes.

    The model, data and loss are built once and shared by both precisions' probes and trials.

    Returns:
        One row per (precision, batch size): ceiling, samples/s, peak bytes and the gain
        over fp32 (throughput ratio, ceiling ratio).
    """
    from batchtune.config.components import build_components
    from batchtune.memory.device import backend_for_spec
    from batchtune.commands.probe import run_probe
    from batchtune.engine.shape import BatchShape
    from batchtune.engine.distributed import current
    from batchtune.engine.trial import Trainer, agreed, trial_config

    ranked = sweep_result.summary.dropna(subset=["rank"]).sort_values("rank").head(top)
    sizes = [(int(r.batch_size), int(r.micro_batch_size), int(r.accum_steps), float(r.lr))
             for r in ranked.itertuples()]
    components = agreed(current(), lambda: build_components(spec), "building the data")
    rows = []
    for precision in PRECISIONS:
        with backend_for_spec(spec) as backend:  # closing restores what it set (CUDA's memory fraction)
            if precision not in backend.supported_precisions():
                log.info("skipping %s: %s does not support it", precision, backend.name)
                continue
            variant = spec.model_copy(update={"precision": precision})
            ceiling = None
            if backend.capacity_bytes() is not None:
                log.info("probing the ceiling in %s", precision)
                ceiling = run_probe(variant, backend=backend, components=components).ceiling
            trainer = Trainer(components, backend, precision)
            for batch_size, micro, accum, lr in sizes:
                log.info("timing batch %d in %s", batch_size, precision)
                result = trainer.run(trial_config(spec, BatchShape(micro, accum), lr=lr, steps=steps,
                                                 timing_warmup_steps=5, memory_steps=2))
                rows.append({"precision": precision, "batch_size": batch_size, "ceiling": ceiling,
                             "samples_per_s": result.samples_per_s, "peak_bytes": result.peak_bytes,
                             "fits": result.fits})
    frame = pd.DataFrame(rows)
    base = frame[frame["precision"] == "fp32"].set_index("batch_size")
    frame["throughput_gain"] = [r.samples_per_s / base.loc[r.batch_size, "samples_per_s"]
                                if r.samples_per_s and base.loc[r.batch_size, "samples_per_s"] else None
                                for r in frame.itertuples()]
    frame["ceiling_gain"] = [r.ceiling / base.loc[r.batch_size, "ceiling"]
                             if r.ceiling and base.loc[r.batch_size, "ceiling"] else None
                             for r in frame.itertuples()]
    return frame
