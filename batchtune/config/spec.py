"""The spec: one YAML file, validated once, every problem reported with its key and line.

A spec is trusted input: a ``target:`` names Python code that batchtune imports and runs.
This module does not import torch, so ``batchtune validate`` and ``--help`` stay fast.
"""

from __future__ import annotations

import decimal
import difflib
import math
import re
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union, get_args, get_origin

import yaml
import annotated_types
from pydantic import (
    PrivateAttr,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from batchtune.config.builtins import BUILTIN_COLLATES, BUILTIN_DATA, BUILTIN_MODELS

__all__ = [
    "MAX_COUNT",
    "Spec",
    "SpecError",
    "SpecIssue",
    "count_text",
    "load_spec",
    "parse_bytes",
    "past_max_count",
    "read_yaml",
]

LOSS_NAMES = ("cross_entropy", "mse", "model_output")
OPTIMIZER_NAMES = ("sgd", "adam", "adamw", "rmsprop", "adagrad", "adamax", "nadam", "radam")
_TARGET_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}


# ---------------------------------------------------------------------------- errors


@dataclass(frozen=True)
class SpecIssue:
    """One problem in a spec: where (dotted key, source, line) and what."""

    path: str
    message: str
    source: str = "<spec>"
    line: int | None = None

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}" if self.line else self.source
        key = f"{self.path}: " if self.path else ""
        return f"{where}: {key}{self.message}"


class SpecError(ValueError):
    """A spec that cannot be used; carries every problem found, not just the first.

    ``raw`` is the spec as parsed (overrides applied), with its key lines and source, when its keys and
    values did not validate: validate still checks its imports against it (:func:`~batchtune.config.
    components.target_issues`).
    """

    def __init__(self, issues: list[SpecIssue],
                 raw: tuple[dict[str, Any], dict[str, int], str, dict[str, str]] | None = None, *,
                 what: str = "spec"):
        self.issues = list(issues)
        self.raw = raw
        self.what = what  # the kind of file: "spec", or "batch schedule" (batchtune.schedule)
        super().__init__(str(self))

    def __str__(self) -> str:
        n = len(self.issues)
        head = f"invalid {self.what} ({n} problem{'s' if n != 1 else ''}):"
        return "\n".join([head, *(f"  {issue}" for issue in self.issues)])


# ---------------------------------------------------------------------------- values


def parse_bytes(value: Any) -> int:
    """Parse a memory size: an int of bytes or a string such as ``"2GiB"`` or ``"512 MB"``.

    Raises:
        ValueError: the value is not a positive size.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a size such as '2GiB', got {value!r}")
    if isinstance(value, (int, float)):
        n = int(value)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
        if not match or match.group(2).lower() not in _UNITS:
            raise ValueError(f"expected a size such as '2GiB', '512MB' or bytes, got {value!r}")
        n = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if n <= 0:
        raise ValueError(f"a memory size must be positive, got {value!r}")
    return n


_SECONDS = {"us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: Any, default_unit: str = "s", example: str = "45ms, 0.1s or 12h") -> float:
    """Parse a duration (``"45ms"``, ``"0.1s"``, ``"500us"``, ``"90min"``, ``"12h"``, ``"2d"``; a bare
    number is in ``default_unit``) into seconds.

    Raises:
        ValueError: not a positive, finite duration (the message names ``example``).
    """
    match = re.fullmatch(r"\s*(-?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(us|µs|ms|s|min|m|h|d)?\s*", str(text))
    if not match:
        raise ValueError(f"expected a duration such as {example}, got {text!r}")
    seconds = float(match.group(1)) * _SECONDS[match.group(2) or default_unit]
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"must be a positive duration, got {text!r}")
    return seconds


# ---------------------------------------------------------------------------- models


def _members(annotation: Any) -> list[Any]:
    """The types a field's annotation admits, with ``Annotated`` and unions unwrapped."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _members(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return [member for arg in get_args(annotation) for member in _members(arg)]
    return [annotation]


def _boolean_as_number(value: Any, members: list[Any]) -> str | None:
    """Why ``value``, or an item of a list, is a YAML boolean that a field of ``members`` would take as a
    number; None where it is not (the field takes booleans, or no numbers, and pydantic speaks for itself).

    Pydantic's lax mode reads true as 1 and 1.0, and YAML 1.1 reads yes and on as true: ``lr: on`` trained
    at lr 1.0 and ``trial_timeout: yes`` gave trials one second.
    """
    if isinstance(value, bool):
        if bool in members or Any in members or not any(m in (int, float) for m in members):
            return None
        kind = "a string or a number" if str in members else "a number"
        return f"must be {kind}, got {str(value).lower()} (a YAML boolean)"
    if isinstance(value, list):
        items = [get_args(m)[0] for m in members if get_origin(m) is list and get_args(m)]
        item_members = [member for item in items for member in _members(item)]
        for i, item in enumerate(value):
            why = _boolean_as_number(item, item_members)
            if why is not None:
                return f"item {i} {why}"
    return None


#: A number in exponent form (2e4, 1.6e4, 2.5E+1), which PyYAML reads as a string: YAML 1.1 wants a dot and a signed
#: exponent for a float.
_EXPONENT_RE = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)[eE][-+]?\d+")


def _whole_numbers(value: Any, members: list[Any]) -> Any:
    """``value`` with a number in exponent form read as the integer it spells, for a field that takes integers
    (and no floats nor strings); an item of a list likewise. ``sweep.samples: 2e4`` was refused as "unable to
    parse string as an integer (got '2e4')", though ``--samples 2e5`` is taken.

    Raises:
        ValueError: the number has a fraction (1.5, 2.5e0).
    """
    if isinstance(value, list):
        items = [get_args(m)[0] for m in members if get_origin(m) is list and get_args(m)]
        item_members = [member for item in items for member in _members(item)]
        out = []
        for i, item in enumerate(value):
            try:
                out.append(_whole_numbers(item, item_members))
            except ValueError as exc:
                raise ValueError(f"item {i} {exc}") from None
        return out
    if int not in members or float in members or str in members:
        return value
    if isinstance(value, str) and _EXPONENT_RE.fullmatch(value.strip()):
        number = decimal.Decimal(value.strip())  # exact, as if its digits were written out
    elif isinstance(value, float) and math.isfinite(value) and not value.is_integer():
        number = decimal.Decimal(value)
    else:
        return value  # pydantic speaks for the rest (2.0 is 2; a float past 64 bits is refused)
    if number != number.to_integral_value():
        shown = f"{value.strip()} (= {number.normalize():f})" if isinstance(value, str) else f"{value:g}"
        raise ValueError(f"must be a whole number, got {shown}")
    return int(number)


#: The largest whole number a spec's count (samples, steps, seeds, batch sizes, bytes) or a count option takes: 2**53,
#: the largest up to which a float holds every whole number, and beyond any run's work. ``sweep.samples=1e100`` was
#: taken, and the sweep would have trained for ever.
MAX_COUNT = 2**53


def count_text(value: Any) -> str:
    """A number as a user reads it, however large: ``1e100`` for 10**100 (whose float form overflows past 1e308)."""
    if isinstance(value, int) and abs(value) >= 10**18:
        return format(decimal.Decimal(f"{decimal.Decimal(value):.4g}").normalize(), "g")
    return f"{value:,}" if isinstance(value, int) else f"{value:g}"


def past_max_count(value: Any, why: str = "work this large would never finish") -> str | None:
    """Why a whole number is too large to count by (``why`` says what it would mean), or None where it is within
    :data:`MAX_COUNT`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= MAX_COUNT:
        return None
    return f"got {count_text(value)}, more than the largest count taken, {MAX_COUNT:,} (2**53): {why}"


def _bounded_counts(value: Any, members: list[Any], metadata: list[Any], name: str) -> str | None:
    """Why ``value`` (an item of it, for a list) is a count past :data:`MAX_COUNT`, for a field that takes integers
    and sets no upper bound of its own (``seed`` takes what torch.manual_seed does); None where it is not."""
    if any(isinstance(m, (annotated_types.Le, annotated_types.Lt)) for m in metadata):
        return None
    if isinstance(value, list):
        items = [get_args(m)[0] for m in members if get_origin(m) is list and get_args(m)]
        item_members = [member for item in items for member in _members(item)]
        for i, item in enumerate(value):
            why = _bounded_counts(item, item_members, [], name)
            if why is not None:
                return f"item {i} {why}"
        return None
    if int not in members or (isinstance(value, float) and not (math.isfinite(value) and value.is_integer())):
        return None  # not a count, or pydantic speaks for it (1.5 is not whole; a float field is not a count)
    return past_max_count(value, "no device holds that many bytes" if name == "memory_limit" else
                          "work this large would never finish")


class _Checked(BaseModel):
    """Numbers that are numbers: no YAML boolean read as 1, no infinity (nor NaN) where a float is meant, and a
    whole number in exponent form (2e4) taken where an integer is."""

    # the only float fields that could mean "no limit" (the time limits) take null for it
    model_config = ConfigDict(allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _numbers(cls, value: Any, info: ValidationInfo) -> Any:
        members = _members(cls.model_fields[info.field_name].annotation)
        why = _boolean_as_number(value, members)
        if why is not None:
            raise ValueError(why)
        value = _whole_numbers(value, members)
        why = _bounded_counts(value, members, cls.model_fields[info.field_name].metadata, info.field_name)
        if why is not None:
            raise ValueError(why)
        return value


class _Strict(_Checked):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _check_target(value: str | None) -> str | None:
    if value is not None and not _TARGET_RE.match(value):
        raise ValueError(f"target must look like 'package.module:callable', got {value!r}")
    return value


class Component(_Strict):
    """A built-in by name, or user code as ``target: package.module:callable`` plus kwargs."""

    builtin: str | None = None
    target: str | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)

    builtins: ClassVar[dict[str, str]] = {}

    _target_format = field_validator("target")(_check_target)

    @field_validator("builtin")
    @classmethod
    def _known_builtin(cls, value: str | None) -> str | None:
        if value is not None and cls.builtins and value not in cls.builtins:
            raise ValueError(f"unknown builtin {value!r}; choose from {', '.join(sorted(cls.builtins))}")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> Component:
        if (self.builtin is None) == (self.target is None):
            raise ValueError("give exactly one of 'builtin' or 'target'")
        return self


class ModelSpec(Component):
    builtins: ClassVar[dict[str, str]] = BUILTIN_MODELS


class CollateSpec(Component):
    """The collate (padding) function for variable-length samples: a callable taking a list of
    samples, or a class whose instance is one (built with ``kwargs``, as Hugging Face's collators)."""

    builtins: ClassVar[dict[str, str]] = BUILTIN_COLLATES


class DataSpec(Component):
    builtins: ClassVar[dict[str, str]] = BUILTIN_DATA
    num_workers: NonNegativeInt = 0
    # variable-length data: the probe and check's fits verdict run the longest samples, as collated
    collate: CollateSpec | None = None
    # the field (dict key or tuple index) whose first dimension (len()) is a sample's length; default: a sample's
    # largest dimension among those that vary across the samples
    length_key: str | NonNegativeInt | None = None


class LossTarget(_Strict):
    target: str
    kwargs: dict[str, Any] = Field(default_factory=dict)

    _target_format = field_validator("target")(_check_target)


class OptimizerSpec(_Checked):
    """``{name: adamw, lr: 3e-4, weight_decay: 0.1, ...}``: keys other than these are kwargs."""

    model_config = ConfigDict(extra="allow")
    # set from the built optimizer object (engine/optimizer.py): (family, evidence)
    _detected: tuple[str, str] | None = PrivateAttr(default=None)

    name: str | None = None
    target: str | None = None
    lr: PositiveFloat
    kwargs: dict[str, Any] = Field(default_factory=dict)

    _target_format = field_validator("target")(_check_target)

    @model_validator(mode="after")
    def _one_source(self) -> OptimizerSpec:
        if (self.name is None) == (self.target is None):
            raise ValueError("give exactly one of 'name' or 'target'")
        if self.name is not None and self.name.lower() not in OPTIMIZER_NAMES:
            raise ValueError(f"unknown optimizer {self.name!r}; choose from {', '.join(OPTIMIZER_NAMES)}")
        return self

    @property
    def options(self) -> dict[str, Any]:
        """Keyword arguments for the optimizer besides ``lr``."""
        return {**(self.model_extra or {}), **self.kwargs}

    @property
    def family(self) -> str:
        """``sgd`` for SGD-like optimizers, ``adaptive`` for Adam-like ones (for lr_scaling: auto).

        Judged from the optimizer object once it has been built (:meth:`detect`); before
        that, a built-in name decides (``sgd`` or not).
        """
        if self._detected is not None:
            return self._detected[0]
        return "sgd" if (self.name or "").lower() == "sgd" else "adaptive"

    @property
    def family_evidence(self) -> str | None:
        return self._detected[1] if self._detected is not None else None

    def detect(self, family: str, evidence: str) -> None:
        """Record what the built optimizer showed (see ``batchtune.engine.optimizer``)."""
        self._detected = (family, evidence)


class DeviceSpec(_Strict):
    type: str = "auto"
    # A list gives one limit per rank (torchrun); a single value applies to every rank.
    memory_limit: int | list[int | None] | None = None
    # torch's CPU threads; default $OMP_NUM_THREADS if set, else the physical cores this
    # process may run on. Set it on a shared machine: threads fighting other work ruin timings.
    threads: PositiveInt | None = None

    @field_validator("type")
    @classmethod
    def _device_type(cls, value: str) -> str:
        if not _DEVICE_RE.match(value):
            raise ValueError(f"device type must be auto, cpu, cuda, cuda:N or mps, got {value!r}")
        return value

    @field_validator("memory_limit", mode="before")
    @classmethod
    def _limit(cls, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, list):
            if not value:  # read as no limit at all
                raise ValueError("an empty list limits no rank: give a size such as '2GiB', one per rank, or null")
            return [None if v is None else parse_bytes(v) for v in value]
        return parse_bytes(value)

    def limit_for_rank(self, rank: int, world_size: int) -> int | None:
        """The memory limit of ``rank`` among ``world_size`` ranks; one process takes a list's first entry.

        Raises:
            ValueError: under several ranks, a list that is not one limit per rank (3 limits on 2 ranks, or 1
                on 2, were taken without a word: the last entry covered the ranks beyond the list).
        """
        limits = self.memory_limit
        if not isinstance(limits, list):
            return limits
        if world_size > 1 and len(limits) != world_size:
            raise ValueError(f"lists {len(limits)} limit{'' if len(limits) == 1 else 's'}, one per rank, and this "
                             f"run has {world_size} ranks: give {world_size} limits, or one size for every rank")
        return limits[rank if world_size > 1 else 0]


class FSDPSpec(_Strict):
    """How ``distributed.strategy: fsdp`` shards the model (FSDP2's ``fully_shard``)."""

    # module class names sharded one by one (e.g. [GPT2Block]); the root is always sharded
    shard: list[str] = Field(default_factory=list)
    # free each unit's gathered parameters after its forward (gathered again for backward)
    reshard_after_forward: bool = True


class DistributedSpec(_Strict):
    """How ranks under torchrun share the model: DDP replicates it, FSDP shards it."""

    # null: ddp under torchrun, none outside it (a single process)
    strategy: Literal["none", "ddp", "fsdp"] | None = None
    fsdp: FSDPSpec = Field(default_factory=FSDPSpec)

    def resolved(self, world_size: int) -> str:
        """The strategy for ``world_size`` ranks (``none`` for one process without a choice)."""
        if self.strategy is None:
            return "ddp" if world_size > 1 else "none"
        return self.strategy


class ProbeSpec(_Strict):
    # Field order matters: later validators read earlier fields from ``info.data``.
    granularity: PositiveInt = 1
    min_batch_size: PositiveInt = 1
    max_batch_size: PositiveInt = 1 << 20
    headroom: float = Field(0.10, ge=0.0, lt=0.9)
    steps_per_trial: PositiveInt = 2
    # start the search from the traced estimate's ceiling (probe --estimate): two trials when
    # the estimate is exact; only where the device's capacity is known
    from_estimate: bool = False

    @field_validator("min_batch_size")
    @classmethod
    def _multiple(cls, value: int, info: ValidationInfo) -> int:
        granularity = info.data.get("granularity")
        if granularity and value % granularity:
            raise ValueError(f"must be a multiple of granularity ({granularity}), got {value}")
        return value

    @field_validator("max_batch_size")
    @classmethod
    def _above_min(cls, value: int, info: ValidationInfo) -> int:
        low = info.data.get("min_batch_size")
        if low and value < low:
            raise ValueError(f"must be at least min_batch_size ({low}), got {value}")
        # refused, not rounded: a cap of 100 at granularity 8 could only be reported as 96 or as the 100 no other
        # ceiling could be, and the stated number is the user's to change (min_batch_size is refused alike)
        granularity = info.data.get("granularity")
        if granularity and value % granularity:
            raise ValueError(f"must be a multiple of probe.granularity ({granularity}), got {value}: the probe "
                             f"only reports multiples of it (the largest below {value} is "
                             f"{value // granularity * granularity})")
        return value


#: Seconds as a limit: positive and finite, at most ~115 days (a timer cannot be set past it;
#: null is "no limit").
Seconds = Annotated[float, Field(gt=0, le=1e7, allow_inf_nan=False)]


class SweepSpec(_Strict):
    batch_sizes: list[PositiveInt] | None = None
    min_batch_size: PositiveInt = 8
    max_batch_size: PositiveInt | None = None
    ceiling: PositiveInt | None = None
    accumulation: bool = True
    max_accum_steps: PositiveInt = 64
    samples: PositiveInt | None = None  # the same for every size, up to min_steps
    epochs: PositiveFloat | None = None
    # a size trains at least this many steps, so a large batch (few steps at equal samples)
    # can reach a target too; with target_loss given, a trial ends once it has crossed the lowest
    min_steps: PositiveInt = 64
    # a trial that has not crossed the lowest target (given, or the default once every seed's budget
    # fixes it) at its budget trains on, up to this many times its steps (a screening lr stops at 1.25×
    # the size's fastest crossing); 1: every size stops at the budget
    reach_factor: float = Field(2.0, ge=1.0, le=64.0)
    warmup: float = Field(0.05, ge=0.0, lt=1.0)
    # Each size tries the rule's lr times each multiplier (seed 0), keeps for its other seeds
    # the lrs near its fastest, and extends the bracket when the fastest is on an edge.
    lr_multipliers: list[PositiveFloat] = Field(default_factory=lambda: [0.5, 1.0, 2.0])
    lr_search: bool = True  # false: one lr per size, the rule's (lr_multipliers ignored)
    lr_extensions: int = Field(2, ge=0, le=16)  # times a bracket may grow past its edge by its outer ratio
    # then try the midpoint between each fastest lr and its faster neighbour: "leaders" (the default) for the
    # sizes whose first-seed time to some target is within 1.25× the fastest's, true for every size, false: none
    lr_refine: bool | Literal["leaders"] = "leaders"
    # bounded: every seed's trials are planned up front (an outside sweep.seeds=1e9 took 16 GB in a minute)
    seeds: int = Field(3, ge=1, le=1000)
    # with target_loss given, the other seeds run only the sizes whose first-seed time to some target
    # is within this × the fastest size's (null: every size)
    reseed_within: float | None = Field(2.0, ge=1.0)
    eval_points: int = Field(8, ge=1, le=10_000)  # validations at the same sample counts for every size
    evals_per_doubling: int = Field(4, ge=0, le=1000)  # and on a log grid of steps, to resolve each crossing
    eval_samples: PositiveInt | None = 2048  # validation subset, the same for every trial
    target_loss: float | list[float] | None = None  # several: each gets its own ranking
    timing_warmup_steps: NonNegativeInt = 2
    max_seconds_per_trial: Seconds | None = None
    data_bound_share: float = Field(0.5, gt=0.0, le=1.0)
    noise_scale: bool = True
    divergence_factor: PositiveFloat = 3.0
    grad_clip: PositiveFloat | None = None

    @field_validator("batch_sizes")
    @classmethod
    def _sizes(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and not value:  # read as not given: the powers of two ran, silently
            raise ValueError("an empty list: give the sizes to sweep, or leave it out for powers of two")
        if value and (twice := sorted({v for v in value if value.count(v) > 1})):  # it ran once, without a word
            raise ValueError(f"{', '.join(map(str, twice))} given more than once")
        return value

    @field_validator("lr_multipliers")
    @classmethod
    def _multipliers(cls, value: list[float]) -> list[float]:
        if not value:  # it ran no trial and exited 1, 'no size reached the target'
            raise ValueError("an empty list: give the lr multipliers to try (the default is [0.5, 1, 2]), or set "
                             "sweep.lr_search: false for the rule's lr alone")
        return value

    @field_validator("min_batch_size", "max_batch_size")
    @classmethod
    def _bounds_the_list(cls, value: int | None, info: ValidationInfo) -> int | None:
        """A bound that a given ``batch_sizes`` list crosses is refused: the bounds pick only the default powers of
        two, and an outside sweep ran and recommended batch 48 above its max_batch_size 32 without a word. A bound
        the list keeps within stands (a spec file's bounds under a command line's list of sizes); the default
        (min 8, written into every run folder's spec) bounds nothing a list gives."""
        sizes = info.data.get("batch_sizes")
        if not sizes or value is None or value == cls.model_fields[info.field_name].default:
            return value
        low = info.field_name == "min_batch_size"
        beyond = sorted({b for b in sizes if (b < value if low else b > value)})
        if beyond:
            listed = ", ".join(map(str, beyond))
            raise ValueError(f"sweep.batch_sizes lists {listed}, {'below' if low else 'above'} sweep.{info.field_name} "
                             f"{value}: the bounds pick only the default powers of two, and a list is swept as given; "
                             f"drop {listed} from the list, or {'lower' if low else 'raise'} or leave out "
                             f"sweep.{info.field_name}")
        return value

    @field_validator("target_loss")
    @classmethod
    def _targets(cls, value: float | list[float] | None) -> float | list[float] | None:
        """A list names at least one loss, each once (an empty list read as no target, silently)."""
        if isinstance(value, list):
            if not value:
                raise ValueError("an empty list: give one loss or several, or leave it out for the default target")
            if twice := sorted({v for v in value if value.count(v) > 1}):
                raise ValueError(f"{', '.join(map(str, twice))} given more than once")
            if value != sorted(value, reverse=True):  # [0.2, 0.5] made 0.5 the headline and trained on to 0.2
                shown = ", ".join(f"{v:g}" for v in sorted(value, reverse=True))
                raise ValueError(f"give the targets highest first, [{shown}]: the last, the lowest, is the headline")
        return value

    @model_validator(mode="after")
    def _budget(self) -> SweepSpec:
        if self.samples is not None and self.epochs is not None:
            raise ValueError("give 'samples' or 'epochs', not both")
        if self.max_batch_size is not None and self.min_batch_size > self.max_batch_size:
            raise ValueError(f"min_batch_size {self.min_batch_size} is above max_batch_size {self.max_batch_size}")
        return self


class TrainSpec(_Strict):
    """The batch size the long job intends to use (read by ``batchtune check``); its lr alone may be given,
    with the batch on check's command line."""

    batch_size: PositiveInt | None = None
    accum_steps: PositiveInt = 1
    lr: PositiveFloat | None = None  # the job's lr; default the baseline sweep's fastest at the size, else the rule's

    @field_validator("accum_steps")
    @classmethod
    def _divides(cls, value: int, info: ValidationInfo) -> int:
        """The batch is the global one: its micro-batches must split it evenly (validate passed 100 with
        accum_steps 3, which check then refused)."""
        batch = info.data.get("batch_size")
        if batch is not None and batch % value:
            raise ValueError(f"train.batch_size {batch} is not divisible by accum_steps {value}: give a batch that "
                             f"{value} micro-batches split evenly")
        return value


class CheckSpec(_Strict):
    steps: PositiveInt = 30
    max_seconds: Seconds = 60.0
    divergence_factor: PositiveFloat = 3.0
    data_warn_share: float = Field(0.3, gt=0.0, le=1.0)
    data_fail_share: float = Field(0.8, gt=0.0, le=1.0)
    throughput_tolerance: float = Field(0.15, ge=0.0)
    memory_tolerance: float = Field(0.10, ge=0.0)

    @model_validator(mode="after")
    def _shares(self) -> CheckSpec:
        if self.data_warn_share > self.data_fail_share:
            raise ValueError(f"data_warn_share ({self.data_warn_share}) must not exceed "
                             f"data_fail_share ({self.data_fail_share})")
        return self


class Spec(_Strict):
    """A validated batchtune spec."""

    @field_validator("loss", mode="before")
    @classmethod
    def _loss_name(cls, value: Any) -> Any:
        if isinstance(value, str) and value not in LOSS_NAMES:
            raise ValueError(f"unknown loss {value!r}; choose from {', '.join(LOSS_NAMES)} or give {{target: ...}}")
        return value

    name: str
    model: ModelSpec
    data: DataSpec
    # A name or a {target: ...} mapping; the tag picks one, so errors speak of the form given.
    loss: Annotated[
        Union[Annotated[Literal["cross_entropy", "mse", "model_output"], Tag("name")],
              Annotated[LossTarget, Tag("target")]],
        Discriminator(lambda v: "target" if isinstance(v, (dict, LossTarget)) else "name"),
    ] = "cross_entropy"
    # Required by every command that trains (parse_spec's ``training``); serve runs without them.
    optimizer: OptimizerSpec | None = None
    base_batch_size: PositiveInt | None = None
    lr_scaling: Literal["linear", "sqrt", "none", "auto"] = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    device: DeviceSpec = Field(default_factory=DeviceSpec)
    distributed: DistributedSpec = Field(default_factory=DistributedSpec)
    seed: int = Field(0, ge=-(2**63), lt=2**64)  # what torch.manual_seed takes
    # Seconds a trial may go without finishing a training step (a forward that never
    # returns, a stuck data loader) before it is stopped; null: never.
    trial_timeout: Seconds | None = 600.0
    probe: ProbeSpec = Field(default_factory=ProbeSpec)
    sweep: SweepSpec = Field(default_factory=SweepSpec)
    train: TrainSpec | None = None
    check: CheckSpec = Field(default_factory=CheckSpec)

    # Where each key came from, for errors raised after validation (imports, kwargs).
    _lines: dict[str, int] = {}
    _source: str = "<spec>"
    _origin: dict[str, str] = {}  # key → the override that set it

    def issue(self, path: str, message: str) -> SpecIssue:
        """An issue at ``path``, located at the override that set it, else the nearest line the file gives."""
        return locate(path, message, self._lines, self._source, self._origin)

    def error(self, path: str, message: str) -> SpecError:
        return SpecError([self.issue(path, message)])

    def resolved(self) -> dict[str, Any]:
        """The spec as plain data, every default filled in (written to run folders)."""
        return self.model_dump(mode="json")


# ---------------------------------------------------------------------------- loading


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader whose composed nodes we walk for lines and duplicate keys."""


#: The most values a YAML file may hold once its aliases are expanded: a spec has a few hundred, while ten lines
#: of aliases, each a list of ten of the one before, expand to 10**10 (a "billion laughs").
MAX_YAML_VALUES = 100_000


class _LineWalk:
    """The line of each dotted key path and the duplicate keys, from composed YAML nodes.

    The walk follows each alias into its anchor's value, as validation and the written spec would: it counts
    the values it meets, so a file whose aliases expand past :data:`MAX_YAML_VALUES` is refused at once
    rather than walked for hours, and it refuses an alias inside its own anchor's value (an endless value).
    """

    def __init__(self, source: str, what: str) -> None:
        self.source, self.what = source, what
        self.lines: dict[str, int] = {}
        self.dups: list[tuple[str, int]] = []
        self._values = 0
        self._open: set[int] = set()  # the nodes from the root to the one being walked

    def walk(self, node: yaml.Node, prefix: str = "") -> None:
        self._values += 1
        if self._values > MAX_YAML_VALUES:
            self._refuse(prefix, f"its aliases expand to over {MAX_YAML_VALUES:,} values (each use of an alias "
                                 "repeats its anchor's whole value); write the values out or nest fewer aliases")
        if id(node) in self._open:
            self._refuse(prefix, "an alias inside its own anchor's value makes it endless")
        self._open.add(id(node))
        if isinstance(node, yaml.MappingNode):
            self._mapping(node, prefix)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                path = f"{prefix}.{i}"
                self.lines[path] = item.start_mark.line + 1
                self.walk(item, path)
        self._open.discard(id(node))

    def _mapping(self, node: yaml.MappingNode, prefix: str) -> None:
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = str(key_node.value)
            path = f"{prefix}.{key}" if prefix else key
            if key in seen:
                self.dups.append((path, key_node.start_mark.line + 1))
            seen.add(key)
            self.lines[path] = key_node.start_mark.line + 1
            self.walk(value_node, path)

    def _refuse(self, path: str, message: str) -> None:
        # named by the top-level key being walked: a path deep inside the expansion says nothing more
        top = path.split(".")[0]
        raise SpecError([SpecIssue(top, message, self.source, self.lines.get(top))], what=self.what)


def changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two resolved specs (or parts of them), each with both
    values, down to the key that changed: 'sweep.samples (4096 → 8192)', not 'sweep'."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [c for k in sorted(set(old) | set(new), key=str) if old.get(k) != new.get(k)
                for c in changed_keys(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [f"{prefix.rstrip('.')} ({old!r} → {new!r})"]


def locate(path: str, message: str, lines: dict[str, int], source: str, origin: dict[str, str]) -> SpecIssue:
    """``message`` about the key ``path``, at the override that set it, a key under it or one above it
    (``nokey.sub=3`` makes 'nokey' unknown), else at the nearest line the spec file gives for it: an
    override's import error named the file's line of the key it replaced."""
    over = next((o for k, o in origin.items() if path == k or path.startswith(k + ".") or k.startswith(path + ".")),
                None)
    if over is not None:
        return SpecIssue(path, message, f"override {over!r}")
    return SpecIssue(path, message, source, _nearest_line(lines, path))


def _nearest_line(lines: dict[str, int], path: str) -> int | None:
    parts = path.split(".") if path else []
    while parts:
        key = ".".join(parts)
        if key in lines:
            return lines[key]
        parts.pop()
    return None


_UNION_TAGS = {"name", "target"}


# how pydantic labels a union's member in an error's location: 'float', 'list[float]', "literal['leaders']", ...
_BRANCH = re.compile(r"^(?:bool|int|float|str|none|bytes|constrained-\w+"
                     r"|(?:literal|list|dict|tuple|function-\w+)\[.*\])$")


def _merge_union_branches(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One error per key where a value matched no member of a union (``float | list[float]``), not one per
    member: a list value keeps the list member's errors (which item is wrong), any other value one error
    naming every member ('Input should be a valid number or a valid list')."""
    merged: dict[tuple, list[dict[str, Any]]] = {}
    for err in errors:
        at = next((i for i, part in enumerate(err["loc"]) if isinstance(part, str) and _BRANCH.match(part)), None)
        key = err["loc"] if at is None else err["loc"][:at]
        merged.setdefault(key, []).append({**err, "branch": None if at is None else err["loc"][at],
                                           "loc": err["loc"] if at is None else key + err["loc"][at + 1:]})
    out = []
    for key, errs in merged.items():
        branches = {e["branch"] for e in errs}
        if len(branches) < 2 or None in branches:
            out += errs
        elif isinstance(errs[0].get("input"), list) and any(b.startswith("list[") for b in branches):
            out += [e for e in errs if e["branch"].startswith("list[")]
        else:
            wants = [e["msg"].removeprefix("Input should be ").split(", ")[0] for e in errs if e["loc"] == key]
            out.append({**errs[0], "loc": key, "msg": "Input should be " + " or ".join(dict.fromkeys(wants))})
    return out


def _loc_to_path(loc: tuple[Any, ...]) -> str:
    # The loss union puts its tag ('name' or 'target') right after 'loss'; keep real keys only.
    parts = [str(p) for p in loc]
    if len(parts) > 1 and parts[0] == "loss" and parts[1] in _UNION_TAGS:
        del parts[1]
    return ".".join(parts)


def _message(err: dict[str, Any]) -> str:
    msg = err["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
    if err["type"] == "extra_forbidden":
        near = difflib.get_close_matches(str(err["loc"][-1]), _known_keys(err["loc"][:-1]), n=1)
        return f"unknown key (did you mean '{near[0]}'?)" if near else "unknown key"
    if err["type"] == "missing":
        return "required key is missing"
    if "input" in err and err["type"] not in ("value_error",) and not isinstance(err["input"], dict):
        msg = f"{msg} (got {err['input']!r})"
    return msg


def _known_keys(loc: tuple[Any, ...]) -> list[str]:
    """The keys the spec's model accepts at ``loc`` (a mapping's location); [] where it cannot tell."""
    model: Any = Spec
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        model = next((a for a in (*get_args(field.annotation), field.annotation)
                      if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if model is None:
            return []
    return list(model.model_fields)


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            nxt = {}
            node[part] = nxt
        node = nxt
    node[parts[-1]] = value


def _apply_overrides(data: dict[str, Any], overrides: list[str], issues: list[SpecIssue]) -> dict[str, str]:
    """Apply ``key=value`` overrides in place; returns which paths they set."""
    origin: dict[str, str] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or not re.fullmatch(r"[A-Za-z_][\w]*(\.[\w]+)*", key):
            issues.append(SpecIssue("", f"override {item!r} must look like key.path=value", "<overrides>"))
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            if raw.strip()[:1] in "[{\"'":  # meant as a list, a mapping or a quoted string: never read as text
                problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
                issues.append(SpecIssue(key, f"the value is not valid YAML ({problem})", f"override {item!r}"))
                continue
            value = raw  # plain text YAML would not take as it stands (`@x`, `a: b: c`): meant as a string
        _set_dotted(data, key, value)
        origin[key] = item
    return origin


def load_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = (), *, training: bool = True) -> Spec:
    """Load, override and validate a spec file.

    Args:
        path: the YAML file.
        overrides: ``key.path=value`` strings applied on top, each value parsed as YAML.
        training: require what training needs (:data:`TRAINING_KEYS`); ``batchtune serve``
            runs the model forward only and passes False.

    Returns:
        The validated :class:`Spec`.

    Raises:
        SpecError: every problem found, each with its key path and line.
    """
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError([SpecIssue("", "no such file", source)]) from None
    except UnicodeDecodeError:
        raise SpecError([_undecodable(path)]) from None
    except OSError as exc:
        raise SpecError([SpecIssue("", f"cannot read spec: {exc}", source)]) from None
    return parse_spec(text, source=source, overrides=overrides, training=training)


def _undecodable(path: Path) -> SpecIssue:
    """The first byte of ``path`` that is not UTF-8, and its line (read again as bytes: a text reader's
    error counts from the start of its chunk, not of the file)."""
    raw = path.read_bytes()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        return SpecIssue("", f"cannot read spec: not UTF-8 text (byte 0x{raw[exc.start]:02x}: {exc.reason}); "
                             "save it as UTF-8", str(path), line)
    return SpecIssue("", "cannot read spec: not UTF-8 text", str(path))  # it changed since: no line to give


def read_yaml(text: str, source: str, *, what: str = "spec") -> tuple[Any, dict[str, int], list[SpecIssue]]:
    """Parse YAML text, keeping where each key is.

    Args:
        text: the file's text.
        source: the file's name, for the issues.
        what: the kind of file, for the error's heading.

    Returns:
        The data, the line of each dotted key path (``stages.1.lr``), and an issue for each duplicate key.

    Raises:
        SpecError: the text is not valid YAML, or its aliases expand past :data:`MAX_YAML_VALUES` values or
            into themselves; the issue names the line.
    """
    walk = _LineWalk(source, what)
    try:
        node = yaml.compose(text, Loader=_UniqueKeyLoader)
        if node is None:
            return None, walk.lines, []
        walk.walk(node)  # before the values are built and validated: it refuses what would take them forever
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError([_yaml_issue(exc, text, source)], what=what) from None
    return data, walk.lines, [SpecIssue(p, "duplicate key (the later value would silently win)", source, ln)
                              for p, ln in walk.dups]


def _yaml_issue(exc: yaml.YAMLError, text: str, source: str) -> SpecIssue:
    """The parser's problem and its line; a character the reader refuses (a NUL byte, say) has only a
    position in the text, which gives the line."""
    if isinstance(exc, yaml.reader.ReaderError):
        line = text.count("\n", 0, exc.position) + 1
        char = f"#x{exc.character:04x}" if isinstance(exc.character, int) else repr(exc.character)
        return SpecIssue("", f"not valid YAML: unacceptable character {char} ({exc.reason})", source, line)
    mark = getattr(exc, "problem_mark", None)
    line = mark.line + 1 if mark is not None else None
    problem = getattr(exc, "problem", None) or str(exc)
    context, opened = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and ("flow" in context or "quoted" in context) and opened is not None and opened.line + 1 != line:
        # where the construct began, not only where the parser gave up: an outside spec's unclosed { on line 2 was
        # said on line 3
        problem += f" ({context} that began on line {opened.line + 1}, column {opened.column + 1}: is it closed?)"
    return SpecIssue("", f"not valid YAML: {problem}", source, line)


#: Keys optional in the spec's model but required by every command that trains.
TRAINING_KEYS = ("optimizer", "base_batch_size")


def parse_spec(text: str, source: str = "<spec>", overrides: list[str] | tuple[str, ...] = (), *,
               training: bool = True) -> Spec:
    """Validate spec text; see :func:`load_spec`."""
    data, lines, issues = read_yaml(text, source)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError([SpecIssue("", "a spec must be a YAML mapping of keys to values", source, 1)])

    origin = _apply_overrides(data, list(overrides), issues)
    if training:
        issues += [SpecIssue(key, "required key is missing (probe, sweep, check, noise and plan train the model; "
                                  "only serve runs without it)", source, _nearest_line(lines, key))
                   for key in TRAINING_KEYS if data.get(key) is None]
    if data.get("name") is None:  # the file names the run
        data["name"] = Path(source).stem if source != "<spec>" else "spec"
    try:
        spec = Spec.model_validate(data)
    except ValidationError as exc:
        issues += [locate(_loc_to_path(err["loc"]), _message(err), lines, source, origin)
                   for err in _merge_union_branches(exc.errors())]
        raise SpecError(_dedupe(issues), raw=(data, lines, source, origin)) from None
    if issues:
        raise SpecError(issues)
    spec._lines = lines
    spec._source = source
    spec._origin = origin
    return spec


def _dedupe(issues: list[SpecIssue]) -> list[SpecIssue]:
    seen, out = set(), []
    for issue in issues:
        key = (issue.path, issue.message)
        if key not in seen:
            seen.add(key)
            out.append(issue)
    return out
