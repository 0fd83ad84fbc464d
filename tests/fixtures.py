"""User code for tests, loaded through ``target: tests.fixtures:NAME`` as a user's would be."""

from __future__ import annotations

import time

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset, default_collate


def tiny_data(n_train: int = 512, n_val: int = 128, in_features: int = 16, num_classes: int = 4, seed: int = 0):
    """Linearly separable-ish classification data (a fixed random teacher)."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(in_features, num_classes, generator=g)
    x = torch.randn(n_train + n_val, in_features, generator=g)
    y = (x @ teacher + 0.5 * torch.randn(n_train + n_val, num_classes, generator=g)).argmax(1)
    return TensorDataset(x[:n_train], y[:n_train]), TensorDataset(x[n_train:], y[n_train:])


def tiny_mlp(in_features: int = 16, hidden: int = 32, num_classes: int = 4) -> nn.Module:
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


class _OOMAbove(nn.Module):
    def __init__(self, threshold: int, message: str, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.threshold = threshold
        self.message = message
        self.net = tiny_mlp(in_features, 32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.threshold:
            raise RuntimeError(self.message)
        return self.net(x)


CUDA_OOM = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 15.78 GiB "
            "of which 1.20 GiB is free.")


def oom_above(threshold: int = 100, message: str = CUDA_OOM, in_features: int = 16, num_classes: int = 4):
    """A model that fails like a GPU would above ``threshold`` samples, whatever the device."""
    return _OOMAbove(threshold, message, in_features, num_classes)


class _Sleepy(Dataset):
    def __init__(self, base: Dataset, seconds: float) -> None:
        self.base, self.seconds = base, seconds

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        time.sleep(self.seconds)
        return self.base[i]


def sleepy_data(seconds: float = 0.002, **kwargs):
    """tiny_data whose training set sleeps in __getitem__: a data-loading bottleneck."""
    train, val = tiny_data(**kwargs)
    return _Sleepy(train, seconds), val


def bad_data():
    return "not a pair of datasets"


class _Keyed(Dataset):
    """tiny_data's samples as dicts: the features under ``x``, the class under ``target_key``; every
    ``ragged``-th sample's features one longer (a zero appended)."""

    def __init__(self, pairs: Dataset, target_key: str, ragged: int | None = None):
        self.pairs, self.target_key, self.ragged = pairs, target_key, ragged

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x, y = self.pairs[i]
        if self.ragged and i % self.ragged == self.ragged - 1:
            x = torch.cat([x, x.new_zeros(1)])
        return {"x": x, self.target_key: y}


class _KeyedMLP(nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.net = tiny_mlp(**kwargs)

    def forward(self, x: torch.Tensor, **_: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def keyed_data(target_key: str = "y", ragged: int | None = None, **kwargs):
    """tiny_data as dict samples; a ``target_key`` outside TARGET_KEYS leaves the loss without targets; ``ragged``:
    every so many samples' features one longer."""
    return tuple(_Keyed(part, target_key, ragged) for part in tiny_data(**kwargs))


def trim_collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """keyed_data's ragged samples as one batch: each ``x`` cut to the shortest."""
    shortest = min(len(s["x"]) for s in samples)
    return default_collate([{**s, "x": s["x"][:shortest]} for s in samples])


def keyed_mlp(**kwargs) -> nn.Module:
    return _KeyedMLP(**kwargs)


class _WholeBatchMLP(_KeyedMLP):
    """Takes a dict batch as one argument, forward(self, batch): keyword arguments never reach it."""

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        return self.net(batch["x"])


def whole_batch_mlp(**kwargs) -> nn.Module:
    return _WholeBatchMLP(**kwargs)


class _Masked(Dataset):
    """tiny_data's samples as (x, mask, y): the mask zeroes the second half of the features."""

    def __init__(self, pairs: Dataset):
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y = self.pairs[i]
        return x, (torch.arange(len(x)) < len(x) // 2).float(), y


class _MaskedMLP(nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.net = tiny_mlp(**kwargs)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.net(x * mask)


def masked_data(**kwargs):
    return tuple(_Masked(part) for part in tiny_data(**kwargs))


def masked_mlp(**kwargs) -> nn.Module:
    return _MaskedMLP(**kwargs)


def per_sample_loss() -> nn.Module:
    """A loss left unreduced: one number per sample, not per batch."""
    return nn.CrossEntropyLoss(reduction="none")


def linreg_data(d: int = 20, sigma: float = 1.0, n_train: int = 65536, n_val: int = 256, seed: int = 0):
    """y = w*·x + ε, x ~ N(0, I_d), Var ε = σ²: the analytic noise-scale case (RESEARCH.md)."""
    g = torch.Generator().manual_seed(seed)
    w_star = torch.randn(d, generator=g)
    x = torch.randn(n_train + n_val, d, generator=g)
    y = x @ w_star + sigma * torch.randn(n_train + n_val, generator=g)
    return TensorDataset(x[:n_train], y[:n_train, None]), TensorDataset(x[n_train:], y[n_train:, None])


def linreg_model(d: int = 20, delta: float = 1.0, seed: int = 0) -> nn.Module:
    """Linear(d, 1) at w = w* + δ·e_1, so |w − w*| = δ (w* as linreg_data draws it)."""
    g = torch.Generator().manual_seed(seed)
    w_star = torch.randn(d, generator=g)
    model = nn.Linear(d, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(w_star[None])
        model.weight[0, 0] += delta
    return model


class _Slow(nn.Module):
    def __init__(self, seconds: float, **kwargs) -> None:
        super().__init__()
        self.seconds = seconds
        self.net = tiny_mlp(**kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds)
        return self.net(x)


def slow_mlp(seconds: float = 0.01, **kwargs) -> nn.Module:
    """tiny_mlp (same parameters, same memory) that sleeps in forward: a throughput regression."""
    return _Slow(seconds, **kwargs)


def oom_on_one_rank(threshold: int = 100, rank: int = 1, in_features: int = 16, num_classes: int = 4):
    """Fails like a GPU above ``threshold`` samples, but only on one torchrun rank."""
    import os

    if int(os.environ.get("RANK", "0")) == rank:
        return _OOMAbove(threshold, CUDA_OOM, in_features, num_classes)
    return _OOMAbove(10**9, CUDA_OOM, in_features, num_classes)


class _FailsOn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = tiny_mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise ValueError("user code bug: this rank's model cannot handle its input")


def broken_on_one_rank(rank: int = 1):
    """A model whose forward raises a plain error (no OOM) on one torchrun rank only."""
    import os

    return _FailsOn() if int(os.environ.get("RANK", "0")) == rank else tiny_mlp()


def factory_fails_on_one_rank(rank: int = 1):
    """A model factory that raises (no model at all) on one torchrun rank only."""
    import os

    if int(os.environ.get("RANK", "0")) == rank:
        raise RuntimeError(f"model factory boom on rank {rank}")
    return tiny_mlp()


def data_fails_on_one_rank(rank: int = 1, **kwargs):
    """A data factory that raises on one torchrun rank only; tiny_data on the others."""
    import os

    if int(os.environ.get("RANK", "0")) == rank:
        raise RuntimeError(f"data factory boom on rank {rank}")
    return tiny_data(**kwargs)


class _Hangs(nn.Module):
    def __init__(self, after: int, **kwargs) -> None:
        super().__init__()
        self.after = after
        self.calls = 0
        self.net = tiny_mlp(**kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls > self.after:
            time.sleep(10**6)  # a forward that never returns (a deadlock, a stuck data pipe)
        return self.net(x)


def hang_mlp(after: int = 0, **kwargs) -> nn.Module:
    """tiny_mlp whose forward never returns after its first ``after`` calls."""
    return _Hangs(after, **kwargs)


class _NaN(nn.Module):
    def __init__(self, **kwargs) -> None:
        super().__init__()
        self.net = tiny_mlp(**kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * float("nan")


def nan_mlp(**kwargs) -> nn.Module:
    """tiny_mlp whose outputs, and so every loss, are NaN (broken data or model code)."""
    return _NaN(**kwargs)


class _Lazy(Dataset):
    """Samples made on demand: a set far larger than memory, as a lazily-read image set is."""

    def __init__(self, n: int, in_features: int) -> None:
        self.n, self.in_features = n, in_features

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return torch.full((self.in_features,), float(i % 7)), i % 4


def huge_data(n_train: int = 10**9, in_features: int = 1024):
    """A billion-sample training set of 4 KiB samples (never materialised); a small validation set."""
    _, val = tiny_data(in_features=in_features)
    return _Lazy(n_train, in_features), val


def autoencoder_data(n_train: int = 256, n_val: int = 64, dim: int = 16):
    """Samples whose target is the input itself: a float vector, not tokens."""
    x = torch.randn(n_train + n_val, dim, generator=torch.Generator().manual_seed(0))
    return TensorDataset(x[:n_train], x[:n_train]), TensorDataset(x[n_train:], x[n_train:])


class _Bags(Dataset):
    """Variable-length bags of item ids (1..max_len each) with a class label."""

    def __init__(self, n: int, n_items: int, max_len: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(1, max_len + 1, (n,), generator=g)
        self.items = [torch.randint(0, n_items, (int(k),), generator=g) for k in lengths]
        self.y = torch.randint(0, 4, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i], self.y[i]


def bag_data(n_train: int = 512, n_val: int = 128, n_items: int = 100, max_len: int = 12):
    return _Bags(n_train, n_items, max_len, 0), _Bags(n_val, n_items, max_len, 1)


def bag_collate(samples):
    """``nn.EmbeddingBag``'s input: every sample's ids in one flat tensor, where each starts, the labels."""
    ids = [s[0] for s in samples]
    offsets = torch.tensor([0] + [len(i) for i in ids[:-1]]).cumsum(0)
    return torch.cat(ids), offsets, torch.stack([s[1] for s in samples])


class _BagModel(nn.Module):
    def __init__(self, n_items: int = 100, dim: int = 16) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(n_items, dim)
        self.head = nn.Linear(dim, 4)

    def forward(self, ids, offsets):
        return self.head(self.bag(ids, offsets))


def bag_model(**kwargs) -> nn.Module:
    return _BagModel(**kwargs)


def bn_mlp(in_features: int = 16, hidden: int = 32, num_classes: int = 4) -> nn.Module:
    """BatchNorm after a Linear layer: it cannot train on a batch of one."""
    return nn.Sequential(nn.Linear(in_features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                         nn.Linear(hidden, num_classes))


class _SlowAfterValidating(nn.Module):
    def __init__(self, seconds: float, **kwargs) -> None:
        super().__init__()
        self.seconds, self.validated = seconds, False
        self.net = tiny_mlp(**kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            self.validated = True
        elif self.validated:
            time.sleep(self.seconds)
        return self.net(x)


def slow_after_validating(seconds: float = 0.01, **kwargs) -> nn.Module:
    """tiny_mlp that sleeps in each training forward once it has validated: a run that validates
    (check's training run) is slow, one that does not (its second timing) is not; a passing slowdown."""
    return _SlowAfterValidating(seconds, **kwargs)


class _ThreeHeads(nn.Module):
    """A trunk whose output feeds three heads, returned as a dict."""

    def __init__(self, in_features: int = 32, hidden: int = 128, num_classes: int = 8) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(in_features, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU())
        self.cls, self.rec = nn.Linear(hidden, num_classes), nn.Linear(hidden, in_features)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(x)
        return {"logits": self.cls(h), "recon": self.rec(h), "hidden": h}


def three_heads(**kwargs) -> nn.Module:
    return _ThreeHeads(**kwargs)


def three_heads_loss(recon_weight: float = 0.1):
    def loss(outputs, targets):
        return (nn.functional.cross_entropy(outputs["logits"], targets)
                + recon_weight * outputs["recon"].pow(2).mean() + 1e-4 * outputs["hidden"].pow(2).mean())
    return loss


class _SparseBag(nn.Module):
    def __init__(self, vocab: int, num_classes: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, num_classes, sparse=True)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.emb(ids).mean(1)


def sparse_bag(vocab: int = 5000, num_classes: int = 8) -> nn.Module:
    """Class scores as the mean of sparse-gradient embeddings (train with SparseAdam)."""
    return _SparseBag(vocab, num_classes)


def id_data(n_train: int = 4000, n_val: int = 500, vocab: int = 5000, num_classes: int = 8, length: int = 12):
    """Rows of ``length`` token ids, half drawn from a band of the vocabulary that names the class."""
    g = torch.Generator().manual_seed(7)
    n = n_train + n_val
    y = torch.randint(0, num_classes, (n,), generator=g)
    ids = torch.randint(0, vocab, (n, length), generator=g)
    band = vocab // num_classes
    ids[:, : length // 2] = y[:, None] * band + torch.randint(0, band, (n, length // 2), generator=g)
    return TensorDataset(ids[:n_train], y[:n_train]), TensorDataset(ids[n_train:], y[n_train:])


class _FloatLists(torch.utils.data.Dataset):
    """Samples whose input is a Python list of floats (no tensor): the default collate cannot batch it for a model."""

    def __init__(self, n: int, in_features: int) -> None:
        self.x = torch.randn(n, in_features).tolist()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], i % 4


def float_list_data(n_train: int = 64, n_val: int = 16, in_features: int = 16):
    return _FloatLists(n_train, in_features), _FloatLists(n_val, in_features)


def frozen_first_layer(in_features: int = 16, hidden: int = 32, num_classes: int = 4) -> nn.Module:
    """tiny_mlp with its first layer frozen (a fine-tune's backbone): 676 parameters, 132 trainable."""
    model = tiny_mlp(in_features, hidden, num_classes)
    model[0].requires_grad_(False)
    return model


def no_optimizer(params, lr):
    """An optimizer factory that forgot its return statement."""
    torch.optim.SGD(params, lr=lr)


def squeezed_mlp(in_features: int = 16) -> nn.Module:
    """One output per sample, squeezed to (B,): a regression head."""
    return nn.Sequential(nn.Linear(in_features, 1), nn.Flatten(0))


def float_targets(**kwargs):
    """tiny_data's inputs with float regression targets of shape (B,)."""
    train, val = tiny_data(**kwargs)
    return tuple(torch.utils.data.TensorDataset(d.tensors[0], d.tensors[1].float()) for d in (train, val))


def column_labels(**kwargs):
    """tiny_data with its class labels as a (B, 1) column."""
    train, val = tiny_data(**kwargs)
    return tuple(torch.utils.data.TensorDataset(d.tensors[0], d.tensors[1][:, None]) for d in (train, val))


def data_out_of_host_memory():
    """A data set too big for host memory, loaded in the factory."""
    raise MemoryError("cannot allocate 80 GB array")


def model_out_of_device_memory():
    """A factory that moves the model to a device with too little memory."""
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


class _Blocking(torch.utils.data.Dataset):
    """A data set whose every read blocks, as one on a stalled network file system does."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, index: int):
        time.sleep(3600)


def blocking_data():
    return _Blocking(), _Blocking()


class _ShortOfItsLength(torch.utils.data.Dataset):
    """Says 64 samples, has 10: reading past them raises IndexError."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, index: int):
        if index >= 10:
            raise IndexError(f"sample {index} is past the 10 on disk")
        return torch.randn(16), torch.tensor(index % 4)


def short_data():
    return _ShortOfItsLength(), _ShortOfItsLength()


def raising_loss():
    """A loss factory whose loss raises on every batch."""
    def loss(output, target):
        raise ZeroDivisionError("oops in the loss")
    return loss


class _BlockingLength(_Blocking):
    def __len__(self) -> int:
        time.sleep(3600)
        return 64


def blocking_len_data(**_):
    return _BlockingLength(), _BlockingLength()


def blocking_model(**_):
    time.sleep(3600)


class _DecodesTooMuch(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, index: int):
        if index:  # the first sample (read to size batches) decodes; the rest need more host memory than there is
            raise MemoryError(f"decoding sample {index}")
        return torch.randn(16), torch.tensor(0)


def data_out_of_host_memory_when_read(**_):
    return _DecodesTooMuch(), _DecodesTooMuch()


class _LSTMClassifier(nn.Module):
    def __init__(self, in_features: int, hidden: int, num_classes: int, layers: int, bidirectional: bool) -> None:
        super().__init__()
        self.lstm = nn.LSTM(in_features, hidden, num_layers=layers, bidirectional=bidirectional, batch_first=True)
        self.head = nn.Linear(hidden * (2 if bidirectional else 1), num_classes)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def tiny_lstm(in_features: int = 4, hidden: int = 32, num_classes: int = 4, layers: int = 1,
              bidirectional: bool = False) -> nn.Module:
    """An nn.LSTM classifier (on CPU: oneDNN's kernel, whose workspace a fake kernel leaves empty)."""
    return _LSTMClassifier(in_features, hidden, num_classes, layers, bidirectional)


class _EncoderClassifier(nn.Module):
    def __init__(self, in_features: int, dim: int, layers: int, num_classes: int) -> None:
        super().__init__()
        self.embed = nn.Linear(in_features, dim)
        layer = nn.TransformerEncoderLayer(dim, 2, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)  # deep copies of `layer`
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(1))


def tiny_encoder(in_features: int = 4, dim: int = 32, layers: int = 2, num_classes: int = 4) -> nn.Module:
    """An nn.TransformerEncoder classifier: its layers are deep copies made under the factory's (fake) mode."""
    return _EncoderClassifier(in_features, dim, layers, num_classes)


def sequence_data(n_train: int = 256, n_val: int = 64, length: int = 20, in_features: int = 4, num_classes: int = 4):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n_train + n_val, length, in_features, generator=g)
    y = torch.randint(0, num_classes, (n_train + n_val,), generator=g)
    return TensorDataset(x[:n_train], y[:n_train]), TensorDataset(x[n_train:], y[n_train:])


class _MissingSample(Dataset):
    """A shard that lost one sample: its ``__getitem__`` raises KeyError at that index alone."""

    def __init__(self, base: Dataset, missing: int) -> None:
        self.base, self.missing = base, missing

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        if index == self.missing:
            raise KeyError(f"sample {index} missing from shard")
        return self.base[index]


class _MissingInBatch(_MissingSample):
    """:class:`_MissingSample` that fetches a batch at once (``__getitems__``, which DataLoader's fetcher prefers):
    it raises for a batch that holds the lost sample."""

    def __getitems__(self, indices: list[int]):
        if self.missing in indices:
            raise KeyError("a sample of the batch is missing from shard")
        return [self.base[i] for i in indices]


class _MissingInBatchOnly(_MissingInBatch):
    """:class:`_MissingInBatch` that reads whole batches alone: its ``__getitem__`` is torch's, which raises
    NotImplementedError for any index."""

    __getitem__ = Dataset.__getitem__


def missing_in_batch_data(missing: int = 40, batches_only: bool = False):
    """:func:`tiny_data` fetched by batch (``__getitems__``), with one sample of the training set missing;
    ``batches_only``: no sample can be fetched alone."""
    train, val = tiny_data()
    return (_MissingInBatchOnly if batches_only else _MissingInBatch)(train, missing), val


def missing_sample_data(missing: int = 40, split: str = "train"):
    """:func:`tiny_data` with one sample of the training (or, ``split: val``, the validation) set missing."""
    train, val = tiny_data()
    if split == "val":
        return train, _MissingSample(val, missing)
    return _MissingSample(train, missing), val


class _NaNInEval(nn.Module):
    """tiny_mlp whose outputs are NaN in eval mode alone: training steps are finite, every validation loss is NaN
    (running statistics gone bad, a broken eval-only branch)."""

    def __init__(self, **kwargs) -> None:
        super().__init__()
        self.net = tiny_mlp(**kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return out if self.training else out * float("nan")


def nan_in_eval_mlp(**kwargs) -> nn.Module:
    return _NaNInEval(**kwargs)


class _Streamed(torch.utils.data.IterableDataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        for i in range(self.n):
            yield torch.randn(16), torch.tensor(i % 4)


def streamed_data(n_train: int = 64, n_val: int = 16):
    """IterableDatasets that define __len__: iterated, not indexed."""
    return _Streamed(n_train), _Streamed(n_val)


def wide_labels(extra: int = 256, **kwargs):
    """tiny_data whose targets carry ``extra`` float columns after the class label (column 0): large targets
    that an inference batch, having none, must not count."""
    train, val = tiny_data(**kwargs)
    return tuple(torch.utils.data.TensorDataset(d.tensors[0], torch.cat(
        [d.tensors[1][:, None].float(), torch.zeros(len(d), extra)], 1)) for d in (train, val))


def first_column_loss():
    """Cross-entropy against the class label in the targets' column 0 (see wide_labels)."""
    return lambda output, targets: nn.functional.cross_entropy(output, targets[:, 0].long())


def flawed_data(split: str = "validation", index: int = 100, flaw: str = "nan", **kwargs):
    """tiny_data with one flaw in one sample of one split, beyond the first two that validate ran through the
    model: ``nan`` or ``inf`` in an input, ``inf_target`` (float targets, for mse), or a class label
    ``label:N``."""
    train, val = tiny_data(**kwargs)
    if flaw == "inf_target":
        train, val = (TensorDataset(d.tensors[0], d.tensors[1].float()) for d in (train, val))
    x, y = (train if split == "training" else val).tensors
    if flaw in ("nan", "inf"):
        x[index, 3] = float(flaw)
    elif flaw == "inf_target":
        y[index] = float("inf")
    else:
        y[index] = int(flaw.removeprefix("label:"))
    return train, val


def huge_output_mlp(scale: float = 1e5, **kwargs) -> nn.Module:
    """tiny_mlp whose last layer is ``scale`` × its init: finite outputs near 1e4, past what an exp takes."""
    model = tiny_mlp(**kwargs)
    with torch.no_grad():
        model[-1].weight.mul_(scale)
    return model


def naive_softmax_loss():
    """Cross-entropy by hand, exp then log: NaN (inf / inf) of outputs past about 88."""
    def loss(output, targets):
        p = torch.exp(output) / torch.exp(output).sum(dim=1, keepdim=True)
        return -torch.log(p.gather(1, targets[:, None])).mean()
    return loss
