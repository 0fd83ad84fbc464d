"""Dynamic batching at a request rate: a discrete-event simulation on a service-time curve.

A dynamic batcher (Triton's, TorchServe's) holds requests in one queue in front of one
model instance. When the instance is free it sends the queued requests as one batch as
soon as either ``max_batch_size`` of them wait or the oldest has waited
``max_queue_delay``; a request that arrives while a batch runs waits for the next one.
With arrivals ``t`` sorted, the instance free at ``F`` and the oldest waiting request
``i``, the next batch leaves at::

    D = max(F, min(t[i] + delay, t[i + B - 1]))

and takes every request that has arrived by ``D``, at most ``B``; it finishes at
``D + service(n)``. Everything here is numpy and pure, so the queueing cases with known
answers (M/D/1, a lone request waiting out the delay) test it directly.

Many settings are simulated in lockstep: each loop iteration dispatches one batch for
every setting still running, so the Python loop runs as many times as the smallest
batches need, not once per setting.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["BatcherSetting", "DynamicChoice", "ServiceCurve", "choose_setting", "delay_grid",
           "poisson_arrivals", "simulate"]

#: Requests at the start of a simulation left out of its statistics (the queue starts empty).
WARMUP_SHARE = 0.05

Service = Callable[[np.ndarray, np.random.Generator], np.ndarray]


@dataclass(frozen=True)
class ServiceCurve:
    """Seconds a batch of ``n`` takes, interpolated linearly between measured sizes.

    Below the smallest measured size the curve keeps that size's time; above the largest it
    continues the last segment's slope. With ``ratios`` (for each measured size, its latencies
    over its time on the curve), every batch's time is the curve's times one ratio drawn at random from
    the nearest measured size's, so the simulation keeps the spread measured at that size;
    without them it is deterministic.
    """

    sizes: np.ndarray
    seconds: np.ndarray
    pools: np.ndarray | None = None  # (sizes, longest pool) ratios, NaN-padded
    pool_lengths: np.ndarray | None = None

    @classmethod
    def from_points(cls, sizes: Sequence[int], seconds: Sequence[float],
                    ratios: Sequence[Sequence[float]] | None = None) -> ServiceCurve:
        """``ratios[k]``: the measured latencies over ``seconds[k]`` at ``sizes[k]`` (or None)."""
        order = np.argsort(np.asarray(sizes))
        curve = cls(np.asarray(sizes, float)[order], np.asarray(seconds, float)[order])
        if ratios is None or not all(len(r) for r in ratios):
            return curve
        ordered = [np.asarray(ratios[k], float) for k in order]
        lengths = np.array([len(r) for r in ordered])
        pools = np.full((len(ordered), lengths.max()), np.nan)
        for k, r in enumerate(ordered):
            pools[k, :len(r)] = r
        return cls(curve.sizes, curve.seconds, pools, lengths)

    def typical(self, n: np.ndarray | float) -> np.ndarray:
        """The curve's seconds at ``n`` (no spread)."""
        n = np.asarray(n, float)
        out = np.interp(n, self.sizes, self.seconds)
        if len(self.sizes) >= 2:
            slope = (self.seconds[-1] - self.seconds[-2]) / (self.sizes[-1] - self.sizes[-2])
            out = np.where(n > self.sizes[-1], self.seconds[-1] + slope * (n - self.sizes[-1]), out)
        return out

    def __call__(self, n: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        base = self.typical(n)
        if self.pools is None:
            return base
        n = np.asarray(n, float)
        right = np.clip(np.searchsorted(self.sizes, n), 0, len(self.sizes) - 1)
        left = np.clip(right - 1, 0, len(self.sizes) - 1)
        nearest = np.where(np.abs(self.sizes[left] - n) <= np.abs(self.sizes[right] - n), left, right)
        pick = (rng.random(np.shape(base)) * self.pool_lengths[nearest]).astype(np.int64)
        return base * self.pools[nearest, pick]


def poisson_arrivals(rate: float, n: int, seed: int = 0) -> np.ndarray:
    """``n`` arrival times (seconds) of a Poisson process at ``rate`` requests per second."""
    rng = np.random.default_rng(seed)
    return np.cumsum(rng.exponential(1.0 / rate, size=n))


@dataclass
class BatcherSetting:
    """One batcher setting's simulated outcome (times in seconds)."""

    max_batch_size: int
    max_queue_delay: float
    p50: float
    p90: float
    p99: float
    at_percentile: float  # latency at the percentile the simulation was asked for
    mean: float
    mean_batch: float  # requests per batch, on average
    served_per_busy_s: float  # requests per second of device time: the throughput one device gives
    utilisation: float  # share of the simulated time the device was busy
    sustains: bool = True  # the rate is below what full batches serve (set by choose_setting)


def simulate(arrivals: np.ndarray, service: Service, max_batch: Sequence[int], max_delay: Sequence[float],
             *, seed: int = 0, percentile: float = 99.0) -> list[BatcherSetting]:
    """Simulate a dynamic batcher at each (``max_batch[k]``, ``max_delay[k]``) on the same arrivals.

    The first :data:`WARMUP_SHARE` of the requests are left out of the latency statistics.

    Args:
        arrivals: sorted arrival times, seconds.
        service: ``service(batch_sizes, rng)``, seconds for each batch (vectorised).
        max_batch, max_delay: the settings, one entry each (delay in seconds).
        seed: for the service times' spread.
        percentile: the latency percentile kept as ``at_percentile`` (50, 90, 99 always are).

    Returns:
        One :class:`BatcherSetting` per setting, in order.
    """
    t = np.asarray(arrivals, float)
    n_req = len(t)
    size = np.asarray(max_batch, np.int64)
    delay = np.asarray(max_delay, float)
    done_log, start_log, busy = _run_lockstep(t, service, size, delay, np.random.default_rng(seed))
    first = int(n_req * WARMUP_SHARE)
    out = []
    for k in range(len(size)):
        batches = int(np.count_nonzero(~np.isnan(done_log[:, k])))
        done = done_log[:batches, k]
        counts = np.diff(np.append(start_log[:batches, k], n_req))
        latency = (np.repeat(done, counts) - t)[first:]
        p50, p90, p99, chosen = np.percentile(latency, [50, 90, 99, percentile])
        out.append(BatcherSetting(int(size[k]), float(delay[k]), float(p50), float(p90), float(p99), float(chosen),
                                  float(latency.mean()), n_req / batches, n_req / float(busy[k]),
                                  float(busy[k] / max(done[-1] - t[0], 1e-12))))
    return out


def _run_lockstep(t: np.ndarray, service: Service, size: np.ndarray, delay: np.ndarray,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dispatch batches for every setting at once until each has served every request.

    Returns (finish time of each setting's b-th batch, its first request, busy seconds per
    setting); the logs are (batches, settings), NaN / 0 past a setting's last batch.
    """
    n_req, n_set = len(t), len(size)
    padded = np.append(t, np.inf)  # "the B-th request never comes": the delay decides
    next_req = np.zeros(n_set, np.int64)
    free_at = np.full(n_set, -np.inf)
    busy = np.zeros(n_set)
    done_log = np.full((n_req, n_set), np.nan)
    start_log = np.zeros((n_req, n_set), np.int64)
    active = np.arange(n_set)
    step = 0
    while active.size:
        first = next_req[active]
        full_at = padded[np.minimum(first + size[active] - 1, n_req)]
        leave = np.maximum(free_at[active], np.minimum(t[first] + delay[active], full_at))
        last = np.minimum(first + size[active], np.searchsorted(t, leave, side="right"))
        seconds = service(last - first, rng)
        done_log[step, active] = leave + seconds
        start_log[step, active] = first
        free_at[active] = leave + seconds
        busy[active] += seconds
        next_req[active] = last
        active = active[last < n_req]
        step += 1
    return done_log[:step], start_log[:step], busy


def delay_grid(budget_s: float) -> list[float]:
    """Queue delays worth trying under a latency budget: none, then 1/64 … 3/4 of the budget."""
    return [0.0] + [budget_s * share for share in (1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 3 / 8, 1 / 2, 3 / 4)]


@dataclass
class DynamicChoice:
    """The batcher setting for a rate, or why there is none."""

    rate: float
    percentile: float
    budget_s: float
    best: BatcherSetting | None
    settings: list[BatcherSetting] = field(default_factory=list)
    capacity: float = 0.0  # the most requests per second any size serves in full batches
    capacity_batch: int = 0  # the size that does
    reason: str | None = None  # why nothing was chosen: "rate" (no setting sustains it) | "budget"
    requests: int = 0
    seconds: float = 0.0  # the simulation's own run time


def choose_setting(curve: ServiceCurve, sizes: Sequence[int], *, rate: float, budget_s: float,
                   percentile: float = 99.0, n_requests: int = 20000, seed: int = 0) -> DynamicChoice:
    """The (max batch, max queue delay) meeting the percentile budget at ``rate`` with the most
    requests served per second of device time; ties (within 1%) go to the lower percentile.

    A setting sustains the rate when full batches serve more than it (``rate · s(B) / B < 1``:
    a backlogged batcher sends full batches); one that does not is never chosen, whatever its
    finite simulation shows.
    """
    import time

    start = time.perf_counter()
    sizes = sorted({int(b) for b in sizes})
    delays = delay_grid(budget_s)
    grid = [(b, d) for b in sizes for d in (delays if b > 1 else [0.0])]  # one request: no delay helps
    arrivals = poisson_arrivals(rate, n_requests, seed)
    settings = simulate(arrivals, curve, [b for b, _ in grid], [d for _, d in grid], seed=seed + 1,
                        percentile=percentile)
    per_batch = np.asarray(sizes, float) / curve.typical(np.asarray(sizes, float))
    for s in settings:
        s.sustains = bool(rate < s.max_batch_size / float(curve.typical(s.max_batch_size)))
    choice = DynamicChoice(rate, percentile, budget_s, None, settings, float(per_batch.max()),
                           sizes[int(per_batch.argmax())], requests=n_requests)
    meeting = [s for s in settings if s.sustains and s.at_percentile <= budget_s]
    if meeting:
        top = max(s.served_per_busy_s for s in meeting)
        near = [s for s in meeting if s.served_per_busy_s >= 0.99 * top]
        choice.best = min(near, key=lambda s: (s.at_percentile, s.max_queue_delay))
    else:
        choice.reason = "budget" if any(s.sustains for s in settings) else "rate"
    choice.seconds = time.perf_counter() - start
    return choice

