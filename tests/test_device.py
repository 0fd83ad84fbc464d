"""The device backend: OOM recognition and CPU memory counted to the byte."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from batchtune.memory.device import CPUBackend, is_oom, select_backend


# The messages as torch and its libraries raise them (first lines; cuDNN's from
# aten/src/ATen/native/cudnn/Conv_v8.cpp and Conv_v7.cpp, where a workspace OOM is swallowed).
OOM_MESSAGES = [
    "CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 15.78 GiB total capacity)",
    "CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported",
    "cuDNN error: CUDNN_STATUS_ALLOC_FAILED",
    "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
    "cuFFT error: CUFFT_ALLOC_FAILED",
    "GET was unable to find an engine to execute this computation",
    "FIND was unable to find an engine to execute this computation",
    "Unable to find a valid cuDNN algorithm to run convolution",
    "MPS backend out of memory (MPS allocated: 17.00 GB, other allocations: 1.00 GB)",
    "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
    "you tried to allocate 1099511627776 bytes.",
    "HIP out of memory. Tried to allocate 2.00 GiB",
]
NOT_OOM_MESSAGES = [
    "mat1 and mat2 shapes cannot be multiplied (4x3 and 5x6)",
    "CUDA error: device-side assert triggered",
    # a size limit of a cuDNN kernel, not memory: retrying smaller would not tell the ceiling
    "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in a non-contiguous "
    "input.",
    "cuDNN error: CUDNN_STATUS_EXECUTION_FAILED",
]


@pytest.mark.parametrize("exc", [torch.OutOfMemoryError("anything"), torch.cuda.OutOfMemoryError("x"),
                                 MemoryError(), *(RuntimeError(m) for m in OOM_MESSAGES)])
def test_is_oom_recognises(exc):
    assert is_oom(exc)


@pytest.mark.parametrize("exc", [ValueError("out of range"), *(RuntimeError(m) for m in NOT_OOM_MESSAGES)])
def test_is_oom_rejects_other_errors(exc):
    assert not is_oom(exc)


def test_is_oom_follows_the_cause_chain():
    try:
        try:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2 GiB")
        except RuntimeError as inner:
            raise ValueError("training step failed") from inner
    except ValueError as outer:
        assert is_oom(outer)


def _mlp(d: int = 100, h: int = 200, c: int = 10) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, c))


def test_counts_parameters_and_adam_state_to_the_byte():
    backend = CPUBackend()
    model = _mlp()
    n_params = sum(p.numel() for p in model.parameters())  # 100*200+200 + 200*10+10 = 22210
    assert n_params == 22210
    backend.track(model.parameters())
    assert backend.current_bytes() == 4 * n_params
    opt = torch.optim.Adam(model.parameters())
    x, y = torch.randn(64, 100), torch.randint(0, 10, (64,))
    with backend.session():
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    # exp_avg and exp_avg_sq per parameter, plus a float32 step counter per parameter tensor.
    assert backend.current_bytes() == 4 * n_params * 3 + 4 * 4
    del opt
    assert backend.current_bytes() == 4 * n_params


def test_forward_activation_bytes():
    backend = CPUBackend()
    layer = nn.Linear(100, 200)
    backend.track(layer.parameters())
    base = backend.current_bytes()
    x = torch.randn(64, 100)  # made outside the session: host data, not counted
    with backend.session(), torch.no_grad():
        backend.reset_peak()
        out = layer(x)
        assert backend.peak_bytes() - base == 64 * 200 * 4
        relu = torch.relu(out)
        view = relu[:10]  # a view allocates nothing
        assert backend.current_bytes() - base == 2 * 64 * 200 * 4
        del out, relu, view
    assert backend.current_bytes() == base


def test_views_of_host_data_are_not_device_memory():
    backend = CPUBackend()
    dataset = torch.randn(10_000, 100)  # 4 MB that lives on the host
    with backend.session():
        rows = [dataset[i] for i in range(8)]
        assert backend.current_bytes() == 0
        batch = torch.stack(rows)  # the collated batch is new memory
        assert backend.current_bytes() == 8 * 100 * 4
        del batch, rows


def test_limit_raises_out_of_memory_at_the_exact_byte():
    x = torch.randn(64, 100)
    for limit, fails in [(64 * 200 * 4 - 1, True), (64 * 200 * 4, False)]:
        backend = CPUBackend(memory_limit=limit)
        weight = torch.randn(200, 100)
        with backend.session():
            if fails:
                with pytest.raises(torch.OutOfMemoryError, match="simulated by batchtune"):
                    x @ weight.T
            else:
                assert (x @ weight.T).shape == (64, 200)
        assert backend.current_bytes() == 0


def test_out_of_memory_in_backward_is_recognised_and_memory_returns():
    model = _mlp()
    backend = CPUBackend(memory_limit=4 * 22210 + 150_000)
    backend.track(model.parameters())
    base = backend.current_bytes()
    x, y = torch.randn(128, 100), torch.randint(0, 10, (128,))
    caught = None
    with backend.session():
        try:
            nn.functional.cross_entropy(model(x), y).backward()
        except Exception as exc:  # noqa: BLE001
            caught = exc
    assert caught is not None and is_oom(caught)
    del caught
    model.zero_grad(set_to_none=True)
    backend.cleanup()
    assert backend.current_bytes() == base


def test_select_backend_cpu_and_errors():
    assert select_backend("cpu", 1024).capacity_bytes() == 1024
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            select_backend("cuda")


def test_per_rank_memory_limits_in_one_process_say_which_one_it_takes(write_spec, monkeypatch):
    """Two limits in one process: the extra one was ignored without a word."""
    import batchtune.memory.device as device
    from batchtune.config.spec import load_spec
    from tests.conftest import logged

    monkeypatch.setattr(device, "_SAID_UNUSED", [])
    spec = load_spec(write_spec(), ["device.memory_limit=[4MiB, 3MiB]"])
    with logged("batchtune") as messages:
        backend = device.backend_for_spec(spec)
        device.backend_for_spec(spec)  # said once
    assert backend.capacity_bytes() == 4 * 2**20
    said = [m for m in messages if "device.memory_limit lists" in m]
    assert said == ["device.memory_limit lists 2 limits, one per rank, and this is one process: it takes the first "
                    "(4.0 MiB); the other 1 is unused"]


@pytest.mark.parametrize("limits,count", [("[4MiB, 3MiB, 2MiB]", "3 limits"), ("[4MiB]", "1 limit")])
def test_per_rank_memory_limits_that_are_not_one_per_rank_are_refused(write_spec, monkeypatch, limits, count):
    """3 limits on 2 ranks: the third was unused with a warning; 1 on 2: the last entry covered rank 1 unsaid."""
    from typer.testing import CliRunner

    import batchtune.engine.distributed as distributed
    from batchtune.cli import app

    two = distributed.DistContext(rank=0, local_rank=0, world_size=2, backend="gloo")  # no group: none is needed

    def joined(device_type="auto"):
        distributed._CONTEXT = two
        return two

    monkeypatch.setattr(distributed, "_CONTEXT", distributed._CONTEXT)
    monkeypatch.setattr(distributed, "init_from_env", joined)
    # the ranks' agreements (the data build's) read this rank's own values: the other rank agrees
    monkeypatch.setattr(distributed.DistContext, "_all_reduce", lambda self, tensor, op: None)
    spec = write_spec()
    for command in (["probe", str(spec)], ["probe", str(spec), "--estimate"]):
        result = CliRunner().invoke(app, [*command, f"device.memory_limit={limits}", "-q"])
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output
        assert (f"device.memory_limit: lists {count}, one per rank, and this run has 2 ranks: give 2 limits, or one "
                "size for every rank") in " ".join(result.stderr.split())
