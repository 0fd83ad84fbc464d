"""NoiseScaleMonitor driven from a hand-written loop, as a user's own loop would drive it."""

from __future__ import annotations

import re
import warnings

import pytest
import torch

from batchtune.monitor import NoiseScaleMonitor
from batchtune.stats.noise import unbiased_estimates


def _linreg(d: int, sigma: float, delta: float, seed: int = 0):
    """Linear(d, 1) held at w* + δ·e_1 and a sampler of (x, y = w*·x + σ·ε)."""
    gen = torch.Generator().manual_seed(seed)
    w_star = torch.randn(d, generator=gen)
    model = torch.nn.Linear(d, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(w_star[None])
        model.weight[0, 0] += delta

    def sample(n: int):
        x = torch.randn(n, d, generator=gen)
        return x, x @ w_star + sigma * torch.randn(n, generator=gen)

    return model, sample


def test_sizes_that_are_not_whole_numbers_are_named():
    """micro_batch_size="32" raised "'<' not supported between instances of 'str' and 'int'"."""
    import numpy as np

    model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"micro_batch_size must be a whole number, got '32' \(str\)"):
        NoiseScaleMonitor(model, micro_batch_size="32")
    with pytest.raises(ValueError, match=r"accum_steps must be a whole number, got 2.5 \(float\)"):
        NoiseScaleMonitor(model, micro_batch_size=32, accum_steps=2.5)
    assert NoiseScaleMonitor(model, micro_batch_size=np.int64(32), accum_steps=2).accum_steps == 2


@pytest.mark.parametrize("kwargs, message", [
    ({"max_examples": 0}, "max_examples must be >= 1 (None: every example); found max_examples=0"),
    ({"max_examples": 2.0}, "max_examples must be a whole number, got 2.0 (float)"),
    ({"every": 0}, "every must be >= 1 (None: the default cadence); found every=0"),
    ({"world_size": 0}, "world_size must be >= 1 (None: torch.distributed's); found world_size=0"),
    ({"accum_steps": 0}, "accum_steps must be >= 1; found accum_steps=0"),
    ({"micro_batch_size": -4, "accum_steps": 2}, "micro_batch_size must be >= 1; found micro_batch_size=-4"),
    ({"ema_decay": 1.5}, "ema_decay must be in [0, 1); found ema_decay=1.5"),
])
def test_numeric_arguments_out_of_range_are_refused_at_construction_by_name(kwargs, message):
    """max_examples=0 was accepted, then crashed inside the user's loss.backward() with a reshape error."""
    for params in (torch.nn.Linear(4, 2), torch.nn.Linear(4, 2).parameters()):
        with pytest.raises(ValueError) as caught:
            NoiseScaleMonitor(params, **{"micro_batch_size": 8, **kwargs})
        assert str(caught.value) == message
    assert NoiseScaleMonitor(torch.nn.Linear(4, 2), micro_batch_size=8, max_examples=1).every == 8


def test_the_horizon_is_one_of_optimizer_steps_whatever_the_cadence():
    """At every=8 a decay of 0.99 per measured step spanned 800 optimizer steps: an outside monitor read the truth of
    step ~70 at step 800. Now ema_decay is per optimizer step, with at least about 10 measured steps."""
    model = torch.nn.Linear(4, 2)
    for every, per_measured in ((1, 0.99), (8, 0.99**8), (32, 0.9)):
        monitor = NoiseScaleMonitor(model, micro_batch_size=8, accum_steps=2, every=every)
        assert monitor.estimator.ema_decay == pytest.approx(per_measured)
    assert NoiseScaleMonitor(model.parameters(), micro_batch_size=8, accum_steps=2, every=4,
                             ema_decay=0.998).estimator.ema_decay == pytest.approx(0.998**4)


def test_a_model_with_no_trainable_parameters_is_refused_at_construction():
    """A frozen model was accepted and warned "0 backward passes for accum_steps=2" on every measured step
    (one backward per step: "this model has none [nn.Linear layers] whose parameters are its own")."""
    frozen = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 1)).requires_grad_(False)
    for accum in (1, 2):
        with pytest.raises(ValueError) as caught:
            NoiseScaleMonitor(frozen, micro_batch_size=8, accum_steps=accum)
        assert str(caught.value) == ("the model has no trainable parameters (none of its 4 requires grad): the "
                                     "noise scale is read from gradients, so there is nothing to measure")
    with pytest.raises(ValueError, match=r"^no trainable parameters among the 4 given \(none requires grad\)"):
        NoiseScaleMonitor(frozen.parameters(), micro_batch_size=8, accum_steps=2)
    frozen[1].requires_grad_(True)
    assert len(NoiseScaleMonitor(frozen.parameters(), micro_batch_size=8, accum_steps=2).params) == 2


@pytest.mark.parametrize("micro,accum", [(32, 4), (64, 1)])
def test_a_plain_loop_recovers_the_analytic_noise_scale_on_its_cadence(micro, accum):
    d, sigma, delta, steps = 20, 1.0, 1.0, 800
    model, sample = _linreg(d, sigma, delta)
    monitor = NoiseScaleMonitor(model.parameters(), micro_batch_size=micro, accum_steps=accum, every=2,
                                confidence=0.99)
    passes = 2 if monitor.splits_batches else accum
    hooked_between = []
    for step in range(steps):
        measured = monitor.due(step)
        if measured:
            monitor.begin()
        x, y = sample(micro * accum)
        for xs, ys in zip(x.chunk(passes), y.chunk(passes)):
            if measured:
                monitor.start_micro_batch()
            (0.5 * (model(xs).squeeze(-1) - ys).square().mean() / passes).backward()
            if measured:
                monitor.end_micro_batch(grad_multiplier=passes)
        if measured:
            monitor.step()
        hooked_between.append(bool(model.weight._backward_hooks))
        model.zero_grad(set_to_none=True)  # lr 0: the model stays at w* + δ
    reading = monitor.reading()
    truth = d * (1 + sigma**2 / delta**2) + 1
    assert monitor.splits_batches == (accum == 1)
    assert monitor.measured_steps == reading.steps == steps // 2  # steps 1, 3, 5, ...
    assert not any(hooked_between)  # hooks only live inside a measured step
    assert reading.reliable and reading.b_simple == pytest.approx(truth, rel=0.10)
    assert reading.low <= truth <= reading.high


class _TwoRanks:
    """One rank of two, whose partner's local |g|² is known: mean() averages with it."""

    enabled, world_size = True, 2

    def __init__(self, partner_sq_norm: float) -> None:
        self.partner = partner_sq_norm

    def mean(self, *values: float) -> list[float]:
        return [(v + self.partner) / 2 for v in values]


def test_across_ranks_the_local_gradient_is_the_small_batch_and_the_reduced_one_the_big():
    param = torch.nn.Parameter(torch.zeros(3))
    g_here, g_there = torch.tensor([1.0, 2.0, 2.0]), torch.tensor([3.0, 0.0, 4.0])
    monitor = NoiseScaleMonitor([param], micro_batch_size=8, accum_steps=2, ranks=_TwoRanks(25.0 / 16))
    assert monitor.batch_sizes == (16, 32) and not monitor.splits_batches
    monitor.begin()  # no hooks across ranks
    assert not param._backward_hooks
    param.grad = g_here * 4  # as a GradScaler at 4 leaves it
    monitor.before_reduce(grad_multiplier=0.25)
    param.grad = (g_here + g_there) / 2 * 4  # the all-reduced gradient
    monitor.step(grad_multiplier=0.25)
    small, big = (9.0 + 25.0 / 16) / 2, float(((g_here + g_there) / 2).square().sum())
    g2, trace = unbiased_estimates(small, big, 16, 32)
    reading = monitor.reading()
    assert reading.steps == 1 and reading.g2 == pytest.approx(g2) and reading.trace_sigma == pytest.approx(trace)


@pytest.mark.parametrize("micro,accum,world,ok", [
    (32, 1, 1, True), (31, 1, 1, False), (1, 1, 1, False), (31, 2, 1, True), (31, 1, 2, True)])
def test_which_shapes_can_be_measured(micro, accum, world, ok):
    assert NoiseScaleMonitor.can_measure(micro, accum, world) is ok
    if not ok:
        with pytest.raises(ValueError, match="must be even"):
            NoiseScaleMonitor([torch.nn.Parameter(torch.zeros(1))], micro_batch_size=micro, accum_steps=accum)


def test_close_removes_the_hooks_of_an_interrupted_step():
    model = torch.nn.Linear(4, 1)
    monitor = NoiseScaleMonitor(model.parameters(), micro_batch_size=4, accum_steps=2)
    monitor.begin()
    monitor.start_micro_batch()
    assert model.weight._backward_hooks
    monitor.close()  # e.g. the backward pass ran out of memory
    assert not model.weight._backward_hooks and monitor.measured_steps == 0
    monitor.close()  # idempotent


# ------------------------------------------------------------ a monitor given the module
def _loop(model, sample, *, micro, accum, steps, monitor=None, optimizer=None, clip=None, clip_first=False):
    """The user's loop: accum backward passes (loss / accum), step(), optional clipping, update.

    ``clip_first`` clips before ``step()``, as the Hugging Face Trainer does before its callbacks.
    """
    losses = []
    for _ in range(steps):
        for _ in range(accum):
            x, y = sample(micro)
            loss = 0.5 * (model(x).squeeze(-1) - y).square().mean() / accum
            loss.backward()
            losses.append(loss.item())
        if clip is not None and clip_first:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        if monitor is not None:
            monitor.step()
        if clip is not None and not clip_first:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        if optimizer is not None:
            optimizer.step()
        model.zero_grad(set_to_none=True)
    return losses


@pytest.mark.parametrize("micro,accum", [(32, 4), (16, 2), (64, 1)])
def test_a_loop_that_only_calls_step_recovers_the_analytic_noise_scale(micro, accum):
    """Passes against the step at accum >= 2, per-example norms against the batch at accum 1."""
    d, sigma, delta, steps = 20, 1.0, 1.0, 800
    model, sample = _linreg(d, sigma, delta)
    monitor = NoiseScaleMonitor(model, micro_batch_size=micro, accum_steps=accum, every=1)
    # lr 0; clipping before step() does no harm on one process: the hooks read .grad before it
    _loop(model, sample, micro=micro, accum=accum, steps=steps, monitor=monitor, clip=1e-3, clip_first=True)
    reading = monitor.reading()
    truth = d * (1 + sigma**2 / delta**2) + 1
    assert monitor.batch_sizes == ((1, 64) if accum == 1 else (micro, micro * accum))
    assert monitor.steps_seen == reading.steps == steps
    assert reading.reliable and reading.b_simple == pytest.approx(truth, rel=0.15)
    # a 90% band misses one draw in ten; twice its half-width (3.3 sigma) must hold the truth
    assert abs(reading.b_simple - truth) <= reading.high - reading.low


@pytest.mark.parametrize("accum", [4, 1])
def test_a_batch_that_grows_is_read_at_the_size_set_and_skipped_with_a_warning_when_not_told(accum):
    """A micro-batch grown from 16 to 32 without set_batch() read half the truth under accum_steps=4, with a band
    excluding the truth and no warning; now those steps are skipped with one, and set_batch(32) reads the truth."""
    d, sigma, delta = 20, 1.0, 1.0
    truth = d * (1 + sigma**2 / delta**2) + 1
    model, sample = _linreg(d, sigma, delta)
    told = NoiseScaleMonitor(model, micro_batch_size=16, accum_steps=accum, every=1)
    _loop(model, sample, micro=16, accum=accum, steps=100, monitor=told)
    told.set_batch(32)
    _loop(model, sample, micro=32, accum=accum, steps=600, monitor=told)
    reading = told.reading()
    assert told.batch_sizes == ((1, 32) if accum == 1 else (32, 32 * accum)) and reading.steps == 700
    assert reading.b_simple == pytest.approx(truth, rel=0.15)
    assert abs(reading.b_simple - truth) <= reading.high - reading.low
    untold = NoiseScaleMonitor(model, micro_batch_size=16, accum_steps=accum, every=1)
    with pytest.warns(RuntimeWarning, match=r"\[32, 20\].*micro.batch.size.*set_batch\(\)"):
        _loop(model, sample, micro=32, accum=accum, steps=3, monitor=untold)
    assert untold.reading().steps == 0
    # a reading whose later steps were all skipped goes stale past its horizon (100 steps at ema_decay 0.99): an
    # outside loop's stayed 'reliable' over 768 skipped steps
    stale = NoiseScaleMonitor(model, micro_batch_size=16, accum_steps=accum, every=1)
    _loop(model, sample, micro=16, accum=accum, steps=300, monitor=stale)
    assert stale.reading().reliable and not stale.stale
    with pytest.warns(RuntimeWarning):
        _loop(model, sample, micro=32, accum=accum, steps=100, monitor=stale)
    assert stale.reading().reliable and stale.reading().steps == 300  # within the horizon: still the recent model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the skip's warning comes again every 100 skipped steps
        _loop(model, sample, micro=32, accum=accum, steps=1, monitor=stale)  # the 101st skipped
    assert stale.stale and not stale.reading().reliable and stale.reading().b_simple is not None
    stale.set_batch(32)
    _loop(model, sample, micro=32, accum=accum, steps=1, monitor=stale)
    assert not stale.stale


def test_a_validation_forward_with_grad_enabled_on_another_size_does_not_skip_the_measured_steps():
    """An outside loop validated on 512 samples without torch.no_grad() after each step: every measured step was
    skipped, blamed on 'a batch that changed size: set_batch()'. A forward no backward pass follows is no step's."""
    import warnings

    d, sigma, delta = 20, 1.0, 1.0
    model, sample = _linreg(d, sigma, delta)
    monitor = NoiseScaleMonitor(model, micro_batch_size=16, accum_steps=4, every=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning at all
        for _ in range(50):
            _loop(model, sample, micro=16, accum=4, steps=1, monitor=monitor)
            model(sample(512)[0])  # validation, grad enabled, never backpropagated
    assert monitor.reading().steps == 50


@pytest.mark.parametrize("accum", [2, 1])
def test_the_monitor_never_changes_training(accum):
    """Losses and weights bit-identical with and without it (SGD with momentum, clipping after step())."""
    runs = []
    for with_monitor in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        gen = torch.Generator().manual_seed(1)

        def sample(n):
            x = torch.randn(n, 6, generator=gen)
            return x, x.sum(1) + torch.randn(n, generator=gen)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        monitor = NoiseScaleMonitor(model, micro_batch_size=8, accum_steps=accum, every=1) if with_monitor else None
        losses = _loop(model, sample, micro=8, accum=accum, steps=30, monitor=monitor, optimizer=optimizer, clip=1.0)
        runs.append((losses, [p.detach().clone() for p in model.parameters()]))
        if monitor is not None:
            assert monitor.measured_steps == 30
    (losses_off, params_off), (losses_on, params_on) = runs
    assert losses_on == losses_off
    assert all(torch.equal(a, b) for a, b in zip(params_on, params_off))


def test_a_module_monitor_hooks_only_the_steps_it_measures():
    model, sample = _linreg(4, 1.0, 1.0)
    monitor = NoiseScaleMonitor(model, micro_batch_size=8, accum_steps=2)  # default cadence: every 8th
    hooked = []
    for _ in range(24):
        hooked.append(bool(model.weight._backward_hooks) or bool(model.weight._post_accumulate_grad_hooks))
        _loop(model, sample, micro=8, accum=2, steps=1, monitor=monitor)
    assert monitor.every == 8 and monitor.measured_steps == 3
    assert [i for i, h in enumerate(hooked) if h] == [7, 15, 23]  # armed at the end of the step before
    monitor.close()
    assert not model.weight._backward_hooks


def test_a_step_with_the_wrong_number_of_passes_is_skipped_with_one_warning():
    model, sample = _linreg(4, 1.0, 1.0)
    monitor = NoiseScaleMonitor(model, micro_batch_size=8, accum_steps=3, every=1)
    with pytest.warns(RuntimeWarning, match="2 backward passes for accum_steps=3"):
        _loop(model, sample, micro=8, accum=2, steps=2, monitor=monitor)
    assert monitor.measured_steps == 0 and monitor.steps_seen == 2


def test_per_example_norms_match_one_backward_per_example():
    """Sequences (3-d inputs) and a bias: N²·mean|c_n|² equals the mean of separate backward passes."""
    from batchtune.monitor import _PerExampleNorms

    torch.manual_seed(0)
    layer, a = torch.nn.Linear(5, 3), torch.randn(4, 6, 5)
    norms = _PerExampleNorms([layer], max_examples=None, micro_batch_size=4)
    layer(a).square().mean().backward()
    small, big, batch = norms.small_and_big()
    separate = []
    for n in range(4):
        layer.zero_grad()
        layer(a[n:n + 1]).square().mean().backward()
        separate.append(sum(float(p.grad.double().square().sum()) for p in layer.parameters()))
    layer.zero_grad()
    layer(a).square().mean().backward()
    assert batch == 4 and small == pytest.approx(sum(separate) / 4, rel=1e-5)
    assert big == pytest.approx(sum(float(p.grad.double().square().sum()) for p in layer.parameters()), rel=1e-6)


@pytest.mark.parametrize("accum", [1, 2])
def test_freezing_and_unfreezing_mid_run_measures_what_is_trainable_now(accum):
    """Freezing a layer with accum_steps=2 raised torch's "cannot register a hook on a tensor that doesn't require
    gradient" from step(); with accum_steps=1 coverage read 0.19 with every trainable parameter measured. After
    the freeze, a monitor made at the start reads each step as one made after it does."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    early = NoiseScaleMonitor(model, micro_batch_size=8, accum_steps=accum, every=1)
    late = None
    for step in range(8):
        if step == 4:
            model[0].requires_grad_(False)
            late = NoiseScaleMonitor(model, micro_batch_size=8, accum_steps=accum, every=1)
        for _ in range(accum):
            x, y = torch.randn(8, 8), torch.randint(0, 2, (8,))
            (torch.nn.functional.cross_entropy(model(x), y) / accum).backward()
        early.step()
        if late is not None:
            late.step()
            assert early.last == late.last and early.coverage == late.coverage == 1.0
        model.zero_grad(set_to_none=True)
    assert early.reading().steps == 8 and late.reading().steps == 4
    model[0].requires_grad_(True)  # armed at the end of step 8 on the head's 34 parameters of 178
    for _ in range(accum):
        torch.nn.functional.cross_entropy(model(torch.randn(8, 8)), torch.randint(0, 2, (8,))).backward()
    early.step()
    assert early.reading().steps == 9 and early.coverage == pytest.approx(34 / 178)


def test_a_parameter_monitor_told_no_micro_batch_says_what_to_call_and_removes_its_hooks():
    """Forgetting start_micro_batch()/end_micro_batch() raised "no micro-batch recorded since the last
    small_and_big()" and left the hooks registered, so the next step(), after begin() or not, raised it again."""
    model = torch.nn.Linear(4, 1)
    monitor = NoiseScaleMonitor(model.parameters(), micro_batch_size=8, accum_steps=4)
    monitor.begin()
    for _ in range(4):
        (model(torch.randn(8, 4)).square().mean() / 4).backward()
    with pytest.raises(RuntimeError, match=r"^step\(\) found no micro-batch recorded since begin\(\): call "
                                           r"start_micro_batch\(\) right before each backward pass"):
        monitor.step()
    assert not model.weight._backward_hooks and monitor.measured_steps == 0
    with pytest.raises(RuntimeError, match=r"call begin\(\) before the step's first backward pass"):
        monitor.step()


def _brute_per_example_sq_norms(a: torch.Tensor, g: torch.Tensor) -> list[float]:
    """|δ_nᵀa_n|² + |Σ_t δ_t|² per example, from the per-example gradients in float64."""
    return [float((gn.double().T @ an.double()).square().sum() + gn.double().sum(0).square().sum())
            for an, gn in zip(a, g)]


@pytest.mark.parametrize("steps, d_in, d_out", [(3, 5, 4), (12, 3, 2), (1, 5, 4)])
@pytest.mark.parametrize("chunk", [1, 1 << 22])
def test_per_example_norms_are_exact_by_either_method_in_any_chunking(monkeypatch, steps, d_in, d_out, chunk):
    """T² <= d_in·d_out takes the Gram form, T² > d_in·d_out the per-example gradients; chunks of one example
    give the same numbers as one chunk of all."""
    from batchtune import monitor as monitor_module

    monkeypatch.setattr(monitor_module, "PER_EXAMPLE_CHUNK_ELEMENTS", chunk)
    gen = torch.Generator().manual_seed(steps)
    a, g = torch.randn(5, steps, d_in, generator=gen), torch.randn(5, steps, d_out, generator=gen)
    got = monitor_module._linear_per_example_sq_norms(a, g, True, None)
    assert got.tolist() == pytest.approx(_brute_per_example_sq_norms(a, g), rel=1e-5)


def test_per_example_norms_of_a_long_sequence_allocate_no_time_by_time_matrix():
    """T=2048, d_in=32, d_out=16: the Gram form allocated 4 x 2048 x 2048 floats (64 MiB) at once; the
    per-example gradients are 4 x 16 x 32 floats (8192 bytes), the largest allocation now."""
    from batchtune.monitor import _linear_per_example_sq_norms

    a, g = torch.randn(4, 2048, 32), torch.randn(4, 2048, 16)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        got = _linear_per_example_sq_norms(a, g, True, None)
    assert max(event.cpu_memory_usage for event in prof.events()) == 4 * 16 * 32 * 4
    assert got.tolist() == pytest.approx(_brute_per_example_sq_norms(a, g), rel=1e-5)


def _ddp_rank(rank: int, world: int, init_file: str, out: str, accum: int) -> None:
    """One gloo rank: DDP over the linear regression at lr 0, its own data, only step() called."""
    import contextlib
    import json

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        d, micro, steps = 20, 16, 400
        model, sample = _linreg(d, 1.0, 1.0, seed=0)  # same weights on both ranks
        gen = torch.Generator().manual_seed(100 + rank)
        w_star = torch.randn(d, generator=torch.Generator().manual_seed(0))
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        monitor = NoiseScaleMonitor(ddp, micro_batch_size=micro, accum_steps=accum, every=1)
        for _ in range(steps):
            for i in range(accum):
                x = torch.randn(micro, d, generator=gen)
                y = x @ w_star + torch.randn(micro, generator=gen)
                with ddp.no_sync() if i < accum - 1 else contextlib.nullcontext():
                    (0.5 * (ddp(x).squeeze(-1) - y).square().mean() / accum).backward()
            monitor.step()
            ddp.zero_grad(set_to_none=True)
        reading = monitor.reading()
        with open(f"{out}.{rank}", "w") as f:
            json.dump({"b_simple": reading.b_simple, "low": reading.low, "high": reading.high,
                       "batch_sizes": monitor.batch_sizes}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("accum", [1, 2])
def test_under_ddp_each_rank_reads_its_local_gradient_against_the_reduced_one(tmp_path, accum):
    """Two gloo ranks: the small batch is a rank's backward pass, the big one the all-reduced step."""
    import json

    torch.multiprocessing.spawn(_ddp_rank, args=(2, str(tmp_path / "init"), str(tmp_path / "out"), accum),
                                nprocs=2, join=True)
    truth = 20 * (1 + 1.0) + 1
    for rank in (0, 1):
        reading = json.loads((tmp_path / f"out.{rank}").read_text())
        assert reading["batch_sizes"] == [16, 16 * accum * 2]
        assert reading["b_simple"] == pytest.approx(truth, rel=0.15)
        assert abs(reading["b_simple"] - truth) <= reading["high"] - reading["low"]


def test_a_monitor_given_parameters_says_what_it_needs_when_step_comes_alone():
    """An outside user passed model.parameters() and called only step(), as for a model: it raised
    AttributeError: 'NoneType' object has no attribute 'small_and_big'."""
    from batchtune.monitor import NoiseScaleMonitor

    model = torch.nn.Linear(3, 1)
    monitor = NoiseScaleMonitor(model.parameters(), micro_batch_size=4, accum_steps=2)
    model(torch.ones(4, 3)).sum().backward()
    with pytest.raises(RuntimeError, match=r"call begin\(\) before the step's first backward pass.*give it the model"):
        monitor.step()


# ------------------------------------------------------------ one micro-batch per step: which axis, which layers
class _TimeFirst(torch.nn.Module):
    """Linear layers applied to (T, B, C), as under nn.GRU/LSTM/Transformer's default batch_first=False."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = torch.nn.Linear(4, 16), torch.nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (T, B, 4) -> (B, 1)
        return self.l2(torch.tanh(self.l1(x))).mean(0)


def _layout_reading(time_first: bool, micro: int = 32, length: int = 12, steps: int = 200):
    """The outside user's case: lr 0, y = 0.1·Σx + noise, one micro-batch per step, every step measured."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = _TimeFirst()
    monitor = NoiseScaleMonitor(model, micro_batch_size=micro, accum_steps=1, every=1)
    for _ in range(steps):
        x = torch.randn(micro, length, 4, generator=gen)
        y = x.sum((1, 2))[:, None] * 0.1 + torch.randn(micro, 1, generator=gen)
        out = model(x.transpose(0, 1)) if time_first else model.l2(torch.tanh(model.l1(x))).mean(1)
        torch.nn.functional.mse_loss(out, y).backward()
        monitor.step()
        model.zero_grad(set_to_none=True)
    return monitor


def test_a_time_first_layout_is_read_on_the_axis_of_the_micro_batch():
    """(T=12, B=32, C): dim 0 as the examples read B_simple 1.04 where the truth is ~50 (accumulation, which
    needs no example axis, reads 50.5 on this model); the axis of size 32 reads what batch-first does."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about
        time_first, batch_first = _layout_reading(True).reading(), _layout_reading(False).reading()
    assert time_first.b_simple == pytest.approx(batch_first.b_simple, rel=1e-6)
    assert 40 < time_first.b_simple < 60 and time_first.low > 30  # not the 1.04 that dim 0 gave
    assert time_first.coverage == 1.0


def test_a_sequence_as_long_as_the_micro_batch_is_read_batch_first():
    """T == B: dims 0 and 1 both have the micro-batch size. Left out, a batch-first language model of that shape
    got no reading at all; dim 0, the batch-first convention, reads it as a longer sequence would."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about
        square = _layout_reading(False, micro=12, length=12).reading()
    assert square.b_simple is not None and square.coverage == 1.0
    longer = _layout_reading(False, micro=12, length=13).reading()  # 12 examples a step: noisy, wide bands
    assert square.low <= longer.b_simple <= square.high and longer.low <= square.b_simple <= longer.high


class _FlatThenHead(torch.nn.Module):
    """An embedding-like Linear on (B·T, C) (no axis of size B), then a head on (B, H)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj, self.head = torch.nn.Linear(4, 8), torch.nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, 4)
        b, t, c = x.shape
        return self.head(torch.tanh(self.proj(x.reshape(b * t, c))).reshape(b, t, -1).mean(1))


def test_a_layer_left_out_leaves_the_others_measured_and_the_coverage_says_so():
    torch.manual_seed(0)
    model = _FlatThenHead()
    monitor = NoiseScaleMonitor(model, micro_batch_size=16, accum_steps=1, every=1)
    with pytest.warns(RuntimeWarning, match=r"'proj': no axis of its input \[80, 4\] has the micro-batch size 16"):
        for _ in range(3):
            x = torch.randn(16, 5, 4)
            torch.nn.functional.mse_loss(model(x), x.sum((1, 2))[:, None]).backward()
            monitor.step()
            model.zero_grad(set_to_none=True)
    assert monitor.measured_steps == 3
    assert monitor.reading().coverage == pytest.approx(9 / (40 + 9))  # the head's 8 + 1 of 49 parameters


def test_a_one_layer_models_smaller_last_batch_is_not_said_to_leave_other_layers_read():
    model = torch.nn.Linear(4, 1)
    monitor = NoiseScaleMonitor(model, micro_batch_size=16, accum_steps=1, every=1)
    with pytest.warns(RuntimeWarning) as caught:
        model(torch.randn(8, 4)).square().mean().backward()  # the epoch's last batch: 8 of 16
        monitor.step()
    said = [str(w.message) for w in caught]
    assert any("'Linear': no axis of its input [8, 4] has the micro-batch size 16" in m and
               "no other layer was read, so the step is skipped, or use accum_steps >= 2" in m for m in said), said
    assert monitor.measured_steps == 0


def test_a_cnns_reading_says_it_covers_only_its_linear_layers():
    """The per-example path sees nn.Linear layers only: a CNN's convolutions are not in its reading."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv1d(4, 32, 5, padding=2), torch.nn.ReLU(),
                                torch.nn.Conv1d(32, 32, 5, padding=2), torch.nn.AdaptiveMaxPool1d(1),
                                torch.nn.Flatten(), torch.nn.Linear(32, 4))
    with pytest.warns(RuntimeWarning, match=r"nn.Linear layers only, 2% of the model's trainable parameters"):
        monitor = NoiseScaleMonitor(model, micro_batch_size=8, accum_steps=1, every=1)
    x, y = torch.randn(8, 4, 16), torch.randint(0, 4, (8,))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    monitor.step()
    share = (32 * 4 + 4) / (4 * 32 * 5 + 32 + 32 * 32 * 5 + 32 + 32 * 4 + 4)  # 132 of 5,956
    assert monitor.measured_steps == 1 and monitor.reading().coverage == pytest.approx(share)
    assert NoiseScaleMonitor(model, micro_batch_size=8, accum_steps=2).reading().coverage == 1.0


@pytest.mark.parametrize("misuse", ["undeclared_accumulation", "validation_with_grad"])
def test_a_layer_run_more_than_once_names_the_likely_causes_and_warns_at_an_interval(monkeypatch, misuse):
    """accum_steps=1 declared but 4 backward passes run, or a validation forward without torch.no_grad(): the
    step is skipped, with a warning that says why on the first skipped step and then every SKIP_WARN_EVERY."""
    import batchtune.monitor

    monkeypatch.setattr(batchtune.monitor, "SKIP_WARN_EVERY", 3)
    model, sample = _linreg(4, 1.0, 1.0)
    monitor = NoiseScaleMonitor(model, micro_batch_size=8, accum_steps=1, every=1)
    with pytest.warns(RuntimeWarning) as caught:
        for _ in range(7):
            for _ in range(4 if misuse == "undeclared_accumulation" else 1):
                x, y = sample(8)
                (0.5 * (model(x).squeeze(-1) - y).square().mean()).backward()
            if misuse == "validation_with_grad":
                model(sample(20)[0])  # grad enabled: the hooks see it (its other batch is not a layout problem)
            monitor.step()
            model.zero_grad(set_to_none=True)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 3 and monitor.measured_steps == 0 and monitor.steps_seen == 7
    assert messages[0] == (
        "noise scale: a measured step was skipped: layer 'Linear' ran forward more than once with grad enabled in "
        "the step, where one micro-batch per step needs one forward and one backward: backward passes accumulated "
        "but not declared (give accum_steps= the passes per optimizer step), a forward with grad enabled outside "
        "the step (e.g. validation without torch.no_grad()), or a layer applied twice in the model (1 measured "
        "step skipped for this so far; warned again every 3)")
    assert [m[m.index("(", len(m) - 70):] for m in messages[1:]] == [
        "(3 measured steps skipped for this so far; warned again every 3)",
        "(6 measured steps skipped for this so far; warned again every 3)"]


class _DeadHead(torch.nn.Module):
    """An MLP with an auxiliary head that runs forward but does not feed the loss (a head kept for later)."""

    def __init__(self, run_aux: bool = True) -> None:
        super().__init__()
        self.body, self.head, self.aux = torch.nn.Linear(8, 16), torch.nn.Linear(16, 1), torch.nn.Linear(16, 3)
        self.run_aux = run_aux

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.tanh(self.body(x))
        if self.run_aux:
            self.last_aux = self.aux(z)
        return self.head(z)


def _dead_head_reading(accum: int, run_aux: bool = True, steps: int = 800):
    """The reading at fixed weights on the same 32 examples a step, run as one batch or as accum micro-batches."""
    torch.manual_seed(0)
    model = _DeadHead(run_aux)
    gen, teacher = torch.Generator().manual_seed(2), torch.randn(8, 1, generator=torch.Generator().manual_seed(1))
    monitor = NoiseScaleMonitor(model, micro_batch_size=32 // accum, accum_steps=accum, every=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            x = torch.randn(32, 8, generator=gen)
            y = x @ teacher + 0.5 * torch.randn(32, 1, generator=gen)
            for xs, ys in zip(x.chunk(accum), y.chunk(accum)):
                (torch.nn.functional.mse_loss(model(xs), ys) / accum).backward()
            monitor.step()
            model.zero_grad(set_to_none=True)
    return monitor.reading(), [str(w.message) for w in caught if "noise scale" in str(w.message)]


def test_a_linear_layer_whose_output_does_not_feed_the_loss_is_left_out_not_every_step_skipped():
    """One micro-batch per step: an auxiliary head that ran forward but got no gradient made every measured
    step be skipped with "no nn.Linear layer ran forward and backward in the step"."""
    reading, said = _dead_head_reading(accum=1)
    assert said == ["noise scale: left out of the per-example norms (warned once per layer): 'aux': ran forward, "
                    "but no gradient reached its output (the output does not feed the loss); the reading covers the "
                    "other layers (reading().coverage), or use accum_steps >= 2, which needs no example axis"]
    assert reading.steps == 800 and reading.coverage == pytest.approx((8 * 16 + 16 + 16 + 1) / (161 + 51))
    # exactly the reading of the same model whose head never runs
    assert reading.b_simple == _dead_head_reading(accum=1, run_aux=False)[0].b_simple
    # and within the band of the accumulation path, which measures the same parameters on the same examples
    passes, said = _dead_head_reading(accum=2)
    assert said == [] and passes.steps == 800
    assert passes.low <= reading.b_simple <= passes.high, (reading, passes)  # 15.15 in 13.10-15.89


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_reads_the_same_as_without_it(reentrant):
    """Checkpointing re-runs a layer's forward inside backward (with grad, or first without grad when reentrant):
    one micro-batch per step read 'ran forward more than once' and skipped every step (an outside tiny GPT-2 in a
    Trainer with gradient_checkpointing=True got no reading at all)."""
    from torch.utils.checkpoint import checkpoint

    class Net(torch.nn.Module):
        def __init__(self, checkpointed: bool) -> None:
            super().__init__()
            self.a, self.b, self.checkpointed = torch.nn.Linear(8, 32), torch.nn.Linear(32, 1), checkpointed

        def forward(self, x):
            block = lambda t: torch.tanh(self.a(t))  # noqa: E731
            return self.b(checkpoint(block, x, use_reentrant=reentrant) if self.checkpointed else block(x))

    readings = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model, gen = Net(checkpointed), torch.Generator().manual_seed(1)
        sample = lambda n: (torch.randn(n, 8, generator=gen).requires_grad_(reentrant),  # noqa: E731
                            torch.randn(n, generator=gen) + 3)
        monitor = NoiseScaleMonitor(model, micro_batch_size=16, every=1)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no step skipped
            _loop(model, sample, micro=16, accum=1, steps=30, optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
                  monitor=monitor)
        readings.append(monitor.reading())
    plain, checkpointed = readings
    assert checkpointed.steps == plain.steps == 30 and checkpointed.coverage == 1.0
    assert checkpointed.b_simple == pytest.approx(plain.b_simple, rel=1e-9) and plain.b_simple > 1


def test_a_transformer_encoders_coverage_leaves_out_the_attention_projection_that_never_runs():
    """An outside ViT on nn.TransformerEncoder read coverage 0.55 at construction, counting each
    self_attn.out_proj, whose forward nn.MultiheadAttention never calls (it applies the weight itself): every
    measured step read 0.44, under the 0.5 warning threshold, and no warning came."""
    torch.manual_seed(0)

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            layer = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
            self.enc = torch.nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
            self.head = torch.nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.enc(x)[:, 0])

    model = Encoder()
    # in_proj 192 + 24, out_proj 64 + 8, linear1 128 + 16, linear2 128 + 8, two LayerNorms 32, head 32 + 4
    assert sum(p.numel() for p in model.parameters()) == 636
    read = (128 + 16) + (128 + 8) + (32 + 4)  # linear1, linear2, head: 316 of 636, 0.497
    with pytest.warns(RuntimeWarning, match=r"nn.Linear layers only, 50% of the model's trainable parameters"):
        monitor = NoiseScaleMonitor(model, micro_batch_size=6, accum_steps=1, every=1)
    assert monitor.coverage == pytest.approx(read / 636)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            x, y = torch.randn(6, 5, 8), torch.randint(0, 4, (6,))
            torch.nn.functional.cross_entropy(model(x), y).backward()
            monitor.step()
            model.zero_grad(set_to_none=True)
    assert [str(w.message) for w in caught] == []  # warned once, at construction
    assert monitor.reading().steps == 3 and monitor.reading().coverage == pytest.approx(read / 636)


def test_coverage_that_a_measured_step_finds_low_is_warned_once_at_the_users_line():
    """A layer whose weight the model applies itself (F.linear) counts at construction but is never read: the
    warning must come from what the measured steps read, once."""
    torch.manual_seed(0)

    class Functional(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.head = torch.nn.Linear(16, 16), torch.nn.Linear(16, 2)  # 272 and 34 parameters

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(torch.nn.functional.linear(x, self.body.weight, self.body.bias)))

    model = Functional()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor = NoiseScaleMonitor(model, micro_batch_size=8, accum_steps=1, every=1)
        assert monitor.coverage == 1.0 and caught == []
        for _ in range(3):
            model(torch.randn(8, 16)).square().mean().backward()
            monitor.step()  # the user's line the warning points at
            model.zero_grad(set_to_none=True)
    said = [(str(w.message), w.filename) for w in caught]
    assert said == [("noise scale: a measured step read per-example norms of nn.Linear layers holding only 11% of "
                     "the model's trainable parameters (a layer whose weight the model applies itself, one left out, "
                     "or one frozen when the step was armed gives none): B_simple is theirs (reading().coverage); "
                     "accum_steps >= 2 measures them all", __file__)]
    assert monitor.reading().steps == 3 and monitor.reading().coverage == pytest.approx(34 / 306)


@pytest.mark.parametrize("params, message", [
    (None, "params must be the model (an nn.Module) or its parameters (model.parameters()), got None (NoneType)"),
    ("model", "params must be the model (an nn.Module) or its parameters (model.parameters()), got 'model' (str)"),
    (torch.nn.Linear(4, 2).state_dict(), "params must be the model (an nn.Module) or its parameters "
                                         "(model.parameters()), got a mapping (OrderedDict, 2 entries): a state_dict "
                                         "holds detached tensors, not the parameters trained"),
    (torch.zeros(3, 4), "params must be the model (an nn.Module) or its parameters (model.parameters()), got one "
                        "Tensor of shape (3, 4): pass [it]"),
    ([torch.nn.Linear(4, 2).weight, 3], "params must be the model (an nn.Module) or its parameters "
                                        "(model.parameters()): item 1 of those given is 3 (int), not a tensor"),
])
def test_params_that_are_neither_a_model_nor_parameters_are_refused_by_name(params, message):
    """NoiseScaleMonitor(None, micro_batch_size=8) raised "'NoneType' object is not iterable" from inside."""
    with pytest.raises(TypeError) as caught:
        NoiseScaleMonitor(params, micro_batch_size=8)
    assert str(caught.value) == message


@pytest.mark.parametrize("kwargs, message", [
    ({"ema_decay": None}, "ema_decay must be a number, got None (NoneType)"),
    ({"confidence": "90%"}, "confidence must be a number, got '90%' (str)"),
    ({"confidence": True}, "confidence must be a number, got True (bool)"),
])
def test_fractions_that_are_not_numbers_are_refused_by_name(kwargs, message):
    """confidence=None raised "'<' not supported between instances of 'float' and 'NoneType'"."""
    with pytest.raises(TypeError) as caught:
        NoiseScaleMonitor(torch.nn.Linear(4, 2), micro_batch_size=8, **kwargs)
    assert str(caught.value) == message


def test_a_band_wider_than_ten_times_is_no_reliable_reading_and_batchnorm_is_said():
    """An outside loop's monitor called bands of 180-11,927 reliable, which `batchtune noise` calls unreliable past
    10x; on its BatchNorm model it read about half of noise's and said nothing of BatchNorm, as noise does."""
    from batchtune.stats.noise import NoiseScaleEstimate

    monitor = NoiseScaleMonitor(torch.nn.Linear(4, 1), micro_batch_size=8, accum_steps=2)
    for low, high, reliable in ((180.0, 11_927.0, False), (100.0, 900.0, True), (0.0, 50.0, False)):
        monitor.estimator.estimate = lambda low=low, high=high: NoiseScaleEstimate(300.0, low, high, 1.0, 300.0, 20,
                                                                                   True)
        assert monitor.reading().reliable is reliable
    with pytest.warns(UserWarning, match="the model has BatchNorm: its micro-batch .* biases B_simple"):
        NoiseScaleMonitor(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4)), micro_batch_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        NoiseScaleMonitor(torch.nn.Linear(4, 1), micro_batch_size=8)


def test_a_reading_of_a_few_layers_is_not_reliable_and_a_new_shape_does_not_warn_again():
    """An outside CNN's per-example reading covered its Linear head alone (6% of the parameters): it read 56,
    'reliable', where accumulating two passes read the whole gradient's 9.4; and its coverage warning came again
    when the schedule grew the batch (set_batch)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv1d(1, 16, 9), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(16, 2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor = NoiseScaleMonitor(model, micro_batch_size=32, accum_steps=1, every=1)
        for step in range(40):
            model(torch.randn(32 if step < 20 else 64, 1, 9)).square().mean().backward()
            monitor.step()
            model.zero_grad(set_to_none=True)
            if step == 19:
                monitor.set_batch(64)
    said = [str(w.message) for w in caught if "of the model's trainable parameters" in str(w.message)]
    assert len(said) == 1 and "the nn.Linear layers only, 18% of" in said[0]  # 34 of 194 parameters, said once
    r = monitor.reading()
    assert r.coverage == pytest.approx(34 / 194) and r.b_simple is not None and not r.reliable


def test_arguments_out_of_range_are_refused_before_any_warning_of_the_model():
    """An outside ema_decay=1.5 on a model measured in part gave the coverage warning, then the ValueError."""
    model = torch.nn.Sequential(torch.nn.Conv1d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(8, 2))
    for kwargs, said in (({"ema_decay": 1.5}, "ema_decay must be in [0, 1)"), ({"confidence": 0}, "confidence")):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(ValueError, match=re.escape(said)):
                NoiseScaleMonitor(model, micro_batch_size=4, **kwargs)
        assert caught == []
