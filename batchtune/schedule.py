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

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["BatchSchedule", "ScheduleStage"]


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
        if not self.stages or self.stages[0].start_samples != 0:
            raise ValueError("a schedule needs a first stage starting at 0 samples")
        starts = [s.start_samples for s in self.stages]
        if starts != sorted(set(starts)):
            raise ValueError(f"stage starts must increase: {starts}")
        for s in self.stages:
            if s.batch_size != s.micro_batch_size * s.accum_steps * self.world_size:
                raise ValueError(f"stage at {s.start_samples}: batch {s.batch_size} is not micro-batch "
                                 f"{s.micro_batch_size} × {s.accum_steps} accumulation × {self.world_size} ranks")

    def stage_at(self, samples: float) -> ScheduleStage:
        """The stage a step starting after ``samples`` samples belongs to."""
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
        """Set every parameter group's lr for the step starting after ``samples`` samples."""
        lr = self.lr_at(samples)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def grows(self) -> list[int]:
        """The sample counts where the batch changes."""
        return [s.start_samples for s in self.stages[1:]]

    def sampler(self, dataset_size: int, seed: int = 0, rank: int = 0) -> Iterator[list[int]]:
        """Index lists of each step's micro-batches, for ``DataLoader(batch_sampler=...)``.

        A fresh permutation each epoch (seeded); under several ranks each takes its own
        micro-batch of every global step.
        """
        generator = torch.Generator().manual_seed(seed)
        order: list[int] = []
        seen = 0
        while seen < self.total_samples:
            stage = self.stage_at(seen)
            for i in range(stage.accum_steps * self.world_size):
                while len(order) < stage.micro_batch_size:
                    order += torch.randperm(dataset_size, generator=generator).tolist()
                take, order = order[:stage.micro_batch_size], order[stage.micro_batch_size:]
                if i % self.world_size == rank:
                    yield take
            seen += stage.batch_size

    # ---------------------------------------------------------------------------- files

    def to_dict(self) -> dict[str, Any]:
        return {"format": "batchtune schedule 1", "total_samples": self.total_samples,
                "warmup_samples": self.warmup_samples,
                "world_size": self.world_size, "stages": [asdict(s) for s in self.stages], "notes": self.notes}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BatchSchedule:
        stages = [ScheduleStage(**s) for s in data["stages"]]
        return cls(stages, int(data["total_samples"]), int(data.get("warmup_samples", 0)),
                   int(data.get("world_size", 1)), list(data.get("notes", [])))

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
        """Read a schedule ``batchtune plan --schedule-out`` wrote.

        Raises:
            ValueError: the file is not one (a spec given by mistake, say): it names what is missing.
        """
        path = Path(path)
        text = path.read_text()
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
        missing = [k for k in ("stages", "total_samples") if not isinstance(data, dict) or k not in data]
        if missing:
            raise ValueError(f"{path} is not a batch schedule (no {' or '.join(missing)}): give a file "
                             "batchtune plan --schedule-out wrote")
        return cls.from_dict(data)
