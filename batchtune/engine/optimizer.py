"""Which learning-rate scaling an optimizer calls for, judged from the optimizer object itself.

SGD-like optimizers (SGD, with or without momentum) scale the lr linearly with the batch;
adaptive ones (Adam-like: a per-parameter second moment divides the step) by its square
root (RESEARCH.md). Neither a factory's name (``momentum_opt`` may build Adam) nor the
names of the state an optimizer keeps (an outside LAMB keeps its second moment as ``v``) say
anything reliable, so ``lr_scaling: auto`` watches what the optimizer does: it builds it on
a small parameter, takes two steps with a chosen gradient, and looks for state that behaves
like a second moment (non-negative, following grad² element by element); a second gradient
of another pattern and size confirms it. State that follows the gradient itself is momentum,
not a second moment.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from batchtune.errors import error_line

__all__ = ["optimizer_call", "optimizer_error", "optimizer_family"]

# Known adaptive optimizers, for those whose test step raises (a closure, sparse gradients) or whose state
# shows no gradient scale (Lion's sign update keeps only momentum; Sophia's Hessian is fed elsewhere).
_ADAPTIVE_CLASSES = ("Adam", "AdamW", "Adamax", "NAdam", "RAdam", "Adagrad", "Adadelta", "RMSprop", "Adafactor",
                     "SparseAdam", "Lion", "LAMB", "Lamb", "AdaBelief", "Sophia")
# Two gradients of different elementwise patterns and sizes (sum of squares 16.6 and 81.5), both signed:
# a state ∝ grad has negative entries, one ∝ grad² has none.
_GRADS = ((0.5, -1.0, 2.0, -0.25, 1.5, -3.0), (-2.0, 0.5, -5.0, 1.5, 7.0, -1.0))
_TEST_STEPS = 2  # Adafactor's first step weighs the new grad² by 0: its variance shows from the second
_OVER_STEPS = "over two test steps"
_TEST_LR = 1e-4  # small, so that weight decay (lr-sized weights × decay) barely moves the gradient the state sees
_TOLERANCE = 1e-3  # of the state's largest value: float32 rounding, an eps, weight decay on lr-sized weights
# what a state tensor was seen to follow, in words; the first three are a gradient scale (adaptive)
_KINDS = {"grad²": "∝ grad² (a second moment)", "|grad|": "∝ |grad| (a running gradient scale)",
          "‖grad‖²": "∝ ‖grad‖² (a per-tensor second moment)", "grad": "∝ grad (momentum-like)"}
_SCALES = ("grad²", "|grad|", "‖grad‖²")


def optimizer_family(build: Callable[[Any, float], torch.optim.Optimizer]) -> tuple[str, str]:
    """(``"sgd"`` or ``"adaptive"``, the evidence in words) for an optimizer factory.

    Adaptive when some state the optimizer keeps follows grad² (or |grad|, or a tensor's ‖grad‖²) over two
    test steps; SGD-like otherwise, unless the class is a known adaptive one. An optimizer whose test step
    raises (a ``step(closure)`` that needs a closure) is judged by its class name, and the evidence says so.

    Args:
        build: ``build(params, lr)``, as :meth:`Components.build_optimizer` is called.
    """
    params = [torch.nn.Parameter(torch.zeros(len(grad))) for grad in _GRADS]
    optimizers = [build([param], _TEST_LR) for param in params]
    name = type(optimizers[0]).__name__
    known = name in _ADAPTIVE_CLASSES
    try:
        states = [_stepped(opt, param, grad) for opt, param, grad in zip(optimizers, params, _GRADS, strict=True)]
    except Exception as exc:  # noqa: BLE001 - a custom optimizer may need a closure: judge by its class
        return ("adaptive" if known else "sgd",
                f"{name} could not take a test step ({error_line(exc)}), so its class name decides: "
                + ("a known adaptive optimizer" if known else "not a known adaptive optimizer, SGD-like"))
    kinds = {key: _kind([state[key] for state in states]) for key in states[0] if all(key in s for s in states)}
    kinds = {key: kind for key, kind in kinds.items() if kind != "constant"}  # a step count, an lr: not the grad's
    scales = {key: kind for key, kind in kinds.items() if kind in _SCALES}
    if scales:
        return "adaptive", f"{name} keeps {_listed(scales)} {_OVER_STEPS}"
    kept = (f"keeps {_listed(kinds)}, nothing ∝ grad², {_OVER_STEPS}" if kinds
            else f"keeps no state that follows the gradient {_OVER_STEPS}")
    if known:
        return "adaptive", f"{name} {kept}; adaptive by its class name"
    return "sgd", f"{name} {kept}: no second moment, SGD-like"


def _stepped(optimizer: torch.optim.Optimizer, param: torch.nn.Parameter,
             grad: tuple[float, ...]) -> dict[str, torch.Tensor]:
    """The state ``optimizer`` keeps for ``param`` after :data:`_TEST_STEPS` steps on ``grad``: its tensors,
    in float64."""
    for _ in range(_TEST_STEPS):
        param.grad = torch.tensor(grad)
        optimizer.step()
    state = optimizer.state.get(param, {})
    return {str(key): value.detach().double().reshape(-1).clone() for key, value in state.items()
            if isinstance(value, torch.Tensor) and value.is_floating_point()}


def _kind(values: list[torch.Tensor]) -> str | None:
    """What one state tensor follows across the two test gradients (a key of :data:`_KINDS`), ``"constant"``
    when it does not depend on the gradient, None when it follows it some other way."""
    grads = [torch.tensor(grad, dtype=torch.float64) for grad in _GRADS]
    y = torch.cat(values)
    if not bool(torch.isfinite(y).all()):
        return None
    scale = float(y.abs().max())
    same = values[0].shape == values[1].shape and float((values[0] - values[1]).abs().max()) <= _TOLERANCE * scale
    if scale == 0 or same:
        return "constant"
    if all(v.numel() == 1 for v in values):  # one number per tensor: a per-tensor second moment follows ‖grad‖²
        x = torch.stack([g.square().mean() for g in grads])
        return "‖grad‖²" if _follows(y, x, through_zero=True) and float(y.min()) > 0 else None
    if any(v.numel() != len(g) for v, g in zip(values, grads, strict=True)):
        return None
    g = torch.cat(grads)
    non_negative = float(y.min()) >= -_TOLERANCE * scale
    if non_negative and _follows(y, g.square()):
        return "grad²"
    if non_negative and _follows(y, g.abs()):
        return "|grad|"
    return "grad" if _follows(y, g, through_zero=True, signed=True) else None


def _follows(y: torch.Tensor, x: torch.Tensor, through_zero: bool = False, signed: bool = False) -> bool:
    """Whether ``y ≈ a + c·x`` element by element, with ``c > 0`` (any sign if ``signed``) and, if
    ``through_zero``, ``a = 0``: an offset (Adagrad's initial accumulator, an eps) is allowed otherwise."""
    columns = [x] if through_zero else [torch.ones_like(x), x]
    fit = torch.linalg.lstsq(torch.stack(columns, dim=1), y.unsqueeze(1)).solution.squeeze(1)
    slope = float(fit[-1])
    scale = float(y.abs().max())
    residual = float((y - torch.stack(columns, dim=1) @ fit).abs().max())
    moves = abs(slope) * float(x.max() - x.min()) > 10 * _TOLERANCE * scale  # not a constant with noise
    return scale > 0 and residual <= _TOLERANCE * scale and moves and (signed or slope > 0)


def _listed(kinds: dict[str, str | None]) -> str:
    """'exp_avg_sq, max_exp_avg_sq ∝ grad² (a second moment), exp_avg ∝ grad (momentum-like), other': the keys
    grouped by what they follow, in the order first seen."""
    groups: dict[str | None, list[str]] = {}
    for key, kind in kinds.items():
        groups.setdefault(kind, []).append(key)
    return ", ".join(f"{', '.join(keys)} {_KINDS[kind]}" if kind else ", ".join(keys)
                     for kind, keys in groups.items())


@contextlib.contextmanager
def optimizer_call(call: str) -> Iterator[None]:
    """Mark what the optimizer raises in ``call`` ("step", "zero_grad") as the optimizer's
    (``exc.batchtune_optimizer_call``), so that the trial blames the spec's optimizer, not the model."""
    try:
        yield
    except Exception as exc:
        exc.batchtune_optimizer_call = call
        raise


def optimizer_error(exc: BaseException, spec: Any) -> Exception:
    """The spec error for an optimizer whose ``step()`` (or ``zero_grad()``) raised in a training step
    (:func:`optimizer_call` marked it): it names ``optimizer.target`` (or ``optimizer.name``), not the model."""
    from batchtune.config.components import STEP_CALL, ComponentError

    opt = spec.optimizer
    key, what = ("optimizer.target", f"{opt.target}()") if opt.target else ("optimizer.name", opt.name)
    call = getattr(exc, "batchtune_optimizer_call", "step")
    return ComponentError([spec.issue(key, f"the optimizer {what} raised {error_line(exc)} in its {call}(): "
                                           f"{STEP_CALL} (an optimizer whose step needs a closure, LBFGS-style, "
                                           "cannot be tuned); fix the optimizer or choose another; BATCHTUNE_DEBUG=1 "
                                           "shows the traceback")])
