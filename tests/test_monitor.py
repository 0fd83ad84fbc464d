"""NoiseScaleMonitor driven from a hand-written loop, as a user's own loop would drive it."""

from __future__ import annotations

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
