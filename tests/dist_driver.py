"""Runs several batchtune commands inside ONE torchrun launch (2 gloo ranks), for tests/test_distributed.py.

Starting torchrun and importing torch costs more than the commands themselves, so every
scenario shares one process group: each is a CLI invocation in-process, its stdout, stderr
and exit code saved per rank as JSON under the output folder. Usage (see the test)::

    torchrun --standalone --nproc-per-node 2 tests/dist_driver.py OUT_DIR SCENARIOS.json
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from pathlib import Path


def run(args: list[str]) -> dict:
    from batchtune.cli import app

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = app(args, standalone_mode=False) or 0  # without standalone mode click returns Exit's code
    return {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}


def overlap_equivalence(spec_path: str) -> dict:
    """Three steps with DDP's own all-reduce (overlapping backward) and three reduced by hand
    after the ranks agree, from the same weights: the parameters must end the same."""
    import torch

    from batchtune.config.spec import load_spec
    from batchtune.engine.distributed import init_from_env
    from batchtune.engine.shape import BatchShape
    from batchtune.engine.trial import Trainer, TrialConfig, prepare

    dist = init_from_env("cpu")
    spec, components, backend = prepare(load_spec(spec_path))
    trainer = Trainer(components, backend, spec.precision, dist)
    params = {}
    for overlap in (False, True):
        model = components.build_model(0)
        trainer.run(TrialConfig(BatchShape(16, 2, world_size=2), lr=0.05, steps=3, overlap_comm=overlap), model=model)
        params[overlap] = torch.cat([p.detach().flatten() for p in model.parameters()])
    start = torch.cat([p.detach().flatten() for p in components.build_model(0).parameters()])
    diff = float((params[True] - params[False]).abs().max())
    moved = float((params[True] - start).abs().max())
    return {"code": 0, "stdout": json.dumps({"max_abs_diff": diff, "moved": moved}),
            "stderr": ""}


def noise_under_fsdp(spec_path: str) -> dict:
    """The same three noise-measured steps under DDP and under FSDP, from the same weights and
    batches: [step, |G|², tr Σ] of each, and FSDP's at two accumulation steps."""
    from batchtune.config.spec import load_spec
    from batchtune.engine.distributed import init_from_env
    from batchtune.engine.shape import BatchShape
    from batchtune.engine.trial import Trainer, TrialConfig, prepare

    dist = init_from_env("cpu")
    figures = {}
    for strategy, accum in (("ddp", 1), ("fsdp", 1), ("fsdp", 2)):
        spec, components, backend = prepare(load_spec(spec_path, [f"distributed.strategy={strategy}"]))
        trainer = Trainer(components, backend, spec.precision, dist)
        config = TrialConfig(BatchShape(16, accum, world_size=2), lr=0.01, steps=3, measure_noise=True, noise_every=1)
        result = trainer.run(config)
        figures[f"{strategy}x{accum}"] = {"raw": result.noise_raw, "fits": result.fits,
                                          "b_simple": result.noise.b_simple if result.noise is not None else None}
    return {"code": 0, "stdout": json.dumps(figures), "stderr": ""}


COMMANDS = {"overlap-equivalence": overlap_equivalence, "noise-under-fsdp": noise_under_fsdp}


def main() -> None:
    out_dir, scenarios = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
    rank = int(os.environ.get("RANK", "0"))
    for name, args in scenarios.items():
        result = COMMANDS[args[0]](args[1]) if args[0] in COMMANDS else run(args)
        (out_dir / f"{name}.rank{rank}.json").write_text(json.dumps(result))
    from batchtune.engine.distributed import end_rank

    end_rank(0)  # as the CLI ends a rank


if __name__ == "__main__":
    main()
