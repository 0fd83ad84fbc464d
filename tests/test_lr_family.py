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


class _Hand(torch.optim.Optimizer):
    """A hand-written optimizer whose one hyperparameter is its lr."""

    def __init__(self, params, lr):
        super().__init__(params, {"lr": lr})


class _Scaled(_Hand):
    """A custom adaptive optimizer: a second moment under a name of its own."""

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                state.setdefault("grad_sq", torch.zeros_like(p)).mul_(0.9).add_(p.grad**2)
                p.add_(p.grad / (state["grad_sq"].sqrt() + 1e-8), alpha=-group["lr"])


def custom(params, lr):
    return _Scaled(params, lr)


class _Moments(torch.optim.Optimizer):
    """An outside LAMB's Adam part (bias correction, eps), its state named ``m`` and ``v``, its class on no list:
    called SGD-like before, as 'keeps m, v: no second moment' (an outside check then used the linear rule's lr)."""

    def __init__(self, params, lr, weight_decay=0.0):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    state.update(step=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
                state["step"] += 1
                state["m"].mul_(0.9).add_(p.grad, alpha=0.1)
                state["v"].mul_(0.999).addcmul_(p.grad, p.grad, value=0.001)
                v_hat = state["v"] / (1 - 0.999 ** state["step"])
                update = state["m"] / (v_hat.sqrt() + 1e-6) + group["weight_decay"] * p
                p.add_(update, alpha=-group["lr"])


class _Misnamed(_Hand):
    """SGD with momentum whose buffer is named like Adam's second moment: once called adaptive by that name."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                buf = self.state[p].setdefault("exp_avg_sq", torch.zeros_like(p)).mul_(0.9).add_(p.grad)
                p.add_(buf, alpha=-group["lr"])


class _PerTensor(_Hand):
    """NovoGrad-like: one second moment per tensor (the mean of grad²), a momentum per element."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                v = state.setdefault("v", torch.zeros(())).mul_(0.98).add_(p.grad.square().mean(), alpha=0.02)
                m = state.setdefault("m", torch.zeros_like(p)).mul_(0.9).add_(p.grad / (v.sqrt() + 1e-8))
                p.add_(m, alpha=-group["lr"])


class _Raises(_Hand):
    """Its step raises whatever it is given (a step that needs what batchtune cannot pass)."""

    def step(self, closure=None):
        raise RuntimeError("needs a sharded parameter")


class _ListState(_Hand):
    """Adam-like, its second moment kept in a list and its step a Python float (an outside tester's)."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    state.update(step=0.0, moments=[torch.zeros_like(p)])
                state["step"] += 1.0
                state["moments"][0].mul_(0.99).addcmul_(p.grad, p.grad, value=0.01)
                p.addcdiv_(p.grad, state["moments"][0].sqrt() + 1e-8, value=-group["lr"])


class _NestedMomentum(_Hand):
    """SGD with momentum kept in a dict of lists, beside a step tensor and a list of floats."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    state.update(step=torch.tensor(0.0), hist={"norms": [], "m": [torch.zeros_like(p)]})
                state["step"] += 1
                state["hist"]["norms"].append(float(p.grad.norm()))
                p.add_(state["hist"]["m"][0].mul_(0.9).add_(p.grad), alpha=-group["lr"])


class _LazyAdam(_Hand):
    """Plain SGD for 5 steps, then an Adam-like second moment: once called SGD-like from two test steps."""

    def __init__(self, params, lr):
        super().__init__(params, lr)
        self.steps = 0

    @torch.no_grad()
    def step(self, closure=None):
        self.steps += 1
        for group in self.param_groups:
            for p in group["params"]:
                if self.steps <= 5:
                    p.add_(p.grad, alpha=-group["lr"])
                    continue
                v = self.state[p].setdefault("v", torch.zeros_like(p)).mul_(0.999).addcmul_(p.grad, p.grad, value=1e-3)
                p.addcdiv_(p.grad, v.sqrt() + 1e-8, value=-group["lr"])


class _MatrixOnly(_Hand):
    """Adam-like, refusing parameters that are not matrices (Muon-like): once judged by its class name."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError("2-D parameters only")
                v = self.state[p].setdefault("v", torch.zeros_like(p)).mul_(0.99).addcmul_(p.grad, p.grad, value=0.01)
                p.addcdiv_(p.grad, v.sqrt() + 1e-8, value=-group["lr"])


def moments(params, lr, weight_decay=0.0):
    return _Moments(params, lr, weight_decay)


_SGD_LIKE = "nothing ∝ grad², over ten test steps: no second moment, SGD-like"  # none showed in two: read to ten


@pytest.mark.parametrize("factory,family,evidence", [
    (momentum_opt, "adaptive", "Adam keeps exp_avg_sq ∝ grad² (a second moment) over two test steps"),
    (adam_like, "sgd", f"SGD keeps momentum_buffer ∝ grad (momentum-like), {_SGD_LIKE}"),
    (custom, "adaptive", "_Scaled keeps grad_sq ∝ grad² (a second moment) over two test steps"),
    (lambda params, lr: torch.optim.SGD(params, lr=lr), "sgd",
     "SGD keeps no state that follows the gradient over ten test steps: no second moment, SGD-like"),
    # the fix: judged by what the state does, not by its name or the class's
    (lambda params, lr: moments(params, lr, weight_decay=0.01), "adaptive",
     "_Moments keeps v ∝ grad² (a second moment) over two test steps"),
    (lambda params, lr: _Misnamed(params, lr), "sgd",
     f"_Misnamed keeps exp_avg_sq ∝ grad (momentum-like), {_SGD_LIKE}"),
    (lambda params, lr: _PerTensor(params, lr), "adaptive",
     "_PerTensor keeps v ∝ ‖grad‖² (a per-tensor second moment) over two test steps"),
    (lambda params, lr: torch.optim.Adamax(params, lr=lr), "adaptive",
     "Adamax keeps exp_inf ∝ |grad| (a running gradient scale) over two test steps"),
    (lambda params, lr: torch.optim.Adagrad(params, lr=lr, initial_accumulator_value=0.1), "adaptive",
     "Adagrad keeps sum ∝ grad² (a second moment) over two test steps"),  # an offset: still ∝ grad²
    (lambda params, lr: _Raises(params, lr), "sgd", "_Raises could not take a test step (RuntimeError: needs a sharded "
     "parameter), so its class name decides: not a known adaptive optimizer, SGD-like"),
    # outside: state nested in a list (a float step), in a dict of lists, created after 5 SGD steps, 2-D only
    (lambda params, lr: _ListState(params, lr), "adaptive",
     "_ListState keeps moments[0] ∝ grad² (a second moment) over two test steps"),
    (lambda params, lr: _NestedMomentum(params, lr), "sgd",
     f"_NestedMomentum keeps hist.m[0] ∝ grad (momentum-like), {_SGD_LIKE}"),
    (lambda params, lr: _LazyAdam(params, lr), "adaptive",
     "_LazyAdam keeps v ∝ grad² (a second moment) over six test steps"),
    (lambda params, lr: _MatrixOnly(params, lr), "adaptive",
     "_MatrixOnly keeps v ∝ grad² (a second moment) over two test steps on a 3×2 parameter (a 1-D one raised "
     "ValueError: 2-D parameters only)"),
], ids=["adam", "sgd-momentum", "grad_sq", "sgd", "outside-lamb", "misnamed", "per-tensor", "adamax", "adagrad-offset",
        "raises", "list-state", "nested-momentum", "lazy-adam", "matrix-only"])
def test_the_family_comes_from_the_state_the_optimizer_keeps(factory, family, evidence):
    assert optimizer_family(factory) == (family, evidence)


@pytest.mark.parametrize("factory,family", [
    (lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9, nesterov=True, weight_decay=0.1), "sgd"),
    (lambda p, lr: torch.optim.AdamW(p, lr=lr, weight_decay=0.1), "adaptive"),
    (lambda p, lr: torch.optim.Adam(p, lr=lr, amsgrad=True), "adaptive"),
    (lambda p, lr: torch.optim.RMSprop(p, lr=lr, centered=True, momentum=0.9), "adaptive"),
    (lambda p, lr: torch.optim.Adafactor(p, lr=lr), "adaptive"),
    (lambda p, lr: torch.optim.Adadelta(p, lr=lr), "adaptive"),
    (lambda p, lr: torch.optim.NAdam(p, lr=lr), "adaptive"),
    (lambda p, lr: torch.optim.RAdam(p, lr=lr), "adaptive"),
    (lambda p, lr: torch.optim.SparseAdam(p, lr=lr), "adaptive"),  # dense gradients raise: its class decides
], ids=["nesterov", "adamw", "amsgrad", "rmsprop", "adafactor", "adadelta", "nadam", "radam", "sparseadam"])
def test_the_torch_optimizers_keep_their_family(factory, family):
    got, evidence = optimizer_family(factory)
    assert got == family, evidence


def test_auto_scaling_follows_the_built_optimizer_not_the_factory_name(write_spec):
    spec = load_spec(write_spec(), ['optimizer={target: "tests.test_lr_family:adam_like", lr: 0.01}'])
    assert spec_rule(spec) == "sqrt"  # before anything is built only a built-in name can say
    spec, _, backend = prepare(spec)
    backend.close()
    assert spec_rule(spec) == "linear" and "momentum_buffer" in spec.optimizer.family_evidence
    assert spec_lr(spec, 128) == pytest.approx(0.01 * 4)  # 128 / 32


def test_auto_scales_an_outside_adam_by_sqrt_and_check_says_why(write_spec):
    """An outside check at 4x the base batch used the linear rule's lr 0.04 (sqrt: 0.02) for an Adam-like
    optimizer, and its note did not say the rule came from auto."""
    from batchtune.commands.check import run_check
    from batchtune.render.check import check_notes

    spec = load_spec(write_spec(), ['optimizer={target: "tests.test_lr_family:moments", lr: 0.01}', "check.steps=4",
                                    "device.memory_limit=null"])
    report = run_check(spec, batch_size=128)
    assert spec_rule(spec) == "sqrt" and report.lr == pytest.approx(0.02)  # 0.01 × sqrt(128 / 32)
    assert ("lr 0.02: the sqrt rule from 0.01 at batch 32 (auto: adaptive, because _Moments keeps v ∝ grad² (a second "
            "moment) over two test steps)") in check_notes(report)
