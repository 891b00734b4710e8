"""Many classifiers in one process: K runs of `invariance.train_classifier` trained together.

The CGN paper's protocol trains dozens of small classifiers per variant (table rows × seeds ×
composition-study variants). On a GPU each step of one such CNN is launch-bound, so K of them
stacked into one network cost little more than one. `train_classifiers` takes K jobs (images,
labels, `ClassifierConfig`, folder) and writes, for each, exactly the folder `train_classifier`
writes (checkpoint per epoch in the one training-state format, train_log.csv, model, manifest
with the same stage), so `stage_complete`, `load_classifier`, a resume by `train_classifier` and
the pipeline cannot tell the two apart.

How the K classifiers become one network (the "stack"):
- each job's classifier is built exactly as `train_classifier` builds it (same seeded init), then
  its parameters are stacked along a new leading axis K into one flat tensor (one leaf: one
  gradient, one optimizer update per step);
- a convolution of C_in → C_out channels becomes one grouped convolution (groups=K) over
  [B, K·C_in, H, W]; pooling and ReLU act per channel anyway; a linear layer is one batched
  matrix product (einsum over K); the input BatchNorm normalises each job's channels with its
  own batch statistics and updates its own running statistics;
- every job keeps its own data order (`torch.randperm` seeded by its seed and epoch), its own
  subset, its own step count, epochs, learning-rate schedule and log. Jobs of different dataset
  sizes or step counts train side by side: a job's short last batch is padded and masked out of
  the BatchNorm statistics, the loss and the accuracy; a job that is done keeps its slot, idle and
  masked (on a GPU, by default, it leaves the stack instead: `compact`).
- Adadelta (Zeiler 2012, arXiv:1212.5701) is applied to the flat stack with a learning rate per
  job (StepLR: `lr ← lr·γ` per epoch, taken from each job's own `torch.optim.lr_scheduler.StepLR`).
  The update is the one of `torch.optim.Adadelta` (`_single_tensor_adadelta`, torch 2.x, rho 0.9,
  eps 1e-6, no weight decay): square_avg ← ρ·square_avg + (1−ρ)·g²; δ = √(acc_delta+ε)/√(square_avg+ε)·g;
  acc_delta ← ρ·acc_delta + (1−ρ)·δ²; p ← p − lr·δ. Checkpoints hold it in that optimizer's
  state_dict format, so either trainer resumes the other's checkpoint.

Exactness: each job's arithmetic reads only its own slice of the stack (grouped convolution,
per-job reductions, elementwise updates); the order of its sums depends on the stack's shape
(e.g. how many groups a convolution has), not on the other jobs' values. With fixed slots the
shape never changes, so on a CPU a run resumed after a kill ends bitwise equal to an
uninterrupted batched run (tests/test_multitrain.py). In float64 a stacked step equals separate
`nn.Module` + `torch.optim.Adadelta` steps to 1e-12; in float32 the weights agree with separate
`train_classifier` runs within floating-point tolerance (other summation orders), not bitwise.

Only the `cgn` architecture (no dropout) is stacked; jobs of other architectures (the
`mnist_example` CNN draws dropout masks from the global generator) are trained one after another
by `train_classifier`. Jobs whose folder is already complete are loaded, not trained.

GPU: the training images of all jobs are copied once to the device (uint8) and each step gathers
the K batches with one indexing; running sums stay on the device; the host waits for the device
only at a job's epoch end (log row, monitor, checkpoint). `ClassifierConfig.bf16` runs the stack
(as `train_classifier`) under bf16 autocast: off by default, and a setting of the classifier's
identity, since it changes the numbers (whether it keeps the accuracy is for a GPU run to show:
benchmarks/gpu_protocol.sh).

Compiled step (`compile`, issue #22: eager, a stacked step of K = 33 is ~100 small kernels, launch-
bound on a GPU): after the batch is gathered (one indexing, eager), `torch.compile` of the rest of
the step (forward, loss, `torch.autograd.grad`, the Adadelta update, the BatchNorm running
statistics, the running sums) as one graph, mode "reduce-overhead" on CUDA (Inductor kernels
replayed from a CUDA graph), the default mode elsewhere. "auto" (the default) compiles CUDA stacks
only, so a CPU run keeps its eager bytes. What it keeps fixed so the graph is compiled (and
captured) once per stack shape, not per epoch or per dataset:
- every per-job value that changes (learning rate, active slots) is a device tensor, not a
  Python number, so a new epoch changes no guard; the compiled part sees the gathered batch
  [B, K, C, H, W], not the pooled data, whose size differs from variant to variant;
- the stack is rebuilt at each epoch end (`_Stack`); `_StepRunner.adopt` copies the new stack's
  state into the tensors the previous stack of the same shape held, so the CUDA graph's inputs
  keep their addresses (they are marked static: updated in place, never copied per step);
- slots are fixed (`compact` off unless asked for): a compacted stack changes K as jobs finish,
  and each new K is a new compilation (tens of seconds; allowed, and kept compiled up to
  `_RECOMPILE_LIMIT` shapes).
The compiled step computes the same maths in other kernels: weights within float tolerance of
the eager stack (tests/test_multitrain_compile.py), bitwise equal between two compiled runs on a
CPU, resumed or not. A failed compilation logs one warning and the stack runs eagerly.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import time
import warnings
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from .checkpoint import rng_state, set_rng_state
from .errors import SkdcgnError
from .hashing import derive_seed
from .images import to_float
from .io import folder_lock
from .runlog import MetricsLog
from .invariance import (CHECKPOINT, LOG, LOG_FIELDS, ClassifierConfig, _claim, _epoch_order, _finish, _new_classifier,
                         _prepare, _resume, _save_checkpoint, _schedule, _subset, _write_log, accuracy,
                         train_classifier)
from .models.classifier import Classifier

logger = logging.getLogger(__name__)

BATCHED_ARCHS = ("cgn",)  # architectures the stack implements (no dropout: nothing random inside a step)
_RHO, _EPS = 0.9, 1e-6  # torch.optim.Adadelta's defaults, as train_classifier uses it
COMPILE_MODES = ("auto", "on", "off")  # `compile` of train_classifiers: auto = on for a CUDA stack
_RECOMPILE_LIMIT = 64  # stack shapes one process keeps compiled (torch's default, 8, is per function: a
                       # compacted stack or a benchmark over many K would fall back to eager silently)


@dataclasses.dataclass
class ClassifierJob:
    """One classifier to train: the arguments of `invariance.train_classifier`.

    images: [N, 3, H, W] uint8, or float32 in [-1, 1]; labels: int64 [N] in [0, 10).
    config: the training settings (None: `ClassifierConfig()`); out_dir: its run folder (None:
    nothing written, no resume). monitor: {name: (images, labels)} scored after every epoch.
    Jobs may share one images tensor (e.g. the seeds of a row): it is then copied to the device once.
    """
    images: Tensor
    labels: Tensor
    config: ClassifierConfig | None = None
    out_dir: str | os.PathLike | None = None
    monitor: dict[str, tuple[Tensor, Tensor]] | None = None


@dataclasses.dataclass(eq=False)
class _Run:
    """A job's host-side state: its settings, its schedule and its shadow model/optimizer (which hold
    its weights between stacks, write its checkpoints and score its monitor sets)."""
    index: int
    job: ClassifierJob
    config: ClassifierConfig
    stage: dict
    monitor_ids: dict[str, str]
    out: Path | None
    keep: Tensor | None
    n: int
    steps_per_epoch: int
    total_steps: int
    model: Classifier
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    rng: dict
    epoch: int
    step: int
    log: list[dict]
    metrics: MetricsLog | None
    base: int = 0  # where its images start in the pooled data
    order: Tensor | None = None  # [epoch_steps, B] pooled indices of the current epoch
    valid: Tensor | None = None  # [epoch_steps, B] 1.0 for a real image, 0.0 for padding
    epoch_steps: int = 0
    batch: int = 0  # batches of the current epoch done
    seconds: float = 0.0
    loss_sum: Tensor | None = None  # float64 scalar on the device (mid-epoch, while out of a stack)
    correct: Tensor | None = None
    complete: bool = False  # finished before this call: holds its slot, never trained or written
    monitor_data: dict | None = None  # job.monitor on the training device (shared by jobs that share it)

    @property
    def done(self) -> bool:
        return self.epoch >= self.config.epochs or self.step >= self.total_steps


def batchable(config: ClassifierConfig) -> bool:
    """Whether `train_classifiers` stacks a classifier of these settings (its arch is in `BATCHED_ARCHS`)."""
    return config.arch in BATCHED_ARCHS


def train_classifiers(jobs: Sequence[ClassifierJob], *, progress: bool = True,
                      on_epoch_end: Callable[[int, int, dict], None] | None = None,
                      overwrite: bool = False, compact: bool | None = None, compile: str = "auto"
                      ) -> list[Classifier]:
    """Train K classifiers together; returns them (eval mode, on their device) in the order of `jobs`.

    Each job's folder ends exactly as `train_classifier(job.images, job.labels, job.config,
    job.out_dir, monitor=job.monitor)` leaves it (same stage and manifest, same log columns; weights
    equal within floating-point tolerance, see the module doc). A complete folder is loaded, not
    retrained; an interrupted one resumes from its own checkpoint. Jobs of architecture `cgn` with
    the same batch size, bf16 setting, image size and image dtype train as one stack; others one after another.
    on_epoch_end(job index, epoch, log row) is called after each of a job's checkpoints.
    overwrite: as `train_classifier` (replace a folder holding other settings).
    compact: drop a job that is done from the stack (None: on a GPU with an eager step only). Without it
    every job keeps its slot to the end, which makes a resumed run bitwise equal to an uninterrupted
    one on a CPU (and a compiled step is compiled once, not once per stack size).
    compile: "on" runs each stacked step through `torch.compile` ("reduce-overhead" on CUDA: CUDA
    graphs; see the module doc), "off" eagerly, "auto" (default) compiled on CUDA only. Weights agree
    with the eager step within float tolerance; a failed compilation warns once and runs eagerly.
    Raises `SkdcgnError` (one line) for bad settings or data, a `compile` not in `COMPILE_MODES`, jobs
    on different devices, two jobs sharing one folder, or a folder holding other settings without `overwrite`.
    """
    if compile not in COMPILE_MODES:
        raise SkdcgnError(f"compile: {compile!r} is not one of {', '.join(COMPILE_MODES)}")
    jobs = list(jobs)
    outs = [Path(j.out_dir).resolve() for j in jobs if j.out_dir is not None]
    if len(set(outs)) != len(outs):
        raise SkdcgnError("train_classifiers: two jobs share one folder")
    with contextlib.ExitStack() as locks:
        for out in outs:
            locks.enter_context(folder_lock(out))
        return _train_all(jobs, progress, on_epoch_end, overwrite, compact, compile)


def _train_all(jobs: list[ClassifierJob], progress: bool, on_epoch_end: Callable[[int, int, dict], None] | None,
               overwrite: bool, compact: bool | None, compile: str) -> list[Classifier]:
    from .models.pretrained import load_model

    hashes: dict = {}  # each distinct dataset hashed once
    prepared = [_prepare(j.images, j.labels, j.config, j.monitor, hashes) for j in jobs]  # all checked before any work
    devices = {str(device) for _, _, _, device in prepared}
    if len(devices) > 1:
        raise SkdcgnError(f"train_classifiers: all jobs must run on one device, got {sorted(devices)}")
    results: list[Classifier | None] = [None] * len(jobs)
    stacked: dict[tuple, list[int]] = {}  # the jobs of each stack, complete ones included (see _train_stack)
    for i, (job, (config, stage, _, device)) in enumerate(zip(jobs, prepared)):  # every folder claimed first
        if batchable(config):
            key = (config.arch, config.batch_size, config.bf16, tuple(job.images.shape[1:]), job.images.dtype)
            stacked.setdefault(key, []).append(i)
        if job.out_dir is not None and _claim(Path(job.out_dir), stage, overwrite):
            results[i] = load_model(job.out_dir).to(device)
    for i, (job, (config, _, _, _)) in enumerate(zip(jobs, prepared)):
        if results[i] is None and not batchable(config):
            out = Path(job.out_dir) if job.out_dir is not None else None
            logger.info("job %d: arch %s is not stacked; trained on its own", i, config.arch)
            callback = None if on_epoch_end is None else (lambda e, row, i=i: on_epoch_end(i, e, row))
            results[i] = train_classifier(job.images, job.labels, config, out, progress=progress,
                                          on_epoch_end=callback, monitor=job.monitor, overwrite=overwrite)
    for indices in stacked.values():
        if all(results[i] is not None for i in indices):
            continue
        runs = [_start(i, jobs[i], *prepared[i], complete=results[i] is not None) for i in indices]
        cudnn_benchmark = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = True  # one stack shape at a time: its convolutions tuned once
        device = runs[0].model.head.weight.device
        compiled = compile == "on" or (compile == "auto" and device.type == "cuda")
        try:
            _train_stack(runs, progress, on_epoch_end, device.type != "cpu" and not compiled
                         if compact is None else compact, _StepRunner(device, compiled))
        finally:
            torch.backends.cudnn.benchmark = cudnn_benchmark
        for run in runs:
            if results[run.index] is None:
                results[run.index] = run.model.eval()
    return results  # type: ignore[return-value]


def _start(index: int, job: ClassifierJob, config: ClassifierConfig, stage: dict, monitor_ids: dict[str, str],
           device: torch.device, complete: bool = False) -> _Run:
    """A job's run: its classifier built and seeded exactly as `train_classifier` builds it, resumed
    from its checkpoint when there is one; `rng` holds the global generators' state that run would
    save in its checkpoints. complete: the job's folder is finished; the run only holds its slot."""
    out = Path(job.out_dir) if job.out_dir is not None else None
    keep = _subset(len(job.labels), config)
    n = len(keep) if keep is not None else len(job.labels)
    steps_per_epoch, total_steps = _schedule(n, config)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(derive_seed(config.seed, "init"))
        model, opt, sched = _new_classifier(config, job.images.shape[-1], device)
        epoch, step, log = (config.epochs, total_steps, []) if complete else \
            _resume(out, model, opt, sched, device, stage, monitor_ids)
        rng = rng_state(device)
    metrics = MetricsLog(out / LOG, LOG_FIELDS, "epoch", resumed_at=epoch) if out is not None and not complete else None
    return _Run(index, job, config, stage, monitor_ids, out, keep, n, steps_per_epoch, total_steps, model, opt, sched,
                rng, epoch, step, log, metrics, complete=complete)


# ---- the stack: K classifiers of one architecture as one network ----------------------------------

class _Stack:
    """The parameters (one flat leaf), Adadelta state, BatchNorm buffers and running sums of the
    runs in `runs`, stacked along K; `forward` is the K classifiers' forward pass."""

    def __init__(self, runs: list[_Run], device: torch.device) -> None:
        self.runs, self.K = runs, len(runs)
        ref = runs[0].model
        self.layers = _check_layers(ref)
        self.names = [name for name, _ in ref.named_parameters()]
        self.shapes = [p.shape for _, p in ref.named_parameters()]
        self.sizes = [self.K * p.numel() for _, p in ref.named_parameters()]

        params = [list(r.model.parameters()) for r in runs]

        def stacked(get: Callable[[int, int], Tensor]) -> Tensor:  # get(job k, parameter i) → one flat [K·P]
            return torch.cat([torch.stack([get(k, i).to(device) for k in range(self.K)]).reshape(-1)
                              for i in range(len(self.names))])

        self.flat = stacked(lambda k, i: params[k][i].detach()).requires_grad_(True)
        self.square_avg = stacked(lambda k, i: _opt_state(runs[k], params[k][i], "square_avg"))
        self.acc_delta = stacked(lambda k, i: _opt_state(runs[k], params[k][i], "acc_delta"))
        self.buffers = {name: torch.stack([dict(r.model.named_buffers())[name].to(device) for r in runs])
                        for name, _ in ref.named_buffers()}
        zeros64 = torch.zeros((), dtype=torch.float64, device=device)
        zerosi = torch.zeros((), dtype=torch.int64, device=device)
        self.loss_sum = torch.stack([r.loss_sum if r.loss_sum is not None else zeros64 for r in runs])
        self.correct = torch.stack([r.correct if r.correct is not None else zerosi for r in runs])
        # per job: its learning rate (its StepLR's value) and whether it trains (a done job's slot is idle)
        self.active = torch.tensor([not r.done for r in runs], device=device)
        lr = torch.tensor([r.opt.param_groups[0]["lr"] for r in runs], dtype=self.flat.dtype)
        self.lr = self.per_element(lr.to(device))
        self.active_elements = self.per_element(self.active)

    def per_element(self, values: Tensor) -> Tensor:
        """A per-job value [K] repeated over each job's elements of the flat stack [K·P]."""
        return torch.cat([values.repeat_interleave(s // self.K) for s in self.sizes])

    def views(self, flat: Tensor) -> dict[str, Tensor]:
        """{parameter name: [K, *shape] view} of a flat stacked tensor."""
        return {name: part.view(self.K, *shape)
                for name, shape, part in zip(self.names, self.shapes, flat.split(self.sizes))}

    def forward(self, x: Tensor, valid: Tensor, count: Tensor) -> Tensor:
        """x: [B, K, C, H, W] float in [-1, 1]; valid: [B, K] float 1/0; count: [K] real images per
        job → logits [B, K, n_classes]. Updates the BatchNorm running statistics of the stack."""
        p = self.views(self.flat)
        B, K = x.shape[:2]
        h = x.reshape(B, K * x.shape[2], *x.shape[3:])
        for name, mod in self.layers:
            if isinstance(mod, nn.BatchNorm2d):
                h = self._batch_norm(name, mod, h, p, valid, count)
            elif isinstance(mod, nn.Conv2d):
                w = p[f"{name}.weight"]
                h = F.conv2d(h, w.reshape(K * w.shape[1], *w.shape[2:]), p[f"{name}.bias"].reshape(-1),
                             mod.stride, mod.padding, mod.dilation, groups=K)
            elif isinstance(mod, nn.ReLU):
                h = F.relu(h)
            elif isinstance(mod, nn.MaxPool2d):
                h = F.max_pool2d(h, mod.kernel_size, mod.stride, mod.padding, mod.dilation, mod.ceil_mode)
            elif isinstance(mod, nn.AvgPool2d):
                h = F.avg_pool2d(h, mod.kernel_size, mod.stride, mod.padding, mod.ceil_mode, mod.count_include_pad,
                                 mod.divisor_override)
            elif isinstance(mod, nn.Flatten):
                h = h.reshape(B, K, -1)  # each job's [C·h·w] features, in the order nn.Flatten gives them
            else:  # nn.Linear (checked by _check_layers)
                h = torch.einsum("bki,koi->bko", h, p[f"{name}.weight"]) + p[f"{name}.bias"]
        return h

    def _batch_norm(self, name: str, mod: nn.BatchNorm2d, h: Tensor, p: dict[str, Tensor], valid: Tensor,
                    count: Tensor) -> Tensor:
        """Training-mode BatchNorm of each job over its real images only (PyTorch's formula: biased
        variance to normalise, unbiased in the running estimate, `momentum` per step)."""
        B, KC, H, W = h.shape
        K = self.K
        h5 = h.view(B, K, KC // K, H, W)
        m5 = valid[:, :, None, None, None]
        n = (count.clamp(min=1) * (H * W)).to(h.dtype)[:, None]  # [K, 1] values per channel (an idle slot: any)
        mean = (h5 * m5).sum((0, 3, 4)) / n  # [K, C]
        d = h5 - mean[None, :, :, None, None]
        var = (d * d * m5).sum((0, 3, 4)) / n
        out = d * (var + mod.eps).rsqrt()[None, :, :, None, None] * p[f"{name}.weight"][None, :, :, None, None] \
            + p[f"{name}.bias"][None, :, :, None, None]
        with torch.no_grad():
            mom, on = mod.momentum, self.active[:, None]
            for key, value in (("running_mean", mean), ("running_var", var * (n / (n - 1)))):
                buf = self.buffers[f"{name}.{key}"]
                buf.copy_(torch.where(on, buf * (1 - mom) + value.detach() * mom, buf))
            self.buffers[f"{name}.num_batches_tracked"].add_(self.active.long())
        return out.reshape(B, KC, H, W)

    @torch.no_grad()
    def adadelta(self, grad: Tensor) -> None:
        """One Adadelta step of every active job (see the module doc for the formula and its source);
        idle slots keep their weights and state."""
        on = self.active_elements
        square_avg = self.square_avg.mul(_RHO).addcmul_(grad, grad, value=1 - _RHO)
        std = square_avg.add(_EPS).sqrt_()
        delta = self.acc_delta.add(_EPS).sqrt_().div_(std).mul_(grad)
        acc_delta = self.acc_delta.mul(_RHO).addcmul_(delta, delta, value=1 - _RHO)
        self.square_avg.copy_(torch.where(on, square_avg, self.square_avg))
        self.acc_delta.copy_(torch.where(on, acc_delta, self.acc_delta))
        self.flat.copy_(torch.where(on, self.flat.addcmul(delta, self.lr, value=-1), self.flat))

    @torch.no_grad()
    def unstack(self, k: int) -> None:
        """Copy job k's weights, BatchNorm buffers, Adadelta state and running sums into its run."""
        run = self.runs[k]
        params, sq, acc = self.views(self.flat), self.views(self.square_avg), self.views(self.acc_delta)
        own = dict(run.model.named_parameters())
        for name in self.names:
            own[name].copy_(params[name][k])
            run.opt.state[own[name]] = {"step": torch.tensor(float(run.step)), "square_avg": sq[name][k].clone(),
                                        "acc_delta": acc[name][k].clone()}
        for name, buf in run.model.named_buffers():
            buf.copy_(self.buffers[name][k])
        run.loss_sum, run.correct = self.loss_sum[k].clone(), self.correct[k].clone()


def _opt_state(run: _Run, param: Tensor, key: str) -> Tensor:
    state = run.opt.state.get(param, {})
    return state[key].detach() if key in state else torch.zeros_like(param)


_SUPPORTED = (nn.BatchNorm2d, nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.Flatten, nn.Linear)


def _check_layers(model: Classifier) -> list[tuple[str, nn.Module]]:
    """The classifier's layers in order (features, then head), each of a kind `_Stack.forward`
    implements with the same settings; anything else (dropout, grouped or padded-mode convolutions,
    affine-less BatchNorm) is a bug of `BATCHED_ARCHS`, raised as RuntimeError."""
    layers = [(name, mod) for name, mod in model.named_modules()
              if name and not isinstance(mod, nn.Sequential)]
    for name, mod in layers:
        ok = isinstance(mod, _SUPPORTED)
        if isinstance(mod, nn.Conv2d):
            ok = mod.groups == 1 and mod.padding_mode == "zeros" and mod.bias is not None and isinstance(mod.padding, tuple)
        if isinstance(mod, nn.BatchNorm2d):
            ok = mod.affine and mod.track_running_stats and mod.momentum is not None
        if not ok:
            raise RuntimeError(f"the classifier stack does not implement layer {name} ({mod!r})")
    return layers


# ---- the loop ---------------------------------------------------------------------------------------

def _pool(runs: list[_Run], device: torch.device) -> tuple[Tensor, Tensor]:
    """All runs' training images and labels in one tensor each on the device, each distinct images
    tensor once; sets each run's `base` offset."""
    first: dict[int, int] = {}
    parts: list[ClassifierJob] = []
    total = 0
    for run in runs:
        key = id(run.job.images)
        if key not in first:
            first[key] = total
            parts.append(run.job)
            total += len(run.job.labels)
        run.base = first[key]
    ref = parts[0].images
    images = torch.empty((total, *ref.shape[1:]), dtype=ref.dtype, device=device)
    labels = torch.empty(total, dtype=torch.int64, device=device)
    at = 0
    for job in parts:
        images[at:at + len(job.labels)].copy_(job.images)
        labels[at:at + len(job.labels)].copy_(job.labels)
        at += len(job.labels)
    return images, labels


def _begin_epoch(run: _Run, device: torch.device) -> None:
    """The run's batches of its next epoch as pooled indices [epoch_steps, B], padded, with a mask."""
    B = run.config.batch_size
    run.epoch_steps = min(run.steps_per_epoch, run.total_steps - run.step)
    order = _epoch_order(run.n, run.config, run.epoch)
    if run.keep is not None:
        order = run.keep[order]
    order = order[:run.epoch_steps * B] + run.base
    valid = torch.ones(run.epoch_steps * B)
    pad = run.epoch_steps * B - len(order)  # only an epoch's last batch can be short
    if pad:
        order = torch.cat([order, order[:1].expand(pad)])
        valid[-pad:] = 0
    run.order, run.valid = order.view(run.epoch_steps, B).to(device), valid.view(run.epoch_steps, B).to(device)
    run.batch, run.seconds = 0, 0.0
    run.loss_sum = run.correct = None


def _train_stack(runs: list[_Run], progress: bool, on_epoch_end: Callable[[int, int, dict], None] | None,
                 compact: bool, runner: _StepRunner | None = None) -> None:
    """Train the runs (one architecture, batch size and image shape) together until each is done.

    The stack holds one slot per run from start to end, in the order of the jobs; the slot of a run
    that is done (or was complete before the call) idles: it is computed on a masked batch and its
    weights and state are not updated. A job's arithmetic thus always sees the same stack shape,
    whatever the other jobs are doing; the kernels (convolutions, reductions) order their sums by
    shape, not by value, so a run resumed after a kill ends bitwise equal to an uninterrupted one
    (checked on CPU by tests/test_multitrain.py). The cost: an idle slot's share of each step.
    compact: drop done jobs from the stack instead (faster when jobs differ in length; a resumed run
    then equals an uninterrupted one within float tolerance only, as GPU runs do anyway).
    runner: how each step runs (`_StepRunner`; None: eagerly)."""
    device = next(runs[0].model.parameters()).device
    runner = runner if runner is not None else _StepRunner(device, False)
    for run in runs:
        if run.done and not run.complete:  # a checkpoint after the last epoch: only the finished folder is missing
            _complete(run)
    pending = [r for r in runs if not r.done]
    if not pending:
        return
    images, labels = _pool(pending, device)
    on_device: dict[int, Tensor] = {}  # each monitor image tensor copied to the device once (`predict` returns
    for run in pending:                 # CPU predictions: the labels stay where they are)
        for mx, _ in (run.job.monitor or {}).values():
            if id(mx) not in on_device:
                on_device[id(mx)] = mx.to(device)
        run.monitor_data = {name: (on_device[id(mx)], my) for name, (mx, my) in (run.job.monitor or {}).items()}
    logger.info("training %d classifiers as one stack of %d (%d images on %s)", len(pending), len(runs), len(labels),
                device)
    bar = tqdm(total=max(r.total_steps - r.step for r in pending), desc=f"{len(pending)} classifiers", unit="step",
               disable=not progress, dynamic_ncols=True, leave=False)
    for run in pending:
        _begin_epoch(run, device)
    B = runs[0].config.batch_size
    idle_order = torch.zeros(1, B, dtype=torch.int64, device=device)
    idle_valid = torch.zeros(1, B, device=device)
    stack = runner.adopt(_Stack(pending if compact else runs, device))
    while True:
        live = [r for r in runs if not r.done]
        T = min(r.epoch_steps - r.batch for r in live)  # steps until the next job's epoch ends
        slots = stack.runs
        order = torch.stack([idle_order.expand(T, B) if r.done else r.order[r.batch:r.batch + T] for r in slots], dim=2)
        valid = torch.stack([idle_valid.expand(T, B) if r.done else r.valid[r.batch:r.batch + T] for r in slots], dim=2)
        count = valid.sum(1)  # [T, K] real images per step and job
        t0 = time.perf_counter()
        for t in range(T):
            runner(stack, images, labels, order[t], valid[t], count[t], runs[0].config.bf16)
        sums = torch.stack([stack.loss_sum, stack.correct.double()]).tolist()  # the one wait for the device
        share = (time.perf_counter() - t0) / len(live)  # each training job's share of the stack's time
        bar.update(T)
        for run in live:
            run.batch += T
            run.step += T
            run.seconds += share
        ended = [k for k, run in enumerate(slots) if run in live and run.batch == run.epoch_steps]
        for k in ended:
            _end_epoch(stack, k, sums[0][k], sums[1][k], on_epoch_end)
        for k in range(stack.K):
            stack.unstack(k)
        for k in ended:
            if slots[k].done:
                _complete(slots[k])
            else:
                _begin_epoch(slots[k], device)
        if all(r.done for r in runs):
            break
        # rebuilt: a new epoch's learning rate; a job that is done idles (or, compacting, leaves)
        stack = runner.adopt(_Stack([r for r in runs if not r.done] if compact else runs, device))
    bar.close()


def _step(stack: _Stack, images: Tensor, labels: Tensor, order: Tensor, valid: Tensor, count: Tensor,
          bf16: bool) -> None:
    """One optimizer step of every job in the stack: order [B, K] pooled indices, valid [B, K], count [K]."""
    _train_step(stack, images[order], labels[order], valid, count, bf16)


def _train_step(stack: _Stack, batch: Tensor, y: Tensor, valid: Tensor, count: Tensor, bf16: bool) -> None:
    """`_step` after the gather: batch [B, K, C, H, W] uint8 or float images, y [B, K] labels. The part a
    compiled runner compiles: its inputs have the stack's shapes, whatever the size of the pooled data."""
    x = to_float(batch)  # [B, K, C, H, W]
    with torch.autocast(batch.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = stack.forward(x, valid, count)  # [B, K, classes]
    B, K, c = logits.shape
    logits = logits if logits.dtype == torch.float64 else logits.float()  # bf16: the loss in float32; float64 stays
    ce = F.cross_entropy(logits.reshape(B * K, c), y.reshape(-1), reduction="none").view(B, K)
    loss = (ce * valid).sum(0) / count.clamp(min=1)  # [K] each job's mean loss over its real images (idle: 0)
    (grad,) = torch.autograd.grad(loss.sum(), stack.flat)
    stack.adadelta(grad)
    with torch.no_grad():
        stack.loss_sum += loss.double() * count.double()
        stack.correct += ((logits.argmax(-1) == y) & (valid > 0)).sum(0)


def _trace_settings() -> dict:
    """torch._dynamo settings of a compiled step, as this torch names them: `torch.autograd.grad` traced
    into the graph (where torch has `trace_autograd_ops`, as 2.13 does; older ones break the graph
    there: forward + backward, then the update, each still compiled) and room for `_RECOMPILE_LIMIT`
    stack shapes."""
    config = torch._dynamo.config
    out = {"trace_autograd_ops": True} if hasattr(config, "trace_autograd_ops") else {}
    out["recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"] = _RECOMPILE_LIMIT  # renamed
    return out


_COMPILED: dict[str, Callable] = {}  # one torch.compile of `_train_step` per mode and process: compiled graphs are
                                     # cached per wrapper, so every stack and benchmark of a mode shares them


class _StepRunner:
    """Runs `_step` on a stack, eagerly or through `torch.compile`.

    mode: "eager"; or, compiled, "reduce-overhead" on CUDA (Inductor + CUDA graphs) and "default"
    elsewhere; `compile_mode` overrides it (a benchmark comparing modes). Compiled, the batch is
    gathered eagerly (one indexing) and `_train_step` is compiled: it depends on the stack's shape
    only, not on how many images the jobs have. A compiled runner keeps one set of state tensors
    per stack shape (`adopt`) and marks them as static inputs: a CUDA graph updates them in place
    and is captured once. The first call that raises (a compiler missing or failing, an op it
    cannot trace) logs one warning, and the runner runs that step and every later one eagerly;
    compilation fails before the compiled step changes any state.
    """

    def __init__(self, device: torch.device, compiled: bool, compile_mode: str | None = None) -> None:
        self.mode = (compile_mode or ("reduce-overhead" if device.type == "cuda" else "default")) if compiled else "eager"
        self._held: _Stack | None = None
        self._settings = _trace_settings()  # patched in around every call (~20 µs): a new shape may compile at any step

    def adopt(self, stack: _Stack) -> _Stack:
        """The stack, its state moved into the tensors of the previous stack of the same shape (compiled
        only): the same addresses epoch after epoch. The previous stack must not be used afterwards."""
        if self.mode == "eager":
            return stack
        new, old = _state(stack), _state(self._held) if self._held is not None else None
        if old is not None and [(t.shape, t.dtype) for t in old.values()] == [(t.shape, t.dtype) for t in new.values()]:
            with torch.no_grad():
                for name, t in new.items():
                    old[name].copy_(t)
            _set_state(stack, old)
        else:
            for t in new.values():
                torch._dynamo.mark_static_address(t)
        self._held = stack
        return stack

    def __call__(self, stack: _Stack, images: Tensor, labels: Tensor, order: Tensor, valid: Tensor, count: Tensor,
                 bf16: bool) -> None:
        """One step of every job in the stack (`_step`'s arguments)."""
        if self.mode != "eager":
            try:
                if self.mode not in _COMPILED:
                    _COMPILED[self.mode] = torch.compile(_train_step, dynamic=False,
                                                         mode=None if self.mode == "default" else self.mode)
                batch, y = images[order], labels[order]
                with torch._dynamo.config.patch(**self._settings):
                    _COMPILED[self.mode](stack, batch, y, valid, count, bf16)
                return
            except Exception as err:  # noqa: BLE001  (any compiler failure: run eagerly, once warned)
                logger.warning("classifier stack: torch.compile (%s) failed (%s: %s); the stack runs eagerly",
                               self.mode, type(err).__name__, str(err).splitlines()[0] if str(err) else "")
                self.mode = "eager"
        _step(stack, images, labels, order, valid, count, bf16)


_STATE = ("flat", "square_avg", "acc_delta", "loss_sum", "correct", "active", "lr", "active_elements")


def _state(stack: _Stack) -> dict[str, Tensor]:
    """Every tensor of the stack a step reads or updates (buffers as "buffers.<name>"), in a fixed order."""
    return {**{name: getattr(stack, name) for name in _STATE},
            **{f"buffers.{name}": buf for name, buf in stack.buffers.items()}}


def _set_state(stack: _Stack, state: dict[str, Tensor]) -> None:
    for name in _STATE:
        setattr(stack, name, state[name])
    stack.buffers = {name: state[f"buffers.{name}"] for name in stack.buffers}


def _end_epoch(stack: _Stack, k: int, loss_sum: float, correct: float,
               on_epoch_end: Callable[[int, int, dict], None] | None) -> None:
    """Job k's epoch end, as `train_classifier` does it: schedule step, log row, monitored
    accuracies, checkpoint, log file, callback."""
    run = stack.runs[k]
    lr = run.opt.param_groups[0]["lr"]
    with warnings.catch_warnings():  # the shadow optimizer's step() is never called: the stack steps for it
        warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
        run.sched.step()
    run.epoch += 1
    stack.unstack(k)
    seen = min(run.epoch_steps * run.config.batch_size, run.n)  # the epoch's real images
    row = {"epoch": run.epoch, "steps": run.step, "lr": lr, "loss": round(loss_sum / seen, 6),
           "accuracy": round(correct / seen, 6), "seconds": round(run.seconds, 2)}
    for name, (mx, my) in (run.monitor_data or {}).items():
        row[f"{name}_accuracy"] = round(accuracy(run.model, mx, my), 6)  # eval mode: BN statistics untouched
    run.log.append(row)
    logger.info("job %d, epoch %d: loss %.4f, train accuracy %.4f", run.index, run.epoch, row["loss"], row["accuracy"])
    if run.out is not None:
        device = next(run.model.parameters()).device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            set_rng_state(run.rng, device)  # what the global generators hold in train_classifier at this point
            _save_checkpoint(run.out / CHECKPOINT, run.model, run.opt, run.sched, run.epoch, run.step, run.log,
                             device, run.stage, run.monitor_ids)
        _write_log(run.metrics, run.log)
    if on_epoch_end is not None:
        on_epoch_end(run.index, run.epoch, row)


def _complete(run: _Run) -> None:
    """Write a done run's folder (log, model, manifest last)."""
    run.model.eval()
    if run.out is not None:
        _finish(run.out, run.model, run.stage, run.log, run.metrics, run.monitor_ids)
