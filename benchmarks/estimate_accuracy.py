"""Estimated against measured peak memory: traced steps (fake tensors) against the CPU simulation.

Run: ``python benchmarks/estimate_accuracy.py`` (about 2 minutes on a 2-core CPU);
``--skip-probe`` leaves out the probe comparison, ``--skip-large`` the billion-parameter models.

Three tables, markdown on stdout (progress on stderr):

1. **Peaks.** For each shipped config (at its own precision, and fp32 beside bf16), and a
   Hugging Face GPT-2 built from a config with dict batches, and batch size: the peak of a measured probe trial (``Trainer.run``, ``probe.steps_per_trial``
   steps, on the CPU backend without a limit, set up as ``run_probe`` does it) against the
   peak of one traced step (``StepTracer.trace``, after its warm-up step), the relative
   error, and the wall time of each.
2. **Probe.** ``run_probe`` against ``run_probe_estimate`` on each config at its own
   ``device.memory_limit``: ceiling, safe size, trials, training steps and wall time.
3. **Larger than the machine.** Each model in a fresh process (``--child``): a transformer of
   1.0e9 parameters, built under fake tensors and traced for an H100 (CUDA allocator, 512-byte
   blocks, foreach AdamW): its size, the estimate's wall time, and the process's peak RSS
   (``ru_maxrss``) after setting up (imports, data) and after the estimate.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402

from batchtune.commands.probe import _estimate_setup, run_probe, run_probe_estimate  # noqa: E402
from batchtune.config.spec import load_spec  # noqa: E402
from batchtune.engine.data import worst_case  # noqa: E402
from batchtune.engine.distributed import current  # noqa: E402
from batchtune.engine.shape import BatchShape  # noqa: E402
from batchtune.engine.trial import Trainer, prepare, trial_config  # noqa: E402
from batchtune.memory.estimate import StepTracer, peak_rss_bytes, resolve_target  # noqa: E402
from batchtune.render.text import format_bytes  # noqa: E402

# config, precision, batch sizes (a few samples, the base batch's neighbourhood, near the ceiling)
PEAKS = [
    ("quickstart", "fp32", (32, 256, 3000)),
    ("char_lm", "bf16", (8, 64, 256)),
    ("char_lm", "fp32", (8, 64, 192)),
    ("digits_cnn", "fp32", (8, 64, 512)),
    ("digits_cnn", "bf16", (8, 64, 512)),
    ("varlen_lm", "fp32", (8, 64, 152)),  # measured on the worst-case batch, traced at the longest sample
    ("hf_gpt2", "fp32", (8, 32, 128)),
    ("hf_gpt2", "bf16", (8, 32, 128)),
]
# Specs that are not shipped configs: a Hugging Face GPT-2 built from a config (2 layers, d 64,
# 64 positions), trained on dict batches (input_ids, attention_mask, labels) with its own loss.
EXTRA_SPECS = {"hf_gpt2": """\
name: hf-gpt2
model: {target: "tests.test_estimate:gpt2"}
data: {target: "tests.test_estimate:gpt2_data"}
loss: model_output
optimizer: {name: adamw, lr: 0.001}
base_batch_size: 8
device: {type: cpu}
"""}
PROBES = ("quickstart", "char_lm", "digits_cnn")
# Two shapes of a 1.0e9-parameter decoder on byte-level text: deep and narrow, shallow and wide.
LARGE = {
    "lm-1b (20 × 2048, seq 1024)": {"block_size": 1024, "d_model": 2048, "n_layers": 20, "n_heads": 16},
    "lm-1b (5 × 4096, seq 512)": {"block_size": 512, "d_model": 4096, "n_layers": 5, "n_heads": 32},
}
LARGE_SPEC = """\
name: lm-1b
model: {{builtin: char_transformer, kwargs: {kwargs}}}
data: {{builtin: char_text, kwargs: {{block_size: {block_size}, max_bytes: 200000}}}}
loss: cross_entropy
optimizer: {{name: adamw, lr: 0.0003}}
base_batch_size: 8
precision: bf16
device: {{type: cuda}}
"""


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def peaks_table() -> list[list[Any]]:
    """Measured probe-trial peaks against traced ones, per config, precision and batch size."""
    rows = []
    for name, precision, sizes in PEAKS:
        spec = load_spec(_spec_path(name), ["device.memory_limit=null", f"precision={precision}"])
        spec, components, backend = prepare(spec)
        tracer = StepTracer(spec, components, resolve_target(spec, "1GiB"))
        components = worst_case(components)  # variable-length data: the longest samples, as the probe runs them
        for b in sizes:
            model = components.build_model(spec.seed)
            backend.track(list(model.parameters()) + list(model.buffers()))
            config = trial_config(spec, BatchShape(b), lr=spec.optimizer.lr, steps=spec.probe.steps_per_trial,
                                  grad_clip=None)
            started = time.perf_counter()
            measured = Trainer(components, backend, spec.precision, current()).run(config, model=model)
            seconds = time.perf_counter() - started
            del model
            point = tracer.trace(b)
            error = (point.peak_bytes - measured.peak_bytes) / measured.peak_bytes
            rows.append([name, precision, b, measured.peak_bytes, point.peak_bytes, f"{error:+.3%}",
                         f"{seconds:.2f}", f"{point.seconds:.2f}"])
            _log(f"  {name} {precision} b={b}: measured {measured.peak_bytes:,}, traced {point.peak_bytes:,}")
    return rows


def _spec_path(name: str) -> Path:
    """A shipped config, or one of :data:`EXTRA_SPECS` written to a temporary file."""
    if name not in EXTRA_SPECS:
        return ROOT / "configs" / f"{name}.yaml"
    path = Path(tempfile.gettempdir()) / f"batchtune-bench-{name}.yaml"
    path.write_text(EXTRA_SPECS[name])
    return path


def probes_table() -> list[list[Any]]:
    """The measured probe against the estimated one, each config at its own limit."""
    rows = []
    for name in PROBES:
        path = ROOT / "configs" / f"{name}.yaml"
        started = time.perf_counter()
        measured = run_probe(load_spec(path))
        measured_s = time.perf_counter() - started
        started = time.perf_counter()
        estimated = run_probe_estimate(load_spec(path))
        estimated_s = time.perf_counter() - started
        for label, r, s in (("measured", measured, measured_s), ("estimate", estimated, estimated_s)):
            traced = r.estimate["traced_steps"] if r.estimate else "-"
            rows.append([name, label, r.ceiling, r.safe_batch_size, len(r.trials), traced, r.total_steps,
                         format_bytes(r.safe_peak_bytes), f"{s:.1f}"])
        _log(f"  {name}: measured ceiling {measured.ceiling}, estimated {estimated.ceiling}")
    return rows


def child(kwargs: dict[str, Any], batch_sizes: list[int]) -> dict[str, Any]:
    """In a fresh process: set up, build under fake tensors, trace; sizes, times and peak RSS."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "lm.yaml"
        path.write_text(LARGE_SPEC.format(kwargs=json.dumps(kwargs), block_size=kwargs["block_size"]))
        spec, components = _estimate_setup(load_spec(path))
    setup_s, setup_rss = time.perf_counter() - started, peak_rss_bytes()
    started = time.perf_counter()
    tracer = StepTracer(spec, components, resolve_target(spec, "h100-80gb"))
    points = [tracer.trace(b).to_dict() for b in batch_sizes]
    return {"parameters": tracer.parameters, "parameter_bytes": tracer.parameter_bytes,
            "state_bytes": tracer.state_bytes(), "setup_s": setup_s, "setup_rss": setup_rss,
            "estimate_s": time.perf_counter() - started, "rss": peak_rss_bytes(), "points": points}


def large_table(batch_sizes: list[int]) -> list[list[Any]]:
    """Each large model in its own process, so that its peak RSS is the estimate's alone."""
    rows = []
    for label, kwargs in LARGE.items():
        command = [sys.executable, __file__, "--child", json.dumps(kwargs), "--sizes", *map(str, batch_sizes)]
        out = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT,
                             env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
        r = json.loads(out.stdout)
        fp32_state = r["parameter_bytes"] * 2 + r["state_bytes"]  # weights + grads + AdamW moments
        peaks = ", ".join(f"{p['batch_size']}: {format_bytes(p['peak_bytes'])}" for p in r["points"])
        rows.append([label, f"{r['parameters']:,}", format_bytes(r["parameter_bytes"]),
                     format_bytes(fp32_state), peaks, f"{r['estimate_s']:.1f}", f"{r['setup_s']:.1f}",
                     format_bytes(r["setup_rss"]), format_bytes(r["rss"])])
        _log(f"  {label}: peak RSS {format_bytes(r['rss'])} for {format_bytes(fp32_state)} of training state")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-probe", action="store_true")
    parser.add_argument("--skip-large", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.child:
        print(json.dumps(child(json.loads(args.child), args.sizes)))
        return
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s)\n")
    _log("peaks ...")
    print(tabulate(peaks_table(), headers=["config", "precision", "batch", "measured peak B", "estimated peak B",
                                           "error", "measured s", "traced s"], tablefmt="github"), "\n")
    if not args.skip_probe:
        _log("probes ...")
        print(tabulate(probes_table(), headers=["config", "probe", "ceiling", "safe", "trials", "traced steps",
                                                "training steps", "safe peak", "wall s"], tablefmt="github"), "\n")
    if not args.skip_large:
        _log("larger than the machine ...")
        print(tabulate(large_table(args.sizes), headers=[
            "model", "parameters", "weights", "weights+grads+AdamW", "estimated peak on h100-80gb (batch: peak)",
            "estimate s", "setup s", "peak RSS after setup", "peak RSS after estimate"], tablefmt="github",
            disable_numparse=True))


if __name__ == "__main__":
    main()
