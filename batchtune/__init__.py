"""batchtune: measure the batch size that fits, trains well and wastes no compute.

The public API mirrors the commands::

    import batchtune
    result = batchtune.probe("configs/mlp.yaml")       # or a Spec from batchtune.load_spec
    print(result.ceiling, result.safe_batch_size)

Attributes are imported on first use, so ``import batchtune`` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_spec": ("batchtune.config.spec", "load_spec"),
    "Spec": ("batchtune.config.spec", "Spec"),
    "SpecError": ("batchtune.config.spec", "SpecError"),
    "probe": ("batchtune.commands.probe", "run_probe"),
    "ProbeResult": ("batchtune.commands.probe", "ProbeResult"),
    "sweep": ("batchtune.commands.sweep", "run_sweep"),
    "SweepResult": ("batchtune.commands.sweep", "SweepResult"),
    "check": ("batchtune.commands.check", "run_check"),
    "CheckReport": ("batchtune.commands.check", "CheckReport"),
    "noise": ("batchtune.commands.noise", "run_noise"),
    "serve": ("batchtune.commands.serve", "run_serve"),
    "ServeResult": ("batchtune.commands.serve", "ServeResult"),
    "plan": ("batchtune.commands.plan", "run_plan"),
    "PlanResult": ("batchtune.commands.plan", "PlanResult"),
    "BatchSchedule": ("batchtune.schedule", "BatchSchedule"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module, attr = _EXPORTS[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'batchtune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
