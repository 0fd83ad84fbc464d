"""The CUDA path on a real card, one summary line per check (run through gpu_check.sh).

Each check prints ``PASS|FAIL|SKIP name: figure (seconds)`` and appends its raw numbers as
one JSON line to ``--results``. ``--dry-run`` runs every step against the CPU backend with
small simulated limits, so CI keeps this script from rotting where no GPU is lent.

    python benchmarks/gpu_check.py [--dry-run] [--limit 4GiB] [--only NAME ...] [--results FILE]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # batchtune and tests.gpu_targets without an install

CONFIGS = ("quickstart", "digits_cnn", "char_lm")
# Dry run: limits that give a ceiling of a few hundred samples at most on the CPU counter, so
# the run takes seconds. Of the configs only quickstart runs: char_lm's CPU trials take seconds
# each, and the cuDNN check takes the path a GPU machine without scikit-learn takes.
DRY = {
    "quickstart": ["device.memory_limit=2MiB"],
    "synthetic_cnn": ["device.memory_limit=3MiB", "probe.granularity=1", "probe.min_batch_size=1"],
}
# On a GPU every config gets --limit, except quickstart: its MLP takes ~3 KiB a sample, so at
# 4 GiB its ceiling passes probe.max_batch_size (2^20) and every step collates a million
# samples on the host. 512 MiB keeps it near 160k and the probe near a minute.
GPU_LIMITS = {"quickstart": "512MiB"}
SYNTHETIC_CNN = """\
# The cuDNN check's CNN when scikit-learn (digits) is missing: written by benchmarks/gpu_check.py.
name: synthetic-cnn
model: {builtin: cnn, kwargs: {in_channels: 1, num_classes: 10, width: 64}}
data: {target: "tests.gpu_targets:images"}
optimizer: {name: sgd, lr: 0.05, momentum: 0.9}
base_batch_size: 32
device: {type: cuda}
probe: {granularity: 64, min_batch_size: 64}
"""
FP16_SPEC = """\
name: fp16-state
model: {target: "tests.gpu_targets:loud_mlp"}
data: {target: "tests.fixtures:tiny_data"}
optimizer: {name: adamw, lr: 0.001}
base_batch_size: 32
precision: fp16
device: {type: cuda}
"""


@dataclass
class Check:
    name: str
    status: str  # PASS | FAIL | SKIP
    figure: str
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)


class Run:
    """Where the checks run (cuda, or cpu for a dry run) and what earlier checks found."""

    def __init__(self, dry: bool, limit: str, results: Path, workdir: Path) -> None:
        self.dry, self.limit, self.results, self.workdir = dry, limit, results, workdir
        self.device = "cpu" if dry else "cuda"
        self.probes: dict[str, Any] = {}  # config -> ProbeResult
        self.pinned: dict[str, dict[str, Any]] = {}
        self.checks: list[Check] = []

    def overrides(self, config: str) -> list[str]:
        if self.dry:
            return [f"device.type={self.device}", *DRY[config]]
        return [f"device.type={self.device}", f"device.memory_limit={GPU_LIMITS.get(config, self.limit)}"]

    def spec(self, config: str, path: Path | None = None) -> Any:
        from batchtune.config.spec import load_spec

        return load_spec(path or ROOT / "configs" / f"{config}.yaml", self.overrides(config))

    def write(self, name: str, text: str) -> Path:
        path = self.workdir / f"{name}.yaml"
        path.write_text(text)
        return path

    def record(self, name: str, check: Callable[..., Check], *args: Any) -> Check:
        started = time.perf_counter()
        try:
            result = check(self, *args)
        except Exception as exc:  # noqa: BLE001 - a crashed check is a failed check, and the rest still run
            last = str(exc).strip().splitlines()
            result = Check(name, "FAIL", f"{type(exc).__name__}: {last[0] if last else ''}"[:200],
                           details={"traceback": traceback.format_exc()})
        result.name = name
        result.seconds = round(time.perf_counter() - started, 2)
        self.checks.append(result)
        print(f"{result.status} {name}: {result.figure} ({result.seconds:.0f} s)", flush=True)
        with self.results.open("a", encoding="utf-8") as f:
            f.write(json.dumps(asdict(result), default=str) + "\n")
        return result


def _mib(n: float | None) -> str:
    return "?" if n is None else f"{n / 2**20:.1f} MiB"


def _proof(result: Any, granularity: int) -> tuple[bool, dict[int, bool]]:
    """Whether the probe's log shows a fit at the ceiling and an OOM one granule above."""
    runs = {t.batch_size: t.fits for t in result.trials if t.phase != "confirm"}
    c = result.ceiling
    return c is not None and runs.get(c) is True and runs.get(c + granularity) is False, runs


# ---------------------------------------------------------------------------- checks


def _subprocess(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 420) -> tuple[int, str, str]:
    env = {**os.environ, **(env or {}),
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return out.returncode, out.stdout, out.stderr


def _cli(args: list[str]) -> tuple[int, str, str]:
    """The CLI in this process (a dry run: a second torch import would cost more than the check)."""
    from batchtune.cli import app

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = app(args, standalone_mode=False) or 0
        except SystemExit as exc:
            code = exc.code
    return int(code or 0), out.getvalue(), err.getvalue()


def gpu_tests(run: Run) -> Check:
    if run.dry:  # they would all skip: show that they import, in this process
        import tests.test_gpu as module

        names = [name for name in vars(module) if name.startswith("test_")]
        return Check("", "SKIP", f"dry run: tests/test_gpu.py imports, {len(names)} tests (run on a GPU)")
    code, stdout, stderr = _subprocess([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu",
                                        "tests/test_gpu.py"])
    tail = (stdout.strip().splitlines() or stderr.strip().splitlines() or ["no output"])[-1]
    return Check("", "PASS" if code == 0 else "FAIL", tail,
                 details={"returncode": code, "output": stdout[-4000:] + stderr[-2000:]})


def probe(run: Run, config: str, path: Path | None = None) -> Check:
    from batchtune.commands.probe import run_probe
    from batchtune.config.spec import SpecError

    if run.dry and config not in DRY:
        return Check("", "SKIP", f"dry run: {config} is probed on the GPU only")
    try:
        spec = run.spec(config, path)
        result = run_probe(spec)
    except SpecError as exc:
        if "sklearn" in str(exc) or "scikit" in str(exc):
            return Check("", "SKIP", "scikit-learn is not installed (pip install 'batchtune[digits]')")
        raise
    run.probes[config] = result
    g = spec.probe.granularity
    proven, runs = _proof(result, g)
    model = result.memory_model
    figure = (f"ceiling {result.ceiling} (g {g}) in {len(result.trials)} trials, safe {result.safe_batch_size}, "
              f"capacity {_mib(result.capacity_bytes)}, {model.per_sample_bytes:.0f} B/sample" if model else
              f"ceiling {result.ceiling} in {len(result.trials)} trials")
    ok = proven and not result.capped and result.memory_returned
    if not ok:
        figure += f"; proven {proven}, capped {result.capped}, memory returned {result.memory_returned}"
    return Check("", "PASS" if ok else "FAIL", figure, details={**result.to_dict(), "runs": runs})


def pinned(run: Run, config: str) -> Check:
    """A fresh backend and model: the ceiling must fit and one granule above must not."""
    from batchtune.engine.shape import BatchShape
    from batchtune.engine.trial import Trainer, prepare, trial_config

    found = run.probes.get(config)
    if found is None or found.ceiling is None:
        return Check("", "SKIP", "no ceiling from the probe")
    spec, components, backend = prepare(run.spec(config))
    with backend:
        trainer = Trainer(components, backend, spec.precision)
        model = components.build_model(spec.seed).to(backend.device)
        backend.track(list(model.parameters()) + list(model.buffers()))
        reserved = backend.current_reserved_bytes()
        c, g = found.ceiling, spec.probe.granularity
        results = [trainer.run(trial_config(spec, BatchShape(b), lr=spec.optimizer.lr, grad_clip=None,
                                            steps=spec.probe.steps_per_trial), model=model) for b in (c, c + g)]
        backend.cleanup()
        leftover = backend.current_reserved_bytes() - reserved
        del model
    fits = [r.fits for r in results]
    run.pinned[config] = {"leaked_bytes": results[1].leaked_bytes, "reserved_leftover_bytes": leftover,
                          "oom": not results[1].fits, "error": results[1].error}
    figure = f"{c}: {'fits' if fits[0] else 'OOM'}, {c + g}: {'fits' if fits[1] else 'OOM'}"
    return Check("", "PASS" if fits == [True, False] else "FAIL", figure,
                 details={"fits": fits, "peaks": [r.peak_bytes for r in results], **run.pinned[config]})


def cudnn_cnn(run: Run) -> Check:
    """A BatchNorm CNN probed to its ceiling: every cuDNN failure near it must read as an OOM."""
    config = "digits_cnn"
    if run.probes.get(config) is None:  # no scikit-learn (or a dry run): the same CNN on random images
        config = "synthetic_cnn"
        check = probe(run, config, run.write(config, SYNTHETIC_CNN))
        if check.status != "PASS":
            return check
    result = run.probes[config]
    kinds = collections.Counter(re.sub(r"\d[\d.,]*", "N", t.error or "?")[:70] for t in result.trials if not t.fits)
    proven, _ = _proof(result, run.spec(config, run.workdir / f"{config}.yaml"
                                        if config == "synthetic_cnn" else None).probe.granularity)
    figure = f"{config}: ceiling {result.ceiling}, OOMs recognised: " + "; ".join(
        f"{n}× {kind}" for kind, n in kinds.items())
    return Check("", "PASS" if proven else "FAIL", figure, details={"errors": dict(kinds)})


def expandable_segments(run: Run) -> Check:
    """The quickstart probe again through the CLI, in a process whose allocator maps expandable segments."""
    args = ["probe", str(ROOT / "configs" / "quickstart.yaml"), *run.overrides("quickstart"), "--format", "json", "-q"]
    if run.dry:  # the allocator setting means nothing on CPU: the CLI path runs in this process
        code, stdout, stderr = _cli(args)
    else:  # the setting is read when CUDA initialises: a fresh process
        code, stdout, stderr = _subprocess([sys.executable, "-m", "batchtune", *args],
                                           {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"})
    if code != 0:
        return Check("", "FAIL", f"exit {code}: {(stderr.strip().splitlines() or [''])[-1]}",
                     details={"stderr": stderr[-4000:], "stdout": stdout[-4000:]})
    data = json.loads(stdout[stdout.index("{"):])
    runs = {t["batch_size"]: t["fits"] for t in data["trials"] if t["phase"] != "confirm"}
    c, g = data["ceiling"], data["granularity"]
    proven = c is not None and runs.get(c) is True and runs.get(c + g) is False
    default = run.probes.get("quickstart")
    figure = (f"ceiling {c} (default allocator: {default.ceiling if default else '?'}), "
              f"memory returned {data['memory_returned']}")
    return Check("", "PASS" if proven and data["memory_returned"] else "FAIL", figure, details=data)


def oom_baseline(run: Run) -> Check:
    """After every pinned OOM, allocated memory is back at the baseline (reserved reported apart)."""
    if not run.pinned:
        return Check("", "SKIP", "no pinned runs")
    ooms = {k: v for k, v in run.pinned.items() if v["oom"]}
    leaked = max((v["leaked_bytes"] for v in ooms.values()), default=0)
    leftover = max((v["reserved_leftover_bytes"] for v in ooms.values()), default=0)
    figure = f"{len(ooms)} OOMs, at most {leaked} B allocated left, {_mib(leftover)} reserved left after cleanup"
    return Check("", "PASS" if ooms and leaked == 0 else "FAIL", figure, details=run.pinned)


def fraction_reset(run: Run) -> Check:
    """A limited backend's cap is lifted by the next unlimited one and restored by close()."""
    import torch

    from batchtune.memory.device import select_backend

    if run.dry:
        with select_backend("cpu", 2**20) as limited, select_backend("cpu") as free:
            ok = limited.capacity_bytes() == 2**20 and free.capacity_bytes() is None
        return Check("", "PASS" if ok else "FAIL", "dry run: cpu has no process-wide cap; capacities 1 MiB, None")
    getter = getattr(torch.cuda, "get_per_process_memory_fraction", lambda device: float("nan"))
    before = getter(0)
    with select_backend("cuda", 1 << 30) as limited:
        capped = getter(limited.device)
        try:
            torch.empty(3 << 29, dtype=torch.uint8, device=limited.device)
            refused = False
        except torch.OutOfMemoryError:
            refused = True
        limited.cleanup()
    with select_backend("cuda") as free:
        lifted = getter(free.device)
        x = torch.empty(3 << 29, dtype=torch.uint8, device=free.device)  # 1.5 GiB: must fit now
        del x
        free.cleanup()
    after = getter(0)
    figure = f"fraction {before:.3g} -> {capped:.3g} (1.5 GiB refused: {refused}) -> {lifted:.3g} -> {after:.3g}"
    ok = refused and (lifted == 1.0 or lifted != lifted) and (after == before or after != after)
    return Check("", "PASS" if ok else "FAIL", figure)


def fp16_optimizer_state(run: Run) -> Check:
    """An fp16 trial whose first steps overflow still measures Adam's state in its peak."""
    from batchtune.config.spec import load_spec
    from batchtune.engine.shape import BatchShape
    from batchtune.engine.trial import Trainer, prepare, trial_config

    spec = load_spec(run.write("fp16_state", FP16_SPEC), [f"device.type={run.device}"])
    spec, components, backend = prepare(spec)
    with backend:
        trainer = Trainer(components, backend, "fp16")
        model = components.build_model(spec.seed).to(backend.device)
        backend.track(list(model.parameters()))
        param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        base = backend.current_bytes()
        result = trainer.run(trial_config(spec, BatchShape(64), steps=2), model=model)
        del model
    above = (result.optimizer_peak_bytes or 0) - base
    # parameters' gradients and Adam's two moments, all alive during the step
    ok = result.fits and above >= 3 * param_bytes
    figure = f"optimizer peak {above / param_bytes:.2f}× the parameters above the baseline (needs >= 3)"
    return Check("", "PASS" if ok else "FAIL", figure, details={"param_bytes": param_bytes, "above": above,
                                                                "fits": result.fits, "error": result.error})


def fake_tensor_estimate(run: Run) -> Check:
    return Check("", "SKIP", "TODO: the fake-tensor memory estimate does not exist yet (compare it with probe:*)")


# ---------------------------------------------------------------------------- main


def plan() -> list[tuple[str, Callable[..., Check], tuple[Any, ...]]]:
    steps: list[tuple[str, Callable[..., Check], tuple[Any, ...]]] = [("gpu-tests", gpu_tests, ())]
    steps += [(f"probe:{c}", probe, (c,)) for c in CONFIGS]
    steps += [(f"pinned:{c}", pinned, (c,)) for c in CONFIGS]
    steps += [("cudnn-cnn", cudnn_cnn, ()), ("expandable-segments", expandable_segments, ()),
              ("oom-baseline", oom_baseline, ()), ("fraction-reset", fraction_reset, ()),
              ("fp16-optimizer-state", fp16_optimizer_state, ()), ("fake-tensor-estimate", fake_tensor_estimate, ())]
    return steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="every step on the CPU backend, small limits")
    parser.add_argument("--limit", default="4GiB", help="device.memory_limit for the probes (quickstart: 512MiB)")
    parser.add_argument("--only", nargs="*", help="run only checks whose name starts with one of these")
    parser.add_argument("--results", type=Path, help="JSON lines file (default: a temporary folder)")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    results = args.results or workdir / "gpu_check.jsonl"
    results.parent.mkdir(parents=True, exist_ok=True)
    run = Run(args.dry_run, args.limit, results, workdir)
    import torch

    where = "cpu (dry run)" if run.dry else (torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    if where is None:
        print("FAIL setup: CUDA is not available (use --dry-run on a machine without a GPU)")
        return 1
    print(f"# gpu_check on {where}, torch {torch.__version__}, "
          f"PYTORCH_CUDA_ALLOC_CONF={os.environ.get('PYTORCH_CUDA_ALLOC_CONF')}; results: {results}", flush=True)
    for name, check, check_args in plan():
        if not args.only or any(name.startswith(prefix) for prefix in args.only):
            run.record(name, check, *check_args)
    if args.results:  # the results live elsewhere: the specs written for the checks are not worth keeping
        shutil.rmtree(workdir, ignore_errors=True)
    failed = [c.name for c in run.checks if c.status == "FAIL"]
    print(f"# {len(run.checks) - len(failed)} of {len(run.checks)} checks did not fail"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
