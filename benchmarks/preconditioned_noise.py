"""Would an Adam-preconditioned simple noise scale track the critical batch better? (issue 12)

Under Adam the sweep's B_simple (McCandlish's tr Σ / |G|², on raw gradients) read 5-7x below
the exhaustive B_crit on the quickstart (AdamW) and 1.8-2.9x above it on the char LM (AdamW).
This trains one run with the spec's optimizer and, each time the validation loss first falls
below a target, freezes it and measures the noise scale from ``--micro-batches`` gradients of
``--micro`` samples each, three ways:

* ``plain``: tr(Σ) / |G|² (the sweep's quantity);
* ``P``: tr(PΣ) / GᵀPG with Adam's preconditioner P = 1/(√v̂ + ε) (the noise scale in the space
  Adam steps in, if P H P ∝ P);
* ``P2``: the same with P², the noise scale of the update vectors P·g themselves;

and with ``--hessian`` also B_noise = tr(HΣ)/GᵀHG (plain and P-preconditioned, from
Hessian-vector products on a 4096-sample batch, 48 micro-batch deviations).

    OMP_NUM_THREADS=1 python benchmarks/preconditioned_noise.py configs/quickstart.yaml \
        --size 512 --lr 0.00283 --warmup 32 --targets 0.9,0.7,0.6,0.55 --hessian
    OMP_NUM_THREADS=1 python benchmarks/preconditioned_noise.py configs/char_lm.yaml --size 32 \
        --lr 0.002 --warmup 50 --targets 2.69,2.5 --micro 8 device.memory_limit=null \
        model.kwargs.d_model=64 precision=fp32

One JSON line per target on stdout, appended to ``results/preconditioned_noise.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from batchtune.config.components import build_components
from batchtune.config.spec import load_spec

RESULTS = Path(__file__).resolve().parent / "results" / "preconditioned_noise.jsonl"


def ratio(grads: torch.Tensor, weight: torch.Tensor | None, b_micro: int) -> float:
    """tr(WΣ)/GᵀWG from micro-batch gradients (rows), unbiased numerator and denominator."""
    w = 1.0 if weight is None else weight
    s_small = (grads * grads * w).sum(1).mean().item()
    mean = grads.mean(0)
    s_big = (mean * mean * w).sum().item()
    big = b_micro * len(grads)
    g2 = (big * s_big - b_micro * s_small) / (big - b_micro)
    trace = (s_small - s_big) / (1 / b_micro - 1 / big)
    return trace / g2


def adam_half(grads: torch.Tensor, b_micro: int) -> float:
    """The batch at which Adam's best step makes half the progress of a noiseless one: at steady state with
    batch B, v_i = G_i² + σ_i²/B, so the first-order gain Σ G_i·E[g_i]/√v_i = Σ|G_i|(1 + r_i/B)^-1/2
    (r_i = σ_i²/G_i², each coordinate's own noise scale) while the second-order cost Σ h_i·E[u_i²] does not
    depend on B; the best lr's progress goes as the gain squared, which is half its limit where the gain is
    1/√2 of Σ|G_i|. One coordinate gives B = r (SGD's); many give a |G|-weighted middle of the r_i."""
    n = len(grads)
    mean, var = grads.mean(0), grads.var(0)
    g2 = (mean * mean - var / n).clamp(min=0)
    keep = g2 > 0
    weight, r = g2[keep].sqrt(), (var[keep] * b_micro) / g2[keep]
    total = weight.sum()
    lo, hi = 0.0, 9.0
    for _ in range(50):
        mid = (lo + hi) / 2
        f = (weight / (1 + r / 10 ** mid).sqrt()).sum() / total
        lo, hi = (mid, hi) if f < 2 ** -0.5 else (lo, mid)
    return 10 ** lo


def hessian_noise(comp, model, params, grads, weight, b_micro: int, probes: int = 48) -> float:
    """tr(WHWΣ)/(GᵀWHWG) with Hessian-vector products on one 4096-sample batch."""
    loader = DataLoader(comp.train_set, batch_size=4096, shuffle=True, generator=torch.Generator().manual_seed(7))
    batch = next(iter(loader))
    model.zero_grad(set_to_none=True)
    first = torch.autograd.grad(comp.loss_fn(model, batch), params, create_graph=True)

    def quad(vec: torch.Tensor) -> float:
        parts, start = [], 0
        for p in params:
            parts.append(vec[start:start + p.numel()].view_as(p).to(p.dtype))
            start += p.numel()
        hv = torch.autograd.grad(sum((g * v).sum() for g, v in zip(first, parts)), params, retain_graph=True)
        return sum((h.double() * v.double()).sum() for h, v in zip(hv, parts)).item()

    w = (lambda v: v) if weight is None else (lambda v: v * weight)
    mean = grads.mean(0)
    trace = sum(quad(w(grads[i] - mean)) for i in range(probes)) / (probes - 1) * b_micro
    return trace / (quad(w(mean)) - trace / (b_micro * len(grads)))


def measure(comp, model, opt, args) -> dict[str, float]:
    params = [p for p in model.parameters() if p.requires_grad]
    states = [opt.state[p] for p in params]
    beta2, eps = opt.param_groups[0]["betas"][1], opt.param_groups[0]["eps"]
    v = torch.cat([s["exp_avg_sq"].reshape(-1).double() for s in states]) / (1 - beta2 ** float(states[0]["step"]))
    precond = 1.0 / (v.sqrt() + eps)
    loader = DataLoader(comp.train_set, batch_size=args.micro, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(123))
    rows = []
    for i, batch in enumerate(loader):
        if i == args.micro_batches:
            break
        model.zero_grad(set_to_none=True)
        comp.loss_fn(model, batch).backward()
        rows.append(torch.cat([p.grad.reshape(-1).double() for p in params]))
    model.zero_grad(set_to_none=True)
    grads = torch.stack(rows)
    out = {"plain": ratio(grads, None, args.micro), "P": ratio(grads, precond, args.micro),
           "P2": ratio(grads, precond * precond, args.micro),
           "adam_half": adam_half(grads, args.micro)}
    if args.hessian:
        out["B_noise"] = hessian_noise(comp, model, params, grads, None, args.micro)
        out["B_noise_P"] = hessian_noise(comp, model, params, grads, precond, args.micro)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("spec")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--warmup", type=int, default=32, help="linear warmup steps")
    parser.add_argument("--targets", required=True, help="comma-separated, falling")
    parser.add_argument("--micro", type=int, default=64)
    parser.add_argument("--micro-batches", type=int, default=256)
    parser.add_argument("--hessian", action="store_true")
    args = parser.parse_intermixed_args()
    torch.set_num_threads(1)
    comp = build_components(load_spec(args.spec, args.overrides))
    model = comp.build_model(seed=0)
    opt = comp.build_optimizer(model.parameters(), lr=args.lr)
    targets = [float(t) for t in args.targets.split(",")]
    train = DataLoader(comp.train_set, batch_size=args.size, shuffle=True, drop_last=True,
                       generator=torch.Generator().manual_seed(0))
    val = DataLoader(comp.val_set, batch_size=256)
    step, every, started = 0, max(1, 512 // args.size), time.time()
    while targets and step < 200_000:
        for batch in train:
            for group in opt.param_groups:
                group["lr"] = args.lr * min(1.0, (step + 1) / args.warmup)
            opt.zero_grad(set_to_none=True)
            comp.loss_fn(model, batch).backward()
            opt.step()
            step += 1
            if step % every:
                continue
            with torch.no_grad():
                model.eval()
                loss = sum(comp.loss_fn(model, b).item() * len(b[1]) for b in val) / len(comp.val_set)
                model.train()
            while targets and loss <= targets[0]:
                line = {"spec": args.spec, "overrides": args.overrides, "size": args.size, "lr": args.lr,
                        "target": targets.pop(0), "step": step, "val_loss": loss, **measure(comp, model, opt, args)}
                print(json.dumps(line), flush=True)
                with RESULTS.open("a") as f:
                    f.write(json.dumps(line) + "\n")
            if not targets:
                break
    print(f"{time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
