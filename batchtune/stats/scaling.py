"""Learning-rate scaling rules and the warmup schedule: pure functions, no torch.

See RESEARCH.md: linear (Goyal et al. 2017) for SGD-like optimizers, square root
(Hoffer et al. 2017; Malladi et al. 2022) for adaptive ones.
"""

from __future__ import annotations

import math
from typing import Any, Literal

__all__ = ["Rule", "auto_choice", "lr_at_step", "resolve_rule", "rule_lr", "rule_name", "scale_lr", "spec_lr",
           "spec_rule"]

Rule = Literal["linear", "sqrt", "none", "auto"]


def resolve_rule(rule: Rule, optimizer_family: str) -> Literal["linear", "sqrt", "none"]:
    """The concrete rule: ``auto`` means linear for SGD-like optimizers and sqrt for adaptive ones."""
    if rule == "auto":
        return "linear" if optimizer_family == "sgd" else "sqrt"
    return rule


def scale_lr(base_lr: float, base_batch_size: int, batch_size: int, rule: Literal["linear", "sqrt", "none"]) -> float:
    """The learning rate for ``batch_size``, given ``base_lr`` tuned at ``base_batch_size``.

    >>> scale_lr(0.1, 256, 1024, "linear")
    0.4
    >>> scale_lr(1e-3, 64, 256, "sqrt")
    0.002
    """
    if base_lr <= 0 or base_batch_size <= 0 or batch_size <= 0:
        raise ValueError(f"need positive values, got {base_lr=}, {base_batch_size=}, {batch_size=}")
    ratio = batch_size / base_batch_size
    if rule == "linear":
        return base_lr * ratio
    if rule == "sqrt":
        return base_lr * math.sqrt(ratio)
    if rule == "none":
        return base_lr
    raise ValueError(f"unknown lr scaling rule {rule!r}")


def spec_rule(spec: Any) -> Literal["linear", "sqrt", "none"]:
    """The concrete rule a spec asks for (``lr_scaling``, with ``auto`` resolved by its optimizer)."""
    return resolve_rule(spec.lr_scaling, spec.optimizer.family)


def auto_choice(spec: Any) -> str | None:
    """What ``lr_scaling: auto`` chose and why, for a report to say ("adaptive, because Scaled keeps v ∝ grad² (a
    second moment) over two test steps"); None when the spec names its rule."""
    if spec.lr_scaling != "auto":
        return None
    evidence = spec.optimizer.family_evidence or f"optimizer {spec.optimizer.name or spec.optimizer.target}"
    return f"{spec.optimizer.family}, because {evidence}"


def rule_name(rule: str) -> str:
    """'the sqrt lr rule'; for ``none`` 'the unscaled lr (lr_scaling: none)' (reports read 'the none rule')."""
    return "the unscaled lr (lr_scaling: none)" if rule == "none" else f"the {rule} lr rule"


def rule_lr(rule: str) -> str:
    """Whose lr a multiplier multiplies: "the sqrt rule's"; for ``none`` "the spec's lr"."""
    return "the spec's lr" if rule == "none" else f"the {rule} rule's"


def spec_lr(spec: Any, batch_size: int) -> float:
    """The spec's lr (tuned at ``base_batch_size``) scaled by its rule to the global ``batch_size``."""
    return scale_lr(spec.optimizer.lr, spec.base_batch_size, batch_size, spec_rule(spec))


def lr_at_step(step: int, peak_lr: float, warmup_steps: int) -> float:
    """Linear warmup from peak_lr/warmup_steps to peak_lr over ``warmup_steps``, then constant.

    ``step`` counts optimizer steps from 0.
    """
    if warmup_steps <= 0 or step >= warmup_steps:
        return peak_lr
    return peak_lr * (step + 1) / warmup_steps
