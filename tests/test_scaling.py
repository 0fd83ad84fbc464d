"""Learning-rate rules and warmup, on hand-checked numbers."""

import math

import pytest

from batchtune.stats.scaling import lr_at_step, resolve_rule, scale_lr


@pytest.mark.parametrize("rule,base_lr,base_bs,bs,expected", [
    ("linear", 0.1, 256, 1024, 0.4),
    ("linear", 0.1, 256, 64, 0.025),
    ("sqrt", 1e-3, 64, 256, 2e-3),
    ("sqrt", 1e-3, 64, 16, 5e-4),
    ("sqrt", 3e-4, 32, 64, 3e-4 * math.sqrt(2)),
    ("none", 0.05, 32, 4096, 0.05),
])
def test_scale_lr(rule, base_lr, base_bs, bs, expected):
    assert scale_lr(base_lr, base_bs, bs, rule) == pytest.approx(expected, rel=1e-12)


def test_auto_rule_follows_the_optimizer():
    assert resolve_rule("auto", "sgd") == "linear"
    assert resolve_rule("auto", "adaptive") == "sqrt"
    assert resolve_rule("none", "sgd") == "none"


def test_warmup_is_linear_then_constant():
    assert [lr_at_step(s, 1.0, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_at_step(0, 0.3, 0) == 0.3


def test_scale_lr_rejects_nonsense():
    with pytest.raises(ValueError):
        scale_lr(0.1, 0, 32, "linear")
    with pytest.raises(ValueError):
        scale_lr(0.1, 32, 32, "cubic")
