"""The noise-scale callbacks inside real Hugging Face and Lightning Trainers (CPU, tiny models)."""

from __future__ import annotations

import logging
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
pl = pytest.importorskip("lightning.pytorch")

from batchtune.integrations import NoiseScaleWatch  # noqa: E402
from batchtune.integrations.huggingface import NoiseScaleCallback as HFCallback  # noqa: E402
from batchtune.integrations.lightning import NoiseScaleCallback as PLCallback  # noqa: E402
from tests.conftest import logged  # noqa: E402


class _Tokens(torch.utils.data.Dataset):
    """Random 32-token sequences over a 64-word vocabulary, as causal-LM examples."""

    def __init__(self, n: int = 64) -> None:
        self.ids = torch.randint(0, 64, (n, 32), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


@pytest.mark.parametrize("accum", [2, 1])
def test_hugging_face_trainer_logs_the_noise_scale(tmp_path, accum):
    """Accumulation: passes against the step; one micro-batch: per-example norms of GPT-2's Conv1D layers."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=64, n_positions=32)
    model = transformers.GPT2LMHeadModel(config)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4,
                                          gradient_accumulation_steps=accum, max_steps=6, logging_steps=2,
                                          learning_rate=1e-3, report_to=[], save_strategy="no",
                                          disable_tqdm=True, use_cpu=True, dataloader_num_workers=0)
    callback = HFCallback(every=1)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Tokens(), callbacks=[callback])
    with logged("batchtune.integrations") as said:
        trainer.train()
    # the Trainer's AdamW (inside accelerate's wrapper) is judged adaptive: no batch warnings without a ratio
    assert callback.watch.optimizer_family[0] == "adaptive" and callback.watch.optimizer_family[1].startswith("AdamW")
    assert len([m for m in said if m.startswith("noise scale: no batch warnings in this run")]) == 1
    flagged = [rec for rec in trainer.state.log_history if "noise_scale/resolved" in rec]
    assert [rec["step"] for rec in flagged] == [2, 4, 6]  # the latest measured step's: a reading, or resolved 0
    read_logs = [rec for rec in flagged if rec["noise_scale/resolved"] == 1.0]
    assert [rec for rec in flagged if "noise_scale/b_simple" in rec] == read_logs and read_logs
    assert all(math.isfinite(rec["noise_scale/b_simple"]) and rec["noise_scale/b_simple"] > 0 for rec in read_logs)
    # noise_scale/high only where the band is bounded: 6 steps of 4 examples often leave it unbounded
    assert all(rec["noise_scale/low"] <= rec["noise_scale/b_simple"] <= rec.get("noise_scale/high", math.inf)
               for rec in read_logs)
    read = [h for h in callback.history if h["b_simple"] is not None]  # at 4 examples |G|² can average <= 0
    assert all(("noise_scale/high" in rec) == math.isfinite(h["high"])
               for rec in read_logs for h in read if h["step"] == rec["step"])
    assert [h["step"] for h in callback.history] == [1, 2, 3, 4, 5, 6] and read  # every measured step kept
    assert callback.history[-1]["batch_size"] == 4 * accum and callback.history[-1]["measured_steps"] == 6
    # one micro-batch: the Conv1D layers' 12,576 of 15,840 parameters (not the tied embedding, positions, norms)
    assert callback.history[-1]["coverage"] == (1.0 if accum == 2 else pytest.approx(12576 / 15840))
    assert not model.transformer.wte.weight._backward_hooks  # hooks gone after training


def test_attach_places_the_callback_first_once_on_the_class_or_an_instance(tmp_path):
    """An outside user called ``cb.attach(trainer)`` on their own callback: a second one was attached, and theirs
    (the one they read .history from) stayed empty."""
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=1)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=64,
                                                                 n_positions=32))
    mine = HFCallback(every=4)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Tokens(), callbacks=[mine])
    assert mine.attach(trainer) is mine and trainer.callback_handler.callbacks[0] is mine
    assert HFCallback.attach(trainer) is mine  # the trainer's own, moved first, not a second one
    assert sum(isinstance(c, HFCallback) for c in trainer.callback_handler.callbacks) == 1
    with pytest.raises(TypeError, match="takes the trainer alone"):
        mine.attach(trainer, every=2)
    with pytest.raises(ValueError, match="has a NoiseScaleCallback already"):
        HFCallback.attach(trainer, every=2)
    with pytest.raises(ValueError, match="has another NoiseScaleCallback already"):  # it got a second one
        HFCallback(every=2).attach(trainer)
    assert sum(isinstance(c, HFCallback) for c in trainer.callback_handler.callbacks) == 1
    fresh = transformers.Trainer(model=model, args=args, train_dataset=_Tokens())
    made = HFCallback.attach(fresh, every=2)
    assert fresh.callback_handler.callbacks[0] is made and made.watch.options["every"] == 2


class _Regression(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x).squeeze(-1), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _regression_loader() -> torch.utils.data.DataLoader:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=gen)
    y = x.sum(1) + torch.randn(256, generator=gen)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


@pytest.mark.parametrize("accum", [2, 1])
def test_lightning_trainer_logs_the_noise_scale(tmp_path, accum):
    torch.manual_seed(0)
    callback = PLCallback(every=1)
    logger = pl.loggers.CSVLogger(str(tmp_path))
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=6, accumulate_grad_batches=accum,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         logger=logger, log_every_n_steps=1, callbacks=[callback])
    trainer.fit(_Regression(), _regression_loader())
    # steps whose smoothed |G|² is still <= 0 give no reading (a batch of 8 against B_simple ~60), kept as None
    assert [h["step"] for h in callback.history] == list(range(1, 7)) and callback.history[-1]["measured_steps"] == 6
    read = [h for h in callback.history if h["b_simple"] is not None]
    assert read and all(math.isfinite(h["b_simple"]) and h["b_simple"] > 0 for h in read)
    assert callback.history[-1]["batch_size"] == 8 * accum
    rows = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert {"noise_scale/b_simple", "noise_scale/low"} <= set(header)
    # each reading once, on its own row, each value only when finite: log_dict repeated a reading on every row
    # until the next one (also after a step with b_simple None) and logged an unbounded band's high as inf
    col = {name: header.index(f"noise_scale/{name}") if f"noise_scale/{name}" in header else None
           for name in ("b_simple", "low", "high")}
    logged_rows = [r.split(",") for r in rows[1:] if r.split(",")[col["b_simple"]]]
    assert [float(row[header.index("step")]) + 1 for row in logged_rows] == [h["step"] for h in read]
    for row, reading in zip(logged_rows, read):
        assert float(row[col["b_simple"]]) == pytest.approx(reading["b_simple"], rel=1e-6)
        high = row[col["high"]] if col["high"] is not None else ""
        assert high == "" if math.isinf(reading["high"]) else float(high) == pytest.approx(reading["high"], rel=1e-6)
    assert "inf" not in "".join(rows)
    resolved = header.index("noise_scale/resolved")  # one per measured step, so the series never just stops
    assert [float(r.split(",")[resolved]) for r in rows[1:] if r.split(",")[resolved]] == [
        float(h["b_simple"] is not None) for h in callback.history]


def test_lightning_reads_the_micro_batch_from_a_batch_sampler(tmp_path):
    """``DataLoader(batch_sampler=BatchSampler(..., 8, ...))`` has batch_size None: the callback raised "cannot
    read the train DataLoader's batch_size" although the batch sampler has it."""
    torch.manual_seed(0)
    data = _regression_loader().dataset
    sampler = torch.utils.data.BatchSampler(torch.utils.data.SequentialSampler(data), 8, drop_last=True)
    callback = PLCallback(every=1)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=4, accumulate_grad_batches=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[callback])
    trainer.fit(_Regression(), torch.utils.data.DataLoader(data, batch_sampler=sampler))
    assert callback.watch.batch_size == 16 and callback.watch.monitor.batch_sizes == (8, 16)
    assert callback.watch.monitor.measured_steps == 4 and all(h["batch_size"] == 16 for h in callback.history)

    varying = [[0, 1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11]]  # no batch_size anywhere: each step's batch tells
    callback = PLCallback(every=1)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])
    trainer.fit(_Regression(), torch.utils.data.DataLoader(data, batch_sampler=varying))
    assert [h["batch_size"] for h in callback.history] == [4, 8] and callback.watch.samples == 12
    assert callback.watch.monitor.batch_sizes == (1, 8) and callback.watch.monitor.measured_steps == 2


class _ManualAccumulation(_Regression):
    """Manual optimization stepping every second batch (loss / 2), as the callback's warning advises."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        self.manual_backward(super().training_step(batch, batch_idx) / 2)
        if batch_idx % 2 == 1:
            self.optimizers().step()
            self.optimizers().zero_grad()


def _fit(callbacks: list, module: pl.LightningModule, loader: torch.utils.data.DataLoader, **options) -> None:
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, **options)
    trainer.fit(module, loader)


def test_lightning_follows_accumulation_as_it_changes_and_under_manual_optimization():
    """GradientAccumulationScheduler({0: 2, 1: 4}) set accumulate_grad_batches after on_train_start read it: all
    40 steps were skipped; NoiseScaleCallback(accum_steps=2), which its own warning advised, raised TypeError."""
    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    torch.manual_seed(0)
    scheduled = PLCallback(every=1)
    _fit([GradientAccumulationScheduler({0: 2, 1: 4}), scheduled], _Regression(), _regression_loader(), max_epochs=2)
    assert [h["batch_size"] for h in scheduled.history] == [16] * 16 + [32] * 8  # 256 examples, batches of 8
    assert scheduled.watch.monitor.batch_sizes == (8, 32) and scheduled.watch.samples == 512
    manual = PLCallback(every=1, accum_steps=2)
    _fit([manual], _ManualAccumulation(), _regression_loader(), max_epochs=1)
    assert len(manual.history) == 16 and manual.watch.monitor.batch_sizes == (8, 16)


def test_lightning_follows_a_schedule_samplers_growing_batch_without_a_grow_warning():
    """DataLoader(batch_sampler=schedule.sampler(...)) grew 8 -> 16 at sample 64; the callback was told "this run
    is still at 8 after 64 samples" and measured at 8 (or skipped the steps)."""
    from batchtune.schedule import BatchSchedule, ScheduleStage

    schedule = BatchSchedule([ScheduleStage(0, 8, 8, 1, 0.01), ScheduleStage(64, 16, 16, 1, 0.01)], 256)
    data = _regression_loader().dataset
    for given in (None, 8):
        callback = PLCallback(micro_batch_size=given, every=1, schedule=schedule)
        with logged("batchtune.integrations") as messages:
            _fit([callback], _Regression(), torch.utils.data.DataLoader(data, batch_sampler=schedule.sampler(256)),
                 max_steps=12)
        assert [h["batch_size"] for h in callback.history] == [8] * 8 + [16] * 4 and callback.watch.samples == 128
        assert callback.watch.grow_warnings == [] and callback.watch.monitor.batch_sizes == (1, 16)
        assert len(messages) == (0 if given is None else 1)  # given 8: the batch's 16 is used, and said


def test_the_watch_warns_once_then_at_its_interval_when_the_batch_is_too_big():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    watch = NoiseScaleWatch(every=1, warn_after=2, warn_every=5)
    watch.start(model, micro_batch_size=64, accum_steps=2, world_size=1)
    gen = torch.Generator().manual_seed(0)
    with logged("batchtune.integrations") as messages:
        for step in range(1, 14):
            for _ in range(2):  # y = noise only: B_simple ≈ d(1 + σ²/|w|²) + 1, far below 128
                x = torch.randn(64, 4, generator=gen)
                (0.5 * (model(x).squeeze(-1) - torch.randn(64, generator=gen)).square().mean() / 2).backward()
            watch.step(step)
            model.zero_grad(set_to_none=True)
    assert watch.history[-1]["b_simple"] < 128 / 1.2
    assert watch.warnings == [3, 8, 13]  # not at 2: two steps' band (Student's t, one degree of freedom) holds 128
    assert len([m for m in messages if "above the noise scale" in m]) == 3
    watch.start(model, micro_batch_size=64, accum_steps=2, world_size=1)  # the same callback trains again
    with logged("batchtune.integrations") as messages:
        for step in range(1, 5):
            for _ in range(2):
                x = torch.randn(64, 4, generator=gen)
                (0.5 * (model(x).squeeze(-1) - torch.randn(64, generator=gen)).square().mean() / 2).backward()
            watch.step(step)
            model.zero_grad(set_to_none=True)
    assert watch.warnings == [3, 8, 13, 4] and len(watch.history) == 13 + 4  # warned anew; history kept whole


def test_the_watch_says_when_the_schedule_grows_the_batch(tmp_path):
    """A run that stays at 16 while its schedule grows to 64 at sample 160 is told at step 11
    (the first step run past it at 16), then every warn_every steps, never before."""
    from batchtune.schedule import BatchSchedule, ScheduleStage

    path = BatchSchedule([ScheduleStage(0, 16, 16, 1, 0.1), ScheduleStage(160, 64, 32, 2, 0.2)],
                         total_samples=1000).save(tmp_path / "schedule.yaml")
    model = torch.nn.Linear(4, 1)
    watch = NoiseScaleWatch(every=1, warn_every=4, schedule=str(path))
    watch.start(model, micro_batch_size=16, accum_steps=1, world_size=1)
    with logged("batchtune.integrations") as messages:
        for step in range(1, 20):
            model(torch.randn(16, 4)).sum().backward()
            watch.step(step)
            model.zero_grad(set_to_none=True)
    # step 11 started at sample 160, stage 2's, and ran at 16 (at step 10 a sampler may still grow the next)
    assert watch.grow_warnings == [11, 15, 19]
    grow = [m for m in messages if "the schedule grows the batch to 64" in m]
    assert len(grow) == 3 and "lr 0.2" in grow[0] and "still at 16 after 176 samples" in grow[0]


class _Scripted:
    """A monitor that measures every step and reads the (b_simple, low, high) it is given, in turn (None: no
    reading, the mean |G|² not above zero)."""

    every = 1

    def __init__(self, *readings: tuple[float | None, float | None, float | None]) -> None:
        self.readings = list(readings)
        self.measured_steps = 0

    def step(self) -> None:
        self.measured_steps += 1

    def reading(self):
        from batchtune.monitor import MonitorReading

        b, low, high = self.readings[min(self.measured_steps, len(self.readings)) - 1]
        if b is None:
            return MonitorReading(None, None, None, -1.0, 2.0, self.measured_steps, False)
        return MonitorReading(b, low, high, 1.0, b, self.measured_steps, math.isfinite(high))

    def close(self) -> None:
        pass


def _watch_logs(watch: NoiseScaleWatch, steps: int, level: int = logging.WARNING) -> list[str]:
    with logged("batchtune.integrations", level) as messages:
        for step in range(1, steps + 1):
            watch.step(step)
    return messages


def test_steps_with_no_reading_are_kept_logged_as_unresolved_and_explained():
    """A mean |G|² not above zero reads no B_simple: an outside Trainer's history read None from step 40 to 96
    and the noise_scale/* keys vanished from its logs, unsaid. Each measured step logs noise_scale/resolved; after
    5 in a row without a reading the watch says why (then every warn_every steps), and again at once after a
    reading came back in between."""
    unread = (None, None, None)
    watch = NoiseScaleWatch(warn_after=1, warn_every=10)
    watch.monitor = _Scripted((40.0, 30.0, 50.0), *[unread] * 16, (40.0, 30.0, 50.0), *[unread] * 5)
    watch.batch_size = 32
    with logged("batchtune.integrations", logging.INFO) as messages:
        logs = [watch.step(step) for step in range(1, 24)]
    assert logs[0] == {"noise_scale/b_simple": 40.0, "noise_scale/low": 30.0, "noise_scale/high": 50.0,
                       "noise_scale/reliable": 1.0, "noise_scale/resolved": 1.0}
    assert logs[1] == logs[16] == {"noise_scale/resolved": 0.0} and logs[17]["noise_scale/resolved"] == 1.0
    assert [(h["step"], h["b_simple"], h["reliable"]) for h in watch.history[:3]] == [
        (1, 40.0, True), (2, None, False), (3, None, False)]
    assert watch.unresolved_warnings == [6, 16, 23]
    assert messages[0] == ("step 6: noise scale: no reading for the last 5 measured steps (noise_scale/resolved 0): "
                           "the gradient's mean |G|^2 is not resolved against its noise at batch 32 and every=1; "
                           "measure every step (every=1), accumulate more backward passes per step, or "
                           "average over a longer window (ema_decay nearer 1)")
    assert messages[2] == ("step 18: the noise scale is read again (B_simple=40) after 16 measured steps without a "
                           "reading")
    assert len(messages) == 4 and messages[3].startswith("step 23: noise scale: no reading for the last 5")


@pytest.mark.parametrize("b_simple,low,high,warns", [
    (42.79, 22.69, 166.3, False),  # an outside user's batch 64: 50% above, inside the band, and it warned
    (55.0, 45.0, 60.0, False),     # above the band but only 16% above the estimate
    (42.79, 30.0, 50.0, True),     # 50% above and above the band
    (53.0, 40.0, 64.0, False),     # 21% above; the band reaches the batch
])
def test_the_batch_warning_needs_the_batch_clearly_above_the_estimate(b_simple, low, high, warns):
    watch = NoiseScaleWatch(warn_after=1, warn_every=100)
    watch.monitor, watch.batch_size = _Scripted((b_simple, low, high)), 64
    messages = _watch_logs(watch, 3)
    assert watch.warnings == ([1] if warns else []) and len(messages) == len(watch.warnings)
    if warns:
        assert messages == ["step 1: batch 64 is 50% above the noise scale B_simple=42.79 and above its 90% band "
                            "(30-50), the critical-batch estimate; a smaller batch would likely reach the loss in "
                            "fewer samples"]


def test_under_an_adaptive_optimizer_the_batch_warnings_wait_for_a_measured_critical_ratio():
    """Under AdamW B_simple read 0.06-0.2x the critical batch on the ground truths: a Trainer at its fastest batch
    was told it was past diminishing returns. The watch judges the optimizer at its first step: an adaptive one
    holds the batch warnings back (said once), unless critical_ratio, the measured B_crit / B_simple, is given;
    then the batch is set against that multiple of B_simple. SGD keeps B_simple itself."""
    reading = (42.79, 30.0, 50.0)  # batch 64: 50% above B_simple and above its band
    param = [torch.nn.Parameter(torch.zeros(2))]
    held = NoiseScaleWatch(warn_after=1, warn_every=100)
    held.monitor, held.batch_size = _Scripted(reading), 64
    with logged("batchtune.integrations") as said:
        held.judge_optimizer(torch.optim.AdamW(param, lr=1e-3, weight_decay=0.01))
        held.judge_optimizer(torch.optim.AdamW(param, lr=1e-3))  # once per run
    assert held.optimizer_family[0] == "adaptive" and len(said) == 1
    assert said[0].startswith("noise scale: no batch warnings in this run: AdamW keeps exp_avg_sq ∝ grad² (a second "
                              "moment) over two test steps, an adaptive optimizer")
    assert _watch_logs(held, 3) == [] and held.warnings == [] and len(held.history) == 3  # readings kept

    sgd = NoiseScaleWatch(warn_after=1, warn_every=100)
    sgd.monitor, sgd.batch_size = _Scripted(reading), 64
    sgd.judge_optimizer(torch.optim.SGD(param, lr=0.1, momentum=0.9))
    assert sgd.optimizer_family[0] == "sgd" and len(_watch_logs(sgd, 3)) == 1 and sgd.warnings == [1]

    measured = NoiseScaleWatch(warn_after=1, warn_every=100, critical_ratio=0.5)  # the critical batch ~21
    measured.monitor, measured.batch_size = _Scripted(reading), 64
    measured.judge_optimizer(torch.optim.AdamW(param, lr=1e-3))
    assert _watch_logs(measured, 3) == ["step 1: batch 64 is 199% above the critical-batch estimate 21.39 "
                                        "(critical_ratio 0.5 x the noise scale B_simple=42.79) and above its 90% "
                                        "band (15-25); a smaller batch would likely reach the loss in fewer samples"]
    ample = NoiseScaleWatch(warn_after=1, warn_every=100, critical_ratio=2)  # ~86: no longer too big, nor small
    ample.monitor, ample.batch_size = _Scripted(reading), 64
    ample.judge_optimizer(torch.optim.AdamW(param, lr=1e-3))
    assert _watch_logs(ample, 3) == [] and ample.warnings == ample.below_warnings == []
    below = NoiseScaleWatch(warn_after=1, warn_every=100, critical_ratio=10)  # ~428: well above the batch
    below.monitor, below.batch_size = _Scripted(reading), 64
    assert _watch_logs(below, 3)[0] == ("step 3: batch 64 is well below the critical-batch estimate 427.9 "
                                        "(critical_ratio 10 x the noise scale B_simple=42.79): its 90% band (300-500) "
                                        "has stayed above 2x the batch for 3 readings. It estimates the critical "
                                        "batch, so a larger batch (up to about 427.9) would likely reach the loss in "
                                        "fewer steps at little extra cost in samples")


def test_readings_too_wide_to_judge_are_said_and_an_unreliable_one_advises_no_more_than_its_lower_end():
    """An outside batch-1024 run read B_simple 138-205 with bands open above for 150 steps at every=8 and said
    nothing, where check called 1024 4.6x its critical batch; another, at 16, was told to grow 'up to about 1817',
    one outlier among readings of 80-160, all unreliable; and a collapsed model (loss at ln 10) was told to grow."""
    wide = NoiseScaleWatch(warn_after=1, warn_every=10)
    wide.monitor, wide.batch_size = _Scripted((40.0, 20.0, math.inf)), 64
    said = _watch_logs(wide, 16)
    assert wide.warnings == [] and wide.unjudged_warnings == [5, 15]
    assert said[0] == ("step 5: batch 64 is 60% above the noise scale B_simple=40, but its 90% band (20-inf) has held "
                       "the batch for 5 readings: too wide to say it is too big; measure every step (every=1), "
                       "accumulate more backward passes per step, or read over a longer window (ema_decay nearer 1) "
                       "to narrow it")
    small = NoiseScaleWatch(warn_after=1, warn_every=100)
    small.monitor, small.batch_size = _Scripted((1817.0, 60.0, math.inf)), 16
    (advice,) = _watch_logs(small, 3)
    assert "so a larger batch (up to about 60) would likely reach the loss in fewer steps" in advice
    assert advice.endswith("; the readings are not reliable (a band open above or over 10x wide), and a gradient near "
                           "zero, as in a model that has stopped learning, reads a large B_simple too: check that the "
                           "loss still falls")


def test_the_batch_warnings_follow_the_reading_above_and_below():
    """An outside GPT-2 run at batch 32 was warned at step 22 that 32 was 74% above B_simple=18.38; B_simple then
    grew to 28, 86, 174, 368, unsaid. A warning whose condition clears is withdrawn (info) and re-armed; a batch
    whose band has stayed above twice it for 3 readings (not one) is told a larger one would take fewer steps, the
    band bounded above or not (that run's read 70-inf ... 152-inf for its last 100 steps)."""
    above, near, well_below, far_below = (18.38, 10.0, 25.0), (28.0, 20.0, 40.0), (86.0, 70.0, 110.0), (
        174.0, 150.0, math.inf)
    watch = NoiseScaleWatch(warn_after=1, warn_every=10)
    watch.monitor, watch.batch_size = _Scripted(above, above, near, above, *[well_below] * 3, *[far_below] * 13,
                                                (50.0, 30.0, 80.0), *[well_below] * 3), 32
    messages = _watch_logs(watch, 24, logging.INFO)
    assert watch.warnings == [1, 4]  # again at once after it cleared at 3, not 10 steps on
    assert watch.below_warnings == [7, 17, 24]  # the third reading in a row, then every 10 steps, then re-armed
    assert [m.split(":")[0] for m in messages] == ["step 1", "step 3", "step 4", "step 5", "step 7", "step 17",
                                                   "step 21", "step 24"]  # 5: cleared again
    assert messages[1] == ("step 3: batch 32 is no longer more than 20% above the noise scale B_simple=28 (90% band "
                           "20-40): the smaller-batch warning no longer holds (it is given again if the batch is "
                           "clearly above once more)")
    assert messages[4] == ("step 7: batch 32 is well below the noise scale B_simple=86: its 90% band (70-110) has "
                           "stayed above 2x the batch for 3 readings. B_simple estimates the critical batch, so a "
                           "larger batch (up to about 86) would likely reach the loss in fewer steps at little "
                           "extra cost in samples")
    assert messages[6] == ("step 21: the noise scale B_simple=50 is no longer well above batch 32: the larger-batch "
                           "advice no longer holds")


def test_while_the_run_follows_its_schedule_the_watch_never_says_shrink(tmp_path):
    """An outside run at 8 whose schedule grows to 16 at sample 200 was told at step 25 to grow to 16 and at
    step 26 that 8 was too big; another, on plan's own schedule, was told during warmup at the stage's 32 that 32
    was 450% above the noise scale. The schedule the user chose governs, and its grow warning says what the
    estimate reads; a run above its schedule's batch still hears the estimate."""
    from batchtune.schedule import BatchSchedule, ScheduleStage

    schedule = BatchSchedule([ScheduleStage(0, 8, 8, 1, 0.003), ScheduleStage(200, 16, 8, 2, 0.0042)], 2000)
    watch = NoiseScaleWatch(warn_after=1, warn_every=10, schedule=schedule)
    watch.monitor, watch.batch_size = _Scripted((5.0, 4.0, 6.0)), 8  # 60% above the estimate, above its band
    messages = _watch_logs(watch, 48)
    assert watch.warnings == []  # at the stage's 8, then told to grow: never to shrink
    assert watch.grow_warnings == [26, 36, 46]  # from the step run from sample 200 on, the schedule speaks
    assert messages[0] == ("step 26: the schedule grows the batch to 16 (micro-batch 8 x 2 accumulation, lr 0.0042) "
                           "from sample 200; this run is still at 8 after 208 samples; the noise scale B_simple=5 "
                           "(90% band 4-6) is below this batch, but the schedule you chose governs: no "
                           "smaller-batch warning while it says to grow")
    assert len(messages) == 3
    above = NoiseScaleWatch(warn_after=1, warn_every=10, schedule=schedule)
    above.monitor, above.batch_size = _Scripted((5.0, 4.0, 6.0)), 32  # past the schedule's 8 and 16 alike
    _watch_logs(above, 12)
    assert above.warnings == [1, 11] and above.grow_warnings == []
    warm = BatchSchedule([ScheduleStage(0, 8, 8, 1, 0.003)], 2000, warmup_samples=400)
    early = NoiseScaleWatch(warn_after=1, warn_every=10, schedule=warm)
    early.monitor, early.batch_size = _Scripted((5.0, 4.0, 6.0)), 32
    _watch_logs(early, 14)
    assert early.warnings == [13]  # 32 samples a step: the warmup's 400 end after step 12


def test_hugging_face_logs_a_reading_once_and_only_its_finite_values():
    """Every logging step repeated the last reading (stale at every=8), and an unbounded band put
    noise_scale/high: inf into log_history."""
    from types import SimpleNamespace

    callback = HFCallback(every=1)
    callback.watch.monitor, callback.watch.batch_size = _Scripted((5.0, 4.0, math.inf), (6.0, 5.0, 7.0)), 32
    state = SimpleNamespace(global_step=0, is_world_process_zero=True, log_history=[])
    logged = []
    for step in (0, None, 1):  # an optimizer step (its global_step) before each log, or none
        if step is not None:
            state.global_step = step
            callback.on_pre_optimizer_step(None, state, None)
        logs = {"loss": 1.0}
        callback.on_log(None, state, None, logs=logs)
        logged.append(logs)
    # with whether each reading is reliable: a dashboard filters on it (an outside one's axis ran to 74,279)
    assert logged == [{"loss": 1.0, "noise_scale/b_simple": 5.0, "noise_scale/low": 4.0, "noise_scale/reliable": 0.0,
                       "noise_scale/resolved": 1.0},
                      {"loss": 1.0}, {"loss": 1.0, "noise_scale/b_simple": 6.0, "noise_scale/low": 5.0,
                                      "noise_scale/high": 7.0, "noise_scale/reliable": 1.0,
                                      "noise_scale/resolved": 1.0}]
    assert callback.history[0]["high"] == math.inf  # the history keeps it


def _hf_steps(callback: HFCallback, state, model: torch.nn.Module, steps: int, accum: int = 2) -> None:
    """Optimizer steps as the Trainer takes them: accum backward passes of 8 examples, then the callback."""
    for _ in range(steps):
        for _ in range(accum):
            (model(torch.randn(8, 4)).square().mean() / accum).backward()
        callback.on_pre_optimizer_step(None, state, None)
        state.global_step += 1
        model.zero_grad(set_to_none=True)


def test_hugging_face_counts_a_resumed_runs_samples_from_its_global_step():
    """Resumed at step 20 of a 16-example batch, the schedule's growth at sample 400 went unsaid (samples counted
    from 0 reached 320 by step 40); the uninterrupted run hears it at step 26."""
    from types import SimpleNamespace

    from batchtune.schedule import BatchSchedule, ScheduleStage

    schedule = BatchSchedule([ScheduleStage(0, 16, 8, 2, 0.001), ScheduleStage(400, 32, 16, 2, 0.0014)], 1280)
    model, callback = torch.nn.Linear(4, 1), HFCallback(every=4, schedule=schedule)
    args = SimpleNamespace(per_device_train_batch_size=8, gradient_accumulation_steps=2, world_size=1,
                           max_grad_norm=1.0)
    state = SimpleNamespace(global_step=20, is_world_process_zero=True, log_history=[])
    with logged("batchtune.integrations") as messages:
        callback.on_train_begin(args, state, None, model=model)
        _hf_steps(callback, state, model, 10)
    assert callback.watch.grow_warnings == [26] and callback.watch.samples == 30 * 16
    assert messages == ["step 26: the schedule grows the batch to 32 (micro-batch 16 x 2 accumulation, lr 0.0014) "
                        "from sample 400; this run is still at 16 after 416 samples"]


def test_hugging_face_says_once_what_clipping_does_under_ddp_and_when_no_step_was_measured():
    """Under DDP with max_grad_norm=1.0 the reading read 45% high and 0.01 gave no reading, unsaid; a run of 3
    steps at every=8 ended with an empty history, unsaid."""
    from types import SimpleNamespace

    model = torch.nn.Linear(4, 1)
    for world, clip, said in [(2, 1.0, 1), (2, 0.0, 0), (1, 1.0, 0)]:
        args = SimpleNamespace(per_device_train_batch_size=8, gradient_accumulation_steps=2, world_size=world,
                               max_grad_norm=clip)
        with logged("batchtune.integrations") as messages:
            HFCallback(every=1).on_train_begin(args, SimpleNamespace(global_step=0, is_world_process_zero=True),
                                               None, model=model)
        assert len([m for m in messages if "set max_grad_norm=0 for the measurement" in m]) == said
    callback, state = HFCallback(every=8), SimpleNamespace(global_step=0, is_world_process_zero=True)
    with logged("batchtune.integrations") as messages:
        callback.on_train_begin(args, state, None, model=model)
        _hf_steps(callback, state, model, 3)
        callback.on_train_end(args, state, None)
    assert callback.history == [] and messages == ["noise scale: no step was measured, so there is no reading: the "
                                                   "run took 3 optimizer steps and every=8 measures steps 8, 16, ..."]


@pytest.mark.parametrize("make", [NoiseScaleWatch, HFCallback, PLCallback])
@pytest.mark.parametrize("kwargs, message", [
    ({"every": 0}, "every must be >= 1 (None: the default cadence); found every=0"),
    ({"max_examples": 0}, "max_examples must be >= 1 (None: every example); found max_examples=0"),
    ({"warn_every": 0}, "warn_every must be >= 1; found warn_every=0"),
    ({"warn_after": -1}, "warn_after must be >= 0; found warn_after=-1"),
    ({"confidence": 1.0}, "confidence must be in (0, 1); found confidence=1.0"),
    ({"critical_ratio": 0}, "critical_ratio must be a positive number, the critical batch over B_simple; found "
                            "critical_ratio=0"),
    ({"critical_ratio": "10"}, "critical_ratio must be a positive number, the critical batch over B_simple; found "
                               "critical_ratio='10'"),
])
def test_the_callbacks_refuse_arguments_out_of_range_when_made(make, kwargs, message):
    """every=0 was accepted and only logged "noise scale not measured in this run" when training began."""
    with pytest.raises(ValueError) as caught:
        make(**kwargs)
    assert str(caught.value) == message


def test_the_lightning_callback_refuses_a_micro_batch_of_zero():
    """micro_batch_size=0 was taken as "not given" and the DataLoader's size read instead, unsaid."""
    with pytest.raises(ValueError) as caught:
        PLCallback(micro_batch_size=0)
    assert str(caught.value) == "micro_batch_size must be >= 1; found micro_batch_size=0"
    assert PLCallback(micro_batch_size=4).micro_batch_size == 4


@pytest.mark.parametrize("make", [NoiseScaleWatch, HFCallback, PLCallback])
def test_the_callbacks_check_a_schedule_file_as_load_does(tmp_path, make):
    """``schedule=`` takes the same files as BatchSchedule.load, with the same errors: a batch of 0 loaded and
    a lr of "2e-2" crashed in optimizer.step."""
    from batchtune.config.spec import SpecError

    path = tmp_path / "schedule.yaml"
    path.write_text("format: batchtune schedule 1\ntotal_samples: 1000\nstages:\n"
                    "- {start_samples: 0, batch_size: 0, micro_batch_size: 0, accum_steps: 1, lr: 2e-2}\n")
    with pytest.raises(SpecError) as caught:
        make(schedule=str(path))
    assert str(caught.value).splitlines() == [
        "invalid batch schedule (2 problems):",
        f"  {path}:4: stages[0].batch_size: must be positive, got 0",
        f"  {path}:4: stages[0].micro_batch_size: must be positive, got 0"]
    path.write_text(path.read_text().replace("size: 0", "size: 8"))
    made = make(schedule=str(path))
    watch = made if isinstance(made, NoiseScaleWatch) else made.watch
    assert watch.schedule.stages[0].lr == 0.02 and watch.schedule.stages[0].batch_size == 8


@pytest.mark.parametrize("module,library,extra", [("huggingface", "transformers", "hf"),
                                                  ("lightning", "lightning.pytorch", "lightning")])
def test_a_missing_library_names_the_extra_to_install(monkeypatch, module, library, extra):
    import importlib
    import sys

    monkeypatch.setitem(sys.modules, library, None)  # as if not installed
    monkeypatch.delitem(sys.modules, f"batchtune.integrations.{module}")
    with pytest.raises(ImportError, match=rf'pip install "batchtune\[{extra}\]"'):
        importlib.import_module(f"batchtune.integrations.{module}")


def test_the_core_never_imports_the_integrations():
    import subprocess
    import sys

    code = ("import sys, batchtune, batchtune.monitor, batchtune.cli; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'lightning') "
            "or m.startswith('batchtune.integrations')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr
