"""``batchtune noise``: the gradient noise scale over one short training run.

The simple noise scale grows as the loss falls (Kaplan et al. 2020), so a single number
taken early under-states the critical batch size later: this reports it at every
validation point, with its band and the loss it was measured at.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["NoiseRun", "run_noise"]


@dataclass
class NoiseRun:
    name: str
    batch_size: int
    micro_batch_size: int
    accum_steps: int
    lr: float
    steps: int
    history: list[dict[str, Any]]  # step, samples, val_loss, b_simple, low, high, reliable
    final: dict[str, Any] | None
    tokens_per_sample: int
    seconds: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def run_noise(spec: Any, batch_size: int | None = None, accum_steps: int = 4, steps: int = 400,
              points: int = 10, backend: Any = None) -> NoiseRun:
    """Train ``steps`` optimizer steps at ``batch_size`` (micro × accum) and track B_simple.

    Args:
        spec: a Spec or a path.
        batch_size: the global batch; default the spec's base_batch_size.
        accum_steps: micro-batches per step (the small batch of the estimator); 1 splits each
            batch into halves instead.
        steps: optimizer steps; the estimate needs a few hundred to settle.
        points: validation points (each reports the estimate so far).
    """
    from torch.nn.modules.batchnorm import _BatchNorm

    from batchtune.stats.scaling import resolve_rule, scale_lr
    from batchtune.engine.trial import Trainer, TrialConfig, prepare

    spec, components, backend = prepare(spec, backend)
    batch_size = batch_size or spec.base_batch_size
    if batch_size % accum_steps:
        raise spec.error("", f"batch size {batch_size} is not divisible by {accum_steps} accumulation steps")
    micro = batch_size // accum_steps
    if accum_steps == 1 and micro % 2:
        raise spec.error("", f"with one accumulation step the batch is split in halves: {batch_size} must be even")
    lr = scale_lr(spec.optimizer.lr, spec.base_batch_size, batch_size,
                  resolve_rule(spec.lr_scaling, spec.optimizer.family))
    config = TrialConfig(micro, accum_steps, lr=lr, steps=steps, warmup_steps=round(spec.sweep.warmup * steps),
                         seed=spec.seed, eval_every_samples=steps * batch_size / points, validate=True,
                         eval_samples=spec.sweep.eval_samples, measure_noise=True, noise_every=1,
                         memory_steps=2, grad_clip=spec.sweep.grad_clip)
    result = Trainer(components, backend, spec.precision).run(config)
    tokens = components.tokens_per_sample()
    notes = []
    if not result.fits:
        notes.append(f"out of memory: {result.error}")
    if result.diverged:
        notes.append(f"diverged: {result.divergence}")
    if any(isinstance(m, _BatchNorm) for m in components.build_model(spec.seed).modules()):
        notes.append("the model has BatchNorm: micro-batch statistics differ from the full batch's, "
                     "which biases the estimate")
    final = result.noise_history[-1] if result.noise_history else None
    return NoiseRun(spec.name, batch_size, micro, accum_steps, lr, result.steps, result.noise_history, final,
                    tokens, result.seconds, notes)
