"""Build the model, data, loss and optimizer a spec names.

Built-ins come by name; user code by ``target: package.module:callable``. Import errors
and keyword arguments that do not fit a callable's signature are reported as
:class:`~batchtune.config.spec.SpecError` with the key and line, before anything trains.
A factory that raises while building (a missing file, an argument out of range) is a
:class:`ComponentError` naming the key and the factory, whenever it is called.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import math
import os
import re
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_flatten_with_path, tree_leaves, tree_map
from torch.utils.data import Dataset, default_collate

from batchtune.config.spec import _TARGET_RE, Spec, SpecError, SpecIssue, locate
from batchtune.errors import error_line
from batchtune.render.text import count_of

log = logging.getLogger(__name__)

__all__ = ["STEP_CALL", "ComponentError", "Components", "build_components", "load_target", "batch_size_of",
           "batchnorm_single_values", "has_batchnorm", "sample_length", "sparse_gradient_layers", "to_device",
           "varying_lengths"]

_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "rmsprop": torch.optim.RMSprop,
    "adagrad": torch.optim.Adagrad,
    "adamax": torch.optim.Adamax,
    "nadam": torch.optim.NAdam,
    "radam": torch.optim.RAdam,
}

LossFn = Callable[[nn.Module, Any], torch.Tensor]


class ComponentError(SpecError):
    """A factory the spec names raised while building its component: one problem, on one line."""

    def __str__(self) -> str:
        return str(self.issues[0])


def _build(spec: Spec, key: str, what: str, factory: Callable[..., Any], *args: Any, kwargs_key: str | None = None,
           **kwargs: Any) -> Any:
    """``factory(*args, **kwargs)``; anything it raises but an out-of-memory is a :class:`ComponentError`.

    The error says ``what`` raised and names the key of the spec to change: ``<kwargs_key>.<name>``
    when the message names one of the keyword arguments given (``hidden must be >= 1`` →
    ``model.kwargs.hidden``), else ``key`` itself (the factory's own line: the kwargs already
    matched its signature, so a failure that names none of them is the code's).
    """
    try:
        return factory(*args, **kwargs)
    except (torch.OutOfMemoryError, MemoryError) as exc:
        # the device or host ran out: inside a trial the probe's business (does not fit); outside one the CLI says
        # this, not a traceback (an outside data factory's MemoryError reached the user as one)
        exc.batchtune_issue = spec.issue(key, f"{what} ran out of memory: {error_line(exc)}")
        raise
    except SpecError:
        raise  # names its key already
    except Exception as exc:  # noqa: BLE001 - the user's code: any failure is theirs to fix
        text = str(exc).strip().splitlines()
        line = text[0] if text else ""
        named = ([k for k in kwargs if re.search(rf"\b{re.escape(k)}\b", line)] or _value_quoted(line, kwargs)
                 or _fractions_at_fault(line, kwargs))
        quoted, note = ([], "") if named else _strings_at_fault(exc, line, kwargs)
        if not quoted and isinstance(exc, (TypeError, ValueError, LookupError)):  # the others of the wrong kind too
            faults, note = _types_at_fault(factory, {k: v for k, v in kwargs.items() if k not in named})
            quoted = [] if named else faults
        path = f"{kwargs_key or key}.{(named or quoted)[0]}" if named or quoted else getattr(exc, "spec_key", key)
        message = f"{what} raised {type(exc).__name__}: {text[0] if text else ''}"[:400] + note
        raise ComponentError([spec.issue(path, message)]) from exc


#: A TypeError of an operation that wanted a number and met a str (not 'str' object is not callable: no number).
_NUMBER_WANTED = re.compile(r"(not supported between instances of|unsupported operand type).*'str'|real number, not "
                            r"str|'str' object cannot be interpreted as an integer")


def _strings_at_fault(exc: BaseException, line: str, kwargs: dict[str, Any]) -> tuple[list[str], str]:
    """The string kwargs a factory's TypeError that names none of them is likely about, and what to say of it:
    one that reads as a number (YAML's "64": an outside GRU's hidden_size, said on model.target), else, where the
    error is a number's operation on a str (:data:`_NUMBER_WANTED`: '<=' not supported between 'float' and 'str'),
    one that is no number at all (an outside RMSprop's momentum: high, said on optimizer). ([], "") where neither."""
    if not isinstance(exc, TypeError):
        return [], ""
    strings = {k: v for k, v in kwargs.items() if isinstance(v, str)}
    numeric = [k for k, v in strings.items() if re.fullmatch(r"[-+]?\d+(\.\d*)?([eE][-+]?\d+)?", v)]
    if numeric:
        first = numeric[0]
        return numeric, f" ({first} is the string {strings[first]!r}: unquote it in the YAML to give a number)"
    if strings and _NUMBER_WANTED.search(line):
        shown = ", ".join(f"{k} is the string {v!r}" for k, v in strings.items())
        return list(strings), f" ({shown}, where a number is expected: give a number)"
    return [], ""


def _value_quoted(line: str, kwargs: dict[str, Any]) -> list[str]:
    """The one numeric kwarg whose value (or an element of it) an error that names no key quotes: torch's "Invalid
    epsilon value: -1" is about ``eps`` (a validate of three bad optimizer kwargs put it on weight_decay's line).
    [] where none or several values are quoted (a common 0 or 1 proves nothing then)."""
    shown = {float(q) for q in re.findall(r"(?<![\w.])[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?(?![\w.])", line)}

    def numbers(value: Any) -> list[float]:
        if isinstance(value, (list, tuple)):
            return [n for v in value for n in numbers(v)]
        return [float(value)] if isinstance(value, (int, float)) and not isinstance(value, bool) else []

    found = [k for k, v in kwargs.items() if any(n in shown for n in numbers(v))]
    return found if len(found) == 1 else []


_INTEGER_WANTED = re.compile(r"cannot be interpreted as an integer|must be (an )?int|expected .*\bint\b|of ints\b",
                             re.I)  # Python's range(2.5); torch's "size must be tuple of ints, but found ... float"


def _fractions_at_fault(line: str, kwargs: dict[str, Any]) -> list[str]:
    """The kwargs holding a number with a fraction, where the error wants an integer and names no key: an outside
    model's ``n_layers: 2.5`` met "'float' object cannot be interpreted as an integer", said on model.target."""
    if not _INTEGER_WANTED.search(line):
        return []
    return [k for k, v in kwargs.items() if isinstance(v, float) and not v.is_integer()]


def _expected_form(default: Any, value: Any) -> str | None:
    """What a keyword argument whose default is ``default`` takes, in words ('a pair like [0.9, 0.999]'), where
    ``value`` is plainly not of its kind (a scalar for a sequence, a string for a number); else None (no default
    to judge by, or a value of its kind)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, bool):
        return None if isinstance(value, (bool, int)) else "true or false"
    if isinstance(default, (tuple, list)) and default:
        form = "a pair" if len(default) == 2 else f"a list of {len(default)}"
        fits = isinstance(value, (tuple, list)) and len(value) == len(default) and not any(
            _expected_form(d, v) for d, v in zip(default, value))
        return None if fits else f"{form} like {list(default)}"
    if isinstance(default, (int, float)):
        return None if number else f"a number like {default!r}"
    if isinstance(default, str):
        return None if isinstance(value, str) else f"a string like {default!r}"
    return None


def _types_at_fault(factory: Callable[..., Any], kwargs: dict[str, Any]) -> tuple[list[str], str]:
    """The kwargs not of the kind their default in ``factory``'s signature is, which a TypeError, ValueError or
    IndexError that names none of them is likely about, and what to say of them: an outside NAdam's betas: 0.9 met
    "'float' object is not subscriptable", naming no key. ([], "") where every kwarg is of its default's kind."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return [], ""
    name = getattr(factory, "__name__", "the factory")
    faults = {k: form for k, v in kwargs.items() if k in params
              and (form := _expected_form(params[k].default, v)) is not None}
    said = "; ".join(f"{k}: {name}() expects {form} (its default {params[k].default!r}); got {kwargs[k]!r}"
                     for k, form in faults.items())
    return list(faults), f" ({said})" if faults else ""


SAMPLES_CHECKED = 256  # validate reads at most this many samples of each split, spread through it
IGNORE_INDEX = -100  # cross_entropy's ignore_index: a label it skips (padding in token targets)
#: How every training step calls the optimizer: the errors about a custom one's step say it.
STEP_CALL = "batchtune calls optimizer.step() with no closure, once per training step after backward"


def _step_needs(optimizer: Any) -> list[str]:
    """The arguments ``optimizer.step`` cannot do without (``['closure']`` for LBFGS): batchtune passes none."""
    try:
        signature = inspect.signature(optimizer.step)
    except (TypeError, ValueError):  # a builtin or C-level step: nothing to read, nothing to refuse
        return []
    return [name for name, p in signature.parameters.items() if p.default is p.empty
            and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _factory_name(entry: Any) -> str:
    return f"{entry.target}()" if entry.target is not None else f"built-in {entry.builtin}()"


def load_target(target: str, spec: Spec, path: str) -> Callable[..., Any]:
    """Import ``package.module:attr`` and return the attribute.

    The current directory is importable, as it is for ``python -m``.

    Raises:
        SpecError: the module or the attribute is missing (named in the message).
    """
    module_name, _, attr_path = target.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or module_name
        raise spec.error(path, f"cannot import {target!r}: no module named {missing!r}") from None
    except Exception as exc:  # the user's module raised while importing
        raise spec.error(path, f"importing module {module_name!r} failed: {type(exc).__name__}: {exc}") from None
    obj: Any = module
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise spec.error(path, f"cannot import {target!r}: module {module_name!r} has no attribute {attr_path!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise spec.error(path, f"{target!r} is not callable")
    return obj


def _check_kwargs(fn: Callable[..., Any], kwargs: dict[str, Any], spec: Spec, path: str,
                  skip: Iterable[str] = ()) -> None:
    """Bind kwargs to ``fn``'s signature so that a typo fails now, naming the key."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    params = {k: v for k, v in signature.parameters.items() if k not in skip}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [k for k, p in params.items()
                if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    issues = [spec.issue(f"{path}.{key}", f"unexpected argument; {getattr(fn, '__name__', fn)}() accepts "
                                          f"{', '.join(accepted) or 'no arguments'}")
              for key in kwargs if key not in accepted]
    # an optimizer's switch given a word: torch takes any truthy value (an outside SGD's nesterov: maybe validated)
    issues += [spec.issue(f"{path}.{key}", f"{key} is the string {value!r}, where {getattr(fn, '__name__', fn)}() "
                                           f"takes true or false")
               for key, value in kwargs.items() if path.startswith("optimizer") and key in accepted
               and isinstance(value, str) and isinstance(params[key].default, bool)]
    if issues:
        raise SpecError(issues)


class _Located:
    """What :func:`load_target` and :func:`_check_kwargs` need of a spec, for one that did not validate."""

    def __init__(self, lines: dict[str, int], source: str, origin: dict[str, str]) -> None:
        self.lines, self.source, self.origin = lines, source, origin

    def issue(self, path: str, message: str) -> SpecIssue:
        return locate(path, message, self.lines, self.source, self.origin)

    def error(self, path: str, message: str) -> SpecError:
        return SpecError([self.issue(path, message)])


def target_issues(exc: SpecError) -> list[SpecIssue]:
    """The import and keyword-argument problems of a spec whose keys or values did not validate (``exc``):
    validate lists them with the others at once, instead of one round of fixes later. Entries that have
    a problem of their own already are left out."""
    if exc.raw is None:
        return []
    data, lines, source, origin = exc.raw
    located, flagged, issues = _Located(lines, source, origin), {i.path.split(".")[0] for i in exc.issues}, []
    entries = [(key, data.get(key)) for key in ("model", "data", "loss", "optimizer") if key not in flagged]
    for key, entry in entries:
        target = entry.get("target") if isinstance(entry, dict) else None
        if key == "optimizer" and isinstance(entry, dict) and str(entry.get("name", "")).lower() in _OPTIMIZERS:
            issues += _optimizer_issues(entry, _OPTIMIZERS[str(entry["name"]).lower()], located)
            continue
        if not (isinstance(target, str) and _TARGET_RE.match(target)):
            continue
        kwargs = entry.get("kwargs") if key != "optimizer" else None
        try:
            factory = load_target(target, located, f"{key}.target")  # type: ignore[arg-type]
            if isinstance(kwargs, dict):
                _check_kwargs(factory, kwargs, located, f"{key}.kwargs")  # type: ignore[arg-type]
            if key == "optimizer":
                issues += _optimizer_issues(entry, factory, located)
        except SpecError as err:
            issues += err.issues
    return issues


def _optimizer_issues(entry: dict[str, Any], factory: Callable[..., Any], located: Any) -> list[SpecIssue]:
    """An optimizer's keyword arguments (its extra keys and ``kwargs``) checked against its factory's signature:
    outside specs with an invalid lr_scaling and momentum on AdamW (built in, then as a target) were told of the
    first only."""
    kwargs = entry.get("kwargs")
    extras = {k: v for k, v in entry.items() if k not in ("name", "target", "lr", "kwargs")}
    extras.update(kwargs if isinstance(kwargs, dict) else {})
    try:
        _check_kwargs(factory, extras, located,  # type: ignore[arg-type]
                      "optimizer.kwargs" if kwargs else "optimizer", skip=("params", "lr"))
    except SpecError as err:
        return err.issues
    return []


def _source_key(entry: Any, path: str) -> str:
    return f"{path}.builtin" if entry.builtin is not None else f"{path}.target"


def _resolve(entry: Any, registry: dict[str, str], spec: Spec, path: str) -> Callable[..., Any]:
    if entry.builtin is not None:
        module_name, _, attr = registry[entry.builtin].partition(":")
        return getattr(importlib.import_module(module_name), attr)
    return load_target(entry.target, spec, f"{path}.target")


def batch_size_of(batch: Any) -> int:
    """The number of samples in a collated batch: the leading dimension most of its tensors share
    (the smallest of a tie). Not simply the first tensor's: a collate for ``nn.EmbeddingBag``
    returns ``(ids, offsets, targets)`` with every sample's ids concatenated into one flat tensor,
    whose length counts ids, not samples.

    Raises:
        TypeError: the batch holds no tensor with a leading dimension.
    """
    counts = Counter(leaf.shape[0] for leaf in tree_leaves(batch) if isinstance(leaf, torch.Tensor) and leaf.dim())
    if not counts:
        raise TypeError(f"cannot find a tensor with a batch dimension in a batch of type {type(batch).__name__}")
    return min(counts, key=lambda size: (-counts[size], size))


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` has BatchNorm layers: a batch of one cannot train them, and micro-batch statistics
    differ from the whole batch's."""
    from torch.nn.modules.batchnorm import _BatchNorm

    return any(isinstance(m, _BatchNorm) for m in model.modules())


def batchnorm_single_values(model: nn.Module, loss_fn: Callable[[nn.Module, Any], Any],
                            batch: Any) -> dict[str, tuple[int, ...]] | None:
    """The BatchNorm layers of ``model`` that see one value per channel when ``loss_fn`` runs on ``batch`` (one
    sample), each with the shape it sees: in training they raise 'Expected more than 1 value per channel'. One over
    features, (1, C), does; a BatchNorm1d over (1, C, T) sees T values per channel, a BatchNorm2d H×W.

    Read from the inputs the layers get, in eval mode under no_grad (no running statistics change). None where the
    forward raised or ran no BatchNorm layer: not told."""
    from torch.nn.modules.batchnorm import _BatchNorm

    seen: dict[str, tuple[int, ...]] = {}

    def recorder(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple[Any, ...]) -> None:
            if args and isinstance(args[0], torch.Tensor) and args[0].dim() >= 2:
                seen.setdefault(name, tuple(int(n) for n in args[0].shape))
        return record

    handles = [m.register_forward_pre_hook(recorder(name or type(m).__name__))
               for name, m in model.named_modules() if isinstance(m, _BatchNorm)]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            loss_fn(model, batch)
    except Exception:  # noqa: BLE001 - the user's forward: not told, the caller stays on the safe side
        return None
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    if not seen:
        return None
    return {name: shape for name, shape in seen.items() if shape[0] * math.prod(shape[2:]) <= 1}


def sparse_gradient_layers(model: nn.Module) -> list[str]:
    """The names of ``model``'s ``nn.Embedding``/``nn.EmbeddingBag`` layers built with ``sparse=True``: their
    gradients are sparse, and so is the memory of their optimizer step, which grows with the rows a batch
    touches (SparseAdam's state update), not a floor independent of the batch."""
    return [name or type(m).__name__ for name, m in model.named_modules()
            if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse]


def to_device(batch: Any, device: torch.device) -> Any:
    """The batch with every tensor on ``device`` (dicts, lists, tuples nest; other leaves pass through)."""
    # tree_map with an isinstance test costs half of tree_map_only's wrapper, per batch.
    return tree_map(lambda x: x.to(device, non_blocking=True) if isinstance(x, torch.Tensor) else x, batch)


def _model_loss(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict) and "loss" in output:
        return output["loss"]
    loss = getattr(output, "loss", None)
    if loss is None:
        raise TypeError("loss is 'model_output' but the model returned neither a tensor nor an object with .loss")
    return loss


def _output_text(output: Any) -> str:
    """What a model returned, in words: ``a dict (logits, recon, hidden)``, ``a tuple of 3``."""
    if isinstance(output, dict):
        return f"a {type(output).__name__} ({', '.join(map(str, output)) or 'no keys'})"
    if isinstance(output, (tuple, list)):
        return f"a {type(output).__name__} of {len(output)}"
    return f"a {type(output).__name__}"


def _tensor_output(loss: str, output: Any) -> None:
    """A built-in loss needs the model's output as one tensor; else a spec error on ``loss`` saying what came."""
    if not isinstance(output, torch.Tensor):
        own = " or, as it returns a loss, loss: model_output" if getattr(output, "loss", None) is not None or (
            isinstance(output, dict) and "loss" in output) else ""
        raise LossShapeError(f"{loss} needs the model's output as a tensor; the model returned {_output_text(output)}: "
                             f"give loss: {{target: ...}}, a loss that reads it{own}")


def _cross_entropy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    _tensor_output("cross_entropy", output)
    _class_scores(output, target)
    if output.dim() > 2:  # (B, T, V) sequence logits against (B, T) targets
        return F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1))
    return F.cross_entropy(output, target)


def _class_scores(output: torch.Tensor, target: Any) -> None:
    """A LossShapeError where cross_entropy cannot be the loss meant: outside regressions that left out ``loss:``
    trained on a loss always 0 (one output: the log-softmax of one class; check passed), on the batch read as one
    sample's scores over B classes (a (B,) output and (B,) float targets: a target of -3.3e6 was recommended),
    or raised torch's 'multi-target not supported' against the model's line."""
    what = "cross_entropy (the built-in loss, and the default where a spec names none)"
    regression = "for a regression give loss: mse"
    if output.dim() < 2:
        raise LossShapeError(f"{what} needs class scores of shape [B, C] (or [B, T, C]); the model's output has shape "
                             f"{list(output.shape)}, which it would read as one sample's scores over "
                             f"{output.shape[0] if output.dim() else 1} classes: {regression}")
    if output.shape[-1] == 1:
        raise LossShapeError(f"{what} over the model's output of shape {list(output.shape)}, one class, is always 0 "
                             f"(the log-softmax of one class) and trains nothing: {regression}; a classifier needs "
                             "an output per class")
    if not isinstance(target, torch.Tensor):
        return
    if target.is_floating_point() and target.shape != output.shape:
        raise LossShapeError(f"{what} takes class indices (integers) of shape {list(output.shape[:-1])} or class "
                             f"probabilities of the output's shape {list(output.shape)}; the targets are "
                             f"{str(target.dtype).removeprefix('torch.')} of shape {list(target.shape)}: "
                             f"{regression}; for labels, make them integers")
    if not target.is_floating_point() and target.shape != output.shape[:-1]:
        raise LossShapeError(f"{what} takes class indices of shape {list(output.shape[:-1])} for the model's output "
                             f"of shape {list(output.shape)}; the targets have shape {list(target.shape)}"
                             + (": squeeze their last dimension" if target.shape[:-1] == output.shape[:-1] else ""))


class LossShapeError(ValueError):
    """A built-in loss given shapes it cannot compare: the spec's ``loss`` (or the model's output) to change,
    named as ``loss`` where the model and the loss run together (validate's first samples)."""

    spec_key = "loss"


def _mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    _tensor_output("mse", output)
    if output.shape != target.shape and output.numel() == target.numel():
        target = target.reshape(output.shape)
    if output.shape != target.shape:  # F.mse_loss would broadcast them, warn, and train on the wrong numbers
        raise LossShapeError(f"mse: the model's output of shape {list(output.shape)} and the targets of shape "
                             f"{list(target.shape)} differ (mse would broadcast them); make the model's output "
                             "match the targets")
    return F.mse_loss(output, target.to(output.dtype))


TARGET_KEYS = ("labels", "label", "targets", "target", "y")  # "label": a Hugging Face dataset's own column


def _split(batch: Any) -> tuple[Any, Any]:
    """(inputs, targets) of a batch: a pair's two parts; a longer tuple's last part, the others (a tuple,
    the model's positional arguments) before it; a dict's value under the first of :data:`TARGET_KEYS` it has.

    Raises:
        TypeError: a dict without targets (the loss needs them).
        ValueError: a batch of another form (the data's).
    """
    if isinstance(batch, dict):
        for key in TARGET_KEYS:
            if key in batch:
                return {k: v for k, v in batch.items() if k != key}, batch[key]
        raise TypeError(f"a dict batch needs its targets under one of {', '.join(TARGET_KEYS)} unless loss is "
                        f"'model_output'; this one has {', '.join(map(str, batch)) or 'no keys'}")
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        form = f"a {type(batch).__name__}" + (f" of {len(batch)}" if isinstance(batch, (tuple, list)) else "")
        raise ValueError(f"a batch must be (inputs, targets), (input, ..., targets) or a dict with its targets under "
                         f"{', '.join(TARGET_KEYS)}; this one is {form}")
    return (batch[0] if len(batch) == 2 else tuple(batch[:-1])), batch[-1]


def _spread(n: int, limit: int) -> list[int]:
    """At most ``limit`` indices of ``range(n)``, evenly spread, the first and the last among them."""
    if n <= limit:
        return list(range(n))
    return sorted({round(i * (n - 1) / (limit - 1)) for i in range(limit)})


def _as_tensor(value: Any) -> torch.Tensor | None:
    """A tensor, a numeric NumPy array or scalar, or a Python number as a tensor; None for anything else (strings,
    booleans)."""
    if isinstance(value, torch.Tensor):
        return value
    numeric = (isinstance(value, (int, float)) and not isinstance(value, bool)) or (
        type(value).__module__ == "numpy" and getattr(getattr(value, "dtype", None), "kind", "") in ("i", "u", "f"))
    return torch.as_tensor(value) if numeric else None


def _sample_problem(sample: Any, classes: int | None) -> str | None:
    """What is wrong with one sample, in words after 'training sample 7 (of 512)', or None: values that are not
    finite, or (``classes`` given: cross_entropy) a class label outside 0..classes-1 (-100 aside)."""
    try:
        inputs, targets = _split(sample)
        parts: tuple[tuple[str, Any], ...] = (("inputs", inputs), ("targets", targets))
    except (TypeError, ValueError):
        targets, parts = None, (("values", sample),)
    for part, value in parts:
        for t in filter(lambda x: x is not None, map(_as_tensor, tree_leaves(value))):
            if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
                kinds = " and ".join(k for k, found in (("NaN", torch.isnan(t)), ("inf", torch.isinf(t)))
                                     if bool(found.any()))
                bad = int((~torch.isfinite(t)).sum())
                return f"holds {kinds} in its {part} ({bad:,} of {count_of(t.numel(), 'value')}): clean the data"
    labels = _as_tensor(targets) if classes is not None and not isinstance(targets, (dict, list, tuple)) else None
    if labels is None or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        return None
    wrong = labels[(labels >= classes) | ((labels < 0) & (labels != IGNORE_INDEX))]
    if wrong.numel() == 0:
        return None
    return (f"has class label {int(wrong.flatten()[0])} in its targets, out of range for the model's {classes} "
            f"outputs: cross_entropy takes labels 0 to {classes - 1} ({IGNORE_INDEX} is ignored); give the model an "
            "output per class, or fix the labels")


def _shapes(sample: Any) -> dict[str, tuple[int, ...] | None]:
    """A sample's leaves by field (``field noisy``, ``field 0.input_ids``; a list's items by index): a tensor's or
    array's shape, None for a number or a string (the default collate batches those whatever they hold)."""
    leaves, _ = tree_flatten_with_path(sample)
    return {"field " + ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path) if path else "the sample":
            tuple(int(d) for d in leaf.shape) if hasattr(leaf, "shape") else None for path, leaf in leaves}


def _shape_clash(first: tuple[int, dict[str, Any]], other: tuple[int, dict[str, Any]]) -> str | None:
    """How two samples' :func:`_shapes` differ, in words after 'training samples 0 and 80 (of 4,096)', or None
    where torch's default collate stacks them into one batch."""
    (i, a), (j, b) = first, other
    if (missing := next((k for k in (*a, *b) if (k in a) != (k in b)), None)) is not None:
        has, lacks = (i, j) if missing in a else (j, i)
        return f"differ in form: sample {has} has a {missing} that sample {lacks} has not"
    differ = [k for k in a if None not in (a[k], b[k]) and a[k] != b[k]]
    if not differ:
        return None
    k = differ[0]
    return (f"differ in shape: {k} is {list(a[k])} in sample {i} and {list(b[k])} in sample {j}"
            + (f" ({', '.join(differ[1:])} too)" if differ[1:] else ""))


def _numbers_as_lists(batch: Any, n: int) -> int:
    """How many numbers each sample's input held, where the input was a Python list of them (the default collate
    makes it a list of tensors of one number per sample, which no model takes); else 0."""
    try:
        inputs, _ = _split(batch)
    except (TypeError, ValueError):
        return 0
    if isinstance(inputs, list) and len(inputs) > 1 and all(
            isinstance(t, torch.Tensor) and tuple(t.shape) == (n,) for t in inputs):
        return len(inputs)
    return 0


def _call(model: nn.Module, inputs: Any) -> Any:
    """The model on a batch's inputs: a dict as keyword arguments, a tuple as positional ones.

    Raises:
        TypeError: ``forward`` does not take a dict's keys as its parameters; the message says that the keys are
            passed so (an outside ``forward(self, batch)`` met 'got an unexpected keyword argument 'src'' alone).
    """
    if not isinstance(inputs, dict):
        return model(*inputs) if isinstance(inputs, tuple) else model(inputs)
    try:
        return model(**inputs)
    except TypeError as exc:
        if not re.search(r"forward\(\) (got an unexpected keyword argument|missing \d+ required)", str(exc)):
            raise
        raise TypeError(f"{exc} (a dict of inputs reaches model.forward as keyword arguments, one per key: "
                        f"{', '.join(map(str, inputs))}; name forward's parameters after the keys, or take "
                        "**kwargs)") from exc


def _one_number(spec: Spec, loss: Any) -> torch.Tensor:
    """``loss`` when it is one number per batch; else a spec error on ``loss`` (torch's own complaint comes
    only at backward: "grad can be implicitly created only for scalar outputs")."""
    if isinstance(loss, torch.Tensor) and loss.numel() == 1:
        return loss
    got = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
    raise spec.error("loss", f"the loss must be one number per batch (reduce it, e.g. .mean()); it returned {got}")


def _model_output_fix(batch: Any) -> str:
    """What a batch that a ``model_output`` model's forward did not take calls for, fitted to the batch: a dict's
    keys reach forward as keyword arguments whatever the loss, and a named loss needs a dict's targets under one of
    :data:`TARGET_KEYS` (an outside denoiser's forward(self, batch) on noisy and clean was told to name mse, which
    such a batch refuses)."""
    named = "name a loss instead (cross_entropy, mse or {target: ...})"
    if not isinstance(batch, dict):
        return named
    keys = ", ".join(map(str, batch))
    own = (f"a dict batch reaches forward as keyword arguments, one per key: give forward those parameters "
           f"(forward(self, {keys})) and return the loss")
    if (target := next((k for k in TARGET_KEYS if k in batch), None)) is None:
        return (f"{own}; or, to name a loss (cross_entropy, mse or {{target: ...}}), store the targets under one of "
                f"{', '.join(TARGET_KEYS)} (this batch has none): forward then takes the other keys")
    rest = ", ".join(str(k) for k in batch if k != target)
    return f"{own}; or {named}: forward then takes {rest}, and the loss {target}"


def _make_loss(spec: Spec) -> LossFn:
    if spec.loss == "model_output":
        def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
            try:
                output = model(**batch) if isinstance(batch, dict) else model(*batch)
            except TypeError as exc:
                if not re.search(r"positional argument|keyword argument", str(exc)):
                    raise
                given = (f"{len(batch)} keyword arguments" if isinstance(batch, dict) else
                         f"{len(batch)} positional arguments" if isinstance(batch, (tuple, list)) else "one argument")
                # the spec's loss in every command, with its line: not a trial's error, and not cut at 400 characters
                raise ComponentError([spec.issue("loss", f"model_output passes the whole batch, targets included, to "
                                                         f"a model that computes its own loss ({given} here); this one "
                                                         f"raised TypeError: {exc}: {_model_output_fix(batch)}")]) \
                    from exc
            return _one_number(spec, _model_loss(output))
        return loss_fn

    if isinstance(spec.loss, str):
        criterion = {"cross_entropy": _cross_entropy, "mse": _mse}[spec.loss]
    else:
        factory = load_target(spec.loss.target, spec, "loss.target")
        _check_kwargs(factory, spec.loss.kwargs, spec, "loss.kwargs")
        criterion = _build(spec, "loss.target", f"the loss factory {spec.loss.target}()", factory,
                           kwargs_key="loss.kwargs", **spec.loss.kwargs)

    checked = False
    output_extremes: list[torch.Tensor] = []  # a loss of the user's: this step's outputs' min and max (outputs_finite)

    def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
        nonlocal checked
        try:
            inputs, targets = _split(batch)
        except (TypeError, ValueError) as exc:  # no targets for this loss, or a batch of no known form: the spec's
            data_key = "data.collate" if spec.data.collate is not None else "data"  # the batch is the collate's
            raise ComponentError([spec.issue("loss" if isinstance(exc, TypeError) else data_key, str(exc))]) from None
        output = _call(model, inputs)
        if not isinstance(spec.loss, str) and torch.is_grad_enabled():
            # min and max, not a sum: they tell how large finite outputs are (a sum cancels, and overflows)
            output_extremes.extend(v for t in tree_leaves(output) if isinstance(t, torch.Tensor)
                                   and t.is_floating_point() and t.numel() for v in torch.aminmax(t.detach()))
        try:  # the first batch of every command is checked for broadcasting, not validate's only
            loss = criterion(output, targets) if checked else _unbroadcast(spec, criterion, output, targets)
        except Exception as exc:  # the loss's to fix, not the model's (a raising loss was named at model:)
            if not hasattr(exc, "spec_key"):
                exc.spec_key = "loss" if isinstance(spec.loss, str) else "loss.target"
            raise
        checked = True
        return _one_number(spec, loss)

    loss_fn.output_extremes = output_extremes
    return loss_fn


def largest_output(loss_fn: LossFn) -> float | None:
    """The largest absolute value of the model's outputs in every training pass of the user's loss (``loss.target``)
    since :func:`clear_outputs`: NaN or inf where one was not finite. None where there is no answer (a built-in loss
    keeps none). Their min and max, not the outputs: holding those would add their bytes to a trial's peak."""
    extremes = getattr(loss_fn, "output_extremes", None)
    if not extremes:
        return None
    values = [abs(float(v)) for v in extremes]  # read only when a loss was not finite: the syncs are rare
    return math.nan if any(math.isnan(v) for v in values) else max(values)


def outputs_finite(loss_fn: LossFn) -> bool | None:
    """Whether the model's outputs were finite in every training pass of the user's loss since
    :func:`clear_outputs` (:func:`largest_output`); None where there is no answer."""
    largest = largest_output(loss_fn)
    return None if largest is None else math.isfinite(largest)


#: The largest float32 whose exp is finite (about 88.7): finite model outputs past it overflow a loss's exp.
EXP_OVERFLOW = math.log(torch.finfo(torch.float32).max)


def huge_outputs(largest: float | None, loss_key: str) -> str | None:
    """Why a loss made of finite model outputs as large as ``largest`` (in absolute value) is not finite, where they
    pass :data:`EXP_OVERFLOW`: the model's outputs, or a loss that cannot take them, named by their keys (an outside
    exp of outputs near 1e5 was blamed on the loss alone). None where they do not: the loss function's."""
    if largest is None or not EXP_OVERFLOW < largest < math.inf:
        return None
    return (f"the model's outputs are finite but huge (largest |output| {largest:.4g}; exp overflows float32 past "
            f"{EXP_OVERFLOW:.1f}): scale down the model's initial outputs (model) or make the loss ({loss_key}) "
            "take them without overflowing (log_softmax or logsumexp, not exp then log); not the lr")


def clear_outputs(loss_fn: LossFn) -> None:
    """Start a step: forget the outputs' extremes of the last one."""
    extremes = getattr(loss_fn, "output_extremes", None)
    if extremes is not None:
        extremes.clear()


def _unbroadcast(spec: Spec, criterion: Callable[..., Any], output: Any, targets: Any) -> Any:
    """``criterion(output, targets)``, a spec error on ``loss`` where torch warned that it broadcast them:
    it then trains on the wrong numbers (nn.MSELoss or F.huber_loss on (B,) outputs against (B, 1) targets
    averages a (B, B) matrix; an outside check passed such a spec, exit 0, and its probe fitted memory growing
    as B²). Torch's other warnings pass on."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            loss = criterion(output, targets)
        except LossShapeError as exc:  # a built-in loss the shapes do not suit: the spec's loss, exit 2 everywhere
            raise ComponentError([spec.issue("loss", f"the model and loss on the first batch raised LossShapeError: "
                                                     f"{exc}")]) from None
    broadcast = next((str(w.message) for w in caught if "broadcasting" in str(w.message)), None)
    if broadcast:
        raise spec.error("loss", f"the loss broadcast the model's output against the targets: "
                                 f"{broadcast.split('. This')[0]}; make their shapes match")
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return loss


def _dims(value: Any) -> tuple[int, ...]:
    """A field's dimensions: a tensor's or array's shape, a sequence's (len(),), none for a scalar."""
    shape = getattr(value, "shape", None)
    if shape is not None:
        return tuple(int(d) for d in shape)
    if isinstance(value, (list, tuple, str, bytes)):
        return (len(value),)
    return ()


def _field_dims(sample: Any) -> dict[Any, tuple[int, ...]]:
    """Each field's dimensions, by dict key or tuple index (a bare tensor is one field)."""
    if isinstance(sample, dict):
        return {key: _dims(value) for key, value in sample.items()}
    if isinstance(sample, (tuple, list)):
        return {index: _dims(value) for index, value in enumerate(sample)}
    return {None: _dims(sample)}


def sample_length(sample: Any, length_key: str | int | None = None) -> int:
    """A sample's length: its ``length_key`` field's first dimension (len()), else its largest tensor dimension
    (or list length). Read alone, a sample cannot tell a varying dimension from a constant one;
    :func:`varying_lengths` reads a whole data set's.

    Raises:
        ValueError: the sample has no field ``length_key``.
    """
    if length_key is not None:  # the first dimension: a (T, 96) feature field is T long, not 96
        return next(iter(_keyed_dims(sample, length_key)), 1)
    return max((max(dims, default=1) for dims in _field_dims(sample).values()), default=1)


def _keyed_dims(sample: Any, length_key: str | int) -> tuple[int, ...]:
    """The dimensions of the field ``length_key`` names.

    Raises:
        ValueError: the sample has no such field.
    """
    try:
        return _dims(sample[length_key])
    except (KeyError, IndexError, TypeError):
        raise ValueError(f"a sample has no field {length_key!r} (it holds {_fields(sample)})") from None


def keyed_lengths(dims: list[tuple[int, ...]], length_key: str | int) -> list[int]:
    """Samples' lengths from the dimensions of their ``length_key`` field: its first, as len() reads it.
    Warns where that dimension is the same in every sample while a later one varies: a channels-first field
    ((80, T) filterbanks) reads as 80 long throughout, and the worst case and token budget with it."""
    lengths = [d[0] if d else 1 for d in dims]
    later = {axis: {d[axis] for d in dims if len(d) > axis} for axis in range(1, max(map(len, dims), default=0))}
    moving = [axis for axis, sizes in later.items() if len(sizes) > 1]
    if len(set(lengths)) == 1 and moving:
        sizes = later[moving[0]]
        log.warning(f"data.length_key {length_key!r}: its first dimension, the length batchtune reads, is "
                    f"{lengths[0]:,} in all {count_of(len(lengths), 'sample')}, while dimension {moving[0]} varies "
                    f"from {min(sizes):,} to {max(sizes):,}: store the field length-first ((T, features)), or give a "
                    f"data set a 'lengths' attribute")
    return lengths


def varying_lengths(profiles: list[dict[Any, tuple[int, ...]]]) -> list[int]:
    """Samples' lengths from their fields' dimensions (:func:`_field_dims`), without a ``length_key``: each
    sample's largest dimension among those that vary across the samples. A dimension every sample shares
    (96 features a step, a label's 1) is no length: taking the largest dimension outright read an outside
    data set's (T, 96) samples, T from 4 to 64, as 96 tokens each (padding 0%, a token budget that ran out of
    memory). Where no dimension varies, the samples are as long as their largest dimension."""
    seen: dict[tuple[Any, int], set[int]] = {}
    for profile in profiles:
        for key, dims in profile.items():
            for axis, size in enumerate(dims):
                seen.setdefault((key, axis), set()).add(size)
    varying = {place for place, sizes in seen.items() if len(sizes) > 1}

    def length(profile: dict[Any, tuple[int, ...]]) -> int:
        sizes = [size for key, dims in profile.items() for axis, size in enumerate(dims) if (key, axis) in varying]
        return max(sizes or [d for dims in profile.values() for d in dims] or [1])

    return [length(profile) for profile in profiles]


def _fields(sample: Any) -> str:
    """What a sample holds, for an error: its keys, or its type and size."""
    if isinstance(sample, dict):
        return ", ".join(map(repr, sample))
    if isinstance(sample, (tuple, list)):
        return f"a {type(sample).__name__} of {len(sample)}"
    return f"a {type(sample).__name__}"


@dataclass
class Components:
    """What a spec builds: a model factory, the data, a loss and an optimizer factory.

    Variable-length data also brings a ``collate_fn`` (the spec's ``data.collate``) and a
    ``length_key``; :meth:`lengths` reads every training sample's length once and keeps it.
    """

    spec: Spec
    model_factory: Callable[..., nn.Module]
    train_set: Dataset
    val_set: Dataset
    loss_fn: LossFn
    optimizer_factory: Callable[..., torch.optim.Optimizer]
    collate_fn: Callable[[list[Any]], Any] | None = None
    length_key: str | int | None = None
    _lengths: dict[int, list[int]] = field(default_factory=dict, repr=False)
    _pads: bool | None = field(default=None, repr=False)

    @property
    def variable_length(self) -> bool:
        """Whether samples differ in length (the spec names a collate function or a length key)."""
        return self.collate_fn is not None or self.length_key is not None

    def collate(self, samples: list[Any]) -> Any:
        """``samples`` as one batch, as the data loader collates them."""
        return (self.collate_fn or default_collate)(samples)

    def lengths(self, dataset: Dataset | None = None) -> list[int]:
        """Every sample's length (default: the training set's), in one pass, cached.

        A data set with a ``lengths`` attribute (one int per sample) is read from it instead.

        Raises:
            ComponentError: reading a sample raised, or it has no ``length_key`` field.
        """
        dataset = self.train_set if dataset is None else dataset
        if id(dataset) not in self._lengths:
            given = getattr(dataset, "lengths", None)
            if given is not None and len(given) == len(dataset):
                self._lengths[id(dataset)] = [int(n) for n in given]
            else:
                key = "data.length_key" if self.length_key is not None else "data"

                def read(index: int) -> Any:
                    if watch is not None:
                        watch.renew()  # a deadline on each sample: the whole pass may take long
                    sample = dataset[index]
                    return _field_dims(sample) if self.length_key is None else _keyed_dims(sample, self.length_key)

                from batchtune.engine.watchdog import bounded

                with bounded(self.spec.trial_timeout, "reading a sample's length") as watch:
                    read_all = [_build(self.spec, key, "reading a sample's length", read, i)
                                for i in range(len(dataset))]
                self._lengths[id(dataset)] = (varying_lengths(read_all) if self.length_key is None
                                              else keyed_lengths(read_all, self.length_key))
        return self._lengths[id(dataset)]

    def pads(self) -> bool:
        """Whether the collate pads samples to the batch's longest (``pad_tokens``, Hugging Face's collators),
        judged on the longest and the shortest training samples collated together: some tensor of two rows
        as long as the longest. A collate that concatenates samples (``nn.EmbeddingBag``'s flat ids with
        offsets) does not pad, and padding figures say nothing of it. True where the lengths do not differ."""
        if self._pads is None:
            lengths = self.lengths()
            longest = max(range(len(lengths)), key=lengths.__getitem__)
            shortest = min(range(len(lengths)), key=lengths.__getitem__)
            self._pads = lengths[longest] == lengths[shortest] or any(
                t.dim() >= 2 and t.shape[0] == 2 and max(t.shape[1:]) >= lengths[longest]
                for t in tree_leaves(self.collate([self.train_set[longest], self.train_set[shortest]]))
                if isinstance(t, torch.Tensor))
        return self._pads

    def build_model(self, seed: int | None = None) -> nn.Module:
        """A freshly initialised model (seeded, so trials at one seed start alike)."""
        if seed is not None:
            torch.manual_seed(seed)
        from batchtune.engine.watchdog import bounded

        spec = self.spec
        with bounded(spec.trial_timeout, f"the model factory {_factory_name(spec.model)}"):
            model = _build(spec, _source_key(spec.model, "model"), f"the model factory {_factory_name(spec.model)}",
                           self.model_factory, kwargs_key="model.kwargs", **spec.model.kwargs)
        if not isinstance(model, nn.Module):
            raise spec.error("model", f"the model factory returned {type(model).__name__}, not an nn.Module")
        return model

    def build_optimizer(self, params: Iterable[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
        """The optimizer over ``params``; a value it rejects is a :class:`ComponentError` naming its key."""
        opt = self.spec.optimizer
        key = "optimizer.kwargs" if opt.kwargs else "optimizer"
        name = f"{opt.target}()" if opt.target else f"{getattr(self.optimizer_factory, '__name__', opt.name)}()"
        optimizer = _build(self.spec, key, f"the optimizer {name}", self.optimizer_factory, params, lr=lr,
                           **opt.options)
        missing = [a for a in ("param_groups", "step", "zero_grad") if not hasattr(optimizer, a)]
        if missing:  # an outside factory returned None: validate said ok, check failed at the step, exit 1
            raise self.spec.error("optimizer.target" if opt.target else "optimizer",
                                  f"the optimizer {name} returned {type(optimizer).__name__}, not an optimizer (it has "
                                  f"no {', '.join(missing)}): return a torch.optim.Optimizer built over the "
                                  "parameters and lr it is given")
        needs = _step_needs(optimizer)
        if needs:  # an outside step(self, closure): validate said ok, every command failed at the first step
            raise ComponentError([self.spec.issue(
                "optimizer.target" if opt.target else "optimizer",
                f"the optimizer {name} has step({', '.join(needs)}), which needs "
                f"{'a closure' if needs == ['closure'] else 'arguments'}: {STEP_CALL}, so an optimizer whose step "
                "needs a closure (LBFGS-style) cannot be tuned; choose another")])
        return optimizer

    def first_loss(self, model: nn.Module, samples: int = 2, device: torch.device | None = None) -> float:
        """The loss of the first ``samples`` training samples, forward only, as validate checks before any
        training: the data collates, the model takes the batch, the loss takes its output to one number.
        ``device``: the model's, where the batch goes first (a trial's model, asked why its loss is not finite).

        Raises:
            ComponentError: collating, the forward or the loss raised.
            SpecError: the loss is not one number (:func:`_one_number`), or not finite.
        """
        n = min(samples, len(self.train_set))
        first = "the first training sample" if n == 1 else f"the first {n} training samples"
        batch = self._first_batch(n, first)
        if device is not None:
            batch = to_device(batch, device)
        # torch's warnings here are about a forward without gradients (checkpointing's 'None of the inputs have
        # requires_grad'), not the user's: left unsaid (a loss that broadcast raises in the loss function)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                loss = _build(self.spec, "model", f"the model and loss on {first}",
                              self.loss_fn, model, batch)
            except ComponentError as exc:
                if numbers := _numbers_as_lists(batch, n):
                    raised = exc.issues[0].message
                    raise self.spec.error("data", f"each sample's input is a Python list of {numbers} numbers, "
                                                  f"which collates to a list of {numbers} tensors, not one tensor "
                                                  f"({raised}); return a tensor from the data set (torch.tensor(...)) "
                                                  "or give data.collate") from None
                raise
        if not math.isfinite(float(loss)):
            if any(isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())
                   for t in tree_leaves(batch)):
                raise self.spec.error("data", f"{first} {'holds' if n == 1 else 'hold'} values that are not finite "
                                              f"(NaN or inf), and the loss on {'it' if n == 1 else 'them'} is "
                                              f"{float(loss)}: clean the data")
            largest = self._largest_output(model, batch)
            key = "loss" if isinstance(self.spec.loss, str) else "loss.target"
            if huge := huge_outputs(largest, key):  # finite, but past what an exp takes: the model's or the loss's
                raise self.spec.error("model", f"the loss on {first} is {float(loss)} before any training step: "
                                               f"{huge}")
            if largest is not None and math.isfinite(largest):  # the loss made it of finite outputs: the loss's
                raise self.spec.error(key, f"the loss on {first} is {float(loss)} before any training step, from "
                                           "the model's finite outputs (and finite inputs): the loss function, not "
                                           "the model or the lr")
            raise self.spec.error("model", f"the model's initial output on {first} is not finite (NaN or inf) "
                                           f"before any training step, from finite inputs, and the loss on "
                                           f"{'it' if n == 1 else 'them'} is {float(loss)}: the model, not the lr")
        return float(loss)

    def _largest_output(self, model: nn.Module, batch: Any) -> float | None:
        """The largest absolute value of the floating-point tensors the model gives on ``batch``'s inputs (NaN or
        inf where one is not finite); None where the loss is the model's own (``model_output``) or the inputs
        cannot be told apart (the model's to answer)."""
        if self.spec.loss == "model_output":
            return None
        try:
            with torch.no_grad():
                output = _call(model, _split(batch)[0])
        except Exception:  # noqa: BLE001 - it ran once already in first_loss: any failure now is no answer
            return None
        largest = [float(t.abs().max()) for t in tree_leaves(output)
                   if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel()]
        return math.nan if any(math.isnan(v) for v in largest) else max(largest, default=0.0)

    def check_samples(self, model: nn.Module, limit: int = SAMPLES_CHECKED, device: torch.device | None = None) -> int:
        """Read up to ``limit`` samples of each split, spread evenly through it (bounded however large the data
        set), for values that are not finite (NaN or inf, in the inputs or the targets) and, under
        ``cross_entropy``, class labels the model's outputs cannot hold (below 0 other than -100, which it
        ignores, or at least its number of outputs), and, without variable-length data (``data.collate``,
        ``data.length_key``), for shapes that differ within a split: torch's default collate cannot stack them (an
        outside data set's every 7th 1×24×24 image among 1×16×16 ones passed validate and failed the sweep's
        collate; 1×15×15 ones failed in the model, naming no sample). Returns the samples read. validate read two
        samples: a NaN in the validation set, or a label out of range, passed it and failed later, less clearly.
        ``device``: the model's, where its batch goes (a trial's model, asked why its step raised).

        Raises:
            SpecError: on ``data``, naming the split, the sample's index and the problem (two samples' indices and
                shapes on ``data.target``).
            ComponentError: reading a sample raised.
        """
        from batchtune.errors import COLLATE_HINT

        classes = self._classes(model, device) if self.spec.loss == "cross_entropy" else None
        read = 0
        for which, dataset in (("training", self.train_set), ("validation", self.val_set)):
            n, first = len(dataset), None
            for i in _spread(n, limit):
                sample = _build(self.spec, "data", f"reading {which} sample {i}", dataset.__getitem__, i)
                problem = _sample_problem(sample, classes)
                if problem is not None:
                    raise self.spec.error("data", f"{which} sample {i} (of {n:,}) {problem}")
                if not self.variable_length:  # a collate of the spec's may pad; without one, torch's stacks
                    shapes = (i, _shapes(sample))
                    first = first or shapes
                    if clash := _shape_clash(first, shapes):
                        raise self.spec.error(_source_key(self.spec.data, "data"),
                                              f"{which} samples {first[0]} and {i} (of {n:,}) {clash}: torch's default "
                                              f"collate cannot stack them into one batch; {COLLATE_HINT}")
                read += 1
        return read

    def _classes(self, model: nn.Module, device: torch.device | None = None) -> int | None:
        """The model's number of class scores (the last dimension of its output on the first two training
        samples), or None where it gives none, or one (the forward's errors and a one-class output are first_loss's
        to say, as the loss's)."""
        n = min(2, len(self.train_set))
        try:
            inputs, _ = _split(self._first_batch(n, "the first training samples"))
            inputs = inputs if device is None else to_device(inputs, device)
            with torch.no_grad():
                output = _call(model, inputs)
        except Exception:  # noqa: BLE001 - said by first_loss, which runs the same batch
            return None
        scores = isinstance(output, torch.Tensor) and output.dim() >= 2 and output.shape[-1] >= 2
        return int(output.shape[-1]) if scores else None

    def _first_batch(self, n: int, first: str) -> Any:
        """The first ``n`` training samples collated; a collate that raises is ``data.collate``'s where the spec
        names one, else the data set's, with what samples of different shapes need (:data:`COLLATE_HINT`)."""
        from batchtune.errors import COLLATE_HINT

        samples = [self.train_set[i] for i in range(n)]
        if self.collate_fn is not None:
            return _build(self.spec, "data.collate", f"collating {first}", self.collate, samples)
        try:
            return _build(self.spec, "data", f"collating {first}", self.collate, samples)
        except ComponentError as exc:
            raise ComponentError([self.spec.issue("data", f"{exc.issues[0].message}; {COLLATE_HINT}")]) from exc

    def tokens_per_sample(self) -> int:
        """Elements in one sample's integer targets (token ids: the sequence length for a language model),
        else 1 (a class, or float targets such as a regression's or an autoencoder's vector); for
        variable-length data the mean sample length (real tokens, padding not counted).

        Raises:
            ComponentError: reading the first training sample raised.
        """
        if self.variable_length:
            lengths = self.lengths()
            return max(1, round(sum(lengths) / len(lengths)))
        from batchtune.engine.watchdog import bounded

        with bounded(self.spec.trial_timeout, "reading the first training sample"):  # plan hung here, unbounded
            sample = _build(self.spec, "data", "reading the first training sample", self.train_set.__getitem__, 0)
        try:
            _, target = _split(sample)
        except (TypeError, ValueError):
            return 1
        tokens = isinstance(target, torch.Tensor) and target.dim() > 0 and not target.is_floating_point()
        return int(target.numel()) if tokens else 1


def build_components(spec: Spec) -> Components:
    """Resolve and check everything the spec names; builds the data sets once.

    Raises:
        SpecError: a target that cannot be imported, kwargs that a callable does not take,
            or a data factory that does not return ``(train, val)``.
        ComponentError: the data or loss factory raised.
    """
    from batchtune.config.builtins import BUILTIN_DATA, BUILTIN_MODELS

    issues = []
    model_factory = data_factory = optimizer_factory = loss_fn = None
    try:
        model_factory = _resolve(spec.model, BUILTIN_MODELS, spec, "model")
        _check_kwargs(model_factory, spec.model.kwargs, spec, "model.kwargs")
    except SpecError as exc:
        issues += exc.issues
    try:
        data_factory = _resolve(spec.data, BUILTIN_DATA, spec, "data")
        _check_kwargs(data_factory, spec.data.kwargs, spec, "data.kwargs")
    except SpecError as exc:
        issues += exc.issues
    try:
        loss_fn = _make_loss(spec)
    except SpecError as exc:
        issues += exc.issues
    try:
        if spec.optimizer is None:  # serve: the model runs forward only (load_spec's ``training``)
            pass
        elif spec.optimizer.target is not None:
            optimizer_factory = load_target(spec.optimizer.target, spec, "optimizer.target")
        else:
            optimizer_factory = _OPTIMIZERS[spec.optimizer.name.lower()]
            extras = spec.optimizer.options
            kwargs_path = "optimizer.kwargs" if spec.optimizer.kwargs else "optimizer"
            _check_kwargs(optimizer_factory, extras, spec, kwargs_path, skip=("params", "lr"))
    except SpecError as exc:
        issues += exc.issues
    if issues:
        raise SpecError(issues)

    from batchtune.engine.watchdog import bounded

    with bounded(spec.trial_timeout, f"the data factory {_factory_name(spec.data)} and len() of its data sets"):
        return _components(spec, model_factory, data_factory, loss_fn, optimizer_factory)


def _components(spec: Spec, model_factory: Any, data_factory: Any, loss_fn: Any, optimizer_factory: Any) -> Components:
    """:func:`build_components` from what it resolved: the user's data factory called, the data sets checked."""
    data = _build(spec, _source_key(spec.data, "data"), f"the data factory {_factory_name(spec.data)}", data_factory,
                  kwargs_key="data.kwargs", **spec.data.kwargs)
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise spec.error("data", f"the data factory must return (train_dataset, val_dataset), got {type(data).__name__}")
    train_set, val_set = data
    collate_fn = _make_collate(spec) if spec.data.collate is not None else None
    for which, dataset in (("train", train_set), ("validation", val_set)):
        if (unindexed := _unindexed(dataset)) is not None:  # an IterableDataset with a __len__ got this far
            raise spec.error("data", f"the {which} dataset {unindexed}; batchtune needs map-style datasets")
        try:
            n = len(dataset)
        except TypeError:
            raise spec.error("data", f"the {which} dataset has no len(); batchtune needs map-style datasets") from None
        if n == 0:
            raise spec.error("data", f"the {which} dataset is empty")
    if collate_fn is not None:  # a collate function that cannot batch one sample fails here, not mid-probe
        _build(spec, _source_key(spec.data.collate, "data.collate"), "the collate function", collate_fn, [train_set[0]])
    return Components(spec, model_factory, train_set, val_set, loss_fn, optimizer_factory, collate_fn,
                      spec.data.length_key)


def _unindexed(dataset: Any) -> str | None:
    """Why ``dataset`` cannot be indexed (in words, after 'the train dataset'), or None where it can: an
    IterableDataset given a ``__len__`` met 'Subclasses of Dataset should implement __getitem__' from the loader."""
    from torch.utils.data import IterableDataset

    if isinstance(dataset, IterableDataset):
        return f"is an IterableDataset ({type(dataset).__name__}): it is iterated, not indexed"
    if getattr(type(dataset), "__getitem__", None) in (None, Dataset.__getitem__):
        return f"({type(dataset).__name__}) has no __getitem__ of its own: it cannot be indexed"
    return None


def _make_collate(spec: Spec) -> Callable[[list[Any]], Any]:
    """The collate function ``data.collate`` names: a function (its kwargs bound) or a class's instance.

    Raises:
        SpecError: it cannot be imported or does not take its kwargs.
        ComponentError: building the collator raised.
    """
    from batchtune.config.builtins import BUILTIN_COLLATES

    entry = spec.data.collate
    factory = _resolve(entry, BUILTIN_COLLATES, spec, "data.collate")
    if inspect.isclass(factory):  # Hugging Face style: DataCollatorWithPadding(tokenizer=...)
        _check_kwargs(factory, entry.kwargs, spec, "data.collate.kwargs")
        return _build(spec, _source_key(entry, "data.collate"), f"the collator {_factory_name(entry)}", factory,
                      kwargs_key="data.collate.kwargs", **entry.kwargs)
    first = next(iter(_parameters(factory)), None)
    _check_kwargs(factory, entry.kwargs, spec, "data.collate.kwargs", skip=(first,) if first else ())
    return functools.partial(factory, **entry.kwargs) if entry.kwargs else factory


def _parameters(fn: Callable[..., Any]) -> list[str]:
    try:
        return list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return []
