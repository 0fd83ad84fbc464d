"""Which learning-rate scaling an optimizer calls for, judged from the optimizer object itself.

SGD-like optimizers (SGD, with or without momentum) scale the lr linearly with the batch;
adaptive ones (Adam-like: a per-parameter second moment divides the step) by its square
root (RESEARCH.md). Neither a factory's name (``momentum_opt`` may build Adam) nor the
names of the state an optimizer keeps (an outside LAMB keeps its second moment as ``v``) say
anything reliable, so ``lr_scaling: auto`` watches what the optimizer does: it builds it on
a small parameter (3×2 where a 1-D one is refused), takes two steps (up to ten, for state created
late) with a chosen gradient, and looks for state, nested in lists and dicts too, that behaves like a
second moment (non-negative, following grad² element by element); a second gradient of another
pattern and size confirms it. State that follows the gradient itself is momentum,
not a second moment.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from batchtune.errors import error_line

__all__ = ["built_optimizer_family", "optimizer_call", "optimizer_error", "optimizer_family"]

# Known adaptive optimizers, for those whose test step raises (a closure, sparse gradients) or whose state
# shows no gradient scale (Lion's sign update keeps only momentum; Sophia's Hessian is fed elsewhere).
_ADAPTIVE_CLASSES = ("Adam", "AdamW", "Adamax", "NAdam", "RAdam", "Adagrad", "Adadelta", "RMSprop", "Adafactor",
                     "SparseAdam", "Lion", "LAMB", "Lamb", "AdaBelief", "Sophia")
# Two gradients of different elementwise patterns and sizes (sum of squares 16.6 and 81.5), both signed:
# a state ∝ grad has negative entries, one ∝ grad² has none.
_GRADS = ((0.5, -1.0, 2.0, -0.25, 1.5, -3.0), (-2.0, 0.5, -5.0, 1.5, 7.0, -1.0))
_TEST_STEPS = 2  # Adafactor's first step weighs the new grad² by 0: its variance shows from the second
_MAX_STEPS = 10  # where no second moment shows by then: an optimizer may create its state late (SGD for a warm-up)
_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
# a 6-element vector first; a 3×2 matrix for an optimizer that refuses 1-D parameters (Muon-like)
_SHAPES = ((len(_GRADS[0]),), (3, 2))
_MAX_DEPTH = 4  # how deep state nested in lists, tuples and dicts is searched for tensors
_TEST_LR = 1e-4  # small, so that weight decay (lr-sized weights × decay) barely moves the gradient the state sees
_TOLERANCE = 1e-3  # of the state's largest value: float32 rounding, an eps, weight decay on lr-sized weights
# what a state tensor was seen to follow, in words; the first three are a gradient scale (adaptive)
_KINDS = {"grad²": "∝ grad² (a second moment)", "|grad|": "∝ |grad| (a running gradient scale)",
          "‖grad‖²": "∝ ‖grad‖² (a per-tensor second moment)", "grad": "∝ grad (momentum-like)"}
_SCALES = ("grad²", "|grad|", "‖grad‖²")


def optimizer_family(build: Callable[[Any, float], torch.optim.Optimizer]) -> tuple[str, str]:
    """(``"sgd"`` or ``"adaptive"``, the evidence in words) for an optimizer factory.

    Adaptive when some state the optimizer keeps (searched in nested lists, tuples and dicts too) follows grad²
    (or |grad|, or a tensor's ‖grad‖²) over two test steps, or over up to :data:`_MAX_STEPS` for state created
    late; SGD-like otherwise, unless the class is a known adaptive one. An optimizer that refuses a 1-D parameter
    is tried on a 3×2 one. One whose test step still raises (a ``step(closure)`` that needs a closure) is judged
    by its class name, and the evidence says so.

    Args:
        build: ``build(params, lr)``, as :meth:`Components.build_optimizer` is called.
    """
    errors: list[Exception] = []
    for shape in _SHAPES:
        params = [torch.nn.Parameter(torch.zeros(shape)) for _ in _GRADS]
        optimizers = [build([param], _TEST_LR) for param in params]
        name = type(optimizers[0]).__name__
        try:
            steps, kinds = _observed(optimizers, params)
        except Exception as exc:  # noqa: BLE001 - a custom optimizer may need a closure: judge by its class
            errors.append(exc)
            continue
        over = f"over {_NUMBERS[steps]} test steps" + (
            f" on a {shape[0]}×{shape[1]} parameter (a 1-D one raised {error_line(errors[0])})" if errors else "")
        return _judged(name, kinds, over)
    known = name in _ADAPTIVE_CLASSES
    return ("adaptive" if known else "sgd",
            f"{name} could not take a test step ({error_line(errors[0])}), so its class name decides: "
            + ("a known adaptive optimizer" if known else "not a known adaptive optimizer, SGD-like"))


def built_optimizer_family(optimizer: Any) -> tuple[str, str]:
    """:func:`optimizer_family` of an optimizer already built (a Trainer's), rebuilt from its class and the
    ``defaults`` its constructor accepts; one wrapped by accelerate (``.optimizer``) or Lightning (``._optimizer``)
    is unwrapped first. ``("unknown", why)`` where it cannot be rebuilt and its class is not a known adaptive one."""
    import inspect

    inner = optimizer
    for _ in range(_MAX_DEPTH):  # an AcceleratedOptimizer inside a LightningOptimizer, say
        wrapped = getattr(inner, "optimizer", None) or getattr(inner, "_optimizer", None)
        if wrapped is None or wrapped is inner or not hasattr(wrapped, "param_groups"):
            break
        inner = wrapped
    cls, defaults = type(inner), dict(getattr(inner, "defaults", None) or {})
    try:
        accepted = inspect.signature(cls).parameters
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
            defaults = {k: v for k, v in defaults.items() if k in accepted}
        defaults.pop("lr", None)
        return optimizer_family(lambda params, lr: cls(params, lr=lr, **defaults))
    except Exception as exc:  # noqa: BLE001 - a constructor that does not take its own defaults back
        if cls.__name__ in _ADAPTIVE_CLASSES:
            return "adaptive", f"{cls.__name__}, a known adaptive optimizer (rebuilding it raised {error_line(exc)})"
        return "unknown", f"{cls.__name__} could not be rebuilt to test ({error_line(exc)})"


def _judged(name: str, kinds: dict[str, str | None], over: str) -> tuple[str, str]:
    """The family and its evidence from what each state tensor was seen to follow ``over`` the test steps."""
    scales = {key: kind for key, kind in kinds.items() if kind in _SCALES}
    if scales:
        return "adaptive", f"{name} keeps {_listed(scales)} {over}"
    kept = (f"keeps {_listed(kinds)}, nothing ∝ grad², {over}" if kinds
            else f"keeps no state that follows the gradient {over}")
    if name in _ADAPTIVE_CLASSES:
        return "adaptive", f"{name} {kept}; adaptive by its class name"
    return "sgd", f"{name} {kept}: no second moment, SGD-like"


def _observed(optimizers: list[torch.optim.Optimizer],
              params: list[torch.nn.Parameter]) -> tuple[int, dict[str, str | None]]:
    """(the steps taken, what each state tensor follows, a key of :data:`_KINDS` or None): read from
    :data:`_TEST_STEPS` steps on, until some state follows a gradient scale or :data:`_MAX_STEPS` are taken.
    Constant state (a step count, an lr) is left out: it is not the gradient's."""
    for step in range(1, _MAX_STEPS + 1):
        for optimizer, param, grad in zip(optimizers, params, _GRADS, strict=True):
            param.grad = torch.tensor(grad).reshape(param.shape)
            optimizer.step()
        if step < _TEST_STEPS:
            continue
        states = [dict(_tensors(optimizer.state.get(param, {}), "", 0))
                  for optimizer, param in zip(optimizers, params, strict=True)]
        kinds = {key: _kind([state[key] for state in states]) for key in states[0] if all(key in s for s in states)}
        kinds = {key: kind for key, kind in kinds.items() if kind != "constant"}
        if step == _MAX_STEPS or any(kind in _SCALES for kind in kinds.values()):
            return step, kinds
    raise AssertionError("unreachable")


def _tensors(value: Any, path: str, depth: int) -> Iterator[tuple[str, torch.Tensor]]:
    """(``"moments[0]"``, ``"hist.m[0]"``: where, the tensor flattened in float64) for each floating-point tensor
    in ``value``, searched through lists, tuples and dicts down to :data:`_MAX_DEPTH`."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point():
            yield path, value.detach().double().reshape(-1).clone()
    elif depth < _MAX_DEPTH and isinstance(value, dict):
        for key, item in value.items():
            yield from _tensors(item, f"{path}.{key}" if path else str(key), depth + 1)
    elif depth < _MAX_DEPTH and isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _tensors(item, f"{path}[{index}]", depth + 1)


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
