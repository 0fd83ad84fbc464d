"""The probe finds the exact ceiling in few trials, on synthetic curves and real trials."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

import batchtune.config.components
from batchtune.commands.probe import run_probe, run_probe_estimate, safe_size
from batchtune.config.components import build_components
from batchtune.config.spec import load_spec
from batchtune.engine.distributed import DistContext
from batchtune.engine.shape import BatchShape
from batchtune.engine.trial import Trainer, TrialConfig
from batchtune.memory.device import CPUBackend
from batchtune.memory.model import fit_memory_model
from batchtune.memory.search import (
    GROWTH_BISECT,
    MODEL_GUIDED,
    Measurement,
    SearchSpace,
    choose_search,
    double_then_bisect,
    grow_then_bisect,
    lightning_binsearch,
    model_guided_search,
    search_ceiling,
    seeded_search,
    shrink_from_above,
)
from batchtune.memory.source import MemorySource
from batchtune.render.probe import render_probe
from batchtune.render.text import format_bytes
from tests.conftest import TINY_SPEC


BN_NOTE = ("probe.min_batch_size 2: on one sample the model's BatchNorm 1 (input (1, 32)) sees one value per channel "
           "(no length or image axis), which cannot train ('Expected more than 1 value per channel')")


def _curve(fixed: int, per_sample: int, capacity: int, wobble: float = 0.0):
    calls = []

    def measure(b: int) -> Measurement:
        calls.append(b)
        peak = int(fixed + per_sample * b + wobble * per_sample * math.sin(b))
        return Measurement(peak <= capacity, peak if peak <= capacity else None)

    return measure, calls


# ceiling, granularity, wobble (share of per-sample bytes), most trials allowed
CASES = [
    (37, 1, 0.0, 6), (100, 1, 0.0, 6), (1000, 1, 0.0, 6), (3000, 1, 0.0, 6), (20000, 1, 0.0, 5),
    (1000, 8, 0.0, 5), (20000, 64, 0.0, 5), (1000, 1, 0.3, 6), (3000, 1, 0.3, 6), (5, 1, 0.0, 5),
]


@pytest.mark.parametrize("ceiling,granularity,wobble,most", CASES)
def test_model_guided_search_is_exact_and_cheap(ceiling, granularity, wobble, most):
    fixed, per = 3_000_000, 10_000
    capacity = fixed + per * ceiling + per // 2
    measure, calls = _curve(fixed, per, capacity, wobble)
    out = model_guided_search(measure, min_batch_size=granularity, max_batch_size=1 << 20, granularity=granularity,
                              capacity_bytes=capacity, baseline_bytes=1_000_000)
    exact = (ceiling // granularity) * granularity
    assert out.ceiling == exact
    assert len(calls) <= most
    # exactness is proven by the log: the ceiling fit and one granule more did not
    runs = {b: m.fits for b, _, m in out.phases}
    assert runs[exact] is True and runs[exact + granularity] is False


# an exact estimate costs 2 trials; one k granules off about 2·log2(k) + 2 (galloping, then bisecting)
@pytest.mark.parametrize("guess,most", [(1000, 2), (1001, 2), (999, 4), (1010, 8), (990, 8), (1500, 18),
                                         (500, 18), (10, 20)])
def test_a_search_seeded_by_an_estimate_is_exact_in_two_trials_when_the_estimate_is(guess, most):
    fixed, per = 3_000_000, 10_000
    measure, calls = _curve(fixed, per, fixed + per * 1000 + per // 2)
    out = seeded_search(measure, guess=guess, min_batch_size=1, max_batch_size=1 << 20, granularity=1)
    assert out.ceiling == 1000 and len(calls) <= most
    runs = {b: m.fits for b, _, m in out.phases}
    assert runs[1000] is True and runs[1001] is False


# guess → most trials with the estimate's slope exact, 10% high, 20% low (capacity known)
@pytest.mark.parametrize("guess,most", [(1000, (2, 2, 2)), (999, (3, 3, 3)), (990, (3, 4, 4)), (500, (3, 4, 4)),
                                        (10, (3, 4, 4)), (1500, (5, 6, 6)), (5000, (6, 7, 7))])
def test_a_seeded_search_corrects_the_guess_from_a_measured_peak(guess, most):
    fixed, per = 3_000_000, 10_000
    capacity = fixed + per * 1000 + per // 2
    for slope, allowed in zip((10_000, 11_000, 8_000), most):
        measure, calls = _curve(fixed, per, capacity)
        out = seeded_search(measure, guess=guess, min_batch_size=1, max_batch_size=1 << 20, granularity=1,
                            capacity_bytes=capacity, per_sample_bytes=slope)
        assert out.ceiling == 1000 and len(calls) <= allowed, (slope, calls)


@pytest.mark.parametrize("guess,slope", [(3000, 3000), (14000, 700), (100000, 100)])
def test_a_seeded_search_recovers_from_an_estimate_far_too_high(guess, slope):
    # memory the trace cannot see: the estimate's ceiling 3-100x too high, its slope as far too low
    fixed, per = 3_000_000, 10_000
    capacity = fixed + per * 1000 + per // 2
    measure, calls = _curve(fixed, per, capacity)
    out = seeded_search(measure, guess=guess, min_batch_size=1, max_batch_size=1 << 20, granularity=1,
                        capacity_bytes=capacity, per_sample_bytes=slope)
    assert out.ceiling == 1000 and len(calls) == 10 and calls[-2:] == [1000, 1001]  # 10-38 before


def test_a_seeded_search_whose_last_correction_missed_predicts_from_its_two_fits_before_galloping():
    """An outside LSTM (estimate 5.7x high, slope 6.8x low): the corrections ended with 171 fitting and 735 out of
    memory, then galloped up from 171 one granule, two, four...: 26 trials for a ceiling of 719. The two fits'
    line predicts it: 12. Memory here bends at small sizes (a floor below 30 samples), as the LSTM's did."""
    capacity = 32 * 2**20

    def peak(b):
        return 75264 + 46490 * b + (60000 if b < 30 else 0) + 500 * min(b, 40)

    calls = []

    def measure(b):
        calls.append(b)
        return Measurement(peak(b) <= capacity, peak(b) if peak(b) <= capacity else None)

    out = seeded_search(measure, guess=4096, min_batch_size=1, max_batch_size=4096, granularity=1,
                        capacity_bytes=capacity, per_sample_bytes=6861)
    assert out.ceiling == 719 and len(calls) == 12 and calls[-3:] == [171, 719, 720], calls


def test_a_seeded_search_says_when_nothing_fits_or_the_cap_does():
    measure, calls = _curve(3_000_000, 10_000, 1_000_000)
    assert seeded_search(measure, guess=50, min_batch_size=1, max_batch_size=100, granularity=1).ceiling is None
    measure, calls = _curve(3_000_000, 10_000, 1_000_000)
    out = seeded_search(measure, guess=50, min_batch_size=1, max_batch_size=100, granularity=1,
                        capacity_bytes=1_000_000, per_sample_bytes=10_000)
    assert out.ceiling is None and calls == [50, 45, 25, 1]  # each size tried once
    measure, calls = _curve(0, 1, 10**9)
    out = seeded_search(measure, guess=90, min_batch_size=1, max_batch_size=100, granularity=1)
    assert out.ceiling == 100 and out.capped


def test_probe_from_the_estimate_finds_the_same_ceiling_in_two_search_trials(write_spec):
    spec = load_spec(write_spec(), ["probe.from_estimate=true"])
    seeded = run_probe(spec)
    plain = run_probe(load_spec(write_spec()))
    assert seeded.strategy == "estimate-seeded" and seeded.ceiling == plain.ceiling
    assert seeded.safe_batch_size == plain.safe_batch_size
    searched = [t for t in seeded.trials if t.phase != "confirm"]
    assert [t.fits for t in searched] == [True, False] and len(plain.trials) > len(seeded.trials)
    agreement = seeded.estimate["vs_measured"]
    assert agreement["estimated_ceiling"] == agreement["measured_ceiling"] == seeded.ceiling
    assert abs(agreement["peak_error"]) < 0.01 and not any("disagree" in n for n in seeded.notes)


class _RealOnlyWorkspace(torch.nn.Module):
    """Keeps a 2 KiB-per-sample workspace for backward on real tensors only: memory a trace cannot see."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch._subclasses.fake_tensor import is_fake

        y = self.net(x)
        if not is_fake(x):
            y = y + (torch.ones(x.shape[0], 512) * self.scale).mean(1, keepdim=True)  # saved for backward
        return y


def real_only_workspace() -> torch.nn.Module:
    return _RealOnlyWorkspace()


def test_probe_from_the_estimate_says_when_the_measurement_disagrees(write_spec):
    overrides = ["model.target=tests.test_probe:real_only_workspace", "device.memory_limit=400KiB",
                 "data.kwargs.n_train=4096"]
    seeded = run_probe(load_spec(write_spec(), overrides + ["probe.from_estimate=true"]))
    plain = run_probe(load_spec(write_spec(), overrides))
    assert seeded.ceiling == plain.ceiling  # the search corrects the estimate: still exact
    agreement = seeded.estimate["vs_measured"]
    assert agreement["estimated_ceiling"] > 2 * seeded.ceiling and agreement["peak_error"] < -0.3
    (note,) = [n for n in seeded.notes if "disagree" in n]
    assert f"estimated ceiling {agreement['estimated_ceiling']}, measured {seeded.ceiling}" in note


def test_classic_searches_for_comparison():
    fixed, per = 3_000_000, 10_000
    capacity = fixed + per * 1000 + per // 2
    measure, calls = _curve(fixed, per, capacity)
    assert double_then_bisect(measure, min_batch_size=1, max_batch_size=1 << 20, granularity=1).ceiling == 1000
    assert len(calls) == 20
    measure, calls = _curve(fixed, per, capacity)
    out = shrink_from_above(measure, start=4096, min_batch_size=1, granularity=1)
    assert out.ceiling == 933  # 4096·0.9^14, floored each step: within 10% of 1000, not exact
    assert len(calls) == 15


def test_nothing_fits_and_capped():
    measure, _ = _curve(10_000, 100, 5_000)
    assert model_guided_search(measure, min_batch_size=1, max_batch_size=64, granularity=1,
                               capacity_bytes=5_000).ceiling is None
    measure, calls = _curve(10_000, 100, 10**9)
    out = model_guided_search(measure, min_batch_size=1, max_batch_size=64, granularity=1, capacity_bytes=10**9)
    assert (out.ceiling, out.capped) == (64, True)


def test_memory_model_fit_and_safe_size():
    model = fit_memory_model([10, 20, 40], [1100, 1200, 1400])
    assert (model.fixed_bytes, model.per_sample_bytes, model.r2) == pytest.approx((1000, 10, 1.0))
    assert model.max_batch_size(2000) == pytest.approx(100)
    # 10% headroom of 2000 bytes: peak <= 1800 -> b <= 80
    assert safe_size(100, model, 2000, 0.10, 1, 1) == 80
    assert safe_size(100, model, 2000, 0.10, 16, 16) == 80
    assert safe_size(100, None, None, 0.10, 8, 8) == 88


# ------------------------------------------------------- the memory-source seam


class CurveSource(MemorySource):
    """A pure-Python memory source: ``peak(b)`` from a formula, OOM above ``limit_bytes``.

    ``knows_capacity`` is what the search is told; the limit applies either way.
    """

    def __init__(self, peak, limit_bytes: int, *, baseline_bytes: int = 1_000_000, knows: bool = True) -> None:
        self.peak = peak
        self.limit_bytes = limit_bytes
        self.capacity_bytes = limit_bytes if knows else None
        self.baseline_bytes = baseline_bytes
        self.calls: list[int] = []

    def measure(self, batch_size: int) -> Measurement:
        self.calls.append(batch_size)
        peak = self.peak(batch_size)
        return Measurement(peak <= self.limit_bytes, peak if peak <= self.limit_bytes else None)


def _linear(b: int) -> int:
    return 3_000_000 + 10_000 * b


def _floor_then_linear(b: int) -> int:
    """Flat at small batches (a batch-independent peak), then linear: the kink the probe meets."""
    return max(5_000_000, 3_000_000 + 10_000 * b)


# curve, ceiling, granularity, searches in the log
SOURCE_CASES = [
    (_linear, 1000, 1, ["anchor", "anchor", "explore", "approach", "predict", "verify"]),
    (_linear, 1000, 8, ["anchor", "anchor", "approach", "predict", "verify"]),
    (_floor_then_linear, 3744, 1, ["anchor", "anchor", "explore", "approach", "predict", "verify"]),
]


@pytest.mark.parametrize("curve,ceiling,granularity,phases", SOURCE_CASES)
def test_source_with_capacity_gets_the_model_guided_search(curve, ceiling, granularity, phases):
    source = CurveSource(curve, curve(ceiling) + 5_000)
    strategy, out = search_ceiling(source, SearchSpace(granularity, 1 << 20, granularity))
    assert choose_search(source) == strategy == MODEL_GUIDED
    assert out.ceiling == ceiling and not out.capped
    assert [phase for _, phase, _ in out.phases] == phases
    assert len(source.calls) == len(phases)
    assert source.calls[-2:] == [ceiling, ceiling + granularity]  # exact: it fits, one granule more does not


@pytest.mark.parametrize("curve", [_linear, _floor_then_linear])
def test_source_without_capacity_grows_then_bisects(curve):
    source = CurveSource(curve, curve(1000) + 5_000, knows=False)
    strategy, out = search_ceiling(source, SearchSpace(1, 1 << 20, 1))
    assert not source.knows_capacity and strategy == GROWTH_BISECT
    assert out.ceiling == 1000 and out.predicted_ceiling is None
    # growing 2, 8, 128, 32768 granules, bisecting (128, 32768) in log space, then (512, 1024) in the middle
    assert source.calls == [2, 8, 128, 32768, 2048, 512, 1024, 768, 896, 960, 992, 1008, 1000, 1004, 1002, 1001]
    assert {b: m.fits for b, _, m in out.phases}[1001] is False


def _threshold(ceiling: int):
    calls = []

    def measure(b: int) -> Measurement:  # an OOM raised by user code: no memory signal at all
        calls.append(b)
        return Measurement(b <= ceiling)

    return measure, calls


# ceiling: (grow_then_bisect's trials, Lightning binsearch's): the benchmark's ceilings
UNKNOWN_CAPACITY = {37: (10, 11), 100: (11, 13), 1000: (16, 19), 3000: (18, 23), 3744: (18, 23), 20000: (21, 29)}


@pytest.mark.parametrize("ceiling", sorted(UNKNOWN_CAPACITY))
def test_unknown_capacity_is_exact_in_fewer_trials_than_lightning(ceiling):
    measure, calls = _threshold(ceiling)
    assert grow_then_bisect(measure, min_batch_size=1, max_batch_size=1 << 20, granularity=1).ceiling == ceiling
    measure, lightning = _threshold(ceiling)
    assert lightning_binsearch(measure).ceiling == ceiling
    assert (len(calls), len(lightning)) == UNKNOWN_CAPACITY[ceiling]
    assert {ceiling, ceiling + 1} <= set(calls)  # exact: the ceiling ran and fitted, one more ran out


def test_unknown_capacity_never_takes_more_trials_than_lightning_from_16_up():
    worse = []
    for ceiling in range(1, 5001):
        measure, calls = _threshold(ceiling)
        assert grow_then_bisect(measure, min_batch_size=1, max_batch_size=1 << 20, granularity=1).ceiling == ceiling
        measure, lightning = _threshold(ceiling)
        lightning_binsearch(measure)
        if len(calls) > len(lightning):
            worse.append(ceiling)
    assert worse == [1, 2, 3, 8, 9, 10, 11, 12, 13, 14, 15]  # one trial more each (Lightning never runs 1)


@pytest.mark.parametrize("ceiling,minimum,granularity,cap,calls", [
    (20, 16, 1, 5000, [16, 128, 45, 26, 21, 18, 19, 20]),  # min_batch_size above the first sizes
    (10, 16, 1, 5000, [16]),  # nothing fits
    (10**9, 1, 1, 5000, [2, 8, 128, 5000]),  # capped
    (296, 8, 8, 1 << 20, [16, 64, 1024, 256, 512, 384, 320, 288, 304, 296]),
])
def test_unknown_capacity_edges(ceiling, minimum, granularity, cap, calls):
    measure, seen = _threshold(ceiling)
    out = grow_then_bisect(measure, min_batch_size=minimum, max_batch_size=cap, granularity=granularity)
    assert seen == calls
    assert out.ceiling == (None if ceiling < minimum else min(ceiling, cap)) and out.capped == (ceiling >= cap)


# ------------------------------------------------------------------ real trials on CPU


def _direct(spec, batch_size: int) -> bool:
    """Run one trial at ``batch_size`` outside the probe: does it fit?"""
    comps = build_components(spec)
    backend = CPUBackend(spec.device.memory_limit)
    model = comps.build_model(spec.seed)
    backend.track(list(model.parameters()) + list(model.buffers()))
    result = Trainer(comps, backend).run(TrialConfig(BatchShape(batch_size), lr=0.01, steps=spec.probe.steps_per_trial),
                                         model=model)
    return result.fits


@pytest.mark.parametrize("limit,granularity", [("120KiB", 1), ("200KiB", 1), ("200KiB", 8), ("1MiB", 32)])
def test_probe_finds_the_exact_ceiling(write_spec, limit, granularity):
    spec = load_spec(write_spec(), [f"device.memory_limit={limit}", f"probe.granularity={granularity}",
                                    f"probe.min_batch_size={granularity}", "data.kwargs.n_train=4096"])
    result = run_probe(spec)  # a training set larger than the ceiling: batches are capped at the set's size
    c = result.ceiling
    assert c is not None and c % granularity == 0 and not result.capped
    assert _direct(spec, c) and not _direct(spec, c + granularity)
    # Tiny ceilings on this 676-parameter model sit on the kink where activations start to
    # dominate peak memory; the search stays exact but needs up to 8 trials there.
    assert result.search_trials <= 8
    assert result.memory_returned and result.max_leaked_bytes == 0
    # the safe size leaves the headroom it promises, measured by its confirmation run
    assert result.confirmed and result.safe_batch_size <= c
    assert result.safe_headroom >= 0.10
    assert result.power_of_two_batch_size == 1 << (result.safe_batch_size.bit_length() - 1)
    assert result.memory_model.per_sample_bytes > 0


def test_probe_user_model_that_raises_cuda_oom(write_spec):
    text = """\
    name: user-oom
    model: {target: "tests.fixtures:oom_above", kwargs: {threshold: 300}}
    data: {target: "tests.fixtures:tiny_data"}
    optimizer: {name: sgd, lr: 0.1}
    base_batch_size: 32
    device: {type: cpu}
    probe: {max_batch_size: 4096}
    """
    result = run_probe(load_spec(write_spec(text)))
    assert result.strategy == "growth-bisect"
    assert result.ceiling == 300
    assert [t.batch_size for t in result.trials if t.phase == "grow"] == [2, 8, 128, 512]  # 512 samples: the cap
    assert result.search_trials == 13  # Lightning's binsearch: 17 (doubling 2…512, bisecting 256…512)
    assert result.safe_batch_size == 270 and result.power_of_two_batch_size == 256


def test_probe_user_oom_below_the_memory_limit(write_spec):
    """Capacity known but user code fails earlier: the model misses, bisection still lands exactly."""
    text = """\
    name: user-oom
    model: {target: "tests.fixtures:oom_above", kwargs: {threshold: 150}}
    data: {target: "tests.fixtures:tiny_data"}
    optimizer: {name: sgd, lr: 0.1}
    base_batch_size: 32
    device: {type: cpu, memory_limit: 1MiB}
    """
    result = run_probe(load_spec(write_spec(text)))
    assert result.ceiling == 150
    # 151 ran out with most of the megabyte free by the count: the safe size keeps 10% below the ceiling
    assert result.safe_batch_size == 135 and result.confirmed
    assert any(n.startswith("batch 151 ran out of memory where the count predicts") and "keeps 10% below the "
               "ceiling instead" in n for n in result.notes), result.notes


def test_a_batchnorm_model_is_probed_from_batch_2(write_spec):
    """An outside BatchNorm1d model passed validate (two samples) and the probe stopped at batch 1:
    'Expected more than 1 value per channel when training'."""
    text = TINY_SPEC.replace("tests.fixtures:tiny_mlp", "tests.fixtures:bn_mlp")
    result = run_probe(load_spec(write_spec(text)))
    assert result.ceiling is not None and min(t.batch_size for t in result.trials) == 2
    assert BN_NOTE in result.notes
    estimated = run_probe_estimate(load_spec(write_spec(text)))
    assert BN_NOTE in estimated.notes


class _SequenceBN(torch.nn.Module):
    """BatchNorm1d over (B, C, T): T values per channel, so one sample trains (the outside 'tricky' model's)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.head = torch.nn.Conv1d(8, 16, 3, padding=1), torch.nn.BatchNorm1d(16), \
            torch.nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, 8)
        return self.head(self.bn(self.conv(x.transpose(1, 2))).mean(2))


def _loss(model, batch):
    return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])


def test_batchnorm_layers_that_see_one_value_per_channel_are_told_from_the_inputs_they_get():
    from batchtune.config.components import batchnorm_single_values

    seq, features = _SequenceBN(), torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16))
    one = [torch.randn(1, 16, 8), torch.tensor([1])]
    assert batchnorm_single_values(seq, _loss, one) == {}  # (1, 16, 16): 16 values per channel
    seq.train()
    _loss(seq, one).backward()  # and indeed it trains at batch 1
    flat = [torch.randn(1, 8), torch.tensor([1])]
    features.train()
    assert batchnorm_single_values(features, lambda m, b: m(b[0]).sum(), flat) == {"1": (1, 16)}
    assert features.training and torch.equal(features[1].running_mean, torch.zeros(16))  # mode and stats kept
    assert batchnorm_single_values(features, _loss, one) is None  # the forward raised: not told


def test_a_batchnorm_that_trains_on_one_sample_leaves_the_probe_at_batch_1():
    """An outside BatchNorm1d over (B, C, T=16) was said to be 'over features (no length or image axis)' and its
    probe started at 2."""
    from batchtune.commands.probe import probe_settings
    from batchtune.config.spec import load_spec

    spec, notes = load_spec("configs/quickstart.yaml"), []
    assert probe_settings(spec, _SequenceBN(), notes, lambda: {}).min_batch_size == 1 and notes == []
    assert probe_settings(spec, _SequenceBN(), notes, lambda: None).min_batch_size == 2
    assert notes[0].startswith("probe.min_batch_size 2: the model has BatchNorm layers, and a forward on one sample "
                               "could not tell")
    assert probe_settings(spec, torch.nn.Linear(2, 2), notes, lambda: None).min_batch_size == 1  # no BatchNorm


def test_a_confirmed_size_short_of_the_headroom_steps_down_by_the_missing_bytes():
    """An outside EmbeddingBag: the safe size 1926 confirmed with 9.7% of 4 MiB free (10% asked), its
    worst-case batches not quite on the memory model's line; 0.3% of 4 MiB is 12,583 bytes, 7.2 samples
    of 1,741 bytes: 1918 (a multiple of the granularity 2, and at least one granule down)."""
    from types import SimpleNamespace

    from batchtune.commands.probe import _short_of_headroom

    p = SimpleNamespace(headroom=0.10, granularity=2, min_batch_size=2)
    model = SimpleNamespace(per_sample_bytes=1741.0)
    assert _short_of_headroom(1926, 0.097, 4 * 2**20, model, p) == 1918
    assert _short_of_headroom(1926, 0.09999, 4 * 2**20, model, p) == 1924  # a byte short: one granule down
    assert _short_of_headroom(2, 0.05, 4 * 2**20, model, p) is None  # nothing smaller is allowed
    # without a model: the confirmation's own bytes per sample, 90.3% of 4 MiB over 1926 samples
    assert _short_of_headroom(1926, 0.097, 4 * 2**20, None, p) == 1918  # 7 samples of 1,967 bytes: 1919, aligned


def test_figures_a_message_compares_are_written_so_that_they_differ():
    """'left 10.0% free, less than the 10% asked'; 'estimated peak 16.0 MiB is above the 16.0 MiB'."""
    from batchtune.render.text import apart, format_bytes

    assert apart(0.0997, 0.10, lambda x: f"{x:.1%}") == ("9.97%", "10.00%")
    assert apart(0.05, 0.10, lambda x: f"{x:.1%}") == ("5.0%", "10.0%")
    assert apart(16 * 2**20 + 300, 16 * 2**20, format_bytes) == ("16,777,516 B", "16,777,216 B")
    assert apart(17 * 2**20, 16 * 2**20, format_bytes) == ("17.0 MiB", "16.0 MiB")


def test_probe_confirms_with_its_steps_and_reuses_components(write_spec, monkeypatch):
    """The report names the confirmation's real steps; a caller's components are not rebuilt."""
    spec = load_spec(write_spec(), ["device.memory_limit=1MiB", "probe.granularity=32", "probe.min_batch_size=32",
                                    "probe.steps_per_trial=5", "probe.max_batch_size=64"])
    components = build_components(spec)

    def no_second_build(spec):
        raise AssertionError("the probe built the components again")

    monkeypatch.setattr(batchtune.config.components, "build_components", no_second_build)
    result = run_probe(spec, components=components)
    confirm = [t for t in result.trials if t.phase == "confirm"]
    assert result.confirmed and result.confirm_steps == 5 and [t.steps for t in confirm] == [5]
    assert all(t.steps == 5 for t in result.trials if t.fits)
    assert "confirmed with 5 steps + validation" in render_probe(result)
    assert result.to_dict()["confirm_steps"] == 5


def test_probe_nothing_fits(write_spec):
    spec = load_spec(write_spec(), ["device.memory_limit=4KiB"])
    result = run_probe(spec)
    assert result.ceiling is None and result.safe_batch_size is None
    assert len(result.trials) == 1 and not result.trials[0].fits
    # what no batch size changes, counted: the parameters, as many bytes of gradients, and AdamW's two moments
    weights = sum(p.numel() * 4 for p in build_components(spec).build_model(0).parameters())
    fixed = next(n for n in result.notes if n.startswith("batch 1's training step needs"))
    assert (f"the parameters ({format_bytes(weights)}), their gradients ({format_bytes(weights)}) and the "
            f"optimizer's state ({format_bytes(2 * weights + 4 * 6)})") in fixed  # + each tensor's step count
    assert "more than the device holds: no batch size fits" in fixed and "4.0 KiB" in fixed


def test_probe_nothing_fits_says_when_the_batch_is_what_does_not_fit(write_spec):
    """A device that holds the parameters, gradients and state but not one sample's step besides: the note says
    the rest is activations, and the estimate says the same as the measured probe."""
    spec = load_spec(write_spec(), ["device.memory_limit=64KiB", "probe.min_batch_size=256",
                                    "probe.granularity=256", "data.kwargs.n_train=4096"])
    measured, estimated = run_probe(spec), run_probe_estimate(spec)
    assert measured.ceiling is None and estimated.ceiling is None
    said = [next(n for n in r.notes if n.startswith("batch 256's training step needs")) for r in (measured, estimated)]
    assert said[0] == said[1] and "is batch 256's activations and temporaries" in said[0]


class _FragmentingBackend(CPUBackend):
    """A caching allocator's view: reserved bytes run 25% above allocated at every peak."""

    def peak_reserved_bytes(self) -> int:
        return int(self.peak_bytes() * 1.25)


def test_probe_leaves_room_for_what_the_allocator_reserves_beyond_allocated(write_spec):
    spec = load_spec(write_spec(), ["device.memory_limit=1MiB", "data.kwargs.n_train=4096"])
    plain = run_probe(spec)
    fragmenting = run_probe(spec, backend=_FragmentingBackend(spec.device.memory_limit))
    # the search measures allocated bytes (the same ceiling); the safe size is read against
    # the capacity less the largest reserved-minus-allocated gap a fitting trial showed
    assert fragmenting.ceiling == plain.ceiling
    assert fragmenting.safe_batch_size < plain.safe_batch_size
    assert any("reserved up to" in note for note in fragmenting.notes)
    assert not any("reserved up to" in note for note in plain.notes)
    # the confirmation counts the gap against capacity: the headroom it reports is smaller
    assert fragmenting.safe_headroom >= 0.10 - 1e-9


def test_an_oom_in_backward_leaves_no_memory_behind(write_spec):
    """torch keeps the graph of a backward that raised until the next backward: an outside model whose trunk feeds
    three heads held 4.3 MB after an OOM in backward at 1840, so every later trial down to 1375 ran out of memory,
    the probe said 'references kept by user code?' and took 97 confirmation trials. The trainer now releases it."""
    spec = load_spec(write_spec("""
name: heads
model: {target: "tests.fixtures:three_heads"}
data: {target: "tests.fixtures:tiny_data", kwargs: {n_train: 4000, n_val: 500, in_features: 32, num_classes: 8}}
loss: {target: "tests.fixtures:three_heads_loss"}
optimizer: {name: adamw, lr: 0.002}
base_batch_size: 64
device: {type: cpu, memory_limit: 8MiB}
"""))
    result = run_probe(spec)
    # no OOM below the ceiling, and no memory left behind
    assert all(t.fits and not t.leaked_bytes for t in result.trials if t.batch_size <= result.ceiling)
    assert not any(n.startswith("memory did not return") for n in result.notes)
    assert result.ceiling == 1839 and result.confirmed and result.safe_batch_size >= 0.85 * result.ceiling


SPARSE_SPEC = """
name: sparse
model: {target: "tests.fixtures:sparse_bag"}
data: {target: "tests.fixtures:id_data"}
optimizer: {target: "torch.optim:SparseAdam", lr: 0.01}
base_batch_size: 64
device: {type: cpu, memory_limit: 2MiB}
"""


def test_sparse_gradients_are_measured_not_estimated_and_their_optimizer_step_counts(write_spec):
    """An outside SparseAdam model: the estimate's ceiling was 3109 against a measured 1441 (check --estimate passed
    2500, which ran out of memory), and the probe's memory line (the forward and backward only, 520 B a sample)
    read 1.12 MiB at 1339 where the trial peaked at 1.9 MiB: SparseAdam's step grows with the rows a batch touches."""
    from batchtune.commands.check import run_check, run_check_estimate
    from batchtune.commands.probe import run_probe_estimate

    spec = load_spec(write_spec(SPARSE_SPEC))
    measured = run_probe(spec)
    estimated = run_probe_estimate(spec)  # falls back to measuring, and says why
    assert estimated.ceiling == measured.ceiling and estimated.notes[0].startswith(
        "cannot estimate: emb (sparse=True) gives sparse gradients") and "measured with training steps instead" in \
        estimated.notes[0]
    at_ceiling = max((t for t in measured.trials if t.fits and t.phase != "confirm"), key=lambda t: t.batch_size)
    assert measured.memory_model.predict(at_ceiling.batch_size) == pytest.approx(at_ceiling.peak_bytes, rel=0.2)
    report = run_check_estimate(spec, batch_size=2 * measured.ceiling)
    assert report.check("fits").status == "fail" and "checked with training steps instead" in report.notes[0]
    # the safe size keeps the headroom: stepped down by the bytes a sample the confirmations themselves lost
    # (the line's 1.1 KiB had stopped at 1136, 9.7% free, which check then failed)
    assert run_check(spec, batch_size=measured.safe_batch_size).check("fits").status == "pass"


def test_a_ceiling_capped_by_the_training_set_with_no_known_capacity_is_the_safe_size(write_spec):
    """An outside probe with no memory limit and an 80-sample training set said ceiling 80, safe 72: 10% 'headroom'
    off a cap memory had nothing to do with (with a 1 MiB capacity known, the same cap gave 80)."""
    import json

    from typer.testing import CliRunner

    from batchtune.cli import app

    spec = write_spec(TINY_SPEC.replace('"tests.fixtures:tiny_data"}', '"tests.fixtures:tiny_data", kwargs: '
                                        '{n_train: 80}}'))
    result = CliRunner().invoke(app, ["probe", str(spec), "device.memory_limit=null", "-q", "-f", "json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert (data["ceiling"], data["capped"], data["safe_batch_size"]) == (80, True, 80)


def test_counts_of_one_sample_are_worded_in_the_singular():
    """An outside probe said 'the training set has 1 samples'."""
    from types import SimpleNamespace

    from torch.utils.data import TensorDataset

    from batchtune.commands.probe import _largest
    from batchtune.engine.data import NonFinite

    one = SimpleNamespace(train_set=TensorDataset(torch.randn(1, 4)), spec=SimpleNamespace(trial_timeout=None))
    p = SimpleNamespace(max_batch_size=64, granularity=1, min_batch_size=1)
    assert _largest(one, p) == (1, "the training set has 1 sample: batches are capped there (not at "
                                   "probe.max_batch_size 64); a larger batch would only repeat samples, so the device "
                                   "may hold more than this ceiling")
    assert NonFinite([0], 1, 1, 1).text() == ("1 training sample holds NaN or inf (index 0, of its 1 sample): the "
                                              "data, not the lr; clean it")


def test_a_memory_model_says_where_its_max_error_is():
    """An outside probe showed 'R² 1.00000 ... max error 10.61%' together: the error was on batch 1's small peak,
    a residual that R², set by the large batches' spread, does not see."""
    from batchtune.memory.model import fit_memory_model
    from batchtune.render.probe import _fit_text

    model = fit_memory_model([1, 100, 200, 400], [1106, 100_000, 200_000, 400_000])
    assert model.max_error_batch_size == 1 and model.max_relative_error == pytest.approx(0.03849, abs=1e-5)
    assert _fit_text(model) == "R² 1.00000 over 4 runs, max error 3.85% at batch 1"
    assert _fit_text(fit_memory_model([1, 2], [10, 20])) == "exact through 2 points over 2 runs, max error 0.00%"


def test_the_default_cap_is_searched_as_a_multiple_of_the_granularity():
    # an unsized data set leaves only probe.max_batch_size as the cap; its default 2**20 is not a multiple of 3, and
    # a probe whose memory allowed more reported 1,048,576 as a ceiling at granularity 3
    from types import SimpleNamespace

    from batchtune.commands.probe import _largest
    from batchtune.config.spec import ProbeSpec

    class Unsized(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter([])

    components = SimpleNamespace(train_set=Unsized(), spec=SimpleNamespace(trial_timeout=None))
    assert _largest(components, ProbeSpec(granularity=3)) == (1_048_575, None)
    assert _largest(components, ProbeSpec(granularity=8, max_batch_size=96)) == (96, None)


class _AloneAsTwo(DistContext):
    """Two ranks for the trainer, one process: every reduction is this rank's own values (both ranks alike)."""

    def __init__(self) -> None:
        super().__init__(rank=0, world_size=2)

    def _reduce(self, values, op):
        return values


class _Buckets(torch.nn.Module):
    """DDP's memory without its collectives: a gradient-sized bucket beside the model."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.module = model
        self.bucket = torch.zeros(sum(p.numel() for p in model.parameters()))

    def forward(self, *args):
        return self.module(*args)

    def no_sync(self):
        return contextlib.nullcontext()


def test_the_wrapper_a_failed_first_trial_built_is_not_memory_the_oom_left_behind(write_spec, monkeypatch):
    """A probe under [4MiB, 6KiB] whose first trial (batch 1) ran out said 'memory did not return to the baseline
    after an OOM: 2704 bytes still held': the DDP buckets that trial built, which the model keeps for the next."""
    import batchtune.engine.trial

    monkeypatch.setattr(batchtune.engine.trial, "data_parallel", lambda model, device: _Buckets(model))
    spec = load_spec(write_spec(), ["device.memory_limit=6KiB"])
    comps = build_components(spec)
    backend = CPUBackend(spec.device.memory_limit)
    model = comps.build_model(spec.seed)
    backend.track(list(model.parameters()) + list(model.buffers()))
    trainer = Trainer(comps, backend, dist=_AloneAsTwo())
    result = trainer.run(TrialConfig(BatchShape(2, 1, 2), lr=0.01, steps=1), model=model)
    assert not result.fits and "out of memory" in result.error
    assert backend.current_bytes() - result.baseline_bytes == 0 == result.leaked_bytes
    assert trainer._wrapped[1].bucket.numel() * 4 == 2704  # the buckets are still held, by the model's wrapper


def test_a_rank_without_room_for_ddp_s_copy_of_its_weights_runs_out_before_ddp_s_collectives(write_spec, monkeypatch):
    """[4MiB, 4KiB]: rank 1 held its 2,704 bytes of weights, ran out making the flat copy DDP's constructor
    broadcasts, inside that collective, and rank 0 waited there until the process group's timeout."""
    import batchtune.engine.trial

    wrapped = []
    monkeypatch.setattr(batchtune.engine.trial, "data_parallel", lambda model, device: wrapped.append(model) or model)
    spec = load_spec(write_spec(), ["device.memory_limit=4KiB"])
    comps = build_components(spec)
    backend = CPUBackend(spec.device.memory_limit)
    model = comps.build_model(spec.seed)
    backend.track(list(model.parameters()) + list(model.buffers()))
    with pytest.raises(torch.OutOfMemoryError) as info:
        Trainer(comps, backend, dist=_AloneAsTwo()).data_parallel(model)
    assert str(info.value) == ("OutOfMemoryError: CPU out of memory: the model's weights hold 2704 bytes of this "
                               "rank's 4096, and DDP's broadcast of them needs 2704 more")
    assert wrapped == []  # agreed before DDP's constructor, and its collectives, ran
    roomy = CPUBackend(6 * 1024)
    roomy.track(list(model.parameters()) + list(model.buffers()))
    assert roomy.current_bytes() == 2704
    assert Trainer(comps, roomy, dist=_AloneAsTwo()).data_parallel(model) is model  # 5,408 of 6,144: DDP is built
