"""A batch-size schedule a plain training loop can follow: sizes, the sample counts where they
change, the lr at each stage, warmup.

``batchtune plan SPEC --samples N --schedule-out schedule.yaml`` writes one; a loop reads it::

    from torch.utils.data import DataLoader
    from batchtune.schedule import BatchSchedule

    schedule = BatchSchedule.load("schedule.yaml")
    loader = DataLoader(dataset, batch_sampler=schedule.sampler(len(dataset), seed=0))
    micro_batches = iter(loader)
    seen = 0
    while seen < schedule.total_samples:
        stage = schedule.stage_at(seen)
        schedule.set_lr(optimizer, seen)
        optimizer.zero_grad()
        for _ in range(stage.accum_steps):        # the sampler yields micro-batches
            loss = loss_fn(model, next(micro_batches)) / stage.accum_steps
            loss.backward()
        optimizer.step()
        seen += stage.batch_size

Everything is counted in samples, not steps, so the schedule means the same whatever the
batch: stage ``i`` runs from ``stages[i].start_samples`` to the next stage's start.
"""

from __future__ import annotations

import difflib
import json
import math
import numbers
import re
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from batchtune.config.spec import SpecError, SpecIssue, _nearest_line, read_yaml

__all__ = ["FORMAT", "BatchSchedule", "ScheduleStage", "schedule_problems"]

FORMAT = "batchtune schedule 1"  # the first key of every schedule file batchtune writes


@dataclass(frozen=True)
class ScheduleStage:
    """From ``start_samples`` on: global ``batch_size`` = ``micro_batch_size`` × ``accum_steps``
    (× ranks), at peak ``lr``."""

    start_samples: int
    batch_size: int
    micro_batch_size: int
    accum_steps: int
    lr: float


@dataclass
class BatchSchedule:
    """Stages in order (the first starts at 0), the run's length and the warmup, in samples."""

    stages: list[ScheduleStage]
    total_samples: int
    warmup_samples: int = 0
    world_size: int = 1
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        # the checks a file gets, so that a schedule built in code cannot hang the sampler either
        stages = [asdict(s) if isinstance(s, ScheduleStage) else s for s in self.stages]
        data = {"total_samples": self.total_samples, "warmup_samples": self.warmup_samples,
                "world_size": self.world_size, "stages": stages, "notes": self.notes}
        clean, problems = _checked(data)
        if problems:
            raise _error(problems, "BatchSchedule(...)")
        self.stages = [ScheduleStage(**s) for s in clean["stages"]]
        self.total_samples, self.warmup_samples = clean["total_samples"], clean["warmup_samples"]
        self.world_size = clean["world_size"]

    def stage_at(self, samples: float) -> ScheduleStage:
        """The stage a step starting after ``samples`` samples belongs to.

        Raises:
            ValueError: ``samples`` is negative or not a number.
        """
        if isinstance(samples, bool) or not isinstance(samples, numbers.Real) or not samples >= 0:
            raise ValueError(f"samples must be a count of samples seen, at least 0, got {samples!r}")
        return next(s for s in reversed(self.stages) if s.start_samples <= samples)

    def batch_size_at(self, samples: float) -> int:
        return self.stage_at(samples).batch_size

    def lr_at(self, samples: float) -> float:
        """The stage's lr; during the warmup linear from lr/steps-in-warmup up to it."""
        stage = self.stage_at(samples)
        if samples >= self.warmup_samples:
            return stage.lr
        # the step ending past the warmup runs at the full lr, not above it (66 of 67 warmup samples at
        # batch 16 gave 1.22x the stage's lr)
        return stage.lr * min(1.0, (samples + stage.batch_size) / max(self.warmup_samples, stage.batch_size))

    def set_lr(self, optimizer: torch.optim.Optimizer, samples: float) -> float:
        """Set every parameter group's lr for the step starting after ``samples`` samples.

        Raises:
            ValueError: the schedule's ``world_size`` is not this run's (torch.distributed's world size, 1 when
                it is not initialised): its lr is for another global batch. A process placed by another
                launcher sets ``group["lr"] = schedule.lr_at(samples)`` itself.
        """
        self._check_world()
        lr = self.lr_at(samples)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def grows(self) -> list[int]:
        """The sample counts where the batch changes."""
        return [s.start_samples for s in self.stages[1:]]

    def sampler(self, dataset_size: int, seed: int = 0, rank: int | None = None,
                start_samples: int = 0) -> Iterator[list[int]]:
        """Index lists of each step's micro-batches, for ``DataLoader(batch_sampler=...)``.

        The indices are seeded permutations of the data set drawn back to back, so an epoch ends
        anywhere in a batch; under several ranks each takes its own micro-batch of every global step.

        Args:
            dataset_size: examples in the data set, at least 1.
            seed: the permutations' seed.
            rank: this process's rank, below ``world_size``; by default torch.distributed's, and the
                schedule's world size must then be the run's (1 when torch.distributed is not initialised).
                Given, it places a process another launcher started.
            start_samples: resume a run at this many samples seen (the loop's ``seen`` at a step's
                start): the micro-batches are exactly those the uninterrupted run takes from there.

        Raises:
            ValueError: an argument out of range, naming it; ``start_samples`` where no step starts;
                a schedule planned for another world size than this run's.

        A batch larger than the data set repeats examples within it: a warning says so once.
        """
        dataset_size = _argument_count(dataset_size, "dataset_size", 1)
        seed = _argument_count(seed, "seed", -2 ** 63)
        own_rank = self._check_world(checked=rank is None)
        rank = own_rank if rank is None else _argument_count(rank, "rank", 0)
        if rank >= self.world_size:
            raise ValueError(f"rank must be below the schedule's world_size {self.world_size}, got {rank}")
        start_samples = self._step_start(_argument_count(start_samples, "start_samples", 0))
        self._warn_small_data(dataset_size, start_samples)
        return self._micro_batches(_IndexStream(dataset_size, seed), rank, start_samples)

    def _micro_batches(self, indices: _IndexStream, rank: int, start_samples: int) -> Iterator[list[int]]:
        indices.skip(start_samples)  # the steps before took their batch_size indices each, all ranks together
        seen = start_samples
        while seen < self.total_samples:
            stage = self.stage_at(seen)
            for i in range(stage.accum_steps * self.world_size):
                take = indices.take(stage.micro_batch_size)
                if i % self.world_size == rank:
                    yield take
            seen += stage.batch_size

    def _check_world(self, checked: bool = True) -> int:
        """This process's rank; a ValueError when torch.distributed runs another world size than the schedule's,
        or (``checked``) when it is not initialised and the schedule's is not 1."""
        running = dist.is_available() and dist.is_initialized()
        world, rank = (dist.get_world_size(), dist.get_rank()) if running else (1, 0)
        if world == self.world_size or not (running or checked):
            return rank
        stage = self.stages[0]
        batch, trained = stage.batch_size, stage.batch_size * world // self.world_size
        where = (f"this run has {world} ranks" if running else
                 "this process runs alone (torch.distributed is not initialised)")
        raise ValueError(
            f"the schedule was planned for world_size {self.world_size} (batch {batch} = micro-batch "
            f"{stage.micro_batch_size} × {stage.accum_steps} accumulation × {self.world_size} ranks, at lr "
            f"{stage.lr:g}) but {where}: each step would train on {trained} samples where the schedule counts "
            f"{batch}, at the lr for {batch}. Launch with torchrun --nproc-per-node {self.world_size}, or plan "
            f"again with --gpus {world}")

    def _step_start(self, start_samples: int) -> int:
        """``start_samples`` when a step of the run starts there (or the run ends there), else a ValueError."""
        before = seen = 0
        while seen < min(start_samples, self.total_samples):
            before, seen = seen, seen + self.stage_at(seen).batch_size
        if seen == start_samples:
            return start_samples
        if start_samples > seen:
            raise ValueError(f"start_samples {start_samples} is past the run's end: its last step ends at {seen} "
                             f"samples (total_samples {self.total_samples})")
        raise ValueError(f"start_samples {start_samples} is not where a step starts: the steps around it start "
                         f"at {before} and {seen} samples (give the loop's seen at a step's start)")

    def _warn_small_data(self, dataset_size: int, start_samples: int) -> None:
        """Warn once when a stage still to run takes a batch larger than the data set."""
        ends = [s.start_samples for s in self.stages[1:]] + [self.total_samples]
        stage = next((s for s, end in zip(self.stages, ends) if s.batch_size > dataset_size and end > start_samples),
                     None)
        if stage is None:
            return
        within = "micro-batch" if stage.micro_batch_size > dataset_size else "batch (across its micro-batches)"
        warnings.warn(f"the data set's {dataset_size} examples are fewer than the batch of {stage.batch_size} "
                      f"(micro-batch {stage.micro_batch_size}) from sample {stage.start_samples}: examples repeat "
                      f"within a {within}", stacklevel=3)

    # ---------------------------------------------------------------------------- files

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "total_samples": self.total_samples,
                "warmup_samples": self.warmup_samples,
                "world_size": self.world_size, "stages": [asdict(s) for s in self.stages], "notes": self.notes}

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "<dict>", lines: dict[str, int] | None = None) -> BatchSchedule:
        """A schedule from a file's content (see :meth:`load`).

        Raises:
            SpecError: every problem :func:`schedule_problems` finds, at once.
        """
        clean, problems = _checked(data)
        if problems:
            raise _error(problems, source, lines)
        return cls([ScheduleStage(**s) for s in clean["stages"]], clean["total_samples"], clean["warmup_samples"],
                   clean["world_size"], clean["notes"])

    def save(self, path: str | Path) -> Path:
        """Write YAML (``.yaml``/``.yml``) or JSON (anything else), atomically."""
        from batchtune.render.run_folder import atomic_write

        path = Path(path)
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        else:
            text = json.dumps(self.to_dict(), indent=2) + "\n"
        atomic_write(path, text)
        return path

    @classmethod
    def load(cls, path: str | Path) -> BatchSchedule:
        """Read a schedule ``batchtune plan --schedule-out`` wrote (YAML or JSON), or one edited by hand.

        The whole file is checked before anything uses it: whole numbers where samples and batches are
        counted, positive batches, lrs and run length, each stage's batch equal to its micro-batch ×
        accumulation × ranks, stages from 0 in increasing order, no unknown or missing keys.

        Raises:
            SpecError: (a ValueError) every problem at once, each with the file, key path
                (``stages[1].batch_size``) and line; also for a file that is not a schedule (a spec
                given by mistake, say) or not valid YAML/JSON.
        """
        path = Path(path)
        source = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise _error([("", "no such file")], source) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise _error([("", f"cannot read it: {exc}")], source) from None
        lines: dict[str, int] = {}
        duplicates: list[SpecIssue] = []
        if path.suffix.lower() in (".yaml", ".yml"):
            data, lines, duplicates = read_yaml(text, source, what=_WHAT)
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                issue = SpecIssue("", f"not valid JSON: {exc.msg}", source, exc.lineno)
                raise SpecError([issue], what=_WHAT) from None
        if duplicates:
            raise _error(schedule_problems(data), source, lines, duplicates)
        return cls.from_dict(data, source=source, lines=lines)


class _IndexStream:
    """Seeded permutations of ``range(size)`` drawn back to back, taken or skipped a run of indices at a time."""

    def __init__(self, size: int, seed: int) -> None:
        self._size, self._generator = size, torch.Generator().manual_seed(seed)
        self._order: list[int] = []
        self._at = 0

    def take(self, n: int) -> list[int]:
        while len(self._order) - self._at < n:
            # an index into the list rather than slicing off each take: copying the rest every micro-batch
            # cost the data set's size per batch
            self._order = self._order[self._at:] + torch.randperm(self._size, generator=self._generator).tolist()
            self._at = 0
        self._at += n
        return self._order[self._at - n:self._at]

    def skip(self, n: int) -> None:
        """As ``take(n)`` with the indices discarded: the same permutations drawn, so what follows is the same."""
        while n > len(self._order) - self._at:
            n -= len(self._order) - self._at
            perm = torch.randperm(self._size, generator=self._generator)
            if n >= self._size:  # skipped whole: no list made of it
                n, self._order, self._at = n - self._size, [], 0
            else:
                self._order, self._at = perm.tolist(), 0
        self._at += n


def _argument_count(value: Any, name: str, least: int) -> int:
    """A whole-number argument of the sampler, at least ``least``; a ValueError naming it otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    if value < least:
        raise ValueError(f"{name} must be at least {least}, got {value!r}")
    return int(value)


# ---------------------------------------------------------------------------- checks

_WHAT = "batch schedule"
_STAGE_KEYS = tuple(f.name for f in fields(ScheduleStage))
_TOP_KEYS = ("format", "total_samples", "warmup_samples", "world_size", "stages", "notes")
# (key, smallest value) of the whole numbers; lr is the one float
_TOP_COUNTS = (("total_samples", 1), ("warmup_samples", 0), ("world_size", 1))
_STAGE_COUNTS = (("start_samples", 0), ("batch_size", 1), ("micro_batch_size", 1), ("accum_steps", 1))
_DEFAULTS = {"warmup_samples": 0, "world_size": 1}
_NUMBER_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def schedule_problems(data: Any) -> list[tuple[str, str]]:
    """Every problem of a schedule file's content, as (key path such as ``stages[1].lr``, message)."""
    return _checked(data)[1]


def _checked(data: Any) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """The content with its numbers read (ints and floats, defaults filled in), and every problem."""
    if not isinstance(data, dict):
        return {}, [("", f"a batch schedule is a mapping with stages and total_samples, got {type(data).__name__}")]
    if "stages" not in data and "total_samples" not in data:
        return {}, [("", "not a batch schedule (no stages or total_samples): give a file batchtune plan "
                         "--schedule-out wrote")]
    problems = _unknown_and_missing(data, "", _TOP_KEYS, ("stages", "total_samples"))
    if data.get("format", FORMAT) != FORMAT:
        problems.append(("format", f"unknown format {data['format']!r}; this batchtune reads {FORMAT!r}"))
    clean: dict[str, Any] = {}
    for key, least in _TOP_COUNTS:
        if key in data or key in _DEFAULTS:
            clean[key] = _count(data.get(key, _DEFAULTS.get(key)), key, least, problems)
    notes = data.get("notes", [])
    if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
        problems.append(("notes", f"must be a list of strings, got {notes!r}"))
    clean["notes"] = list(notes) if isinstance(notes, list) else []
    stages = data.get("stages")
    if "stages" in data and (not isinstance(stages, list) or not stages):
        problems.append(("stages", f"must be a non-empty list of stages, got {stages!r}"))
    elif isinstance(stages, list):
        clean["stages"] = [_stage(stage, f"stages[{i}]", problems) for i, stage in enumerate(stages)]
        order = _stage_order(clean["stages"], clean["world_size"])
        problems += order + _within_the_run(clean)
        # where the starts and batches are counts in order, whatever else is wrong (an outside file's micro-batch
        # and its off-step start were said one edit at a time)
        counted = all(isinstance(st.get(k), int) for st in clean["stages"] for k in ("start_samples", "batch_size"))
        in_order = not any(key.endswith("start_samples") for key, _ in order)
        problems += _off_step_boundaries(clean) if counted and in_order else []
    return clean, problems


def _off_step_boundaries(clean: dict[str, Any]) -> list[tuple[str, str]]:
    """Stage starts that fall inside a step of the stage before: a loop switches only between steps, so a
    hand-edited start of 50 under batches of 24 switched at 72 (a plan's schedule is aligned)."""
    stages, problems = clean["stages"], []
    for i, (before, stage) in enumerate(zip(stages, stages[1:]), 1):
        start, batch = stage["start_samples"], before["batch_size"]
        over = (start - before["start_samples"]) % batch
        if over:
            problems.append((f"stages[{i}].start_samples", f"{start} is not where a step starts: the batches of "
                                                            f"{batch} before it start steps at {start - over} and "
                                                            f"{start - over + batch} samples"))
    return problems


def _within_the_run(clean: dict[str, Any]) -> list[tuple[str, str]]:
    """Stages that start, and a warmup that ends, past the run's last sample (they load, then never apply:
    a warmup of 99,999 samples in a run of 6,000 left the lr at 6% of its value to the end)."""
    total = clean.get("total_samples")
    if total is None:
        return []
    problems = [(f"stages[{i}].start_samples", f"starts at {s['start_samples']}, past the run's {total} samples")
                for i, s in enumerate(clean.get("stages") or []) if (s.get("start_samples") or 0) >= total > 0]
    warmup = clean.get("warmup_samples")
    if warmup is not None and warmup >= total > 0:
        problems.append(("warmup_samples", f"{warmup} is not less than the run's {total} samples (total_samples)"))
    return problems


def _stage(stage: Any, where: str, problems: list[tuple[str, str]]) -> dict[str, Any]:
    if not isinstance(stage, dict):
        problems.append((where, f"a stage is a mapping of {', '.join(_STAGE_KEYS)}, got {stage!r}"))
        return {}
    problems += _unknown_and_missing(stage, where + ".", _STAGE_KEYS, _STAGE_KEYS)
    clean = {key: _count(stage[key], f"{where}.{key}", least, problems)
             for key, least in _STAGE_COUNTS if key in stage}
    if "lr" in stage:
        lr = _number(stage["lr"])
        if lr is None or not math.isfinite(lr) or lr <= 0:
            problems.append((f"{where}.lr", f"must be a positive, finite number, got {stage['lr']!r}"))
        clean["lr"] = float(lr) if lr is not None else None
    return clean


def _stage_order(stages: list[dict[str, Any]], world_size: int | None) -> list[tuple[str, str]]:
    """What is wrong between the stages: where they start, how their batches add up (numbers that did
    not read as valid ones are left to their own problems)."""
    problems = []
    starts = [(i, s.get("start_samples")) for i, s in enumerate(stages)]
    if starts[0][1] not in (0, None):
        problems.append(("stages[0].start_samples", f"the first stage starts at 0, got {starts[0][1]}"))
    starts = [(i, start) for i, start in starts if start is not None]
    for (_, before), (i, start) in zip(starts, starts[1:]):
        if start <= before:
            problems.append((f"stages[{i}].start_samples", f"stages start in increasing order: {start} comes "
                                                            f"after {before}"))
    for i, s in enumerate(stages):
        sizes = [s.get(k) for k in ("batch_size", "micro_batch_size", "accum_steps")]
        if world_size is None or None in sizes:
            continue
        batch, micro, accum = sizes
        if batch != micro * accum * world_size:
            problems.append((f"stages[{i}].batch_size", f"{batch} is not micro-batch {micro} × {accum} "
                                                         f"accumulation × {world_size} ranks = "
                                                         f"{micro * accum * world_size}"))
    return problems


def _unknown_and_missing(data: dict[str, Any], prefix: str, known: tuple[str, ...],
                         required: tuple[str, ...]) -> list[tuple[str, str]]:
    problems = []
    for key in data:
        if key not in known:
            near = difflib.get_close_matches(str(key), known, n=1)
            problems.append((f"{prefix}{key}", f"unknown key (did you mean '{near[0]}'?)" if near else
                             f"unknown key; a {'stage' if prefix else 'schedule'} has {', '.join(known)}"))
    problems += [(f"{prefix}{key}", "required key is missing") for key in required if key not in data]
    return problems


def _number(value: Any) -> numbers.Real | None:
    """``value`` as a number, or None when it is not one.

    PyYAML reads YAML 1.1, where a float needs a dot and a signed exponent: ``lr: 2e-2`` and
    ``total_samples: 6e3`` arrive as strings, where YAML 1.2 and JSON read the numbers their
    writer meant. A string that is a plain decimal number (``"2e-2"``, ``"64"``) is therefore
    read as that number, as the spec's loader does; anything else (``"fast"``, ``true``) is not.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Real):  # numpy's too: a plan's stages may carry them
        return value
    if isinstance(value, str) and _NUMBER_TEXT.fullmatch(value.strip()):
        text = value.strip()
        return int(text) if text.lstrip("+-").isdigit() else float(text)
    return None


def _count(value: Any, where: str, least: int, problems: list[tuple[str, str]]) -> int | None:
    """A whole number of samples, examples or steps, at least ``least`` (``6e3`` and ``6000.0`` are 6000);
    None, with a problem, otherwise."""
    n = _number(value)
    if n is None or not math.isfinite(n) or n != int(n):
        problems.append((where, f"must be a whole number, got {value!r}"))
        return None
    if n < least:
        problems.append((where, f"must be {'positive' if least == 1 else f'at least {least}'}, got {value!r}"))
        return None
    return int(n)


def _error(problems: list[tuple[str, str]], source: str, lines: dict[str, int] | None = None,
           extra: list[SpecIssue] = ()) -> SpecError:
    """One error for every problem, each located at its key's line where the file gives one."""
    lines = lines or {}
    issues = [SpecIssue(path, message, source, _nearest_line(lines, re.sub(r"\[(\d+)\]", r".\1", path)))
              for path, message in problems]
    # the YAML reader's duplicate keys say stages.1.lr; the rest of this file's problems, stages[1].lr
    extra = [SpecIssue(re.sub(r"\.(\d+)(?=\.|$)", r"[\1]", i.path), i.message, i.source, i.line) for i in extra]
    return SpecError(sorted([*extra, *issues], key=lambda i: i.line or 0), what=_WHAT)
