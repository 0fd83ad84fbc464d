"""The built-in models and data sets: contract, determinism, and that each pair learns."""

from __future__ import annotations

import importlib
import inspect
import itertools
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from batchtune.config.builtins import BUILTIN_COLLATES, BUILTIN_DATA, BUILTIN_MODELS, data, models


def _resolve(target: str):
    module_name, attr = target.split(":")
    return getattr(importlib.import_module(module_name), attr)


@pytest.fixture(scope="module")
def synthetic():
    return data.synthetic_classification()


@pytest.fixture(scope="module")
def digits():
    pytest.importorskip("sklearn")
    return data.digits()


@pytest.fixture(scope="module")
def char_text():
    return data.char_text()


# ---------------------------------------------------------------------------- registry


@pytest.mark.parametrize("target", [*BUILTIN_MODELS.values(), *BUILTIN_DATA.values()])
def test_registry_targets_are_keyword_only_callables(target):
    factory = _resolve(target)
    parameters = inspect.signature(factory).parameters.values()
    assert callable(factory)
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in parameters)
    assert all(p.default is not inspect.Parameter.empty for p in parameters)


@pytest.mark.parametrize("name", sorted(BUILTIN_DATA))
def test_data_factories_take_a_seed_defaulting_to_zero(name):
    assert inspect.signature(_resolve(BUILTIN_DATA[name])).parameters["seed"].default == 0


def test_modules_export_exactly_the_registered_callables():
    assert sorted(models.__all__) == sorted(BUILTIN_MODELS)
    assert sorted(data.__all__) == sorted({**BUILTIN_DATA, **BUILTIN_COLLATES})  # collates live beside the data


# ---------------------------------------------------------------------------- synthetic


def test_synthetic_shapes_dtypes_and_lengths(synthetic):
    train, val = synthetic
    assert (len(train), len(val)) == (8192, 2048)
    x, y = train[0]
    assert x.shape == (32,) and x.dtype == torch.float32
    assert y.shape == () and y.dtype == torch.int64
    labels = torch.cat([train.tensors[1], val.tensors[1]])
    assert labels.min() >= 0 and labels.max() <= 9
    # Every class is used and none dominates: the teacher's logits are standardised.
    counts = labels.bincount(minlength=10)
    assert counts.min() > 0.02 * len(labels) and counts.max() < 0.25 * len(labels)


def test_synthetic_kwargs_change_shapes():
    train, val = data.synthetic_classification(n_train=100, n_val=20, in_features=5, num_classes=3)
    assert (len(train), len(val)) == (100, 20)
    assert train[0][0].shape == (5,)
    assert set(train.tensors[1].tolist()) <= {0, 1, 2}


def test_synthetic_is_deterministic_per_seed(synthetic):
    again = data.synthetic_classification()
    other = data.synthetic_classification(seed=1)
    for (a, b) in zip(synthetic, again):
        assert torch.equal(a.tensors[0], b.tensors[0]) and torch.equal(a.tensors[1], b.tensors[1])
    assert not torch.equal(synthetic[0].tensors[0], other[0].tensors[0])
    assert not torch.equal(synthetic[0].tensors[1], other[0].tensors[1])


def test_synthetic_label_noise_changes_about_that_fraction_of_labels(synthetic):
    noisy_train, _ = data.synthetic_classification(noise=0.5)
    changed = (noisy_train.tensors[1] != synthetic[0].tensors[1]).float().mean().item()
    # Half the labels are redrawn uniformly from 10 classes; 9 in 10 of those change.
    assert changed == pytest.approx(0.45, abs=0.03)


@pytest.mark.parametrize(
    "kwargs", [{"n_train": 0}, {"in_features": 0}, {"num_classes": 1}, {"noise": 1.5}]
)
def test_synthetic_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        data.synthetic_classification(**kwargs)


# ---------------------------------------------------------------------------- digits


def test_digits_shapes_dtypes_range_and_lengths(digits):
    train, val = digits
    assert len(train) + len(val) == 1797
    assert len(val) == pytest.approx(0.2 * 1797, abs=1)
    x, y = train[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32
    assert y.shape == () and y.dtype == torch.int64
    inputs = torch.cat([train.tensors[0], val.tensors[0]])
    assert inputs.min() == 0.0 and inputs.max() == 1.0


def test_digits_split_is_stratified(digits):
    train, val = digits
    train_share = train.tensors[1].bincount(minlength=10) / len(train)
    val_share = val.tensors[1].bincount(minlength=10) / len(val)
    assert torch.allclose(train_share, val_share, atol=0.01)


def test_digits_is_deterministic_per_seed(digits):
    again = data.digits()
    other = data.digits(seed=1)
    for (a, b) in zip(digits, again):
        assert torch.equal(a.tensors[0], b.tensors[0]) and torch.equal(a.tensors[1], b.tensors[1])
    assert not torch.equal(digits[1].tensors[0], other[1].tensors[0])
    # Same images, split differently.
    assert torch.equal(
        torch.cat([digits[0].tensors[0], digits[1].tensors[0]]).sum(dim=0),
        torch.cat([other[0].tensors[0], other[1].tensors[0]]).sum(dim=0),
    )


def test_digits_without_scikit_learn_says_how_to_install(monkeypatch):
    # A None entry in sys.modules makes the import raise ImportError.
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        data.digits()


# ---------------------------------------------------------------------------- char_text


def test_char_text_shapes_dtypes_and_vocab(char_text):
    train, val = char_text
    for dataset in (train, val):
        assert dataset.vocab_size == 256
        x, y = dataset[len(dataset) - 1]
        assert x.shape == y.shape == (64,)
        assert x.dtype == y.dtype == torch.int64
        assert x.min() >= 0 and x.max() < 256
    assert len(train) > 20_000 and len(val) > 2_000
    # Stored once as bytes, sliced per sample.
    assert train.tokens.dtype == torch.uint8


def test_char_text_targets_are_inputs_shifted_by_one_byte(char_text):
    train, _ = char_text
    for index in (0, 1, 1000, len(train) - 2):
        x, y = train[index]
        assert torch.equal(x[1:], y[:-1])
        next_x, _ = train[index + 1]
        # Non-overlapping windows: each window's last target is the next window's first input.
        assert y[-1] == next_x[0]
        assert torch.equal(x, train.tokens[index * 64 : index * 64 + 64].long())


def test_char_text_is_python_source_split_by_position(char_text):
    train, val = char_text
    assert bytes(train.tokens[:3].tolist()) == b'"""'  # a module docstring opens the corpus
    total = len(train.tokens) + len(val.tokens)
    assert total == 2_000_000
    assert len(val.tokens) == int(0.1 * total)
    again_train, again_val = data.char_text(seed=1)  # the seed has no effect by design
    assert torch.equal(again_train.tokens, train.tokens)
    assert torch.equal(again_val.tokens, val.tokens)


def test_char_text_kwargs_change_block_and_size():
    train, val = data.char_text(block_size=16, max_bytes=10_000, val_fraction=0.25)
    assert len(train.tokens) == 7_500 and len(val.tokens) == 2_500
    assert len(train) == (7_500 - 1) // 16
    assert train[0][0].shape == (16,)


def test_char_text_index_out_of_range_raises(char_text):
    train, _ = char_text
    with pytest.raises(IndexError):
        train[len(train)]


@pytest.mark.parametrize(
    "kwargs", [{"block_size": 0}, {"val_fraction": 0.0}, {"val_fraction": 1.0}]
)
def test_char_text_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        data.char_text(**kwargs)


def test_char_text_too_short_for_block_size_raises():
    with pytest.raises(ValueError, match="too little text"):
        data.char_text(block_size=64, max_bytes=100)


# ---------------------------------------------------------------------------- models


def test_mlp_output_shape_and_no_batchnorm(synthetic):
    model = models.mlp()
    x = synthetic[0].tensors[0][:64]
    assert model(x).shape == (64, 10)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.mark.parametrize("depth, n_linear", [(0, 1), (1, 2), (3, 4)])
def test_mlp_depth_counts_hidden_layers(depth, n_linear):
    model = models.mlp(in_features=4, num_classes=3, hidden=8, depth=depth)
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == n_linear
    assert model(torch.zeros(2, 4)).shape == (2, 3)


def test_mlp_micro_batches_accumulate_to_the_full_batch_gradient(synthetic):
    torch.manual_seed(0)
    model = models.mlp()
    x, y = synthetic[0].tensors[0][:64], synthetic[0].tensors[1][:64]
    F.cross_entropy(model(x), y).backward()
    full = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for xs, ys in zip(x.chunk(4), y.chunk(4)):
        (F.cross_entropy(model(xs), ys) / 4).backward()
    for g_full, p in zip(full, model.parameters()):
        assert torch.allclose(g_full, p.grad, atol=1e-6)


def test_cnn_output_shape_and_has_batchnorm(digits):
    model = models.cnn()
    x = digits[0].tensors[0][:64]
    assert model(x).shape == (64, 10)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_char_transformer_output_shape(char_text):
    model = models.char_transformer()
    x = torch.stack([char_text[0][i][0] for i in range(8)])
    assert model(x).shape == (8, 64, 256)
    assert model(x[:, :10]).shape == (8, 10, 256)  # shorter sequences are fine


def test_char_transformer_is_causal():
    torch.manual_seed(0)
    model = models.char_transformer(block_size=16, d_model=32, n_heads=2).eval()
    idx = torch.randint(256, (2, 16))
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 256
    with torch.no_grad():
        before, after = model(idx), model(changed)
    assert torch.allclose(before[:, :10], after[:, :10], atol=1e-5)
    assert not torch.allclose(before[:, 10:], after[:, 10:], atol=1e-3)


def test_char_transformer_rejects_sequences_longer_than_block_size():
    model = models.char_transformer(block_size=8, d_model=16, n_heads=2)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 9, dtype=torch.int64))


@pytest.mark.parametrize(
    "factory, kwargs",
    [
        (models.mlp, {"depth": -1}),
        (models.mlp, {"dropout": 1.0}),
        (models.cnn, {"width": 0}),
        (models.char_transformer, {"d_model": 130, "n_heads": 4}),
    ],
)
def test_models_reject_bad_arguments(factory, kwargs):
    with pytest.raises(ValueError, match="Found"):
        factory(**kwargs)


# ---------------------------------------------------------------------------- learning

# Each pair, 30 Adam steps from a fixed seed; the ratio is loss after / loss before on a
# fixed training batch. Thresholds leave a wide margin over the ratios measured for seeds
# 0-4 (mlp <= 0.48, cnn <= 0.31, char_transformer <= 0.66).
_LEARNING_CASES = [
    # model, data, batch_size, lr, max_ratio
    ("mlp", "synthetic_classification", 64, 3e-3, 0.7),
    ("cnn", "digits", 64, 3e-3, 0.5),
    ("char_transformer", "char_text", 32, 3e-3, 0.8),
]


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten())


@pytest.mark.parametrize("model_name, data_name, batch_size, lr, max_ratio", _LEARNING_CASES)
def test_thirty_adam_steps_reduce_the_training_loss(
    model_name, data_name, batch_size, lr, max_ratio, request
):
    train, _ = request.getfixturevalue(
        {"synthetic_classification": "synthetic", "digits": "digits", "char_text": "char_text"}[
            data_name
        ]
    )
    torch.manual_seed(0)
    model = getattr(models, model_name)()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loader = DataLoader(
        train, batch_size=batch_size, shuffle=True, drop_last=True,
        generator=torch.Generator().manual_seed(0),
    )
    x_eval, y_eval = next(iter(DataLoader(train, batch_size=128)))

    def eval_loss() -> float:
        model.eval()
        with torch.no_grad():
            loss = _cross_entropy(model(x_eval), y_eval).item()
        model.train()
        return loss

    initial = eval_loss()
    for x, y in itertools.islice(itertools.cycle(loader), 30):
        loss = _cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    final = eval_loss()
    assert final < max_ratio * initial, f"{initial=:.3f} {final=:.3f}"
