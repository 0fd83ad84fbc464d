"""Variable-length data: the probe, its confirmation and check's fits run the worst-case batch."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import Dataset
from typer.testing import CliRunner

from batchtune.cli import app
from batchtune.commands.probe import run_probe
from batchtune.config.builtins.data import pad_tokens, text_lines
from batchtune.config.components import build_components, sample_length
from batchtune.config.spec import load_spec
from batchtune.engine.data import LongestFirst, batches, padding_waste, random_batches, token_batches, worst_case
from batchtune.engine.shape import BatchShape
from batchtune.engine.trial import Trainer, TrialConfig
from batchtune.memory.device import CPUBackend
from batchtune.render.probe import render_probe

runner = CliRunner()

VARLEN = """\
name: varlen
model:
  builtin: char_transformer
  kwargs: {{vocab_size: 256, block_size: 160, d_model: 32, n_layers: 1, n_heads: 2}}
data:
  builtin: text_lines
  kwargs: {{max_len: 160, max_bytes: 200000}}
  collate: {{builtin: pad_tokens}}
optimizer: {{name: adamw, lr: 0.001}}
base_batch_size: 32
device: {{type: cpu, memory_limit: {limit}}}
probe: {{granularity: 8, min_batch_size: 8}}
"""


# ---------------------------------------------------------------------------- pure parts


def test_a_samples_length_is_its_largest_dimension_or_its_named_field():
    assert sample_length((torch.zeros(7), torch.zeros(7))) == 7
    assert sample_length({"input_ids": [1, 2, 3], "pixel": torch.zeros(3, 40, 2)}) == 40
    assert sample_length({"input_ids": [1, 2, 3], "pixel": torch.zeros(3, 40, 2)}, "input_ids") == 3
    assert sample_length((torch.zeros(5), torch.tensor(1)), 0) == 5
    with pytest.raises(ValueError, match="no field 'tokens' \\(it holds 'input_ids'\\)"):
        sample_length({"input_ids": [1]}, "tokens")


def test_batchings_and_their_padding_by_hand():
    lengths = [2, 8, 4, 4, 1, 8]
    # sorted 1,2,4,4,8,8: rows while rows × longest <= 8: [1,2,4,4]? 4 × 4 = 16 > 8 -> [1,2] [4,4] [8] [8]
    plan = sorted(token_batches(lengths, 8), key=lambda b: [lengths[i] for i in b])
    assert [[lengths[i] for i in b] for b in plan] == [[1, 2], [4, 4], [8], [8]]
    assert padding_waste(lengths, plan) == pytest.approx(1 - 27 / 28)  # one pad: the 1 next to the 2
    assert padding_waste(lengths, [[0, 1, 2, 3, 4, 5]]) == pytest.approx(1 - 27 / 48)
    capped = sorted(token_batches([1] * 5, 8, max_rows=2), key=len)  # 5 tokens fit one batch; 2 rows each at most
    assert [len(b) for b in capped] == [1, 2, 2]
    epoch = random_batches(10, 4)
    assert len(epoch) == 2 and all(len(b) == 4 for b in epoch) and len(set(epoch[0] + epoch[1])) == 8
    (repeats,) = random_batches(3, 5)  # fewer samples than a batch: one batch, with repeats
    assert len(repeats) == 5 and set(repeats) == {0, 1, 2}


def test_a_collate_that_concatenates_samples_is_told_from_one_that_pads(write_spec):
    """An outside EmbeddingBag's probe reported 'padding 48.4% of tokens' and serve '48% padding' for a collate
    that pads nothing; the probe now says the samples are concatenated, and its padding figures are 0."""
    from batchtune.commands.varlen import token_budget
    from tests.test_estimate import BAG_SPEC

    bags = build_components(load_spec(write_spec(BAG_SPEC, "bags.yaml")))
    padded = build_components(load_spec(write_spec(VARLEN.format(limit="8MiB"), "varlen.yaml")))
    assert not bags.pads() and padded.pads()
    spec = load_spec(write_spec(BAG_SPEC, "b.yaml"))
    budget = token_budget(spec, bags, None, 256, 128)
    assert not budget.pads and budget.fixed.padding_waste == 0.0 and budget.bucketed.padding_waste == 0.0
    assert budget.notes[0].startswith("the collate concatenates samples rather than padding them")
    assert token_budget(spec, padded, None, 256, 128).fixed.padding_waste > 0.3


def test_the_worst_case_stream_is_the_longest_samples_padded_as_collated():
    train, _ = text_lines(max_len=160, max_bytes=200_000)
    view = LongestFirst(train, train.lengths)
    x, y = next(batches(view, 5, seed=0, collate_fn=pad_tokens))
    assert x.shape == (5, max(train.lengths)) and view.lengths[:5] == sorted(train.lengths, reverse=True)[:5]
    assert (y[-1, view.lengths[4]:] == -100).all()  # padding is ignored by the loss
    x, _ = next(batches(train, 64, seed=0, collate_fn=pad_tokens))
    assert x.shape[1] < max(train.lengths)  # a random batch hides the worst case


# ---------------------------------------------------------------------------- probe and check


def _peak(spec, components, batch_size: int, *, worst: bool) -> int | None:
    """Peak bytes of two training steps at ``batch_size`` (None: out of memory), random or worst batches."""
    components = worst_case(components) if worst else components
    backend = CPUBackend(memory_limit=spec.device.memory_limit)
    result = Trainer(components, backend).run(TrialConfig(BatchShape(batch_size, 1, 1), lr=1e-3, steps=2))
    return result.peak_bytes if result.fits else None


def test_a_token_budget_that_runs_out_of_memory_on_many_short_samples_is_capped_at_the_safe_size(write_spec):
    """An outside EmbeddingBag's budget (safe size × longest) ran out of memory on a bucket of short bags,
    2,750 samples where the worst case held 1,918, and the probe named no budget that works."""
    text = """
name: bags
model: {target: "tests.fixtures:bag_model", kwargs: {dim: 64}}
data:
  target: "tests.fixtures:bag_data"
  kwargs: {n_train: 8192, max_len: 12}
  collate: {target: "tests.fixtures:bag_collate"}
loss: cross_entropy
optimizer: {name: sgd, lr: 0.05, momentum: 0.9}
base_batch_size: 32
device: {type: cpu, memory_limit: 1MiB}
"""
    result = run_probe(load_spec(write_spec(text)))
    v, safe = result.variable_length, result.safe_batch_size
    assert v["max_tokens"] == safe * 12 and v["max_rows"] == safe
    assert v["bucketed"]["fits"] and v["bucketed"]["peak_bytes"] <= result.capacity_bytes
    assert v["bucketed"]["mean_rows"] <= safe
    assert any(n.startswith(f"max_tokens {safe * 12:,} alone ran out of memory on a batch of ") and
               n.endswith(f"the budget is capped at {safe:,} samples a batch (max_rows)") for n in v["notes"])
    assert f"and at most {safe:,} samples, length-bucketed" in render_probe(result)


def test_probe_finds_the_worst_case_ceiling_where_random_batches_still_fit(write_spec):
    spec = load_spec(write_spec(VARLEN.format(limit="24MiB")))
    result = run_probe(spec)
    v = result.variable_length
    assert result.ceiling == 40 and v["worst_ceiling"] == 40 and v["longest"] == 104
    components = build_components(spec)
    assert _peak(spec, components, 40, worst=True) is not None
    assert _peak(spec, components, 48, worst=True) is None  # one granule above the ceiling: the longest batch OOMs
    assert _peak(spec, components, 48, worst=False) is not None  # ... but a random batch of 48 fits
    assert result.confirmed and result.safe_batch_size <= 40
    fixed, bucketed = v["fixed"], v["bucketed"]
    assert v["max_tokens"] == result.safe_batch_size * 104
    assert fixed["fits"] and bucketed["fits"] and fixed["tokens_per_s"] > 0 and bucketed["tokens_per_s"] > 0
    assert bucketed["padding_waste"] < 0.05 < fixed["padding_waste"]
    assert bucketed["mean_rows"] > 2 * fixed["mean_rows"]


def test_check_fails_a_batch_whose_longest_batch_does_not_fit(write_spec):
    spec = write_spec(VARLEN.format(limit="24MiB"))
    result = runner.invoke(app, ["check", str(spec), "-b", "48", "-f", "json", "-q", "--max-seconds", "60"])
    assert result.exit_code == 1, result.output
    data = json.loads(result.stdout)
    fits = next(c for c in data["checks"] if c["name"] == "fits")
    assert fits["status"] == "fail" and "out of memory" in fits["reason"]
    assert any("the 48 longest samples (104 tokens at most)" in n for n in data["notes"])


def test_the_estimate_traces_the_worst_case_batch(write_spec):
    spec = write_spec(VARLEN.format(limit="24MiB"))
    result = runner.invoke(app, ["probe", str(spec), "--estimate", "-f", "json", "-q"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["ceiling"] == 40  # the measured worst-case ceiling
    v = data["variable_length"]  # padding figures without a training step; nothing timed
    assert v["max_tokens"] == data["safe_batch_size"] * 104 and v["bucketed"]["tokens_per_s"] is None
    assert v["bucketed"]["padding_waste"] < v["fixed"]["padding_waste"]


# ---------------------------------------------------------------------------- user collators and bad input


class _Dicts(Dataset):
    """Hugging Face style samples: dicts of token lists of different lengths."""

    def __init__(self, n: int = 64) -> None:
        self.lengths_ = [4 + (7 * i) % 29 for i in range(n)]

    def __len__(self) -> int:
        return len(self.lengths_)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": list(range(self.lengths_[i])), "labels": i % 3}


def dict_data():
    return _Dicts(), _Dicts(16)


class PadCollator:
    """A collator class, built with kwargs, as transformers' DataCollatorWithPadding is."""

    def __init__(self, pad_id: int = 0) -> None:
        self.pad_id = pad_id

    def __call__(self, samples: list[dict]) -> dict:
        width = max(len(s["input_ids"]) for s in samples)
        ids = torch.full((len(samples), width), self.pad_id)
        for row, s in enumerate(samples):
            ids[row, :len(s["input_ids"])] = torch.tensor(s["input_ids"])
        return {"input_ids": ids, "labels": torch.tensor([s["labels"] for s in samples])}


class BagModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(64, 8)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(input_ids).mean(1))


def bag_model() -> torch.nn.Module:
    return BagModel()


DICTS = """\
name: dicts
model: {target: "tests.test_varlen:bag_model"}
data:
  target: "tests.test_varlen:dict_data"
  collate: {target: "tests.test_varlen:PadCollator", kwargs: {pad_id: 0}}
  length_key: input_ids
optimizer: {name: adam, lr: 0.01}
base_batch_size: 8
device: {type: cpu, memory_limit: 1MiB}
"""


def test_a_collator_class_with_dict_batches_and_a_length_key(write_spec):
    spec = load_spec(write_spec(DICTS))
    components = build_components(spec)
    assert components.lengths() == _Dicts().lengths_
    batch = next(batches(worst_case(components).train_set, 4, seed=0, collate_fn=components.collate_fn))
    assert batch["input_ids"].shape == (4, 32)  # the four longest, padded to the longest (32)
    result = run_probe(spec)
    assert result.ceiling == 64 and result.capped  # the whole set fits in 1 MiB
    assert result.variable_length["longest"] == 32


@pytest.mark.parametrize("data,key,message", [
    ('{target: "tests.test_varlen:dict_data", collate: {target: "tests.test_varlen:nope"}}', "data.collate.target",
     "has no attribute 'nope'"),
    ('{target: "tests.test_varlen:dict_data", collate: {target: "tests.test_varlen:PadCollator", '
     'kwargs: {pad: 1}}}', "data.collate.kwargs.pad", "unexpected argument"),
    ('{target: "tests.test_varlen:dict_data", collate: {target: "tests.test_varlen:PadCollator"}, '
     'length_key: tokens}', "data.length_key", "no field 'tokens'"),
])
def test_bad_collate_or_length_key_is_one_line_naming_the_key(write_spec, data, key, message):
    spec = write_spec(DICTS.replace(DICTS[DICTS.index("data:"):DICTS.index("optimizer")], f"data: {data}\n"))
    result = runner.invoke(app, ["probe", str(spec), "-q"])
    assert result.exit_code == 2, result.output
    (line,) = [ln for ln in result.stderr.strip().splitlines() if key in ln]  # under "error: invalid spec"
    assert message in line and "Traceback" not in result.output


def test_sweep_gives_tokens_per_second_for_token_data():
    import pandas as pd

    from batchtune.render.sweep import _tokens_line

    summary = pd.DataFrame([{"batch_size": 16, "samples_per_s": 100.0},
                            {"batch_size": 32, "samples_per_s": float("nan")}])
    assert _tokens_line(summary, 42) == ["tokens/s (42 tokens a sample): 16: 4,200"]
    assert _tokens_line(summary, 1) == []


def test_tokens_per_sample_is_the_mean_length_for_variable_length_data(write_spec):
    components = build_components(load_spec(write_spec(DICTS)))
    assert components.tokens_per_sample() == round(sum(_Dicts().lengths_) / 64)


class _Frames(Dataset):
    """Precomputed features, a (T, 24) tensor a sample with T from 2 to 12: every sample's widest dimension is
    the feature one, as in an outside data set of (T, 96) embeddings read as 96 tokens each."""

    def __init__(self, n: int = 44, channels_first: bool = False) -> None:
        self.lengths_ = [2 + (5 * i) % 11 for i in range(n)]
        self.channels_first = channels_first

    def __len__(self) -> int:
        return len(self.lengths_)

    def __getitem__(self, i: int) -> dict:
        feats = torch.ones(self.lengths_[i], 24)
        return {"feats": feats.T if self.channels_first else feats, "y": torch.zeros(1)}


def frame_data(channels_first: bool = False):
    return _Frames(channels_first=channels_first), _Frames(8, channels_first=channels_first)


def pad_frames(samples: list[dict]) -> dict:
    width = max(s["feats"].shape[0] for s in samples)
    feats = torch.zeros(len(samples), width, 24)
    for row, s in enumerate(samples):
        feats[row, :len(s["feats"])] = s["feats"]
    return {"feats": feats, "y": torch.stack([s["y"] for s in samples])}


def frame_model() -> torch.nn.Module:
    return _FrameModel()


class _FrameModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Linear(24, 1)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head(feats.mean(1))


FRAMES = """\
name: frames
model: {target: "tests.test_varlen:frame_model"}
data:
  target: "tests.test_varlen:frame_data"
  collate: {target: "tests.test_varlen:pad_frames"}
  length_key: feats
loss: mse
optimizer: {name: adam, lr: 0.01}
base_batch_size: 8
device: {type: cpu, memory_limit: 1MiB}
"""


@pytest.mark.parametrize("key", ["length_key: feats", ""])
def test_a_feature_dimension_wider_than_the_sequence_is_not_its_length(write_spec, key):
    """(T, 24) samples, T from 2 to 12, were all read as 24 long, with or without a length_key: padding 0%, and a
    token budget (safe size × 24) that admits twice the longest samples' batch."""
    from batchtune.commands.varlen import token_budget

    spec = load_spec(write_spec(FRAMES.replace("length_key: feats", key)))
    components = build_components(spec)
    assert components.lengths() == _Frames().lengths_
    budget = token_budget(spec, components, None, 20, 16)
    assert (budget.longest, budget.median_length, budget.max_tokens) == (12, 7, 16 * 12)
    assert 0.3 < budget.fixed.padding_waste < 0.5  # random batches of 16 padded to 12 or so; read as 24: 0.0%


def test_a_length_key_field_stored_channels_first_is_warned_of(write_spec):
    """A (24, T) field's first dimension is 24 in every sample: its length read as len() is no length at all."""
    from tests.conftest import logged

    data = 'data:\n  target: "tests.test_varlen:frame_data"\n  kwargs: {channels_first: true}\n  length_key: feats\n'
    spec = load_spec(write_spec(FRAMES.replace(FRAMES[FRAMES.index("data:"):FRAMES.index("loss:")], data)))
    components = build_components(spec)
    with logged("batchtune") as said:
        assert components.lengths() == [24] * 44
    assert said == ["data.length_key 'feats': its first dimension, the length batchtune reads, is 24 in all 44 "
                    "samples, while dimension 1 varies from 2 to 12: store the field length-first ((T, features)), "
                    "or give a data set a 'lengths' attribute"]


def test_builtin_text_lines_and_pad_tokens_refuse_bad_input():
    with pytest.raises(ValueError, match="min_len must be at most max_len"):
        text_lines(min_len=300, max_len=256)
    with pytest.raises(TypeError, match=r"\(x, y\) pairs"):
        pad_tokens([torch.zeros(3)])
