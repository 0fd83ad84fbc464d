"""Hangs are stopped, sanity comes before cost, and measurements say when they are not trustworthy."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from typer.testing import CliRunner

from batchtune.cli import app
from batchtune.config.components import build_components
from batchtune.config.spec import load_spec
from batchtune.engine.data import batch_limit
from batchtune.engine.host import LoadMeter, physical_cores, set_threads
from batchtune.engine.shape import BatchShape
from batchtune.engine.trial import Trainer, trial_config
from batchtune.engine.watchdog import TrialTimeout, deadline
from batchtune.memory.device import CPUBackend
from tests.conftest import TINY_SPEC, logged

runner = CliRunner()
HANG = TINY_SPEC.replace("tests.fixtures:tiny_mlp", "tests.fixtures:hang_mlp")
NAN = TINY_SPEC.replace("tests.fixtures:tiny_mlp", "tests.fixtures:nan_mlp")


# ---------------------------------------------------------------------------- the watchdog


def test_a_deadline_interrupts_a_sleep_and_renewing_it_is_progress():
    started = time.monotonic()
    with pytest.raises(TrialTimeout, match="the step did not finish within 0.3 s"):
        with deadline(0.3, "the step"):
            time.sleep(30)
    assert 0.25 < time.monotonic() - started < 1.5
    with deadline(0.3) as watch:  # five 0.1 s steps, renewed after each: never 0.3 s without progress
        for _ in range(5):
            time.sleep(0.1)
            watch.renew()
    assert not watch.fired


def test_nested_deadlines_name_the_one_that_expired_and_restore_what_was_there():
    seen = []
    previous = signal.signal(signal.SIGALRM, lambda *a: seen.append("theirs"))
    try:
        signal.setitimer(signal.ITIMER_REAL, 5.0)  # someone else's timer, running
        with deadline(0.4, "the budget") as outer:
            with pytest.raises(TrialTimeout, match="the budget"):
                with deadline(10, "a step") as inner:
                    time.sleep(30)
        assert outer.fired and not inner.fired
        left, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 3.5 < left < 5.0  # given back, less the time that went by
        assert signal.getsignal(signal.SIGALRM) is not None and seen == []
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_a_fired_deadline_is_not_armed_again_while_its_timeout_is_handled():
    """The inner deadline's exit re-arms the timer for those still active: not for one that fired,
    or a second TrialTimeout lands in the code handling the first (pytest 9.2's raises did)."""
    caught = []
    with deadline(0.2, "the budget") as outer:
        try:
            with deadline(10, "a step"):
                time.sleep(5)
        except TrialTimeout as exc:
            caught.append(str(exc))
            time.sleep(0.1)  # handling it: no second alarm may land here
    assert caught == ["the budget did not finish within 0.2 s"] and outer.fired


def test_a_deadline_off_the_main_thread_does_nothing():
    out = []

    def work():
        with deadline(0.05) as watch:
            time.sleep(0.2)
        out.append(watch)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert out == [None]


def _trainer(write_spec, model: str) -> tuple:
    spec = load_spec(write_spec(TINY_SPEC.replace('"tests.fixtures:tiny_mlp"}', model)), ["device.memory_limit=null"])
    return spec, Trainer(build_components(spec), CPUBackend())


def test_a_trial_is_stopped_when_a_step_makes_no_progress_but_not_when_steps_are_slow(write_spec):
    # four 0.2 s steps under a 0.5 s timeout: each finished step is progress, so 0.8 s in all is fine
    spec, slow = _trainer(write_spec, '"tests.fixtures:slow_mlp", kwargs: {seconds: 0.2}}')
    slow.run(trial_config(spec, BatchShape(8), steps=1))  # the first step in a process imports more
    ok = slow.run(trial_config(spec, BatchShape(8), steps=4, timeout=0.5))
    assert not ok.timed_out and ok.steps == 4 and ok.train_seconds > 0.75, ok.error
    spec, stuck = _trainer(write_spec, '"tests.fixtures:hang_mlp", kwargs: {after: 3}}')
    started = time.monotonic()
    result = stuck.run(trial_config(spec, BatchShape(8), steps=10, timeout=0.5))
    assert result.timed_out and result.steps == 3 and result.fits
    assert result.error == "the training step at batch 8 did not finish within 0.5 s"
    assert time.monotonic() - started < 2.0
    assert trial_config(spec, BatchShape(8)).timeout == 600  # the spec's default


# ---------------------------------------------------------------------------- every command ends


def _timed(args):
    started = time.monotonic()
    result = runner.invoke(app, args)
    return result, time.monotonic() - started


@pytest.mark.parametrize("command", [["probe"], ["check", "-b", "32"], ["noise", "--steps", "20"]])
def test_a_forward_that_never_returns_ends_probe_check_and_noise_with_exit_2(write_spec, command):
    result, seconds = _timed([command[0], str(write_spec(HANG)), *command[1:], "--trial-timeout", "1", "-q"])
    assert result.exit_code == 2, result.output
    assert "did not finish within 1 s (trial_timeout)" in result.output and "Traceback" not in result.output
    assert seconds < 4


def test_check_max_seconds_covers_the_fits_run(write_spec):
    result, seconds = _timed(["check", str(write_spec(HANG)), "-b", "32", "--max-seconds", "2", "-q"])
    # inside the fits trial, or (on a loaded machine) before it starts: both name the budget
    assert result.exit_code == 2, result.output
    assert ("--max-seconds 2: " in result.output and "all that was left of it after 1.5 s kept for start-up and "
            "output; give the check more time" in result.output
            or "the check did not finish within its --max-seconds 2" in result.output
            or "--max-seconds 2 ran out before the first training step finished: loading" in result.output), \
        result.output
    assert "never returns" not in result.output  # the budget ran out, not necessarily the forward
    assert seconds < 3.5


def test_a_sweep_records_a_timed_out_trial_and_goes_on(write_spec, tmp_path):
    spec = write_spec(HANG)
    out = tmp_path / "run"
    result, seconds = _timed(["sweep", str(spec), "sweep.ceiling=64", "sweep.batch_sizes=[8, 16]", "sweep.seeds=1",
                              "sweep.lr_multipliers=[1]", "sweep.samples=64", "sweep.max_seconds_per_trial=0.3",
                              "--out", str(out), "-f", "json"])
    rows = json.loads((out / "trials.json").read_text())
    assert {r["batch_size"] for r in rows} == {8, 16}  # every size ran: the first hang did not end the sweep
    assert all(r["error"] == f"the training step at batch {r['batch_size']} did not finish within 0.3 s"
               for r in rows)
    assert result.exit_code == 1  # nothing to recommend
    assert seconds < 0.3 * len(rows) + 8  # start-up, the report and its plot included: no 600 s wait


# ---------------------------------------------------------------------------- sanity before cost


def test_batches_are_capped_at_the_training_set_and_it_is_said(write_spec):
    small = write_spec(TINY_SPEC.replace('tiny_data"}', 'tiny_data", kwargs: {n_train: 10}}'))
    probe = runner.invoke(app, ["probe", str(small), "-q", "-f", "json"])
    data = json.loads(probe.output)
    assert probe.exit_code == 0 and data["ceiling"] == 10 and data["safe_batch_size"] <= 10
    assert any("the training set has 10 samples" in n for n in data["notes"])
    check = runner.invoke(app, ["check", str(small), "-b", "100000000", "-q", "-f", "json"])
    report = json.loads(check.output)
    assert report["batch_size"] == 10
    assert "batch 100,000,000 is larger than the training set (10 samples): checked at 10" in report["notes"][0]
    # a CI gate is not passed for a batch that never ran (an outside check 'PASS'ed 128 on 50 samples, exit 0)
    fits = next(c for c in report["checks"] if c["name"] == "fits")
    assert (fits["status"], fits["code"], fits["figures"]["checked"]) == ("warn", "fits.unrun", 10), fits


def test_a_batch_host_memory_cannot_collate_is_refused_before_any_work(write_spec):
    huge = TINY_SPEC.replace('tests.fixtures:tiny_data"}', 'tests.fixtures:huge_data"}').replace(
        'tiny_mlp"}', 'tiny_mlp", kwargs: {in_features: 1024}}')
    result, seconds = _timed(["check", str(write_spec(huge)), "-b", "100000000", "-q"])
    assert result.exit_code == 2 and "of host memory to collate (4.0 KiB per sample" in result.output, result.output
    assert seconds < 3


def test_batch_limit_reads_one_sample():
    from tests.fixtures import huge_data, tiny_data

    limit = batch_limit(huge_data(in_features=256)[0])
    assert limit.bytes_per_sample == 256 * 4 + 8 and limit.reason == "host"
    assert limit.batch_size == limit.available_bytes // (2 * limit.bytes_per_sample)
    small = batch_limit(tiny_data(n_train=10)[0])
    assert (small.batch_size, small.reason, small.samples) == (10, "data", 10)


def nan_data(**kwargs):
    from tests.fixtures import tiny_data

    train, val = tiny_data(**kwargs)
    train.tensors[0][1, 3] = float("nan")
    return train, val


def nan_loss():
    """A loss that is NaN whatever the model's (finite) outputs."""
    return lambda output, targets: output.sum() * float("nan")


def test_a_nan_loss_before_any_step_is_bad_input_in_noise_and_probe(write_spec):
    """A model whose loss is NaN before any step is bad input (no lr made it so); validate says so first."""
    noise = runner.invoke(app, ["noise", str(write_spec(NAN)), "--steps", "10", "-q"])
    assert noise.exit_code == 2, noise.output
    model_said = ("spec.yaml:2: model: the model's initial output on the first 2 training samples is not finite (NaN "
                  "or inf) before any training step, from finite inputs, and the loss on them is nan: the model, not "
                  "the lr")
    assert model_said in noise.stderr  # named as validate names it (was 'the model's initial output, the loss or ...')
    validate = runner.invoke(app, ["validate", str(write_spec(NAN))])
    assert validate.exit_code == 2 and model_said in validate.stderr
    # a NaN in the data itself is the data's to fix, said so
    nan_data = TINY_SPEC.replace("tests.fixtures:tiny_data", "tests.test_hangs:nan_data")
    validate = runner.invoke(app, ["validate", str(write_spec(nan_data))])
    assert validate.exit_code == 2 and ("data: the first 2 training samples hold values that are not finite (NaN or "
                                        "inf), and the loss on them is nan: clean the data") in validate.stderr
    # probe too (it had exited 0 with a 'safe batch size' and a note): a NaN before any step is bad input, not a
    # verdict on memory, and CI stops there
    probe = runner.invoke(app, ["probe", str(write_spec(NAN)), "-q", "-f", "json"])
    assert probe.exit_code == 2 and model_said in probe.stderr, probe.output
    assert json.loads(probe.stdout)["exit_code"] == 2 and model_said in json.loads(probe.stdout)["error"]


def test_a_nan_loss_of_finite_outputs_is_the_losss_to_fix(write_spec):
    """An outside loss that returned NaN of a model's finite outputs was named at model: ('the model's initial output
    or the loss function'): the loss is named, at its own line."""
    spec = write_spec(TINY_SPEC + 'loss: {target: "tests.test_hangs:nan_loss"}\n')
    said = (f"{spec}:7: loss.target: the loss on the first 2 training samples is nan before any training step, from "
            "the model's finite outputs (and finite inputs): the loss function, not the model or the lr")
    validate = runner.invoke(app, ["validate", str(spec)])
    assert validate.exit_code == 2 and validate.stderr.splitlines()[1].strip() == said
    probe = runner.invoke(app, ["probe", str(spec), "-q"])  # had exited 0, noting 'the loss was not finite'
    assert probe.exit_code == 2 and probe.stderr.splitlines()[1].strip() == (
        f"{spec}:7: loss.target: the loss returned nan from finite model outputs at step 1, before any update: the "
        "loss function, not the lr"), probe.output
    # a model whose outputs go non-finite once training has begun leaves the memory figures standing: a note, exit 0
    later = write_spec(TINY_SPEC.replace("tests.fixtures:tiny_mlp", "tests.test_hangs:nan_later_mlp"))
    probe = runner.invoke(app, ["probe", str(later), "-q", "-f", "json", "model.kwargs={after: 1}"])
    assert probe.exit_code == 0, probe.output
    assert [n.split(" (")[0] for n in json.loads(probe.stdout)["notes"] if "not finite" in n] == [
        "the loss was not finite in 5 of 7 trials"], probe.stdout  # later trials start from NaN weights


def test_a_loss_that_overflows_on_huge_finite_outputs_names_the_model_and_the_loss(write_spec):
    """A naive exp-then-log loss of a model whose outputs start near 1e4 read 'loss.target: ... the loss function':
    the outputs are the model's, and the largest is said, with both keys."""
    spec = write_spec(TINY_SPEC.replace("tests.fixtures:tiny_mlp", "tests.fixtures:huge_output_mlp")
                      + 'loss: {target: "tests.fixtures:naive_softmax_loss"}\n')
    advice = (r"the model's outputs are finite but huge \(largest \|output\| ([0-9.e+]+); exp overflows float32 past "
              r"88\.7\): scale down the model's initial outputs \(model\) or make the loss \(loss\.target\) take "
              r"them without overflowing \(log_softmax or logsumexp, not exp then log\); not the lr")
    validate = runner.invoke(app, ["validate", str(spec)])  # the first 2 samples, through first_loss
    said = re.fullmatch(rf"{re.escape(str(spec))}:2: model: the loss on the first 2 training samples is nan before "
                        rf"any training step: {advice}", validate.stderr.splitlines()[1].strip())
    assert validate.exit_code == 2 and said and 1e4 < float(said[1]) < 1e6, validate.stderr
    check = runner.invoke(app, ["check", str(spec), "-b", "32", "-q"])  # the fits run's first step
    said = re.fullmatch(rf"{re.escape(str(spec))}:2: model: the loss returned nan at step 1, before any update: "
                        rf"{advice}", check.stderr.splitlines()[1].strip())
    assert check.exit_code == 2 and said and 1e4 < float(said[1]) < 1e6, check.stderr


def nan_after(after: int, value: str = "nan"):
    """Cross entropy, NaN (or ``value``, "inf") from its ``after``-th call with gradients on (the first steps of a run
    are finite), whatever the outputs: an arithmetic of the loss's own (an outside -log(softmax(50 × outputs)) went
    inf at step 2 on outputs within ±1)."""
    calls = [0]

    def loss(output, targets):
        calls[0] += 1
        ce = torch.nn.functional.cross_entropy(output, targets)
        return ce * float(value) if calls[0] > after and torch.is_grad_enabled() else ce

    return loss


def test_an_inf_loss_of_small_finite_outputs_is_said_to_be_the_losss(write_spec):
    """An outside -log(softmax(50 × outputs)) went inf at step 2 on outputs within ±1 and check said only 'diverged
    at lr 0.1: non-finite loss at step 2' (cross_entropy trained at that lr): an inf was taken for the outputs'
    overflow, the lr's, however small they were."""
    spec = write_spec(TINY_SPEC + 'loss: {target: "tests.test_hangs:nan_after", kwargs: {after: 8, value: inf}}\n')
    check = runner.invoke(app, ["check", str(spec), "-b", "32", "-q"])  # after the fits run's passes
    said = " ".join(check.stdout.split())
    assert check.exit_code == 1 and "non-finite loss at step 2 from finite model outputs (largest |output| " in said
    assert "): the loss function made it (a log, exp or division that overflows as the outputs grow" in said, said


def nan_later_data(**kwargs):
    """tiny_data with one NaN in training sample 5 (the first two, which validate reads, are finite)."""
    from tests.fixtures import tiny_data

    train, val = tiny_data(**kwargs)
    train.tensors[0][5, 3] = float("nan")
    return train, val


def test_a_nan_in_the_data_met_in_training_is_named_not_blamed_on_the_lr(write_spec, tmp_path):
    """One NaN sample made every outside sweep trial 'diverge', down to 32x below the lowest lr, and the sweep said
    'the lr is too high'; check said 'diverged at lr 0.002'. The data is looked at once a loss is not finite, and
    what it finds is bad input, exit 2 in every command (a later outside check failed 'trains', exit 1), on data's
    line; a sweep keeps the trials that finished."""
    spec = write_spec(TINY_SPEC.replace("tests.fixtures:tiny_data", "tests.test_hangs:nan_later_data")
                      + "sweep: {min_batch_size: 32, max_batch_size: 64, samples: 1024, seeds: 1}\n")
    said = "1 training sample holds NaN or inf (index 5, of its 512 samples): the data, not the lr; clean it"
    check = runner.invoke(app, ["check", str(spec), "-b", "32", "-q", "-f", "json"])
    assert check.exit_code == 2, check.output
    error = json.loads(check.stdout)["error"]
    assert f"{spec}:3: data: the loss went nan at step " in error and error.endswith(said), error
    sweep = runner.invoke(app, ["sweep", str(spec), "--out", str(tmp_path / "run"), "-q"])
    assert sweep.exit_code == 2 and said in sweep.stderr and "the lr is too high" not in sweep.output
    noise = runner.invoke(app, ["noise", str(spec), "-b", "32", "--steps", "40", "-q"])
    assert noise.exit_code == 2 and said in noise.stderr


def test_nonfinite_samples_reads_tensors_at_once_and_other_sets_within_its_time():
    from batchtune.engine.data import nonfinite_samples

    x = torch.zeros(100, 3)
    x[[7, 40, 41, 90], 1] = torch.tensor([float("nan"), float("inf"), float("-inf"), float("nan")])
    found = nonfinite_samples(torch.utils.data.TensorDataset(x, torch.zeros(100, dtype=torch.long)))
    assert found == (([7, 40, 41], 4, 100, 100)) and "index 7, 40, 41, ..." in found.text()
    samples = [{"x": row, "label": 0} for row in x]  # a plain list of dicts: read one by one
    assert nonfinite_samples(samples, show=5) == ([7, 40, 41, 90], 4, 100, 100)
    assert nonfinite_samples(samples, seconds=-1) is None  # out of time before the first sample: nothing read
    from batchtune.engine.data import NonFinite

    assert NonFinite([7], 1, 50, 100).text().startswith("1 training sample holds NaN or inf (index 7, in the first 50 "
                                                        "of its 100 samples)")
    assert nonfinite_samples(torch.utils.data.TensorDataset(torch.ones(10, 2))) is None


# ---------------------------------------------------------------------------- the machine


def test_threads_are_set_deliberately_and_recorded(write_spec, monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert set_threads() == (physical_cores(), "physical cores")
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert set_threads() == (1, "OMP_NUM_THREADS") and torch.get_num_threads() == 1
        assert set_threads(2) == (2, "device.threads") and torch.get_num_threads() == 2
        check = runner.invoke(app, ["check", str(write_spec()), "-b", "32", "device.threads=1", "-q", "-f", "json"])
        device = json.loads(check.output)["device"]
        assert (device["threads"], device["threads_from"]) == (1, "device.threads")
    finally:
        torch.set_num_threads(before)


def test_more_threads_than_cpus_is_warned():
    """An outside check ran device.threads 16 on 2 CPUs without a word; its JSON recorded contention 0.875."""
    import os

    cpus, before = len(os.sched_getaffinity(0)), torch.get_num_threads()
    try:
        with logged("batchtune.engine.host") as messages:
            set_threads(cpus)
            assert not messages
            set_threads(cpus + 1)
        assert messages == [
            f"device.threads {cpus + 1} is more than the {cpus} CPUs this process may run on: the threads take turns "
            "on them, so throughput (and any comparison of it, such as check --baseline) reads low and unsteady; give "
            f"device.threads {cpus} or fewer"]
    finally:
        torch.set_num_threads(before)


SPIN = "import time\nt = time.time()\nwhile time.time() - t < {seconds}: pass"
# a launcher that starts a spinner and waits for it: the spinner is our grandchild, not our child
LAUNCH = ("import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', {spin!r}]).wait()")


def test_other_work_on_the_machine_is_measured():
    meter = LoadMeter.start()
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCH.format(spin=SPIN.format(seconds=0.8))])
    launcher.wait()
    reading = meter.reading(threads=len(__import__("os").sched_getaffinity(0)))
    assert reading["other_cores"] is not None and reading["other_cores"] > 0.5  # the spinner's core, at least
    assert reading["busy"] is True


def test_the_jobs_other_ranks_and_its_own_workers_are_not_other_work(monkeypatch):
    """Under torchrun the ranks on one machine are the agent's children: a 2-rank sweep on 2 cores read
    its other rank as 1.4 cores of other work and flagged every trial busy. Here a launcher of ours stands in
    for the agent, its spinner for the other rank. A child of ours (a DataLoader worker) is ours too: an outside
    check with loader workers read them as other work."""
    import os
    import signal
    import time

    import batchtune.engine.host as host

    def spinning(code: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", code], start_new_session=True)

    plain = LoadMeter.start()
    launcher = spinning(LAUNCH.format(spin=SPIN.format(seconds=5)))
    try:
        time.sleep(0.3)  # the spinner started
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        monkeypatch.setattr(os, "getppid", lambda: launcher.pid)
        job = LoadMeter.start()
        time.sleep(1.0)
        as_rank = job.reading(threads=1)
        monkeypatch.delenv("LOCAL_WORLD_SIZE")
        alone = plain.reading(threads=1)
    finally:
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()
    monkeypatch.undo()
    assert (as_rank["ranks"], alone["ranks"]) == (2, 1)
    assert alone["other_cores"] - as_rank["other_cores"] > 0.3  # the spinner's share, counted only without ranks
    worker = spinning(SPIN.format(seconds=5))
    try:
        time.sleep(0.3)
        mine, blind = LoadMeter.start(), LoadMeter.start()
        time.sleep(1.0)
        ours = mine.reading(threads=1)
        monkeypatch.setattr(host, "_sibling_seconds", lambda: {})
        blind.siblings = {}
        others = blind.reading(threads=1)
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
    assert others["other_cores"] - ours["other_cores"] > 0.3  # the worker's share, ours when it is our child


def test_malloc_is_held_steady_unless_the_user_chose(monkeypatch):
    """glibc's dynamic mmap threshold made a step's time depend on what ran before it (check 16,000 against
    the sweep's 21,000-23,000 samples/s on one outside job): every command fixes it, once."""
    import ctypes

    from batchtune.engine import host

    monkeypatch.setattr(host, "_steady", None)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert host.steady_malloc() is False  # the user's own setting stands
    monkeypatch.setattr(host, "_steady", None)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    try:
        ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        pytest.skip("not glibc")
    assert host.steady_malloc() is True and host.steady_malloc() is True
    # a CPU job's timings are steady malloc's: the user's job is told the environment that matches them (an outside
    # autoencoder stepped at 5,262 samples/s in the sweep, 3,499-4,213 in its own loop, 5,769 with the thresholds)
    note = host.malloc_note("cpu")
    assert note.endswith("start yours with MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=134217728 in its "
                         "environment to train at the speeds measured here")
    assert host.malloc_note("cuda") is None
    monkeypatch.setattr(host, "_steady", False)  # off glibc, or the user's own setting: nothing to match
    assert host.malloc_note("cpu") is None


class _NaNLater(torch.nn.Module):
    """tiny_mlp whose outputs turn NaN from its ``after``-th training forward: weights gone bad, as an lr does."""

    def __init__(self, after: int) -> None:
        super().__init__()
        from tests.fixtures import tiny_mlp

        self.net, self.after, self.calls = tiny_mlp(), after, 0

    def forward(self, x):
        self.calls += torch.is_grad_enabled()
        return self.net(x) * (float("nan") if self.calls > self.after else 1.0)


def nan_later_mlp(after: int = 8) -> torch.nn.Module:
    return _NaNLater(after)


def test_a_nan_loss_of_finite_outputs_in_training_is_the_losss_not_the_lrs(write_spec):
    """An outside loss that returned NaN after its 20th call read 'diverged: non-finite loss at step 1 ... or lower
    optimizer.lr' in noise and 'diverged at lr 0.00424' in check: the model's outputs of that step were finite, so
    it is the loss's to fix, exit 2 in every command. A NaN that comes with NaN outputs stays a divergence."""
    spec = write_spec(TINY_SPEC + 'loss: {target: "tests.test_hangs:nan_after", kwargs: {after: 8}}\n')
    said = f"{spec}:7: loss.target: the loss returned nan from finite model outputs at step 1, before any update: " \
        "the loss function, not the lr"
    noise = runner.invoke(app, ["noise", str(spec), "--steps", "10", "-q"])  # its steps run 8 passes
    assert noise.exit_code == 2 and noise.stderr.splitlines()[1].strip() == said, noise.output
    # at a later step the lr may have grown the outputs until the loss overflowed: a divergence (a sweep goes on from
    # it), said to be the loss's
    check = runner.invoke(app, ["check", str(spec), "-b", "32", "-q"])  # after the fits run's passes
    said = " ".join(check.stdout.split())
    assert check.exit_code == 1 and "non-finite loss at step 2 from finite model outputs (largest |output| " in said
    assert ("): the loss function made it (a log, exp or division that overflows as the outputs grow, or a bug in "
            "it)") in said, check.output
    outputs = write_spec(TINY_SPEC.replace("tests.fixtures:tiny_mlp", "tests.test_hangs:nan_later_mlp")
                         + 'loss: {target: "tests.test_hangs:nan_after", kwargs: {after: 1000}}\n')
    noise = runner.invoke(app, ["noise", str(outputs), "--steps", "10", "-q"])
    assert noise.exit_code == 1 and "diverged: non-finite loss at step 3. No noise scale" in noise.stdout, noise.output


class _TokenBag(torch.nn.Module):
    """Tokens in, classes out: an embedding of ``vocab`` rows, mean-pooled."""

    def __init__(self, vocab: int = 16, classes: int = 4) -> None:
        super().__init__()
        self.emb, self.head = torch.nn.Embedding(vocab, 8), torch.nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(x).mean(1))


def token_bag(**kwargs):
    return _TokenBag(**kwargs)


def tokens_past_the_vocabulary(n: int = 512, bad: int = 300):
    """Token ids 0..15 for a vocabulary of 16, but sample ``bad`` holds 16 (neither the first two nor validate's
    spread of samples hold it)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 16, (n, 6), generator=g)
    x[bad, 2] = 16
    y = torch.randint(0, 4, (n,), generator=g)
    return torch.utils.data.TensorDataset(x, y), torch.utils.data.TensorDataset(x[:64].clamp(max=15), y[:64])


def test_an_embedding_index_past_the_vocabulary_names_the_sample_and_the_id(write_spec):
    """An outside token id 64 for a vocabulary of 64 failed every command with 'a training step at micro-batch 64 × 1
    raised IndexError: index out of range in self', naming no sample or key."""
    spec = write_spec(TINY_SPEC.replace("tests.fixtures:tiny_mlp", "tests.test_hangs:token_bag")
                      .replace("tests.fixtures:tiny_data", "tests.test_hangs:tokens_past_the_vocabulary"))
    out = runner.invoke(app, ["check", str(spec), "-b", "32", "-q"])
    assert out.exit_code == 2, out.output
    assert f"{spec}:3: data: training sample 300 (of 512) holds index 16 in its inputs, past the model's embedding " \
           "of 16 rows (indices 0 to 15): the step raised IndexError: index out of range in self" in out.stderr
    # validate, whose first samples hold it, says the same on data (it said 'model: ... raised IndexError')
    first = write_spec(spec.read_text().replace('vocabulary"}', 'vocabulary", kwargs: {bad: 1}}'), name="first.yaml")
    said = runner.invoke(app, ["validate", str(first)])
    assert said.exit_code == 2 and f"{first}:3: data: training sample 1 (of 512) holds index 16 in its inputs" \
        in said.output, said.output
    from batchtune.engine.data import index_past

    x = torch.zeros(10, 3, dtype=torch.long)
    x[7, 1] = -1
    assert index_past(torch.utils.data.TensorDataset(x, torch.zeros(10)), 16) == (7, -1)
    assert index_past([(torch.tensor([1, 20]), 0)], 16) == (0, 20)  # read sample by sample
    assert index_past([(torch.tensor([1, 2]), 99)], 16) is None  # the targets are not inputs
