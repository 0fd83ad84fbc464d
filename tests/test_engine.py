"""The step engine: workloads through the Trainer, the feed's batch helpers, the run's bookkeeping."""

from __future__ import annotations

import dataclasses
import functools
from collections import namedtuple

import pytest
import torch
from torch import nn

from batchtune.config.components import batch_size_of, build_components, to_device
from batchtune.config.spec import load_spec
from batchtune.engine.data import halves, tensors
from batchtune.engine.shape import BatchShape
from batchtune.engine.trial import ForwardOnly, Trainer, TrialConfig, prepare
from batchtune.memory.device import CPUBackend
from tests.conftest import logged

IN_FEATURES, OUT_FEATURES = 16, 64  # tiny_data's inputs; a wide output so activations dominate


@pytest.fixture
def components(write_spec):
    # conftest's tiny spec without its simulated limit: engine tests measure, they do not OOM
    return build_components(load_spec(write_spec(), ["device.memory_limit=null"]))


def _linear(components):
    """The components with a Linear(16, 64) model (tiny_data: float32 inputs, int64 labels)."""
    return dataclasses.replace(components, model_factory=lambda **_: nn.Linear(IN_FEATURES, OUT_FEATURES))


def _inputs_only(model: nn.Module, batch) -> torch.Tensor:
    return model(batch[0])


def test_forward_only_counts_exactly_the_parameters_the_batch_and_the_output(components):
    batch = 32
    trainer = Trainer(_linear(components), CPUBackend(), workload=functools.partial(ForwardOnly, forward=_inputs_only))
    result = trainer.run(TrialConfig(BatchShape(batch), steps=3))
    params = (IN_FEATURES * OUT_FEATURES + OUT_FEATURES) * 4
    inputs, labels, output = batch * IN_FEATURES * 4, batch * 8, batch * OUT_FEATURES * 4
    assert result.fits and result.compute_peak_bytes == params + inputs + labels + output == 14848
    assert result.optimizer_peak_bytes is None  # no update phase
    assert result.peak_bytes == result.compute_peak_bytes
    assert result.losses == [] and result.samples == 3 * batch  # a custom forward records no loss


def test_serving_forward_moves_and_counts_the_inputs_alone(components):
    """A server's batch has no labels: serve's workload leaves tiny_data's int64 labels (8 B a sample) on the host."""
    from batchtune.commands.serve import serve_workload

    batch = 32
    trainer = Trainer(_linear(components), CPUBackend(), workload=serve_workload("cross_entropy"))
    result = trainer.run(TrialConfig(BatchShape(batch), steps=3))
    params = (IN_FEATURES * OUT_FEATURES + OUT_FEATURES) * 4
    inputs, output = batch * IN_FEATURES * 4, batch * OUT_FEATURES * 4
    assert result.fits and result.compute_peak_bytes == params + inputs + output == 14848 - batch * 8
    assert result.samples == 3 * batch


def test_forward_only_needs_less_memory_than_training_and_leaves_no_gradient(components):
    shape, backend = BatchShape(64), CPUBackend()
    model = components.build_model(0)
    backend.track(model.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    forward = Trainer(components, backend, workload=ForwardOnly).run(TrialConfig(shape, steps=4, timing_warmup_steps=1), model)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training  # restored after the trial
    train = Trainer(components, backend).run(TrialConfig(shape, steps=4), model)
    assert forward.fits and train.fits
    assert forward.compute_peak_bytes < train.compute_peak_bytes
    # the default forward is the spec's loss, recorded per step; timing and samples as for training
    assert len(forward.losses) == 4 and all(0 < x < 5 for x in forward.losses)
    assert forward.timed_samples == 3 * 64 and forward.samples_per_s > 0


def test_measuring_the_noise_scale_does_not_change_training_and_is_not_timed(components):
    trainer = Trainer(components, CPUBackend())
    shape = BatchShape(32)
    plain = trainer.run(TrialConfig(shape, steps=6, seed=1))
    measured = trainer.run(TrialConfig(shape, steps=6, seed=1, measure_noise=True, noise_every=2))
    # halves at accum 1: two backward passes of half the loss each, the same gradient up to rounding
    assert measured.losses == pytest.approx(plain.losses, rel=1e-5)
    assert measured.noise_steps == 3 and measured.noise is not None and measured.noise.steps == 3
    assert measured.timed_samples == 3 * 32 and plain.timed_samples == 6 * 32
    # the hooks are gone after the trial
    model = components.build_model(0)
    trainer.run(TrialConfig(shape, steps=2, measure_noise=True, noise_every=1), model)
    assert all(not p._backward_hooks for p in model.parameters())


def test_an_odd_micro_batch_at_one_step_measures_no_noise(components):
    result = Trainer(components, CPUBackend()).run(TrialConfig(BatchShape(31), steps=2, measure_noise=True,
                                                               noise_every=1))
    assert result.fits and result.noise is None and result.noise_steps == 0


def test_divergence_ends_the_trial_at_the_step(components):
    result = Trainer(components, CPUBackend()).run(TrialConfig(BatchShape(32), lr=1e6, steps=20,
                                                               divergence_factor=3.0))
    assert result.diverged and result.steps < 20 and len(result.losses) == result.steps
    assert "exceeds 3×" in result.divergence or "non-finite" in result.divergence


def test_divergence_is_a_loss_that_stays_up_not_one_spike():
    from types import SimpleNamespace

    from batchtune.engine.trial import EvalPoint, exploded, starting_loss

    assert not exploded([1.0, 5.0, 0.9, 5.0, 5.0, 0.8], 3.0, 1.0)  # spikes the run came back from
    assert exploded([1.0, 0.9, 3.5, 4.0, 3.1], 3.0, 1.0) and not exploded([1.0, 3.5, 4.0], 3.0, 1.0)
    assert not exploded([1.0, 3.5, 4.0, 2.9], 3.0, 1.0)
    # an outside GRU at batch 8: its first batch read 0.105, the validation before it 0.669
    gru = [0.105, 0.6, 0.62, 0.58, 0.61, 0.6]
    assert exploded(gru, 3.0, gru[0]) and not exploded(gru, 3.0, 0.669)
    validated = SimpleNamespace(evals=[EvalPoint(0, 0, 0.0, 0.669)], losses=gru)
    assert starting_loss(validated) == 0.669
    assert starting_loss(SimpleNamespace(evals=[], losses=gru)) == 0.6  # else the median of the first 3


def test_a_trial_past_its_budget_stops_where_its_loss_levels_off_short_of_the_target():
    from batchtune.engine.trial import stalled

    # best 0.60 at step 128, 0.62 by step 64: 0.02 a doubling, twice that over the log2(256/128) = 1
    # doubling left is 0.04, short of the 0.05 to go to 0.55
    curve = [(0, 2.3), (32, 0.7), (64, 0.62), (96, 0.61), (128, 0.60)]
    assert stalled(curve, 0.55, 256)
    assert not stalled(curve, 0.57, 256)  # 0.03 to go: within reach
    assert not stalled(curve, 0.55, 2048)  # four doublings left: 0.16 at that pace
    assert not stalled(curve, 0.55, 256, pace=3.0)
    assert not stalled(curve[:-1] + [(128, 0.54)], 0.55, 256)  # crossed
    assert not stalled(curve, 0.55, 128) and not stalled(curve, None, 256) and not stalled([], 0.55, 256)
    # a rising curve (a small training set overfit): its best is behind it, no pace at all
    assert stalled([(0, 2.3), (32, 0.58), (64, 0.6), (128, 0.7)], 0.55, 1024)
    # the quickstart's ground-truth sweep, batch 128 at lr x4 on seed 1: best 0.588 by step 384, then rising
    # (0.642 at its budget's step 1,024, 0.999 at 2,048, all trained towards a target of 0.55); ends at 1,142
    seen = [(256, 0.676), (284, 0.612), (338, 0.652), (384, 0.588), (402, 0.593), (479, 0.656), (512, 0.607),
            (570, 0.635), (640, 0.598), (678, 0.595), (768, 0.68), (807, 0.653), (896, 0.652), (960, 0.69),
            (1024, 0.642), (1142, 0.68)]
    assert stalled(seen, 0.55, 2048)


def test_the_trainer_ends_a_stalled_trial_at_its_first_validation_past_stall_after(components):
    base = TrialConfig(BatchShape(32), lr=1e-3, steps=40, evals_per_doubling=4, stop_below=0.0)
    plain = Trainer(components, CPUBackend()).run(base)
    cut = Trainer(components, CPUBackend()).run(dataclasses.replace(base, stall_after=16))
    assert not plain.stalled and plain.steps == 40
    first_after = min(e.step for e in plain.evals if e.step > 16)
    assert cut.stalled and cut.steps == first_after and not cut.stopped_at_target
    assert [e.val_loss for e in cut.evals] == [e.val_loss for e in plain.evals if e.step <= first_after]


def test_a_batch_that_is_not_one_row_per_sample_is_counted_by_its_samples_and_never_halved():
    """An EmbeddingBag batch: 3 bags of 2, 1 and 3 ids concatenated. It holds 3 samples (offsets and
    labels agree; the flat ids do not), and cutting it in halves would give offsets past the ids."""
    from batchtune.engine.data import unsplittable
    from tests.fixtures import bag_collate

    batch = bag_collate([(torch.tensor([1, 2]), torch.tensor(0)), (torch.tensor([3]), torch.tensor(1)),
                         (torch.tensor([4, 5, 6]), torch.tensor(2))])
    assert batch[0].shape == (6,) and batch[1].tolist() == [0, 2, 3] and batch_size_of(batch) == 3
    assert "not one row per sample (batch 3, but tensors of shape [6])" in unsplittable(batch)
    assert unsplittable((torch.zeros(4, 3), torch.zeros(4), torch.tensor(1.0))) is None
    assert batch_size_of((torch.zeros(5), torch.zeros(2))) == 2  # a tie: the smaller, as concatenated ids are longer


def test_a_trial_on_batches_it_cannot_halve_trains_on_and_says_why_it_measured_no_noise(write_spec):
    """At one micro-batch per step the noise scale needs two half-batches; with accumulation it
    reads the micro-batches themselves, so 16 × 2 measures it on the same data."""
    from tests.test_estimate import BAG_SPEC

    spec, components, backend = prepare(load_spec(write_spec(BAG_SPEC)))
    base = TrialConfig(BatchShape(32), lr=0.05, steps=12, measure_noise=True, noise_every=2)
    plain = Trainer(components, backend).run(base)
    assert plain.steps == 12 and not plain.diverged and plain.noise is None and plain.noise_steps == 0
    assert "not one row per sample" in plain.noise_unmeasured
    accumulated = Trainer(components, backend).run(dataclasses.replace(base, shape=BatchShape(16, 2)))
    assert accumulated.noise_unmeasured is None and accumulated.noise_steps == 6


def test_stop_from_keeps_a_trial_past_its_first_steps_before_it_may_stop_at_the_target(components):
    """A target every validation meets: the trial stops at its first validation after a step (step 4, where
    the log grid starts), or with stop_from 16 at the first one past step 16, as a retrain towards the
    default target runs its budget again."""
    base = TrialConfig(BatchShape(32), lr=1e-3, steps=40, evals_per_doubling=4, stop_below=100.0)
    early = Trainer(components, CPUBackend()).run(base)
    later = Trainer(components, CPUBackend()).run(dataclasses.replace(base, stop_from=16))
    assert early.stopped_at_target and early.steps == 4
    assert later.stopped_at_target and later.steps == min(e.step for e in later.evals if e.step > 16)


def test_an_accumulated_step_holds_no_micro_batch_past_its_own_passes(components):
    """Each micro-batch's forward runs with the step's earlier micro-batches freed (the first, fetched early to
    see whether it can be halved, stayed referenced through the whole step: one micro-batch on every peak)."""
    import weakref

    class Watch(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner, self.seen, self.alive = inner, [], []

        def forward(self, x):
            self.alive.append(sum(ref() is not None for ref in self.seen))
            self.seen.append(weakref.ref(x))
            return self.inner(x)

    model = Watch(components.build_model(0))
    Trainer(components, CPUBackend()).run(TrialConfig(BatchShape(8, 4), lr=1e-3, steps=2), model=model)
    assert len(model.alive) == 8 and model.alive == [0] * 8


Pair = namedtuple("Pair", "x y")


@pytest.mark.parametrize("batch,expected_sizes", [
    (torch.arange(10), [5, 5]),
    ((torch.zeros(5, 2), torch.zeros(5)), [2, 2]),  # an odd sample is dropped
    ({"x": torch.zeros(6, 3), "meta": "tag", "n": [torch.zeros(6)]}, [3, 3]),
    (Pair(torch.zeros(4), torch.ones(4)), [2, 2]),
])
def test_halves_split_every_tensor_and_keep_the_structure(batch, expected_sizes):
    first, second = halves(batch)
    assert type(first) is type(batch) and type(second) is type(batch)
    assert [batch_size_of(first), batch_size_of(second)] == expected_sizes
    if isinstance(batch, dict):
        assert first["meta"] == second["meta"] == "tag" and first["n"][0].shape == (3,)
    assert halves("text") == ["text", "text"]


def test_halves_are_the_two_leading_halves():
    first, second = halves(torch.arange(7))
    assert first.tolist() == [0, 1, 2] and second.tolist() == [3, 4, 5]


def test_batch_helpers_walk_nested_batches():
    batch = {"ids": torch.zeros(3, 4, dtype=torch.long), "extra": [torch.ones(3), "label", 7]}
    moved = to_device(batch, torch.device("cpu"))
    assert moved.keys() == batch.keys() and moved["extra"][1:] == ["label", 7]
    assert isinstance(moved["extra"], list) and torch.equal(moved["extra"][0], torch.ones(3))
    assert [t.shape for t in tensors(batch)] == [(3, 4), (3,)]
    assert batch_size_of(batch) == 3 and batch_size_of(("name", torch.zeros(5))) == 5
    with pytest.raises(TypeError, match="cannot find a tensor"):
        batch_size_of({"a": "b"})


def test_tensor_data_is_indexed_once_per_batch_and_each_epoch_sees_every_sample():
    from types import SimpleNamespace

    from torch.utils.data import TensorDataset

    from batchtune.engine.data import batches, loader_kind

    data = TensorDataset(torch.arange(12.0), torch.arange(12))
    assert loader_kind(data) == "in-memory tensors indexed once per batch"
    assert loader_kind(data, num_workers=2) == "DataLoader (per-sample fetch and collate, 2 workers)"
    assert loader_kind(list(data)) == "DataLoader (per-sample fetch and collate, in the main process)"
    stream = batches(data, 4, seed=0)
    epoch = [next(stream) for _ in range(3)]
    assert all(isinstance(b, list) and b[0].shape == (4,) and torch.equal(b[0].long(), b[1]) for b in epoch)
    assert sorted(torch.cat([b[1] for b in epoch]).tolist()) == list(range(12))
    again = [next(batches(data, 4, seed=0)) for _ in range(1)][0]
    assert torch.equal(again[1], epoch[0][1])  # the seed decides the order

    # two ranks split one shared shuffle: disjoint shards that cover the epoch
    shards = []
    for rank in range(2):
        dist = SimpleNamespace(enabled=True, rank=rank, world_size=2)
        stream = batches(data, 3, seed=0, dist=dist)
        shards.append(torch.cat([next(stream)[1] for _ in range(2)]).tolist())
    assert not set(shards[0]) & set(shards[1]) and sorted(shards[0] + shards[1]) == list(range(12))

    # smaller than a batch: sampled with replacement, still full batches
    assert next(batches(data, 32, seed=0))[0].shape == (32,)


def test_a_dict_batch_keeps_its_targets_under_the_first_target_key_it_has():
    from batchtune.config.components import _split

    inputs, targets = _split({"input_ids": torch.ones(2, 3), "label": torch.tensor([0, 1])})
    assert list(inputs) == ["input_ids"] and targets.tolist() == [0, 1]  # a Hugging Face dataset's column
    inputs, targets = _split({"x": torch.zeros(2), "labels": torch.ones(2), "y": torch.zeros(2)})
    assert sorted(inputs) == ["x", "y"] and targets.tolist() == [1.0, 1.0]  # labels first
    with pytest.raises(TypeError, match="labels, label, targets, target, y .*; this one has input_ids, mask"):
        _split({"input_ids": torch.ones(2), "mask": torch.ones(2)})


def test_a_tuple_batch_ends_with_its_targets_and_the_model_takes_the_rest_as_arguments(write_spec):
    """An outside (x, mask, y) data set: 'too many values to unpack (expected 2)', blamed on the model."""
    import json

    from typer.testing import CliRunner

    from batchtune.cli import app
    from batchtune.config.components import _call, _split

    inputs, targets = _split((torch.ones(2, 3), torch.zeros(2, 3), torch.tensor([0, 1])))
    assert isinstance(inputs, tuple) and len(inputs) == 2 and targets.tolist() == [0, 1]
    assert _call(lambda x, mask: (x * mask).sum(), inputs).item() == 0.0
    inputs, _ = _split([torch.ones(2, 3), torch.tensor([0, 1])])  # a pair (default_collate makes lists)
    assert isinstance(inputs, torch.Tensor)
    with pytest.raises(ValueError, match=r"\(inputs, targets\), \(input, ..., targets\) or a dict .*; this one is a "
                                         "Tensor"):
        _split(torch.ones(2, 3))
    spec = write_spec("name: x\nmodel: {target: 'tests.fixtures:masked_mlp'}\n"
                      "data: {target: 'tests.fixtures:masked_data'}\noptimizer: {name: sgd, lr: 0.1}\n"
                      "base_batch_size: 8\ndevice: {type: cpu, memory_limit: 1MiB}\n")
    assert CliRunner().invoke(app, ["validate", str(spec)]).exit_code == 0
    result = CliRunner().invoke(app, ["check", str(spec), "-b", "8", "-q", "-f", "json"])
    assert json.loads(result.stdout)["checks"][1]["status"] == "pass", result.output  # trains


def test_float_targets_are_not_tokens(write_spec):
    """An outside autoencoder's 64-float targets were reported as '64 tokens a sample' (tokens/s, B_simple in
    tokens)."""
    spec = load_spec(write_spec("name: x\nmodel: {target: 'tests.fixtures:tiny_mlp', kwargs: {num_classes: 16}}\n"
                                "data: {target: 'tests.fixtures:autoencoder_data'}\nloss: mse\n"
                                "optimizer: {name: sgd, lr: 0.1}\nbase_batch_size: 8\n"))
    assert build_components(spec).tokens_per_sample() == 1
    lm = load_spec("configs/char_lm.yaml")
    assert build_components(lm).tokens_per_sample() == 64  # token ids: the sequence length


def test_fp16_on_the_cpu_is_warned(write_spec):
    """An outside spec ran validate, probe and check in fp16 on a CPU without a word."""
    with logged("batchtune.engine.trial") as messages:
        prepare(load_spec(write_spec(), ["precision=bf16"]))
        assert not messages
        prepare(load_spec(write_spec(), ["precision=fp16"]))
    assert messages == ["precision fp16 on the CPU: float16 autocast with a loss scaler runs, slowly, and its memory "
                        "and timings say little of a GPU's; use bf16 on a CPU, fp16 on the GPU the job will train on"]


def test_a_validation_counts_its_own_batch_not_the_last_training_batch_nor_the_index_shuffle(components):
    """An outside check's linear model peaked at 554.1 KiB validating where its training step peaked at 48.1 KiB:
    the validation subset's randperm over 65,536 samples (512 KiB) and the training stream's last batch, which its
    generator held through the validation, were both counted as device memory."""
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(0)
    val = TensorDataset(torch.randn(20_000, IN_FEATURES, generator=g), torch.randint(OUT_FEATURES, (20_000,)))
    comps = dataclasses.replace(_linear(components), val_set=val)
    batch = 32
    result = Trainer(comps, CPUBackend()).run(TrialConfig(BatchShape(batch), steps=2, validate=True,
                                                          eval_samples=batch))
    params = (IN_FEATURES * OUT_FEATURES + OUT_FEATURES) * 4
    inputs, labels, output = batch * IN_FEATURES * 4, batch * 8, batch * OUT_FEATURES * 4
    # the weights and AdamW's two moments; the batch, its logits and their log-softmax; a few scalars (the
    # moments' step counts, the loss): without the fix 20,000 × 8 B of indices and a second batch came on top
    assert result.fits and result.eval_peak_bytes == 3 * params + inputs + labels + 2 * output + 16 == 31760


def test_the_indexed_stream_holds_no_batch_it_has_yielded():
    import gc
    import weakref

    from torch.utils.data import TensorDataset

    from batchtune.engine.data import batches

    stream = batches(TensorDataset(torch.randn(64, 4), torch.randn(64, 1)), 8, seed=0)
    first = next(stream)
    held = weakref.ref(first[0])
    del first
    gc.collect()
    assert held() is None


def test_a_dict_of_inputs_that_forward_does_not_take_as_keywords_is_said_to_be_passed_so():
    """An outside model's forward(self, batch) met a dict of inputs with only "got an unexpected keyword argument
    'src'", where the README said the model gets the inputs as positional arguments."""
    from batchtune.config.components import _call

    class Whole(nn.Module):
        def forward(self, batch):
            return batch["src"]

    class Keywords(nn.Module):
        def forward(self, src):
            return src

    class Inner(nn.Module):
        def forward(self, src):
            return torch.zeros(2).view(src=1)  # a TypeError of the model's own

    src = torch.ones(2)
    with pytest.raises(TypeError) as caught:
        _call(Whole(), {"src": src, "mask": src})
    assert str(caught.value).endswith(
        "Whole.forward() got an unexpected keyword argument 'src' (a dict of inputs reaches model.forward as keyword "
        "arguments, one per key: src, mask; name forward's parameters after the keys, or take **kwargs)")
    assert _call(Keywords(), {"src": src}) is src
    with pytest.raises(TypeError) as inner:
        _call(Inner(), {"src": src})
    assert "a dict of inputs" not in str(inner.value)


def test_the_fetch_timing_reads_the_batch_most_of_a_core_went_to(monkeypatch):
    """check's data advice reads how much of a core a batch's per-sample fetch used: a busy machine's one switch
    away during a 0.3 ms fetch read 22% (under 25%: 'the fetch waits', and workers were advised). Of up to 3 batches
    of different samples, the one with most of a core counts."""
    import time

    from batchtune.engine import data as data_module

    clock = iter([0.0, 0.0, 1.0, 0.1, 1.0, 0.1, 2.0, 0.9, 2.0, 0.9, 3.0, 1.2])  # wall, cpu at each start and end
    monkeypatch.setattr(time, "perf_counter", lambda: next(clock, 9.0))
    monkeypatch.setattr(time, "process_time", lambda: next(clock, 9.0))
    seen = []

    class Recording(torch.utils.data.Dataset):
        def __len__(self):
            return 200

        def __getitem__(self, i):
            seen.append(i)
            return torch.full((2,), float(i))

    timing = data_module.fetch_timing(Recording(), 64, repeats=1)
    assert seen == list(range(192))  # three batches of different samples
    assert (timing.seconds, timing.cpu_seconds) == pytest.approx((1.0, 0.8))  # the second: 80% of a core


def test_a_peer_rank_gone_mid_step_is_not_blamed_on_the_model():
    """An outside kill -9 of one torchrun rank: the other stopped within a second, but said 'raised RuntimeError:
    [...gloo...] Connection reset by peer ... Check that the model accepts the data's samples'."""
    from batchtune.engine.trial import _training_error
    from batchtune.engine.workload import TrainStep

    config = TrialConfig(shape=BatchShape(4, accum_steps=4), lr=0.1, steps=10)
    gone = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection reset by peer")
    said = str(_training_error(gone, config, TrainStep, None))
    assert said.startswith("a training step at micro-batch 4 × 4 stopped: another rank's process ended mid-step (")
    assert "not this job's model or data" in said and "Check that the model" not in said
    own = str(_training_error(ValueError("shapes do not match"), config, TrainStep, None))
    assert "raised ValueError: shapes do not match. Check that the model accepts" in own
