"""The CUDA path on CPU: a fake ``torch.cuda`` that behaves like the caching allocator.

The fake keeps the numbers the real allocator would: allocated bytes, reserved bytes in
20 MiB segments, a memory fraction that caps reserved bytes, an OOM counter, a CUDA context
and library memory outside the allocator. Each test pins one defect of the CUDA path that a
CPU-only machine could otherwise never see.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from batchtune.engine import distributed
from batchtune.engine.loss_scale import ScalerCarry, optimizer_state_bytes
from batchtune.memory import device as device_mod
from batchtune.memory.device import (
    LIBRARY_RESERVE_BYTES,
    CUDABackend,
    LimitError,
    backend_for_spec,
    cuda_index,
    is_oom,
    select_backend,
)
from batchtune.config.spec import SpecError, load_spec

MiB, GiB = 2**20, 2**30
ROOT = Path(__file__).resolve().parents[1]


class FakeCuda:
    """The parts of torch.cuda the backend uses, over a simulated caching allocator."""

    SEGMENT = 20 * MiB  # what the real allocator reserves for a 1-10 MiB tensor

    def __init__(self, total: int = 16 * GiB, count: int = 2, bf16: bool = True, context: int = 500 * MiB):
        self.total, self.count, self.bf16 = total, count, bf16
        self.outside = context  # CUDA context + libraries: never in the allocator's numbers
        self.allocated = self.reserved = self.peak_allocated = self.peak_reserved = 0
        self.fraction = {i: 1.0 for i in range(count)}
        self.num_ooms = 0
        self.current = 0
        self.warmed = False
        self.calls: list[tuple] = []

    # the allocator
    def alloc(self, nbytes: int) -> None:
        need = self.allocated + nbytes - self.reserved
        if need > 0:
            grow = -(-need // self.SEGMENT) * self.SEGMENT
            if self.reserved + grow > self.fraction[self.current] * self.total or grow > self.free():
                self.num_ooms += 1
                raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {nbytes} bytes")
            self.reserved += grow
        self.allocated += nbytes
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        self.peak_reserved = max(self.peak_reserved, self.reserved)

    def release(self, nbytes: int) -> None:
        self.allocated -= nbytes  # the block stays cached: reserved does not fall

    def free(self) -> int:
        return self.total - self.outside - self.reserved

    def warm_up(self, device: torch.device) -> int:
        """What the real warm-up does: cuBLAS workspaces in the allocator, kernels outside it (once)."""
        if self.warmed:
            return 0
        self.warmed = True
        self.alloc(32 * MiB)
        self.outside += 300 * MiB
        self.empty_cache()
        return 300 * MiB

    # torch.cuda's functions
    def is_available(self) -> bool:
        return True

    def device_count(self) -> int:
        return self.count

    def set_device(self, device) -> None:
        self.current = device.index if isinstance(device, torch.device) else int(device)
        self.calls.append(("set_device", self.current))

    def get_device_properties(self, device) -> SimpleNamespace:
        return SimpleNamespace(total_memory=self.total, name="Fake H100")

    def get_device_capability(self, device=None) -> tuple[int, int]:
        return (9, 0) if self.bf16 else (7, 5)

    def get_device_name(self, device=None) -> str:
        return "Fake H100" if self.bf16 else "Fake T4"

    def is_bf16_supported(self, including_emulation: bool = True) -> bool:
        return self.bf16 or including_emulation

    def get_per_process_memory_fraction(self, device) -> float:
        return self.fraction[device.index]

    def set_per_process_memory_fraction(self, fraction: float, device) -> None:
        assert isinstance(fraction, float) and 0 <= fraction <= 1
        self.fraction[device.index] = fraction

    def mem_get_info(self, device) -> tuple[int, int]:
        return self.free(), self.total

    def memory_allocated(self, device) -> int:
        return self.allocated

    def max_memory_allocated(self, device) -> int:
        return self.peak_allocated

    def memory_reserved(self, device) -> int:
        return self.reserved

    def max_memory_reserved(self, device) -> int:
        return self.peak_reserved

    def reset_peak_memory_stats(self, device) -> None:
        self.peak_allocated, self.peak_reserved = self.allocated, self.reserved

    def memory_stats(self, device) -> dict:
        return {"num_ooms": self.num_ooms}

    def empty_cache(self) -> None:
        # the real allocator frees only whole unused segments; the fake rounds up to them
        self.reserved = -(-self.allocated // self.SEGMENT) * self.SEGMENT

    def synchronize(self, device=None) -> None:
        pass


_FUNCTIONS = [name for name in vars(FakeCuda) if not name.startswith("_") and name not in
              ("SEGMENT", "alloc", "release", "free", "warm_up")]


@pytest.fixture
def cuda(monkeypatch) -> FakeCuda:
    fake = FakeCuda()
    for name in _FUNCTIONS:
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name), raising=False)
    monkeypatch.setattr(device_mod, "_warm_up_libraries", fake.warm_up)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("BATCHTUNE_MEMORY_LIMIT", raising=False)
    return fake


# ---------------------------------------------------------------- 1, 7: the limit and the fraction


def test_limit_sets_the_fraction_and_close_restores_it(cuda):
    with CUDABackend(1, 4 * GiB) as backend:
        assert cuda.fraction[1] == 0.25 and backend.device == torch.device("cuda", 1)
        assert cuda.calls[0] == ("set_device", 1)
    assert cuda.fraction[1] == 1.0


def test_a_backend_without_limit_lifts_an_earlier_cap(cuda):
    limited = CUDABackend(0, 2 * GiB)
    assert cuda.fraction[0] == 0.125
    with CUDABackend(0) as free:  # defect 7: this one used to keep the 2 GiB cap
        assert cuda.fraction[0] == 1.0
        cuda.alloc(3 * GiB)
        assert free.current_bytes() == 3 * GiB + 32 * MiB
    assert cuda.fraction[0] == 0.125  # restored to what it found
    limited.close()
    assert cuda.fraction[0] == 1.0
    limited.close()  # idempotent
    assert cuda.fraction[0] == 1.0


@pytest.mark.parametrize("limit,refused", [(255 * MiB, True), (256 * MiB, False), (64 * GiB, False)])
def test_tiny_cuda_limits_are_refused(cuda, limit, refused):
    if refused:
        with pytest.raises(LimitError, match="below 256 MiB"):
            CUDABackend(0, limit)
        assert cuda.fraction[0] == 1.0  # refused before anything changed
    else:
        backend = CUDABackend(0, limit)
        assert cuda.fraction[0] == min(1.0, limit / cuda.total)
        backend.close()


def _spec(write_spec, device: str = "cuda", limit: str = "null", precision: str = "fp32"):
    return load_spec(write_spec(f"""\
        name: t
        model: {{target: "tests.fixtures:tiny_mlp"}}
        data: {{target: "tests.fixtures:tiny_data"}}
        optimizer: {{name: adamw, lr: 0.01}}
        base_batch_size: 32
        precision: {precision}
        device: {{type: "{device}", memory_limit: {limit}}}
        """))


def test_spec_error_names_memory_limit_for_a_tiny_cuda_limit(cuda, write_spec, monkeypatch):
    with pytest.raises(SpecError) as err:
        backend_for_spec(_spec(write_spec, limit="100MiB"))
    assert "device.memory_limit" in str(err.value) and "below 256 MiB" in str(err.value)
    monkeypatch.setenv("BATCHTUNE_MEMORY_LIMIT", "1MiB")
    with pytest.raises(SpecError, match="BATCHTUNE_MEMORY_LIMIT: a CUDA memory_limit"):
        backend_for_spec(_spec(write_spec, limit="1GiB"))
    # on CPU a small simulated limit is the point: allowed
    assert backend_for_spec(_spec(write_spec, device="cpu", limit="1MiB")).capacity_bytes() == 1 * MiB


# ---------------------------------------------------------------- 2, 3: allocated vs reserved


def test_peaks_are_allocated_bytes_and_fall_after_a_reset(cuda):
    backend = CUDABackend(0, 4 * GiB)
    base = backend.current_bytes()
    assert base == 32 * MiB  # the cuBLAS workspace, in the baseline since the warm-up
    backend.reset_peak()
    cuda.alloc(300 * MiB)  # activations of a phase
    cuda.release(300 * MiB)
    assert backend.peak_bytes() == base + 300 * MiB
    backend.reset_peak()
    cuda.alloc(5 * MiB)  # a small optimizer phase: its own peak, not the last phase's
    assert backend.peak_bytes() == base + 5 * MiB
    assert backend.peak_reserved_bytes() >= base + 300 * MiB  # reserved never fell
    assert backend.fragmentation_bytes() == backend.peak_reserved_bytes() - backend.peak_bytes()
    cuda.release(5 * MiB)
    assert backend.current_bytes() == base  # no leak on allocated bytes ...
    assert backend.current_reserved_bytes() > base  # ... while the cache still holds blocks
    backend.cleanup(collect=False)
    assert backend.current_reserved_bytes() == 40 * MiB  # the workspace's segments remain


def test_cpu_backend_answers_the_same_questions_consistently():
    backend = select_backend("cpu", 1 * MiB)
    with backend.session():
        backend.reset_peak()
        x = torch.empty(1000, dtype=torch.uint8)
        assert backend.peak_bytes() == backend.peak_reserved_bytes() == 1000
        assert backend.current_reserved_bytes() == backend.current_bytes() == 1000
        assert backend.fragmentation_bytes() == 0
        del x
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(2 * MiB, dtype=torch.uint8)
    assert backend.oom_count() == 1 and backend.ooms_since_reset() == 1
    backend.reset_peak()
    assert backend.ooms_since_reset() == 0


# ---------------------------------------------------------------- 4: capacity after the warm-up


def test_capacity_is_read_after_the_libraries_took_their_share(cuda):
    backend = CUDABackend(0)
    assert backend.library_bytes == 300 * MiB
    reserve = backend.library_reserve_bytes()
    assert reserve == LIBRARY_RESERVE_BYTES == 512 * MiB  # 2% of 16 GiB is less
    assert backend.capacity_bytes() == 16 * GiB - 500 * MiB - 300 * MiB - reserve
    backend.close()
    with CUDABackend(0, 4 * GiB) as limited:
        assert limited.capacity_bytes() == 4 * GiB
    cuda.outside = 15 * GiB  # another process took most of the card
    with CUDABackend(0, 4 * GiB) as crowded:
        assert crowded.capacity_bytes() == 16 * GiB - cuda.outside - reserve
        assert crowded.describe()["library_bytes"] == 0  # loaded once per process


# ---------------------------------------------------------------- 6: OOM forms and the allocator's counter


def test_a_library_error_after_an_allocator_oom_is_an_oom(cuda):
    backend = CUDABackend(0, 1 * GiB)
    backend.reset_peak()
    wrapped = RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED")
    assert not is_oom(wrapped, backend)
    with pytest.raises(torch.OutOfMemoryError):
        cuda.alloc(2 * GiB)  # a library tried a workspace, caught the OOM, and went on
    assert backend.oom_count() == 1
    assert is_oom(wrapped, backend) and not is_oom(wrapped)
    backend.reset_peak()  # the next phase starts clean
    assert not is_oom(wrapped, backend)


# ---------------------------------------------------------------- 9: which card, which process group


@pytest.mark.parametrize("kind,local_rank,index", [("cuda", 0, 0), ("cuda", 1, 1), ("cuda:0", 1, 1),
                                                    ("cuda:2", 0, 2), ("cuda:2", 1, 3), ("auto", 1, 1)])
def test_cuda_index_is_an_offset_plus_the_local_rank(kind, local_rank, index):
    assert cuda_index(kind, local_rank) == index


def test_each_rank_gets_its_own_card(cuda, write_spec, monkeypatch):
    assert select_backend("cuda:1", None, local_rank=0).device.index == 1
    with pytest.raises(ValueError, match="'cuda:1' for local rank 1 is card 2, but only 2 CUDA devices"):
        select_backend("cuda:1", None, local_rank=1)
    monkeypatch.setenv("LOCAL_RANK", "1")  # torchrun without a joined group (the Python API)
    assert backend_for_spec(_spec(write_spec, device="cuda")).device.index == 1
    with pytest.raises(SpecError, match="device.type"):
        backend_for_spec(_spec(write_spec, device="cuda:1"))


@pytest.mark.parametrize("kind,backend", [("cuda", "nccl"), ("cuda:1", "nccl"), ("auto", "nccl"), ("cpu", "gloo")])
def test_init_from_env_uses_nccl_for_every_cuda_type(cuda, monkeypatch, kind, backend):
    joined = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # as torchrun sets them (without, a one-line usage error)
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: bool(joined))
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend, timeout: joined.update(b=backend))
    monkeypatch.setattr(distributed.dist, "get_backend", lambda: joined["b"])
    monkeypatch.setattr(distributed, "_CONTEXT", distributed.DistContext())
    ctx = distributed.init_from_env(kind)
    assert (ctx.backend, ctx.rank, ctx.local_rank) == (backend, 1, 1)
    expected = [("set_device", 1 + (kind == "cuda:1"))] if backend == "nccl" else []
    assert cuda.calls == expected


def test_agree_is_a_min_over_ranks():
    single = distributed.DistContext()
    assert single.agree(True) is True and single.agree(False) is False
    assert not hasattr(single, "all_ok") and not hasattr(single, "barrier")


# ---------------------------------------------------------------- 10: bf16 where the card has none


def test_bf16_on_a_card_without_it_is_a_spec_error(cuda, write_spec):
    cuda.bf16 = False
    with pytest.raises(SpecError) as err:
        backend_for_spec(_spec(write_spec, limit="1GiB", precision="bf16"))
    text = str(err.value)
    assert "precision" in text and "Fake T4, compute capability 7.5" in text and "use fp32 or fp16" in text
    assert cuda.fraction[0] == 1.0  # the refused backend was closed
    backend = backend_for_spec(_spec(write_spec, limit="1GiB", precision="fp16"))
    assert backend.supported_precisions() == ("fp32", "fp16")
    backend.close()
    cuda.bf16 = True
    assert CUDABackend(0).supported_precisions() == ("fp32", "bf16", "fp16")


# ---------------------------------------------------------------- 5: fp16 loss scale across trials


def _overflowing_step(model, opt, scaler, factor: float) -> None:
    x = torch.ones(4, 3)
    scaler.scale(model(x).sum() * factor).backward()
    scaler.step(opt)
    opt.zero_grad(set_to_none=True)


def test_a_skipped_fp16_step_leaves_no_optimizer_state_and_the_scale_carries_over():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    carry = ScalerCarry("cpu")
    scaler = carry.new_scaler()
    _overflowing_step(model, opt, scaler, 1e36)  # 1e36 × 2^16 overflows float32: skipped
    assert carry.update(scaler) is False and carry.scale == 2.0**15 and carry.skipped == 1
    assert optimizer_state_bytes(opt) == 0  # what a short trial of skipped steps measures
    _overflowing_step(model, opt, scaler, 1.0)
    assert carry.update(scaler) is True
    # Adam: exp_avg and exp_avg_sq for 6 + 2 parameters, plus a float32 step per tensor
    assert optimizer_state_bytes(opt) == 2 * 4 * (6 + 2) + 2 * 4
    assert carry.new_scaler().get_scale() == 2.0**15  # the next trial starts where this one ended


def _fp16_trainer(write_spec, target: str):
    from batchtune.engine.trial import Trainer, prepare

    spec = load_spec(write_spec(f"""\
        name: fp16
        model: {{target: "{target}"}}
        data: {{target: "tests.fixtures:tiny_data"}}
        optimizer: {{name: adamw, lr: 0.001}}
        base_batch_size: 32
        precision: fp16
        device: {{type: cpu, memory_limit: 2MiB}}
        """))
    spec, components, backend = prepare(spec)
    return spec, Trainer(components, backend, "fp16")


def test_fp16_trials_count_only_applied_steps_and_carry_the_scale(write_spec):
    from batchtune.engine.shape import BatchShape
    from batchtune.engine.trial import trial_config

    spec, trainer = _fp16_trainer(write_spec, "tests.gpu_targets:loud_mlp")
    first = trainer.run(trial_config(spec, BatchShape(16), steps=2))
    # logits × 1000 overflow fp16 gradients at 2^16: skipped steps are run again, not counted
    assert first.fits and first.steps == 2 and first.skipped_steps >= 3
    assert first.optimizer_peak_bytes > 0 and len(first.losses) == 2
    second = trainer.run(trial_config(spec, BatchShape(16), steps=2))
    assert second.steps == 2 and second.skipped_steps == 0  # the scale it found carried over
    assert trainer.scale_carry.scale == 2.0 ** 16 / 2 ** first.skipped_steps


def test_fp16_gradients_that_overflow_at_every_scale_are_a_divergence(write_spec):
    from batchtune.engine.shape import BatchShape
    from batchtune.engine.trial import MAX_SKIPPED_STEPS, trial_config

    spec, trainer = _fp16_trainer(write_spec, "tests.gpu_targets:inf_mlp")
    result = trainer.run(trial_config(spec, BatchShape(16), steps=2))
    assert result.diverged and result.steps == 0 and result.skipped_steps == MAX_SKIPPED_STEPS
    assert "overflowed on 24 steps in a row" in result.divergence


# ---------------------------------------------------------------- the GPU check script, dry


def test_gpu_check_dry_run_runs_every_step_on_cpu(tmp_path):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "OUT": str(tmp_path), "PYTHONPATH": str(ROOT), "TMPDIR": str(scratch)}
    started = time.perf_counter()
    out = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - started
    lines = [line for line in out.stdout.splitlines() if line.split(" ", 1)[0] in ("PASS", "FAIL", "SKIP")]
    assert lines, out.stdout + out.stderr
    status = {line.split()[1].rstrip(":"): line.split()[0] for line in lines}
    for name in ("probe:quickstart", "pinned:quickstart", "cudnn-cnn", "expandable-segments", "oom-baseline",
                 "fraction-reset"):
        assert status.get(name) == "PASS", (name, out.stdout)
    for name in ("gpu-tests", "probe:digits_cnn", "probe:char_lm", "fake-tensor-estimate"):
        assert status.get(name) == "SKIP", (name, out.stdout)
    assert "synthetic_cnn: ceiling" in out.stdout  # the cuDNN check's path without scikit-learn
    assert status["fp16-optimizer-state"] == "PASS", out.stdout  # defect 5: Adam's state is in the peak
    assert out.returncode == (1 if "FAIL" in status.values() else 0)
    records = [json.loads(line) for line in (tmp_path / "gpu_check.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == list(status.values())
    assert not [p.name for p in scratch.iterdir() if p.name.startswith("gpu_check_")]  # its specs went with it
    assert seconds < 150, seconds  # ~25 s of CPU, most of it gc.collect() after each OOM
