"""Batches for a trial: an endless shuffled stream, and a feed that puts them on the device.

The feed is where a step waits for data: it times the wait (fetch, transfer, counting the
batch's memory) apart from the compute, and counts the samples that went by.
:func:`batch_limit` says, before anything is collated, how large a batch the data set and
the host's memory allow.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch.utils._pytree import tree_flatten, tree_leaves, tree_map, tree_unflatten
from torch.utils.data import DataLoader, Dataset, RandomSampler, TensorDataset, default_collate

from batchtune.config.components import batch_size_of, to_device
from batchtune.engine.distributed import DistContext
from batchtune.engine.shape import BatchShape
from batchtune.memory.device import DeviceBackend
from batchtune.render.text import count_of

__all__ = ["BatchLimit", "Feed", "FetchTiming", "LongestFirst", "PlannedBatches", "batch_limit", "batches",
           "data_source", "fetch_timing", "halves", "load_next", "loader_kind", "nonfinite_samples", "noted",
           "padding_waste", "per_sample", "random_batches", "sample_bytes", "tensors", "token_batches",
           "unsplittable", "within_limits", "worst_case"]

#: Collating a batch can hold its samples and the stacked batch at once: twice its bytes.
COLLATE_COPIES = 2


class LongestFirst(Dataset):
    """A data set ordered longest sample first: :func:`batches` draws every batch from its head,
    so a batch of ``b`` holds the ``b`` longest samples (the worst case, once collated).

    Args:
        dataset: the samples.
        lengths: each sample's length, in the data set's order.
    """

    def __init__(self, dataset: Dataset, lengths: Sequence[int]) -> None:
        self.dataset = dataset
        self.order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep their order
        self.lengths = [lengths[i] for i in self.order]

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, index: int) -> Any:
        return _fetch(self.dataset, self.order[index])


class PlannedBatches(Dataset):
    """A data set whose batches are given as lists of sample indices, taken in order and cycled
    (how a length-bucketed sampler would batch it; :func:`batches` follows the plan)."""

    def __init__(self, dataset: Dataset, plan: list[list[int]]) -> None:
        if not plan or not all(plan):
            raise ValueError("a batch plan needs at least one non-empty batch")
        self.dataset = dataset
        self.plan = plan

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        return _fetch(self.dataset, index)


class _Noted(Dataset):
    """The user's data set, each fetch that raises noted with its sample's index (:func:`_fetch`)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        return _fetch(self.dataset, index)


class _NotedBatches(_Noted):
    """The user's data set that fetches a batch at once (``__getitems__``, which DataLoader's fetcher calls instead
    of ``__getitem__``), each fetch that raises noted with the sample to blame (:func:`_fetch_batch`)."""

    def __getitems__(self, indices: list[int]) -> Any:
        return _fetch_batch(self.dataset, indices)


def noted(dataset: Dataset) -> Dataset:
    """``dataset`` with its failed fetches noted by index, for a DataLoader; as it is where it notes its own
    already."""
    if isinstance(dataset, (_Noted, LongestFirst, PlannedBatches)):
        return dataset
    return _NotedBatches(dataset) if callable(getattr(dataset, "__getitems__", None)) else _Noted(dataset)


def _fetch(dataset: Dataset, index: int) -> Any:
    """``dataset[index]``; what it raises carries the index (:data:`~batchtune.errors.SAMPLE_NOTE`), so that a
    failure reads as the data's, at that sample: an outside data set's KeyError for one index was blamed on the
    model and the loss."""
    from batchtune.errors import SAMPLE_NOTE

    try:
        return dataset[index]
    except Exception as exc:
        if not any(note.startswith(SAMPLE_NOTE) for note in getattr(exc, "__notes__", ())):
            exc.add_note(f"{SAMPLE_NOTE}{index}")
        raise


class _Collated:
    """A collate whose failure carries :data:`~batchtune.errors.COLLATE_NOTE` (from a DataLoader worker too, in its
    traceback's text), so that :func:`load_next` tells it from a sample's fetch: the data's form, the spec's."""

    def __init__(self, collate: Callable[[list[Any]], Any]) -> None:
        self.collate = collate

    def __call__(self, samples: list[Any]) -> Any:
        from batchtune.errors import COLLATE_NOTE

        try:
            return self.collate(samples)
        except Exception as exc:
            if COLLATE_NOTE not in getattr(exc, "__notes__", ()):
                exc.add_note(COLLATE_NOTE)
            raise


def noted_collate(collate_fn: Callable[[list[Any]], Any] | None) -> Callable[[list[Any]], Any]:
    """``collate_fn`` (torch's default where None) with its failures noted (:class:`_Collated`)."""
    return collate_fn if isinstance(collate_fn, _Collated) else _Collated(collate_fn or default_collate)


#: The indices a batch note lists before it gives only their count.
BATCH_NOTE_INDICES = 8


def _fetch_batch(dataset: Dataset, indices: list[int]) -> Any:
    """``dataset.__getitems__(indices)``; what it raises carries the sample to blame: the first of ``indices`` whose
    own fetch (``dataset[i]``) raises the same type of error (the batch's own failure, named by sample), else the
    batch's indices (:data:`~batchtune.errors.BATCH_NOTE`). An outside data set fetching its batches at once was
    told of its error with no sample named. The samples are fetched one by one only once the batch has failed."""
    from batchtune.errors import BATCH_NOTE, SAMPLE_NOTE

    try:
        return dataset.__getitems__(indices)
    except Exception as exc:
        if not any(note.startswith((SAMPLE_NOTE, BATCH_NOTE)) for note in getattr(exc, "__notes__", ())):
            index = _first_raising(dataset, indices, type(exc))
            shown = ", ".join(map(str, indices[:BATCH_NOTE_INDICES]))
            shown += f", … ({len(indices)} in all)" if len(indices) > BATCH_NOTE_INDICES else ""
            exc.add_note(f"{SAMPLE_NOTE}{index}" if index is not None else f"{BATCH_NOTE}{shown}")
        raise


def _first_raising(dataset: Dataset, indices: list[int], kind: type[BaseException]) -> int | None:
    """The first of ``indices`` whose ``dataset[i]`` raises ``kind`` (None: none does, or the data set reads only
    whole batches: its ``__getitem__`` is torch's, which raises NotImplementedError for any)."""
    if getattr(type(dataset), "__getitem__", None) in (None, Dataset.__getitem__):
        return None
    for index in indices:
        try:
            dataset[index]
        except kind:
            return index
        except Exception:  # noqa: BLE001 - another error: not the batch's, so not its sample to name
            continue
    return None


def worst_case(components: Any) -> Any:
    """``components`` whose training batches are the longest samples, collated (itself for
    fixed-length data): what the probe and check's fits run measure."""
    if not components.variable_length:
        return components
    return dataclasses.replace(components, train_set=LongestFirst(components.train_set, components.lengths()))


def random_batches(n: int, batch_size: int, seed: int = 0) -> list[list[int]]:
    """One epoch of shuffled fixed-size batches of ``n`` samples (the last partial one dropped;
    one batch with repeats when ``n < batch_size``)."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    if n < batch_size:
        return [[order[i % n] for i in range(batch_size)]]
    return [order[i:i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]


def token_batches(lengths: Sequence[int], max_tokens: int, seed: int = 0,
                  max_rows: int | None = None) -> list[list[int]]:
    """Length-bucketed batches: samples sorted by length, cut into batches of at most
    ``max_tokens`` padded tokens (rows × the batch's longest) and at most ``max_rows`` samples
    (None: no limit), the batches then shuffled.

    A sample longer than ``max_tokens`` makes a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    out: list[list[int]] = []
    current: list[int] = []
    for i in order:
        if current and ((len(current) + 1) * lengths[i] > max_tokens or len(current) == max_rows):
            out.append(current)
            current = []
        current.append(i)
    if current:
        out.append(current)
    random.Random(seed).shuffle(out)
    return out


def padding_waste(lengths: Sequence[int], plan: list[list[int]]) -> float:
    """The share of padded tokens that are padding, over the batches of ``plan``."""
    padded = sum(len(b) * max(lengths[i] for i in b) for b in plan)
    real = sum(lengths[i] for b in plan for i in b)
    return 1.0 - real / padded if padded else 0.0


def within_limits(shape: BatchShape, train_set: Any, notes: list[str], verb: str = "checked",
                  multiple: int = 1, timeout: float | None = None) -> BatchShape:
    """The shape, its batch capped at the training set's size (to a multiple of ``multiple`` micro-batches'
    worth: 2 for noise's halves); refused if host memory cannot collate it. ``timeout``: as :func:`batch_limit`'s.

    Raises:
        UsageError: collating the batch would need more host memory than is available.
    """
    from batchtune.errors import UsageError
    from batchtune.render.text import format_bytes

    limit = batch_limit(train_set, timeout)
    per_step = shape.accum_steps * shape.world_size * multiple
    if limit.samples is not None and limit.samples < per_step:  # one sample read B_simple 0, band 0-0, "reliable"
        ranks = count_of(shape.world_size, "rank")
        raise UsageError(f"the training set has {count_of(limit.samples, 'sample')}, fewer than the {per_step} "
                         f"micro-batches of a step ({shape.accum_steps} accumulated × {ranks}"
                         f"{' × 2 halves' if multiple == 2 else ''}): every one would repeat the same samples")
    if limit.samples is not None and shape.batch_size > limit.samples >= per_step:
        capped = BatchShape.split(limit.samples // per_step * per_step, shape.accum_steps, shape.world_size)
        notes.append(f"batch {shape.batch_size:,} is larger than the training set "
                     f"({count_of(limit.samples, 'sample')}): "
                     f"{verb} at {capped.batch_size:,}, the largest batch it can fill"
                     + (" in halves" if multiple == 2 else ""))
        shape = capped
    need = limit.bytes_for(shape.micro_batch_size)
    if need is not None and limit.available_bytes is not None and need > limit.available_bytes:
        raise UsageError(
            f"batch {shape.batch_size:,} (micro-batch {shape.micro_batch_size:,}) would need about "
            f"{format_bytes(need)} of host memory to collate ({format_bytes(limit.bytes_per_sample)} per sample, "
            f"from the first one); {format_bytes(limit.available_bytes)} is available: choose a smaller "
            "--batch-size or more --accum-steps")
    return shape


def loader_kind(dataset: Dataset, num_workers: int = 0, collate_fn: Callable[[list[Any]], Any] | None = None) -> str:
    """Which loader :func:`batches` uses for ``dataset``, in words for the report."""
    if isinstance(dataset, LongestFirst):
        return "the longest samples, collated (the worst case)"
    if not per_sample(dataset, num_workers, collate_fn):
        return "in-memory tensors indexed once per batch"
    workers = f", {num_workers} worker{'s' * (num_workers != 1)}" if num_workers else ", in the main process"
    return f"DataLoader (per-sample fetch and collate{workers})"


def per_sample(dataset: Dataset, num_workers: int = 0, collate_fn: Callable[[list[Any]], Any] | None = None) -> bool:
    """Whether :func:`batches` fetches ``dataset``'s batches sample by sample and collates them (a DataLoader's)."""
    return not isinstance(dataset, (LongestFirst, PlannedBatches)) and not (
        _indexable(dataset, num_workers) and collate_fn is None)


class FetchTiming(NamedTuple):
    """One batch fetched as a DataLoader in the main process fetches it, and as in-memory tensors indexed at once."""

    seconds: float  # fetched sample by sample and collated
    cpu_seconds: float  # the process's CPU time in that: far below ``seconds``, the fetch waits (a disk, a network)
    indexed_seconds: float | None  # the collated batch's tensors indexed at once (None: the batch is not all tensors)


def fetch_timing(dataset: Dataset, batch_size: int, repeats: int = 5) -> FetchTiming:
    """A batch of ``batch_size`` of ``dataset``'s samples fetched one by one and collated (torch's default; of up to
    3 such batches, the one whose fetch most of a core went to), then its tensors indexed with a shuffled index
    ``repeats`` times (the fastest), as :func:`batches` takes a ``TensorDataset``'s. What check times beside a
    per-sample loader that keeps the training waiting, so that its advice says what batched fetching would save,
    and whether worker processes would have waiting to overlap."""
    n, timing, leaves = max(1, min(batch_size, len(dataset))), None, []
    # the fetch most of a core went to, of up to 3 batches of different samples (a disk's cache serves none twice):
    # one batch of 64 small samples took 0.3 ms, and a busy machine's one switch away read it 22% of a core
    for k in range(max(1, min(3, len(dataset) // n))):
        wall, cpu = time.perf_counter(), time.process_time()
        batch = tree_leaves(default_collate([dataset[i] for i in range(k * n, (k + 1) * n)]))
        took = FetchTiming(time.perf_counter() - wall, time.process_time() - cpu, None)
        if timing is None or took.cpu_seconds * timing.seconds > timing.cpu_seconds * took.seconds:
            timing, leaves = took, batch
    if not leaves or not all(isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == n for t in leaves):
        return timing
    index, best = torch.randperm(n), math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        _ = [t[index] for t in leaves]
        best = min(best, time.perf_counter() - start)
    return timing._replace(indexed_seconds=best)


class NonFinite(NamedTuple):
    """What :func:`nonfinite_samples` found: the first few indices of samples holding NaN or inf, how many
    such samples, and how many samples it read (all of them, or as many as its time allowed)."""

    first: list[int]
    count: int
    scanned: int
    total: int

    def text(self) -> str:
        shown = ", ".join(str(i) for i in self.first) + (", ..." if self.count > len(self.first) else "")
        where = "of its" if self.scanned == self.total else f"in the first {self.scanned:,} of its"
        holds = "sample holds" if self.count == 1 else "samples hold"
        return (f"{self.count:,} training {holds} NaN or inf (index {shown}, {where} "
                f"{count_of(self.total, 'sample')}): the data, not the lr; clean it")


def nonfinite_samples(dataset: Dataset, seconds: float = 10.0, show: int = 3) -> NonFinite | None:
    """The training samples whose floating-point tensors hold NaN or inf, read in order for at most
    ``seconds`` (an in-memory ``TensorDataset`` at once); None where every sample read is finite.

    Run only after a loss went non-finite, to tell bad data from an lr too high: one NaN sample in an
    outside CNN's data made every trial 'diverge' at every lr, down to 32× below the lowest tried, and
    the sweep said to lower the lr."""
    total = len(dataset)
    if isinstance(dataset, TensorDataset):
        bad = torch.zeros(total, dtype=torch.bool)
        for t in dataset.tensors:
            if t.is_floating_point():
                bad |= ~torch.isfinite(t.reshape(total, -1)).all(1)
        found = bad.nonzero().flatten().tolist()
        return NonFinite(found[:show], len(found), total, total) if found else None
    found, scanned = [], 0
    for index, sample in _read_in_order(dataset, seconds):
        if any(isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())
               for t in tree_leaves(sample)):
            found.append(index)
        scanned += 1
    return NonFinite(found[:show], len(found), scanned, total) if found else None


def _read_in_order(dataset: Dataset, seconds: float) -> Iterator[tuple[int, Any]]:
    """(index, sample) of ``dataset`` in order, until ``seconds`` have passed: the scans run after a step failed
    (:func:`nonfinite_samples`, :func:`index_past`) read a data set of any size within a bounded time."""
    start = time.perf_counter()
    for index in range(len(dataset)):
        if time.perf_counter() - start > seconds:
            return
        yield index, dataset[index]


def index_past(dataset: Dataset, rows: int, seconds: float = 10.0) -> tuple[int, int] | None:
    """(sample, value) of the first training sample whose inputs hold an integer past ``rows`` (or below 0), the
    rows of the model's smallest embedding, read in order for at most ``seconds`` (an in-memory ``TensorDataset``'s
    inputs, every tensor but the last, at once); None where none is. Run only after a step raised torch's
    embedding 'index out of range in self': an outside token id 64 for a vocabulary of 64 failed every command
    naming no sample or key."""
    def bad(t: Any) -> torch.Tensor | None:
        if not isinstance(t, torch.Tensor) or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            return None
        return (t >= rows) | (t < 0)

    if isinstance(dataset, TensorDataset):
        for t in dataset.tensors[:-1] if len(dataset.tensors) > 1 else dataset.tensors:
            if (mask := bad(t)) is not None and bool(mask.any()):
                i = int(mask.reshape(len(t), -1).any(1).nonzero()[0])
                return i, int(t[i][mask[i]].flatten()[0])
        return None
    for index, sample in _read_in_order(dataset, seconds):
        inputs = sample[:-1] if isinstance(sample, (tuple, list)) and len(sample) > 1 else sample
        for t in tree_leaves(inputs):
            if (mask := bad(t)) is not None and bool(mask.any()):
                return index, int(t[mask].flatten()[0])
    return None


def past_embedding(components: Any, model: Any, raised: str) -> Any:
    """Where a forward raised torch's embedding "index out of range in self" (``raised`` says where): a SpecError
    on ``data`` naming the training sample and the id past the model's smallest embedding (:func:`index_past`), or
    None where no sample holds one. An outside token id 64 for a vocabulary of 64 failed every command as 'a training
    step ... raised IndexError: index out of range in self', naming no sample or key; validate said it on
    ``model``."""
    from torch import nn

    rows = min((m.num_embeddings for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))),
               default=None)
    found = index_past(components.train_set, rows) if rows else None
    if found is None:
        return None
    i, value = found
    return components.spec.error(
        "data", f"training sample {i} (of {len(components.train_set):,}) holds index {value} in its inputs, past the "
                f"model's embedding of {rows:,} rows (indices 0 to {rows - 1:,}): {raised}; give the embedding more "
                "rows (model.kwargs), or fix the data")


def _indexable(dataset: Dataset, num_workers: int) -> bool:
    return isinstance(dataset, TensorDataset) and num_workers == 0


def batches(dataset: Dataset, batch_size: int, *, seed: int, num_workers: int = 0, pin: bool = False,
            dist: DistContext | None = None, collate_fn: Callable[[list[Any]], Any] | None = None) -> Iterator[Any]:
    """Shuffled batches forever, epoch after epoch; sampled with replacement if the set is smaller.

    Under several ranks each takes its own shard of one shared shuffle. An in-memory
    ``TensorDataset`` is indexed once per batch, as a careful user's loop would, instead of
    fetching and collating sample by sample (12–113× faster per batch at 32–2048 samples of
    32 floats: benchmarks/README.md). ``collate_fn`` (default torch's) makes a batch of
    samples; a :class:`LongestFirst` set gives its ``batch_size`` longest samples every time,
    a :class:`PlannedBatches` set its planned batches in order.
    """
    if isinstance(dataset, (LongestFirst, PlannedBatches)):
        yield from _fixed(dataset, batch_size, noted_collate(collate_fn), pin)
        return
    if _indexable(dataset, num_workers) and collate_fn is None:
        yield from _indexed(dataset, batch_size, seed=seed, pin=pin, dist=dist)
        return
    loader_options = {"num_workers": num_workers, "pin_memory": pin, "persistent_workers": num_workers > 0,
                      "collate_fn": noted_collate(collate_fn)}
    dataset = noted(dataset)
    seed, shard = _sharding(len(dataset), batch_size, seed, dist)
    if shard is not None:
        from torch.utils.data.distributed import DistributedSampler

        rank, world = shard
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
        loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, **loader_options)
        epoch = 0
        while True:
            sampler.set_epoch(epoch)
            yield from loader
            epoch += 1
    generator = torch.Generator().manual_seed(seed)
    if len(dataset) >= batch_size:
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, generator=generator,
                            **loader_options)
    else:
        sampler = RandomSampler(dataset, replacement=True, num_samples=batch_size * 64, generator=generator)
        loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, **loader_options)
    while True:
        yield from loader


def _sharding(n: int, batch_size: int, seed: int,
              dist: DistContext | None) -> tuple[int, tuple[int, int] | None]:
    """(seed, (rank, world) or None) for a rank's batches: under torchrun a shard of one shared
    shuffle when the set holds a batch for every rank; else the whole set (None), with a
    different seed per rank when there are several, so that ranks draw different samples."""
    if dist is None or not dist.enabled:
        return seed, None
    if n >= batch_size * dist.world_size:
        return seed, (dist.rank, dist.world_size)
    return seed + 7919 * dist.rank, None


def _indexed(dataset: TensorDataset, batch_size: int, *, seed: int, pin: bool,
             dist: DistContext | None) -> Iterator[list[torch.Tensor]]:
    """:func:`batches` for a TensorDataset: one shuffle per epoch, each batch one index per tensor."""
    n = len(dataset)
    seed, shard = _sharding(n, batch_size, seed, dist)
    rank, world = shard or (0, 1)
    generator = torch.Generator().manual_seed(seed)
    while True:
        if n >= batch_size * world:
            order = torch.randperm(n, generator=generator)[rank::world]
        else:
            order = torch.randint(n, (batch_size * 64,), generator=generator)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            index = order[start:start + batch_size]
            # yielded without a name that outlives the yield (Feed holds it, and lets go before a validation):
            # on the CPU the batch is the device's, and the generator's frame held it through the trial's
            # validation (an outside check's linear model peaked there at 88.1 KiB, its training step at 48.1 KiB)
            yield _pinned([t[index] for t in dataset.tensors], pin)  # a list, like the DataLoader's collate


def _fixed(dataset: LongestFirst | PlannedBatches, batch_size: int, collate: Callable[[list[Any]], Any],
           pin: bool) -> Iterator[Any]:
    """The worst-case or planned batches, collated afresh each time as a loader would."""
    if isinstance(dataset, PlannedBatches):
        plan = dataset.plan
    else:
        plan = [[i % len(dataset) for i in range(batch_size)]]  # repeats only past the data set's size
    while True:
        for index in plan:  # as in _indexed: no name holds the batch past its yield
            yield _pinned(collate([dataset[i] for i in index]), pin)


def _pinned(batch: Any, pin: bool) -> Any:
    """``batch`` with its tensors in pinned memory when ``pin``."""
    return tree_map(lambda t: t.pin_memory() if isinstance(t, torch.Tensor) else t, batch) if pin else batch


def halves(batch: Any) -> list[Any]:
    """Two equal halves of a batch along dim 0 (an odd last sample is dropped).

    Used for the noise scale at one accumulation step. Leaves that are not tensors, and
    tensors without a dimension, go to both halves unchanged. A batch that is not one row per
    sample cannot be halved this way: see :func:`unsplittable`.
    """
    leaves, spec = tree_flatten(batch)
    split = [(leaf[:leaf.shape[0] // 2], leaf[leaf.shape[0] // 2:2 * (leaf.shape[0] // 2)])
             if isinstance(leaf, torch.Tensor) and leaf.dim() else (leaf, leaf) for leaf in leaves]
    return [tree_unflatten([pair[i] for pair in split], spec) for i in range(2)]


def unsplittable(batch: Any) -> str | None:
    """Why :func:`halves` would not cut ``batch`` into two half-batches of samples, or None when
    it would: every tensor must have one row per sample. A collate that concatenates samples
    (``nn.EmbeddingBag``'s flat ids with offsets) does not, and cutting its ids in the middle gives
    offsets past their end, or silently wrong bags."""
    size = batch_size_of(batch)
    other = [tuple(leaf.shape) for leaf in tree_leaves(batch)
             if isinstance(leaf, torch.Tensor) and leaf.dim() and leaf.shape[0] != size]
    if not other:
        return None
    shapes = ", ".join(str(list(s)) for s in other[:3])
    return (f"the batch is not one row per sample (batch {size}, but tensors of shape {shapes}), so it cannot be "
            "cut into two half-batches for the noise scale at one micro-batch per step; with accumulation "
            "steps it is measured between micro-batches instead")


def tensors(batch: Any) -> list[torch.Tensor]:
    """Every tensor in a nested batch."""
    return [leaf for leaf in tree_leaves(batch) if isinstance(leaf, torch.Tensor)]


class Feed:
    """A trial's batches, on the device and counted, with the time spent waiting for them.

    Args:
        stream: host batches (see :func:`batches`).
        backend: where they go; loading runs with memory counting paused, then the batch's
            tensors are counted as they land.
        world_size: ranks that each take a batch of their own, for the sample count.
        on_device: ``on_device(batch)``, the part of a host batch that goes to the device (the
            workload's :meth:`~batchtune.engine.workload.Workload.on_device`); None: all of it.
    """

    def __init__(self, stream: Iterator[Any], backend: DeviceBackend, world_size: int = 1,
                 source: tuple[str, str | None] = ("data", None),
                 on_device: Callable[[Any], Any] | None = None) -> None:
        self._stream = stream
        self._on_device = on_device
        self._backend = backend
        self._world_size = world_size
        self._source = source  # what the batches come from, for an error (see load_next)
        self.data_seconds = 0.0  # since the last take()
        self.samples = 0  # over every rank, since the last take()
        # the last batch as loaded, until the next one or release(): a loop's batch variable keeps it through the
        # optimizer step, as the estimate's feed does (on the CPU it is the device's batch; elsewhere host memory)
        self._held: Any = None

    def next(self) -> Any:
        """The next batch, on the device.

        Raises:
            LoadError: loading the batch raised.
        """
        start = time.perf_counter()
        backend = self._backend
        with backend.paused():
            self._held = None
            self._held = batch = load_next(self._stream, "training", *self._source)
        samples = self._samples(batch)
        batch = to_device(self._on_device(batch) if self._on_device is not None else batch, backend.device)
        backend.track_batch(tensors(batch))
        self.data_seconds += time.perf_counter() - start
        self.samples += samples * self._world_size
        return batch

    def _samples(self, batch: Any) -> int:
        """The samples in ``batch``; a :class:`~batchtune.errors.BatchFormError` where it has no batch dimension
        (a collate that returns an object of its own): the spec's data, before the model runs."""
        from batchtune.errors import FORM_HINT, BatchFormError

        try:
            return batch_size_of(batch)
        except TypeError:
            dataset, collate = self._source
            where = collate or f"the default collate of {dataset}"
            raise BatchFormError(f"the training batch is a {type(batch).__name__} ({where}), with no tensor of a batch "
                                 f"dimension: {FORM_HINT}",
                                 f"while loading a training batch ({where})",
                                 "data.collate" if collate else "data.target") from None

    def release(self) -> None:
        """Let go of the last batch (before a validation, whose peak is its own batch's)."""
        self._held = None

    def take(self) -> tuple[float, int]:
        """``(data_seconds, samples)`` since the last call, and start counting anew."""
        out = (self.data_seconds, self.samples)
        self.data_seconds, self.samples = 0.0, 0
        return out


def data_source(spec: Any) -> tuple[str, str | None]:
    """The spec keys that make the batches, for :func:`load_next`'s errors: the data set's and the collate's."""
    def named(entry: Any, key: str) -> str:
        return f"{key}.target {entry.target}" if entry.target is not None else f"{key}.builtin {entry.builtin}"

    collate = spec.data.collate
    return named(spec.data, "data"), named(collate, "data.collate") if collate is not None else None


def load_next(stream: Iterator[Any], which: str, dataset: str, collate: str | None = None) -> Any:
    """``next(stream)`` (None at its end), where a failure is the data's: loading is not the step, and what
    the data set's ``__getitem__`` raised (a KeyError for one index) was blamed on the model and the loss.

    Args:
        stream: the batches.
        which: ``"training"`` or ``"validation"``, for the message.
        dataset: the data set's spec key and value (``"data.target pkg:fn"``).
        collate: the collate's, where the spec names one.

    Raises:
        LoadError: fetching or collating raised; the message names the sample where a fetch was noted with
            its index, else the data set and the collate.
    """
    from batchtune.errors import LoadError, error_line, noted_batch, noted_sample

    try:
        return next(stream, None)
    except MemoryError as exc:  # the host's, in the user's data set: not the device running out
        raise LoadError(f"reading a batch from the data set ran out of host memory: "
                        f"{error_line(exc)}") from None  # a probe had called it 'ceiling none'
    except torch.OutOfMemoryError:
        raise  # pinning it on the device: a result, like any out-of-memory
    except Exception as exc:
        index, batch = noted_sample(exc), noted_batch(exc)
        if index is None and batch is None and _collating(exc):
            raise _collate_error(exc, which, dataset, collate) from exc
        if index is not None:
            where = f"{dataset}, sample {index}"
        elif batch is not None:  # its __getitems__ raised, and no one sample's fetch alone did
            where = f"{dataset}, its __getitems__ for the batch of samples {batch}"
        else:
            where = ", or ".join(filter(None, (dataset, collate)))
        raise LoadError(f"loading a {which} batch raised {error_line(exc)} ({where}); BATCHTUNE_DEBUG=1 shows the "
                        "traceback", f"while loading a {which} batch ({where})") from exc


def _collating(exc: BaseException) -> bool:
    """Whether ``exc`` was raised making a batch of fetched samples (:data:`~batchtune.errors.COLLATE_NOTE`)."""
    from batchtune.errors import COLLATE_NOTE

    lines = [*getattr(exc, "__notes__", ()), *str(exc).splitlines()]  # a worker's: in its text
    return any(line.strip() == COLLATE_NOTE for line in lines)


def _collate_error(exc: BaseException, which: str, dataset: str, collate: str | None) -> Exception:
    """The spec's error for a collate that raised: ``data.collate``'s where the spec names one, else the data set's
    (``data.target``), whose samples the default collate cannot make one batch of."""
    from batchtune.errors import COLLATE_HINT, BatchFormError, error_line

    if collate:
        where, fix = collate, "fix the collate; BATCHTUNE_DEBUG=1 shows the traceback"
    else:
        where, fix = f"torch's default collate, on the samples of {dataset}", COLLATE_HINT
    return BatchFormError(f"collating a {which} batch raised {error_line(exc)} ({where}); {fix}",
                          f"while collating a {which} batch ({where})", "data.collate" if collate else "data.target")


def sample_bytes(dataset: Dataset) -> int | None:
    """Bytes one sample takes once collated, estimated from the first (None: an empty or unindexable set).

    Tensors and arrays count their data; Python numbers 8 bytes (collated to int64/float64);
    strings their length.
    """
    try:
        sample = dataset[0]
    except Exception:  # noqa: BLE001 - an iterable data set, or user code: no estimate, no refusal
        return None
    total = 0
    for leaf in tree_leaves(sample):
        if isinstance(leaf, torch.Tensor):
            total += leaf.numel() * leaf.element_size()
        elif hasattr(leaf, "nbytes"):
            total += int(leaf.nbytes)
        elif isinstance(leaf, (int, float, bool)):
            total += 8
        elif isinstance(leaf, (str, bytes)):
            total += len(leaf)
    return total


class BatchLimit(NamedTuple):
    """The largest batch worth collating, and why (``"data"``, ``"host"`` or None: no limit)."""

    batch_size: int | None
    reason: str | None
    samples: int | None  # in the data set
    bytes_per_sample: int | None
    available_bytes: int | None  # host memory the machine can still give

    def bytes_for(self, batch_size: int) -> int | None:
        """Host bytes that collating ``batch_size`` samples may need."""
        return COLLATE_COPIES * batch_size * self.bytes_per_sample if self.bytes_per_sample else None


def batch_limit(dataset: Dataset, timeout: float | None = None) -> BatchLimit:
    """How large a batch makes sense: at most the data set, and what host memory can collate.

    A batch larger than the data set repeats samples; one whose collation needs more host
    memory than the machine has would spend minutes copying before failing (or be killed).
    ``timeout``: the most seconds reading the first sample may take (the spec's ``trial_timeout``).
    """
    from batchtune.engine.host import available_host_bytes
    from batchtune.engine.watchdog import bounded

    try:
        n = len(dataset)
    except TypeError:
        n = None
    with bounded(timeout, "reading the first training sample"):
        per_sample = sample_bytes(dataset)
    available = available_host_bytes()
    host = available // (COLLATE_COPIES * per_sample) if per_sample and available else None
    limits = [(b, why) for b, why in ((n, "data"), (host, "host")) if b is not None]
    size, reason = min(limits) if limits else (None, None)
    return BatchLimit(size, reason, n, per_sample, available)
