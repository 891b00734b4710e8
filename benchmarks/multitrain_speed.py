"""Milliseconds per optimizer step: one classifier alone vs K classifiers stacked (skdcgn.multitrain).

The CGN authors' CNN (arch "cgn"), batch 64, 32 px uint8 images resident on the device, Adadelta:
- sequential: the step of `invariance.train_classifier` (nn.Module, torch.optim.Adadelta), timed
  for one classifier; K classifiers one after another cost K times that;
- stacked: one step of K classifiers as one network (`multitrain._Stack`, the trainer's own step),
  fp32 and (with --bf16) under bf16 autocast; eager, and with --compile also through torch.compile
  as the trainer runs it with `compile="on"` (`multitrain._StepRunner`: "reduce-overhead", i.e.
  CUDA graphs, on a GPU, "default" on a CPU; or the modes named after --compile), for the Ks of
  --compile-ks (default: all). A compiled row also gives its first call's seconds (the compilation)
  and its speed-up over the eager stack of the same K.
The ratio K·t(sequential) / t(stacked K) is the speed-up of training K classifiers together.
Also checks, for the largest K of each kind of step, that the stack's weights after the timed
steps equal those of K separate classifiers trained on the same batches (max |difference|), so a
fast but wrong kernel shows. Writes JSON and markdown.

    python benchmarks/multitrain_speed.py --device cuda --ks 1 33 99 --steps 200 --bf16 --compile \\
        --compile-ks 33 --json docs/multitrain_speed.json --md docs/multitrain_speed.md
    python benchmarks/multitrain_speed.py --device cpu --ks 1 2 --steps 3 --warmup 1 --compile   (a smoke test)
"""
from __future__ import annotations

import argparse
import json
import platform
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

from skdcgn.images import to_float
from skdcgn.models.classifier import Classifier, ClassifierNetConfig
from skdcgn.multitrain import _Stack, _StepRunner


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _models(k: int, device: torch.device) -> list[types.SimpleNamespace]:
    """k freshly initialised classifiers (seeds 0..k-1) with their Adadelta optimizers."""
    out = []
    for seed in range(k):
        torch.manual_seed(seed)
        model = Classifier(ClassifierNetConfig(arch="cgn")).to(device)
        out.append(types.SimpleNamespace(model=model, opt=torch.optim.Adadelta(model.parameters(), lr=1.0),
                                         loss_sum=None, correct=None, done=False))
    return out


def _batches(n_images: int, k: int, batch: int, steps: int, device: torch.device
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random uint8 images [N, 3, 32, 32], labels [N] and per-step indices [steps, batch, k] on the device."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n_images, 3, 32, 32), dtype=torch.uint8, generator=g).to(device)
    labels = torch.randint(0, 10, (n_images,), generator=g).to(device)
    order = torch.randint(0, n_images, (steps, batch, k), generator=g).to(device)
    return images, labels, order


def time_sequential(device: torch.device, batch: int, steps: int, warmup: int) -> float:
    """ms per step of one classifier, train_classifier's step."""
    (run,) = _models(1, device)
    images, labels, order = _batches(4096, 1, batch, steps + warmup, device)
    run.model.train()
    t0 = 0.0
    for s in range(steps + warmup):
        if s == warmup:
            _sync(device)
            t0 = time.perf_counter()
        idx = order[s, :, 0]
        logits = run.model(to_float(images[idx]))
        loss = F.cross_entropy(logits, labels[idx])
        run.opt.zero_grad(set_to_none=True)
        loss.backward()
        run.opt.step()
    _sync(device)
    return 1000 * (time.perf_counter() - t0) / steps


COMPILED_WARMUP = 3  # calls of a compiled step before timing: the compilation, then CUDA graph warm-up and capture


def time_stacked(k: int, device: torch.device, batch: int, steps: int, warmup: int, bf16: bool, mode: str = "eager"
                 ) -> tuple[float, float | None, str, _Stack, list, tuple]:
    """ms per step of k stacked classifiers, stepped eagerly (mode "eager") or through torch.compile in
    `mode`; the seconds of the first call (compiled: the compilation; None eager); the mode that ran
    (a failed compilation runs "eager"); the stack and data (for the check)."""
    runs = _models(k, device)
    runner = _StepRunner(device, mode != "eager", compile_mode=mode)
    stack = runner.adopt(_Stack(runs, device))
    warmup = max(warmup, COMPILED_WARMUP) if mode != "eager" else warmup
    images, labels, order = _batches(4096, k, batch, steps + warmup, device)
    valid = torch.ones(batch, k, device=device)
    count = valid.sum(0)
    t0, first = 0.0, None
    for s in range(steps + warmup):
        if s == warmup:
            _sync(device)
            t0 = time.perf_counter()
        if s == 0 and mode != "eager":
            _sync(device)
            start = time.perf_counter()
        runner(stack, images, labels, order[s], valid, count, bf16)
        if s == 0 and mode != "eager":
            _sync(device)
            first = time.perf_counter() - start
    _sync(device)
    return 1000 * (time.perf_counter() - t0) / steps, first, runner.mode, stack, runs, (images, labels, order)


def check(stack: _Stack, runs: list, data: tuple, n_check: int) -> float:
    """Max |weight difference| between the stack's first n_check jobs and the same classifiers
    trained one by one (torch.optim.Adadelta) on the same batches."""
    images, labels, order = data
    params = stack.views(stack.flat.detach())
    worst = 0.0
    for k in range(min(n_check, len(runs))):
        model, opt = runs[k].model, runs[k].opt  # untouched by the stack: still at their initialisation
        model.train()
        for s in range(order.shape[0]):
            idx = order[s, :, k]
            loss = F.cross_entropy(model(to_float(images[idx])), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        for name, p in model.named_parameters():
            worst = max(worst, (params[name][k] - p.detach()).abs().max().item())
    return worst


def main(argv: list[str] | None = None) -> dict:
    """Run the measurement; returns (and writes) the JSON record."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 33, 99], help="stack sizes to time")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=200, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--bf16", action="store_true", help="also time the stack under bf16 autocast")
    p.add_argument("--compile", nargs="*", default=None, choices=("default", "reduce-overhead"), metavar="MODE",
                   help="also time the stack through torch.compile: alone, the trainer's mode for the device "
                        "(reduce-overhead on CUDA, default elsewhere); or the torch.compile modes given")
    p.add_argument("--compile-ks", type=int, nargs="+", default=None,
                   help="the Ks timed compiled (default: all of --ks); each K is one compilation")
    p.add_argument("--check", type=int, default=2, help="jobs of the largest stack compared with separate training")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--md", type=Path, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    one = time_sequential(device, args.batch_size, args.steps, args.warmup)
    modes = [] if args.compile is None else \
        (args.compile or [_StepRunner(device, True).mode])  # --compile alone: what train_classifiers runs
    compile_ks = args.compile_ks or args.ks
    rows = []
    for k in args.ks:
        for bf16 in ([False, True] if args.bf16 else [False]):
            eager_ms = None
            for mode in ["eager"] + (modes if k in compile_ks else []):
                ms, first, ran, stack, runs, data = time_stacked(k, device, args.batch_size, args.steps, args.warmup,
                                                                 bf16, mode)
                row = {"k": k, "bf16": bf16, "step": mode if ran == mode else f"eager ({mode} failed)",
                       "ms_per_step": round(ms, 3), "sequential_ms_per_step": round(k * one, 3),
                       "speedup": round(k * one / ms, 2)}
                if mode == "eager":
                    eager_ms = ms
                else:
                    row.update(compile_seconds=round(first, 2), vs_eager=round(eager_ms / ms, 2))
                if k == max(args.ks if mode == "eager" else compile_ks) and args.check:  # bf16: how far its weights
                    row["max_abs_weight_difference"] = check(stack, runs, data, args.check)  # drift from fp32 separate
                rows.append(row)
                print(json.dumps(row), flush=True)
    record = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "threads": torch.get_num_threads(), "batch_size": args.batch_size,
              "steps": args.steps, "one_classifier_ms_per_step": round(one, 3), "rows": rows}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=1) + "\n")
    if args.md:
        lines = [f"# Classifiers per step: one alone vs K stacked ({record['device']})", "",
                 f"`python benchmarks/multitrain_speed.py` (torch {record['torch']}, batch {args.batch_size}, "
                 f"{args.steps} timed steps). One classifier alone: {record['one_classifier_ms_per_step']} ms/step.", "",
                 "| K | bf16 | step | stacked ms/step | K × one alone | speed-up | compiled vs eager | compile s "
                 "| max weight diff vs separate |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            vs = f"{r['vs_eager']}×" if "vs_eager" in r else ""
            lines.append(f"| {r['k']} | {'yes' if r['bf16'] else 'no'} | {r['step']} | {r['ms_per_step']} "
                         f"| {r['sequential_ms_per_step']} | {r['speedup']}× | {vs} | {r.get('compile_seconds', '')} "
                         f"| {r.get('max_abs_weight_difference', '')} |")
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text("\n".join(lines) + "\n")
    return record


if __name__ == "__main__":
    main()
