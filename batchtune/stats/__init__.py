"""The analysis math, pure and unit-tested: lr scaling, noise scale, critical batch size."""
