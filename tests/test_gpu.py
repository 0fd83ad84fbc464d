"""On a real CUDA card: each test catches one defect of the CUDA path (skipped without CUDA).

Run with ``python -m pytest -q -m gpu tests/test_gpu.py`` (benchmarks/gpu_check.sh does).
Spec targets live in tests/gpu_targets.py, which the check script uses too.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from batchtune.memory.device import CUDABackend, is_oom

pytestmark = pytest.mark.gpu

MiB, GiB = 2**20, 2**30


SPEC = """\
name: gpu
model: {model}
data: {data}
optimizer: {{name: adamw, lr: 0.001}}
base_batch_size: 32
precision: {precision}
device: {{type: cuda, memory_limit: {limit}}}
probe: {{granularity: {granularity}}}
"""
MLP = "{builtin: mlp, kwargs: {in_features: 1024, hidden: 4096, depth: 2, num_classes: 10}}"
MLP_DATA = "{builtin: synthetic_classification, kwargs: {n_train: 4096, n_val: 256, in_features: 1024}}"
CNN = "{builtin: cnn, kwargs: {in_channels: 1, num_classes: 10, width: 64}}"


def _spec(write_spec, model: str = MLP, data: str = MLP_DATA, precision: str = "fp32", limit: str = "1GiB",
          granularity: int = 1):
    from batchtune.config.spec import load_spec

    return load_spec(write_spec(SPEC.format(model=model, data=data, precision=precision, limit=limit,
                                            granularity=granularity)))


def test_the_fraction_caps_allocations_and_is_reset():
    before = torch.cuda.get_per_process_memory_fraction(0) if hasattr(
        torch.cuda, "get_per_process_memory_fraction") else 1.0
    with CUDABackend(0, 1 * GiB) as backend:
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(1536 * MiB, dtype=torch.uint8, device=backend.device)
        assert backend.oom_count() >= 1 and backend.capacity_bytes() <= 1 * GiB
    with CUDABackend(0) as free:  # without a limit the old 1 GiB cap must not linger
        x = torch.empty(1536 * MiB, dtype=torch.uint8, device=free.device)
        del x
        free.cleanup()
    if hasattr(torch.cuda, "get_per_process_memory_fraction"):
        assert torch.cuda.get_per_process_memory_fraction(0) == before


def test_allocated_peak_falls_after_a_reset_while_reserved_does_not():
    with CUDABackend(0, 2 * GiB) as backend:
        base = backend.current_bytes()
        backend.reset_peak()
        x = torch.empty(256 * MiB, dtype=torch.uint8, device=backend.device)
        del x
        assert backend.peak_bytes() >= base + 256 * MiB
        backend.reset_peak()
        y = torch.empty(8 * MiB, dtype=torch.uint8, device=backend.device)
        assert base + 8 * MiB <= backend.peak_bytes() < base + 64 * MiB  # the last phase's own peak
        assert backend.peak_reserved_bytes() >= base + 256 * MiB  # the cache kept the big block
        assert backend.fragmentation_bytes() >= 200 * MiB
        del y
        backend.cleanup()


def test_the_leak_check_ignores_the_cublas_workspace():
    with CUDABackend(0, 2 * GiB) as backend:
        base = backend.current_bytes()  # after the warm-up: workspaces included
        layer = nn.Linear(512, 512).to(backend.device)
        for dtype in (None, torch.float16):
            with torch.autocast("cuda", dtype=dtype or torch.float16, enabled=dtype is not None):
                layer(torch.randn(64, 512, device=backend.device)).sum().backward()
        del layer
        backend.cleanup()
        assert backend.current_bytes() == base


def test_probe_finds_an_exact_ceiling_under_a_1GiB_limit(write_spec):
    import batchtune
    from batchtune.engine.shape import BatchShape
    from batchtune.engine.trial import Trainer, prepare, trial_config

    spec = _spec(write_spec)
    result = batchtune.probe(spec)
    c = result.ceiling
    assert c is not None and not result.capped and result.memory_returned and result.max_leaked_bytes == 0
    # Pinned re-runs in a fresh backend: the ceiling fits, one more sample does not.
    spec, components, backend = prepare(spec)
    with backend:
        trainer = Trainer(components, backend, spec.precision)
        model = components.build_model(spec.seed).to(backend.device)
        fits = [trainer.run(trial_config(spec, BatchShape(b), steps=spec.probe.steps_per_trial), model=model).fits
                for b in (c, c + 1)]
        del model
    assert fits == [True, False], c


def test_fp16_peak_includes_the_optimizer_state(write_spec):
    from batchtune.engine.shape import BatchShape
    from batchtune.engine.trial import Trainer, prepare, trial_config

    spec, components, backend = prepare(_spec(write_spec, model='{target: "tests.gpu_targets:loud_mlp"}',
                                              data='{target: "tests.fixtures:tiny_data"}', precision="fp16"))
    with backend:
        trainer = Trainer(components, backend, "fp16")
        model = components.build_model(spec.seed).to(backend.device)
        param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        base = backend.current_bytes()
        result = trainer.run(trial_config(spec, BatchShape(64), steps=2), model=model)
        del model
    assert result.fits and result.steps == 2 and result.skipped_steps >= 1  # overflowed steps ran again
    # parameters + gradients + Adam's two moments, all alive in the optimizer step
    assert result.optimizer_peak_bytes - base >= 3 * param_bytes, (result.optimizer_peak_bytes, base, param_bytes)


def test_cudnn_conv_near_its_ceiling_is_an_oom(write_spec):
    import batchtune

    spec = _spec(write_spec, model=CNN, data='{target: "tests.gpu_targets:images"}', granularity=64)
    result = batchtune.probe(spec)  # a cuDNN error taken for user code would raise TrainingError here
    runs = {t.batch_size: t.fits for t in result.trials}
    c = result.ceiling
    assert c is not None and runs[c] is True and runs[c + 64] is False
    errors = {t.error for t in result.trials if not t.fits}
    assert all(is_oom(RuntimeError(e)) or "out of memory" in e.lower() for e in errors), errors
