"""lr_scaling: auto decides from the optimizer object that was built, never from a name."""

from __future__ import annotations

import pytest
import torch

from batchtune.config.spec import load_spec
from batchtune.engine.optimizer import optimizer_family
from batchtune.engine.trial import prepare
from batchtune.stats.scaling import spec_lr, spec_rule


def momentum_opt(params, lr):
    """Named like SGD with momentum; builds Adam."""
    return torch.optim.Adam(params, lr=lr)


def adam_like(params, lr):
    """Named like Adam; builds SGD with momentum."""
    return torch.optim.SGD(params, lr=lr, momentum=0.9)


class _Scaled(torch.optim.Optimizer):
    """A custom adaptive optimizer: a second moment under a name of its own."""

    def __init__(self, params, lr):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                state.setdefault("grad_sq", torch.zeros_like(p)).mul_(0.9).add_(p.grad**2)
                p.add_(p.grad / (state["grad_sq"].sqrt() + 1e-8), alpha=-group["lr"])


def custom(params, lr):
    return _Scaled(params, lr)


@pytest.mark.parametrize("factory,family,evidence", [
    (momentum_opt, "adaptive", "Adam keeps a second moment per parameter (exp_avg_sq)"),
    (adam_like, "sgd", "SGD keeps momentum_buffer: no second moment, SGD-like"),
    (custom, "adaptive", "_Scaled keeps a second moment per parameter (grad_sq)"),
    (lambda params, lr: torch.optim.SGD(params, lr=lr), "sgd", "SGD keeps no state: no second moment, SGD-like"),
])
def test_the_family_comes_from_the_state_the_optimizer_keeps(factory, family, evidence):
    assert optimizer_family(factory) == (family, evidence)


def test_auto_scaling_follows_the_built_optimizer_not_the_factory_name(write_spec):
    spec = load_spec(write_spec(), ['optimizer={target: "tests.test_lr_family:adam_like", lr: 0.01}'])
    assert spec_rule(spec) == "sqrt"  # before anything is built only a built-in name can say
    spec, _, backend = prepare(spec)
    backend.close()
    assert spec_rule(spec) == "linear" and "momentum_buffer" in spec.optimizer.family_evidence
    assert spec_lr(spec, 128) == pytest.approx(0.01 * 4)  # 128 / 32
