"""Loading a batch schedule file, as ``batchtune plan --schedule-out`` writes it or as a user edits it."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

from batchtune.config.spec import SpecError
from batchtune.schedule import BatchSchedule, ScheduleStage

_HEAD = "format: batchtune schedule 1\ntotal_samples: 6000\nwarmup_samples: 100\nworld_size: 1\nstages:\n"
_FIRST = "- {start_samples: 0, batch_size: 16, micro_batch_size: 16, accum_steps: 1, lr: 0.01}\n"


def _load(tmp_path, text: str, name: str = "schedule.yaml") -> BatchSchedule:
    path = tmp_path / name
    path.write_text(text)
    return BatchSchedule.load(path)


def _problems(tmp_path, text: str, name: str = "schedule.yaml") -> list[str]:
    with pytest.raises(SpecError) as caught:
        _load(tmp_path, text, name)
    lines = str(caught.value).splitlines()
    assert lines[0].startswith("invalid batch schedule (")
    return [line.strip().replace(str(tmp_path / name), "FILE") for line in lines[1:]]


# The outside user's hand edits of a second stage (line 7): each loaded and hung, crashed later or raised a
# raw TypeError; each is now one line with the file, the key path and the line.
_STAGE_2 = "- {start_samples: 3008, %s}\n"


@pytest.mark.parametrize("stage,expected", [
    ("batch_size: 0, micro_batch_size: 0, accum_steps: 1, lr: 0.02",  # the sampler yielded forever
     ["FILE:7: stages[1].batch_size: must be positive, got 0",
      "FILE:7: stages[1].micro_batch_size: must be positive, got 0"]),
    ("batch_size: 64, micro_batch_size: 32, accum_steps: 2, lr: -0.02",  # accepted silently
     ["FILE:7: stages[1].lr: must be a positive, finite number, got -0.02"]),
    ("batchsize: 64, micro_batch_size: 32, accum_steps: 2, lr: 0.02",  # TypeError: unexpected keyword argument
     ["FILE:7: stages[1].batchsize: unknown key (did you mean 'batch_size'?)",
      "FILE:7: stages[1].batch_size: required key is missing"]),
    ("batch_size: 64, micro_batch_size: 64, lr: 0.02",  # TypeError: missing 1 required positional argument
     ["FILE:7: stages[1].accum_steps: required key is missing"]),
    ("batch_size: 64, micro_batch_size: 32, accum_steps: 2, lr: fast",
     ["FILE:7: stages[1].lr: must be a positive, finite number, got 'fast'"]),
    ("batch_size: 64.5, micro_batch_size: 32, accum_steps: 2, lr: 0.02",
     ["FILE:7: stages[1].batch_size: must be a whole number, got 64.5"]),
    ("batch_size: 48, micro_batch_size: 32, accum_steps: 2, lr: 0.02",
     ["FILE:7: stages[1].batch_size: 48 is not micro-batch 32 × 2 accumulation × 1 ranks = 64"]),
])
def test_a_bad_stage_is_named_with_its_key_path_and_line(tmp_path, stage, expected):
    assert _problems(tmp_path, _HEAD + _FIRST + _STAGE_2 % stage) == expected


def test_a_stage_or_a_warmup_past_the_runs_end_and_a_duplicate_key_are_named(tmp_path):
    """They loaded: a stage at 9,000 of a 6,000-sample run never applied, a warmup of 99,999 left the lr at 6%
    of its value to the end, and a duplicate key was named stages.1.lr where the others say stages[1].lr."""
    text = (_HEAD.replace("warmup_samples: 100", "warmup_samples: 99999") + _FIRST
            + "- start_samples: 9008\n  batch_size: 64\n  micro_batch_size: 64\n  accum_steps: 1\n  lr: 0.02\n"
              "  lr: 1e400\n")
    assert _problems(tmp_path, text) == [
        "FILE:3: warmup_samples: 99999 is not less than the run's 6000 samples (total_samples)",
        "FILE:7: stages[1].start_samples: starts at 9008, past the run's 6000 samples",
        "FILE:12: stages[1].lr: duplicate key (the later value would silently win)",
        "FILE:12: stages[1].lr: must be a positive, finite number, got '1e400'"]


@pytest.mark.parametrize("edit,expected", [
    (("total_samples: 6000", "total_samples: -5"), ["FILE:2: total_samples: must be positive, got -5"]),
    (("world_size: 1", "world_size: 0"), ["FILE:4: world_size: must be positive, got 0"]),
    (("warmup_samples: 100", "warmup_samples: -1"), ["FILE:3: warmup_samples: must be at least 0, got -1"]),
    (("warmup_samples: 100", "warmup: 100"), ["FILE:3: warmup: unknown key (did you mean 'warmup_samples'?)"]),
    (("format: batchtune schedule 1", "format: batchtune schedule 2"),
     ["FILE:1: format: unknown format 'batchtune schedule 2'; this batchtune reads 'batchtune schedule 1'"]),
    (("world_size: 1", "world_size: 1\nworld_size: 2"),
     ["FILE:5: world_size: duplicate key (the later value would silently win)",
      "FILE:7: stages[0].batch_size: 16 is not micro-batch 16 × 1 accumulation × 2 ranks = 32"]),
    (("start_samples: 0", "start_samples: 10"),
     ["FILE:6: stages[0].start_samples: the first stage starts at 0, got 10"]),
])
def test_a_bad_top_level_value_is_named_with_its_line(tmp_path, edit, expected):
    assert _problems(tmp_path, (_HEAD + _FIRST).replace(*edit)) == expected


def test_every_problem_is_listed_at_once(tmp_path):
    text = ("format: batchtune schedule 1\n"
            "total_samples: 3000.5\n"
            "stages:\n"
            "- start_samples: 0\n"
            "  batch_size: 16\n"
            "  micro_batch_size: 16\n"
            "  accum_steps: 1\n"
            "  lr: 0.01\n"
            "- start_samples: 3000\n"
            "  batch_size: 64\n"
            "  micro_batch_size: 32\n"
            "  accum_steps: 2\n"
            "  lr: -1\n"
            "- {start_samples: 2000, batch_size: 64, micro_batch_size: 32, accum_steps: 2, lr: 0.1, extra: 1}\n")
    assert _problems(tmp_path, text) == [
        "FILE:2: total_samples: must be a whole number, got 3000.5",
        "FILE:13: stages[1].lr: must be a positive, finite number, got -1",
        "FILE:14: stages[2].extra: unknown key; a stage has start_samples, batch_size, micro_batch_size, "
        "accum_steps, lr",
        "FILE:14: stages[2].start_samples: stages start in increasing order: 2000 comes after 3000",
    ]


def test_numbers_written_as_yaml_1_1_strings_read_as_the_numbers_meant(tmp_path):
    """PyYAML reads ``2e-2`` and ``6e3`` as strings: lr 2e-2 crashed in optimizer.step (bad operand type for
    unary -: 'str'), total_samples 6e3 raised invalid literal for int(), batch_size "64" said 64 was not 32 × 2."""
    text = (_HEAD.replace("6000", "6e3") + _FIRST
            + '- {start_samples: 3008, batch_size: "64", micro_batch_size: 32, accum_steps: 2, lr: 2e-2}\n'
            + '- {start_samples: 4032, batch_size: 64, micro_batch_size: 32, accum_steps: 2, lr: "1.5e-2"}\n')
    schedule = _load(tmp_path, text)
    assert schedule.total_samples == 6000 and isinstance(schedule.total_samples, int)
    assert [(s.batch_size, s.lr) for s in schedule.stages] == [(16, 0.01), (64, 0.02), (64, 0.015)]
    assert all(isinstance(s.lr, float) and isinstance(s.batch_size, int) for s in schedule.stages)
    assert schedule.lr_at(3500) == 0.02 and schedule.lr_at(5000) == 0.015
    # whole steps: 188 of 16 (to 3008), 16 of 2 x 32 (to 4032), 31 of 2 x 32 (to 6016)
    assert sum(1 for _ in schedule.sampler(1000)) == 188 + 2 * 16 + 2 * 31


def test_a_stage_that_starts_inside_a_step_is_named_with_the_steps_around_it(tmp_path):
    """A hand-edited stage at sample 50 under batches of 24 loaded, and the loop switched at 72."""
    text = (_HEAD.replace("16, micro_batch_size: 16", "24, micro_batch_size: 24") + _FIRST.replace("16", "24")
            + "- {start_samples: 50, batch_size: 64, micro_batch_size: 16, accum_steps: 4, lr: 0.02}\n"
            + "- {start_samples: 264, batch_size: 32, micro_batch_size: 32, accum_steps: 1, lr: 0.02}\n")
    assert _problems(tmp_path, text) == [
        "FILE:7: stages[1].start_samples: 50 is not where a step starts: the batches of 24 before it start steps at "
        "48 and 72 samples",
        "FILE:8: stages[2].start_samples: 264 is not where a step starts: the batches of 64 before it start steps at "
        "242 and 306 samples"]
    aligned = _load(tmp_path, text.replace("start_samples: 50,", "start_samples: 72,"))  # 264 = 72 + 3 x 64
    assert [s.start_samples for s in aligned.stages] == [0, 72, 264]
    # said beside another stage's problem, not one edit later (an outside file's micro-batch 60 and its start)
    both = _problems(tmp_path, text.replace("micro_batch_size: 32, accum_steps: 1", "micro_batch_size: 30, "
                                            "accum_steps: 1"))
    assert len(both) == 3 and both[1].startswith("FILE:8: stages[2].batch_size: 32 is not micro-batch 30 × 1")
    assert both[0].startswith("FILE:7: stages[1].start_samples: 50 is not where a step starts")


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path):
    text = _HEAD + _FIRST + "  - {start_samples: 3000 batch_size: 64}\n"
    assert _problems(tmp_path, text) == [
        "FILE:7: not valid YAML: expected <block end>, but found '<block sequence start>'"]


def test_a_file_that_is_not_a_schedule_says_so(tmp_path):
    assert _problems(tmp_path, "name: my-run\nbase_batch_size: 32\n") == [
        "FILE: not a batch schedule (no stages or total_samples): give a file batchtune plan --schedule-out wrote"]
    assert _problems(tmp_path, "- 1\n- 2\n") == ["FILE: a batch schedule is a mapping with stages and total_samples, "
                                                 "got list"]
    with pytest.raises(SpecError, match=r"nothing.yaml: no such file"):
        BatchSchedule.load(tmp_path / "nothing.yaml")


def test_json_schedules_get_the_same_checks(tmp_path):
    good = BatchSchedule([ScheduleStage(0, 8, 8, 1, 0.1)], total_samples=80).to_dict()
    good["stages"][0]["batch_size"] = 0
    assert _problems(tmp_path, json.dumps(good, indent=2), "s.json") == [
        "FILE: stages[0].batch_size: must be positive, got 0"]
    assert _problems(tmp_path, '{"stages": [\n}', "s.json") == ["FILE:2: not valid JSON: Expecting value"]


def test_a_schedule_built_in_code_is_checked_the_same_way():
    """``ScheduleStage(0, 0, 0, 1, 0.1)`` made a sampler that yielded forever."""
    with pytest.raises(SpecError) as caught:
        BatchSchedule([ScheduleStage(0, 0, 0, 1, 0.1), ScheduleStage(50, 8, 8, 1, math.nan)], total_samples=100)
    assert str(caught.value).splitlines()[1:] == [
        "  BatchSchedule(...): stages[0].batch_size: must be positive, got 0",
        "  BatchSchedule(...): stages[0].micro_batch_size: must be positive, got 0",
        "  BatchSchedule(...): stages[1].lr: must be a positive, finite number, got nan"]
    built = BatchSchedule([ScheduleStage(0, 8, 8, 1, 1)], total_samples=80.0)
    assert built.total_samples == 80 and isinstance(built.total_samples, int) and built.stages[0].lr == 1.0
    assert isinstance(built.stages[0].lr, float)


# ---------------------------------------------------------------------------- the sampler and stage_at

def _grown() -> BatchSchedule:
    """16 × 1 to 160, then 32 × 2 from 160 to 400: steps start at 0, 16, ..., 160, 224, 288, 352 (end 416)."""
    return BatchSchedule([ScheduleStage(0, 16, 16, 1, 0.1), ScheduleStage(160, 64, 32, 2, 0.2)], total_samples=400)


def _step_starts(schedule: BatchSchedule) -> list[int]:
    starts = [0]
    while starts[-1] < schedule.total_samples:
        starts.append(starts[-1] + schedule.batch_size_at(starts[-1]))
    return starts


def test_the_sampler_and_stage_at_refuse_out_of_range_arguments_by_name():
    """``sampler(0)`` never returned (a hang in the user's loop); ``stage_at(-1)`` raised a bare StopIteration."""
    schedule = _grown()
    cases = [(lambda: schedule.sampler(0), "dataset_size must be at least 1, got 0"),
             (lambda: schedule.sampler(100, rank=1), "rank must be below the schedule's world_size 1, got 1"),
             (lambda: schedule.sampler(100, start_samples=-16), "start_samples must be at least 0, got -16"),
             (lambda: schedule.sampler(100.5), "dataset_size must be a whole number, got 100.5"),
             (lambda: schedule.stage_at(-1), "samples must be a count of samples seen, at least 0, got -1"),
             (lambda: schedule.lr_at(math.nan), "samples must be a count of samples seen, at least 0, got nan")]
    for call, message in cases:
        with pytest.raises(ValueError) as caught:
            call()
        assert str(caught.value) == message
    assert schedule.stage_at(0).batch_size == 16 and schedule.stage_at(159.5).batch_size == 16


@pytest.mark.parametrize("world_size, dataset_size", [(1, 50), (1, 7), (2, 50)])
def test_resuming_at_start_samples_yields_exactly_the_uninterrupted_runs_tail(world_size, dataset_size):
    """A run stopped and resumed at a step's ``seen`` takes the micro-batches the whole run takes from there
    (permutations of 50 end inside batches of 16 and 32; 7 is smaller than every micro-batch)."""
    stages = [ScheduleStage(0, 16 * world_size, 16, 1, 0.1),
              ScheduleStage(160 * world_size, 64 * world_size, 32, 2, 0.2)]
    schedule = BatchSchedule(stages, total_samples=400 * world_size, world_size=world_size)
    starts = _step_starts(schedule)
    micro_per_step = [schedule.stage_at(s).accum_steps for s in starts[:-1]]
    for rank in range(world_size):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the data set of 7 warns
            whole = list(schedule.sampler(dataset_size, seed=3, rank=rank))
            for k, start in enumerate(starts):
                resumed = list(schedule.sampler(dataset_size, seed=3, rank=rank, start_samples=start))
                assert resumed == whole[sum(micro_per_step[:k]):], (rank, start)
    assert starts[-1] == 416 * world_size and len(whole) == 10 + 2 * 4


def test_start_samples_where_no_step_starts_is_refused_with_the_steps_around_it():
    schedule = _grown()
    with pytest.raises(ValueError) as caught:
        schedule.sampler(100, start_samples=200)
    assert str(caught.value) == ("start_samples 200 is not where a step starts: the steps around it start at 160 "
                                 "and 224 samples (give the loop's seen at a step's start)")
    with pytest.raises(ValueError) as caught:
        schedule.sampler(100, start_samples=500)
    assert str(caught.value) == ("start_samples 500 is past the run's end: its last step ends at 416 samples "
                                 "(total_samples 400)")
    assert list(schedule.sampler(100, start_samples=416)) == []  # resuming a finished run takes nothing


def test_a_batch_larger_than_the_data_set_warns_once_that_examples_repeat():
    """A data set of 20 under micro-batches of 32 gave batches of 32 indices of which 20 were distinct, unsaid."""
    schedule = _grown()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(schedule.sampler(20))
    assert [str(w.message) for w in caught] == [
        "the data set's 20 examples are fewer than the batch of 64 (micro-batch 32) from sample 160: examples "
        "repeat within a micro-batch"]
    assert len(batches[-1]) == 32 and len(set(batches[-1])) <= 20
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        schedule.sampler(40)
    assert [str(w.message) for w in caught] == [
        "the data set's 40 examples are fewer than the batch of 64 (micro-batch 32) from sample 160: examples "
        "repeat within a batch (across its micro-batches)"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        schedule.sampler(64)


def _two_ranks() -> BatchSchedule:
    return BatchSchedule([ScheduleStage(0, 64, 32, 1, 0.32)], total_samples=640, world_size=2)


def test_a_schedule_for_more_ranks_than_the_run_has_is_refused_where_the_loop_starts():
    """A plan --gpus 4 schedule in a one-process loop counted 200,192 samples while the model saw 50,048, at the
    4-GPU lr, without a word."""
    schedule = _two_ranks()
    message = ("the schedule was planned for world_size 2 (batch 64 = micro-batch 32 × 1 accumulation × 2 ranks, "
               "at lr 0.32) but this process runs alone (torch.distributed is not initialised): each step would "
               "train on 32 samples where the schedule counts 64, at the lr for 64. Launch with torchrun "
               "--nproc-per-node 2, or plan again with --gpus 1")
    for call in (lambda: schedule.sampler(1000), lambda: schedule.set_lr(torch.optim.SGD([torch.zeros(1)]), 0)):
        with pytest.raises(ValueError) as caught:
            call()
        assert str(caught.value) == message
    # a process another launcher placed says which rank it is; lr_at is the pure function
    assert len(list(schedule.sampler(1000, rank=1))) == 10 and schedule.lr_at(640) == 0.32


def test_under_torch_distributed_the_sampler_takes_the_ranks_own_micro_batches(monkeypatch):
    import batchtune.schedule as module

    schedule = _two_ranks()
    monkeypatch.setattr(module.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(module.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(module.dist, "get_rank", lambda: 1)
    assert list(schedule.sampler(1000)) == list(schedule.sampler(1000, rank=1))
    optimizer = torch.optim.SGD([torch.zeros(1)], lr=1.0)
    assert schedule.set_lr(optimizer, 64) == 0.32 and optimizer.param_groups[0]["lr"] == 0.32
    monkeypatch.setattr(module.dist, "get_world_size", lambda: 4)
    with pytest.raises(ValueError, match=r"world_size 2 .* but this run has 4 ranks: each step would train on 128 "
                                         r"samples where the schedule counts 64"):
        schedule.sampler(1000, rank=0)
