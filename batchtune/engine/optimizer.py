"""Which learning-rate scaling an optimizer calls for, judged from the optimizer object itself.

SGD-like optimizers (SGD, with or without momentum) scale the lr linearly with the batch;
adaptive ones (Adam-like: a per-parameter second moment divides the step) by its square
root (RESEARCH.md). A factory's name says nothing reliable (``momentum_opt`` may build
Adam), so ``lr_scaling: auto`` builds the optimizer on one dummy parameter, takes one step,
and looks at the state it keeps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["optimizer_family"]

# per-parameter state that divides the step by a running gradient scale
_SECOND_MOMENT = ("exp_avg_sq", "square_avg", "sum", "acc_delta", "exp_inf", "max_exp_avg_sq", "variance",
                  "row_var", "col_var")
_ADAPTIVE_CLASSES = ("Adam", "AdamW", "Adamax", "NAdam", "RAdam", "Adagrad", "Adadelta", "RMSprop", "Adafactor",
                     "SparseAdam", "Lion", "LAMB", "Lamb", "AdaBelief", "Sophia")


def optimizer_family(build: Callable[[Any, float], torch.optim.Optimizer]) -> tuple[str, str]:
    """(``"sgd"`` or ``"adaptive"``, the evidence in words) for an optimizer factory.

    Args:
        build: ``build(params, lr)``, as :meth:`Components.build_optimizer` is called.
    """
    param = torch.nn.Parameter(torch.ones(4))
    param.grad = torch.full_like(param, 0.1)
    optimizer = build([param], 1e-3)
    name = type(optimizer).__name__
    try:
        optimizer.step()
    except Exception as exc:  # noqa: BLE001 - a custom optimizer may need a closure: judge by its class
        adaptive = name in _ADAPTIVE_CLASSES
        return ("adaptive" if adaptive else "sgd",
                f"{name} could not take a test step ({type(exc).__name__}); judged by its class name")
    keys = sorted(k for k, v in optimizer.state.get(param, {}).items() if isinstance(v, torch.Tensor) and k != "step")
    second = [k for k in keys if k in _SECOND_MOMENT or k.endswith("_sq")]
    if second:
        return "adaptive", f"{name} keeps a second moment per parameter ({', '.join(second)})"
    if name in _ADAPTIVE_CLASSES:
        return "adaptive", f"{name} is an adaptive optimizer (by its class)"
    kept = f"keeps {', '.join(keys)}" if keys else "keeps no state"
    return "sgd", f"{name} {kept}: no second moment, SGD-like"
