"""Invariant classifiers: train on any labelled images, evaluate out of distribution.

The default is the CGN paper's MNIST protocol (the CGN authors' CNN, Adadelta lr 1.0, StepLR
γ 0.7 per epoch, batch 64, 10 epochs). Training data is whatever tensors you pass: original
variant data, a counterfactual dataset (`load_image_dataset`), or a mix (`load_training_data`);
or a stream of counterfactuals sampled at every step (`train_classifier_on_stream` with a
`counterfactuals.CounterfactualStream`). Both feed one loop through a batch source: stored
tensors are read in a seeded order per epoch, a stream draws batch `step` from (seed, step).

A training run folder:
    checkpoint.safetensors   after every epoch: weights, optimizer, scheduler, RNG, log (resume)
    train_log.csv            epoch, steps, lr, loss, accuracy (train mode), seconds
    config.json, model.safetensors   the classifier (`skdcgn.load_classifier(folder)`)
    manifest.json            written last: training is complete

A run resumed from its checkpoint ends bitwise identical to an uninterrupted one on CPU.
"""
from __future__ import annotations

import logging
import dataclasses
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from .checkpoint import checkpoint_stage, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import identity, resolve_device, setting, validate_config
from .images import to_float, validate_images
from .errors import SkdcgnError
from .runlog import MetricsLog
from .training import restore, usable_checkpoint
from .hashing import derive_seed, sha256_of
from .io import (MANIFEST, config_hash, folder_lock, read_json, refuse_other_settings, stage_complete, tensor_file_metadata,
                 write_manifest)
from .models.classifier import ARCHS, Classifier, ClassifierNetConfig

if TYPE_CHECKING:
    from .counterfactuals import CounterfactualStream

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.safetensors"
LOG = "train_log.csv"
_MAX_DEVICE_DATA_BYTES = 4 << 30  # training sets up to this size are copied to the GPU once
VARIANT_PREFIX = "variant:"
SPLITS = ("train", "test", "test_iid")


@dataclasses.dataclass
class ClassifierConfig:
    """Training of an invariant classifier, the CGN authors' MNIST protocol by default: Adadelta
    (lr 1.0) with StepLR (×`gamma` per epoch), batch 64, 10 epochs. Ranges (`setting` metadata,
    checked by `validate`): epochs 1–10,000, batch_size 1–10⁶, lr in (0, 100], gamma in (0, 1],
    max_examples ≥ 0 (images), max_steps ≥ 0 (optimizer steps); 0 means no limit. Raises
    `SkdcgnError` naming the field. `device` is not part of the stage identity."""

    arch: str = setting("cgn", choices=ARCHS,
                        help="cgn (the CGN authors' CNN) | mnist_example (the PyTorch MNIST example CNN)")
    epochs: int = setting(10, lo=1, hi=10_000, unit="epochs")
    batch_size: int = setting(64, lo=1, hi=1_000_000, unit="images")
    lr: float = setting(1.0, lo=0, hi=100, lo_open=True, help="Adadelta learning rate")
    gamma: float = setting(0.7, lo=0, hi=1, lo_open=True, help="StepLR decay per epoch")
    seed: int = setting(0, lo=0, hi=2**63 - 1, help="weights, data order, subset")
    device: str = setting("auto", identity=False, help="auto | cpu | cuda[:N]")
    max_examples: int = setting(0, lo=0, hi=10**9, unit="images", help="train on a seeded random subset of this size (0: all)")
    max_steps: int = setting(0, lo=0, hi=10**12, unit="steps", help="stop after this many optimizer steps in total (0: no cap)")
    bf16: bool = setting(False, identity="changed",
                         help="forward and backward under bf16 autocast (a GPU speed option; changes the numbers)")

    def validate(self) -> None:
        """Check each field's range and choice (`validate_config`); raises `SkdcgnError`."""
        validate_config(self)


def _check_data(images: Tensor, labels: Tensor, n_classes: int = 10, check_range: bool = True) -> None:
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
        raise SkdcgnError(f"images: expected a tensor [N, 3, H, W], got {getattr(images, 'shape', type(images).__name__)}")
    if images.dtype not in (torch.uint8, torch.float32):
        raise SkdcgnError(f"images: expected uint8 or float32 (in [-1, 1]), got {images.dtype}")
    if check_range:
        validate_images(images)  # float images outside [-1, 1] are refused, [0, 1]-looking ones warn
    if not isinstance(labels, Tensor) or labels.dtype != torch.int64 or labels.shape != (len(images),):
        raise SkdcgnError(f"labels: expected int64 [{len(images)}], got {getattr(labels, 'dtype', None)} "
                          f"{list(getattr(labels, 'shape', []))}")
    if len(labels) == 0:
        raise SkdcgnError("no training examples")
    if labels.min() < 0 or labels.max() >= n_classes:
        raise SkdcgnError(f"labels: classes must lie in [0, {n_classes})")


def data_hash(images: Tensor, labels: Tensor) -> str:
    """A 16-hex-digit sha256 of a dataset (dtype, shape and the bytes of images and labels): which
    images a classifier was trained or scored on."""
    return sha256_of(f"{images.dtype}{list(images.shape)}", images, labels)[:16]


# ---- checkpoints: tensors in safetensors, everything else as JSON in its metadata -----------------

def _save_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer,
                     sched: torch.optim.lr_scheduler.LRScheduler, epoch: int, step: int, log: list[dict],
                     device: torch.device, stage: dict, monitor_ids: dict[str, str]) -> None:
    save_checkpoint(path, {"model": model.state_dict(), "optim": opt.state_dict(), "scheduler": sched.state_dict(),
                           "rng": rng_state(device), "epoch": epoch, "step": step, "log": log,
                           "monitor": monitor_ids}, stage)


def _is_legacy_checkpoint(path: Path) -> bool:
    """A classifier checkpoint of skdcgn 0.1.0 (safetensors with its own 'resume' metadata)."""
    meta = tensor_file_metadata(path)
    return "resume" in meta and "format" not in meta


def _load_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer,
                     sched: torch.optim.lr_scheduler.LRScheduler, device: torch.device
                     ) -> tuple[int, int, list[dict], dict[str, str]]:
    """Restore the training state (`checkpoint.load_checkpoint`); (epoch, step, log, {monitor name:
    data hash} the log's monitored accuracies were measured on)."""
    state = load_checkpoint(path)
    restore(state, {"model": model, "optim": opt, "scheduler": sched, "rng": lambda rng: set_rng_state(rng, device)}, path)
    with usable_checkpoint(path):
        return int(state["epoch"]), int(state["step"]), list(state["log"]), dict(state.get("monitor", {}))


LOG_FIELDS = ("epoch", "steps", "lr", "loss", "accuracy", "seconds")


def _drop_stale_monitoring(log: list[dict], saved: dict[str, str], current: dict[str, str]) -> list[dict]:
    """A resumed log without the monitored accuracies (`<name>_accuracy`) that were measured on other
    images than this run monitors (e.g. the test split of another data build): a curve is then
    incomplete, and shown nowhere, rather than a mix of two test sets."""
    names = {k[:-len("_accuracy")] for r in log for k in r if k.endswith("_accuracy")}  # not the train "accuracy"
    stale = {f"{n}_accuracy" for n in names | set(current) if saved.get(n) != current.get(n)}
    return [{k: v for k, v in r.items() if k not in stale} for r in log]


def _write_log(metrics: MetricsLog, log: list[dict]) -> None:
    """The per-epoch rows so far (LOG_FIELDS + monitored accuracies) through the one metrics writer."""
    metrics.write(log)


# ---- training and evaluation ------------------------------------------------------------------------

def train_classifier(images: Tensor, labels: Tensor, config: ClassifierConfig | None = None,
                     out_dir: str | os.PathLike | None = None, *, progress: bool = True,
                     on_epoch_end: Callable[[int, dict], None] | None = None,
                     monitor: dict[str, tuple[Tensor, Tensor]] | None = None, overwrite: bool = False) -> Classifier:
    """Train a classifier on (images [N, 3, H, W] uint8 or float in [-1, 1], labels int64 [N]).

    With `out_dir`, the run is resumable (a checkpoint per epoch), skipped when already complete
    for the same config and data, and ends with the classifier saved there (`load_classifier`).
    on_epoch_end(epoch, log_row) is called after each epoch's checkpoint is written.
    monitor: {name: (images, labels)} scored after every epoch into the log as `<name>_accuracy`
    (e.g. the OOD test split, to see whether the last epoch is representative); it does not
    change the training: the same weights with or without it.
    overwrite: replace a classifier (finished, or its checkpoint) that `out_dir` holds for other
    settings or data; without it such a folder is refused with one line naming the first
    difference (`io.refuse_other_settings`). `out_dir` is locked while training (`io.folder_lock`).
    Returns the trained classifier in eval mode, on the config's device.
    """
    return _train_locked((images, labels), config, out_dir, progress, on_epoch_end, monitor, overwrite)


def train_classifier_on_stream(stream: CounterfactualStream, config: ClassifierConfig | None = None,
                               out_dir: str | os.PathLike | None = None, *, progress: bool = True,
                               on_epoch_end: Callable[[int, dict], None] | None = None,
                               monitor: dict[str, tuple[Tensor, Tensor]] | None = None,
                               overwrite: bool = False) -> Classifier:
    """Train a classifier on streamed counterfactuals (`counterfactuals.CounterfactualStream`): step
    `s` trains on the stream's batch `s` of `config.batch_size` composites, sampled on the config's
    device (the stream's CGN is moved there), so no composite is seen twice and nothing is stored.

    Everything else is `train_classifier`'s: an epoch is the stream's `steps_per_epoch` steps
    (StepLR, checkpoint and log per epoch), `config.max_steps` caps the total, a resumed run ends
    bitwise identical to an uninterrupted one on CPU, the folder is skipped when complete and
    refused when made with other settings (unless `overwrite`), `load_classifier(out_dir)` loads
    the result. The manifest's stage records the stream's identity (its CGN's weights hash, recipe,
    seed and epoch length) where stored training records a data hash. `config.max_examples` must
    be 0 (a stream has no set to take a subset of): otherwise `SkdcgnError`.
    Returns the trained classifier in eval mode, on the config's device.
    """
    return _train_locked(stream, config, out_dir, progress, on_epoch_end, monitor, overwrite)


def _train_locked(data, config, out_dir, progress, on_epoch_end, monitor, overwrite) -> Classifier:
    if out_dir is None:
        return _train_classifier(data, config, None, progress, on_epoch_end, monitor, overwrite)
    with folder_lock(out_dir):
        return _train_classifier(data, config, Path(out_dir), progress, on_epoch_end, monitor, overwrite)


def _recorded_stage(out: Path) -> dict | None:
    """The settings of the classifier `out` holds: from its manifest, else from its checkpoint; None if neither."""
    if (out / MANIFEST).is_file():
        config = read_json(out / MANIFEST).get("config")
        return config if isinstance(config, dict) else {}
    if (out / CHECKPOINT).is_file():
        if _is_legacy_checkpoint(out / CHECKPOINT):
            raise SkdcgnError(f"{out / CHECKPOINT}: a checkpoint of skdcgn 0.1.0, which this version does not "
                              "resume; delete it (or pass --overwrite) to start over")
        return checkpoint_stage(out / CHECKPOINT) or {"stage_hash": None}  # None: unreadable, started over below
    return None


def _prepare(images: Tensor, labels: Tensor, config: ClassifierConfig | None,
             monitor: dict[str, tuple[Tensor, Tensor]] | None, hashes: dict[tuple[int, int], str] | None = None
             ) -> tuple[ClassifierConfig, dict, dict[str, str], torch.device]:
    """(config, stage, {monitor name: data hash}, device) of a classifier run, its input checked
    (`SkdcgnError` for bad settings, images, labels or monitor data). hashes: {(id(images), id(labels)):
    data hash} of tensors hashed already (by several jobs sharing them), filled as it goes."""
    config = config or ClassifierConfig()
    config.validate()
    _check_data(images, labels)
    for mx, my in (monitor or {}).values():  # bad monitor data fails now, not after the first epoch
        _check_data(mx, my, n_classes=10**9)
    if images.shape[-1] != images.shape[-2]:
        raise SkdcgnError(f"images: expected square images, got {list(images.shape[-2:])}")
    hashes = {} if hashes is None else hashes

    def hashed(x: Tensor, y: Tensor) -> str:
        key = (id(x), id(y))
        if key not in hashes:
            hashes[key] = data_hash(x, y)
        return hashes[key]

    monitor_ids = {name: hashed(mx, my) for name, (mx, my) in (monitor or {}).items()}
    device = resolve_device(config.device)
    # device is identity=False: where it ran does not change what it is
    stage = {"stage": "classifier", "train": identity(config), "data": hashed(images, labels), "n": len(labels)}
    return config, stage, monitor_ids, device


def _prepare_stream(stream: CounterfactualStream, config: ClassifierConfig | None,
                    monitor: dict[str, tuple[Tensor, Tensor]] | None
                    ) -> tuple[ClassifierConfig, dict, dict[str, str], torch.device]:
    """`_prepare` for a stream: the stage records the stream's identity instead of a data hash."""
    config = config or ClassifierConfig()
    config.validate()
    if config.max_examples:
        raise SkdcgnError("max_examples: a stream has no stored set to take a subset of; leave it at 0")
    for mx, my in (monitor or {}).values():  # bad monitor data fails now, not after the first epoch
        _check_data(mx, my, n_classes=10**9)
    monitor_ids = {name: data_hash(mx, my) for name, (mx, my) in (monitor or {}).items()}
    stage = {"stage": "classifier", "train": identity(config), "stream": stream.identity()}
    return config, stage, monitor_ids, resolve_device(config.device)


def _claim(out: Path, stage: dict, overwrite: bool) -> bool:
    """True when `out` already holds the finished classifier of `stage`; otherwise make `out` ready
    for it (a folder of other settings is refused, or emptied with `overwrite`)."""
    if stage_complete(out, stage):
        return True
    if overwrite and (out / CHECKPOINT).is_file() and _is_legacy_checkpoint(out / CHECKPOINT):
        (out / CHECKPOINT).unlink()  # skdcgn 0.1.0's format cannot be resumed: --overwrite starts over
    recorded = _recorded_stage(out)
    if recorded == {"stage_hash": None}:
        recorded = None  # an unreadable checkpoint holds nothing to keep: started over below, saying so
    if refuse_other_settings(out, "a classifier", recorded, stage, overwrite):
        for name in (MANIFEST, CHECKPOINT, LOG, "model.safetensors", "config.json"):
            (out / name).unlink(missing_ok=True)
    return False


def _subset(n: int, config: ClassifierConfig) -> Tensor | None:
    """The sorted indices of the seeded training subset (`max_examples`), or None for all `n` images."""
    if config.max_examples and config.max_examples < n:
        keep = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(config.seed, "subset")))
        return keep[:config.max_examples].sort().values
    return None


def _schedule(n: int, config: ClassifierConfig, steps_per_epoch: int | None = None) -> tuple[int, int]:
    """(steps per epoch, total optimizer steps) of training on `n` images (or a stream's given
    `steps_per_epoch`)."""
    steps_per_epoch = steps_per_epoch or -(-n // config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)
    return steps_per_epoch, total_steps


def _epoch_order(n: int, config: ClassifierConfig, epoch: int) -> Tensor:
    """The order int64 [n] in which an epoch visits the training images (seeded by seed and epoch)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(config.seed, "order", epoch)))


def _new_classifier(config: ClassifierConfig, image_size: int, device: torch.device
                    ) -> tuple[Classifier, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The freshly initialised classifier (drawn from the global generator: seed it first), its
    Adadelta optimizer and StepLR schedule."""
    model = Classifier(ClassifierNetConfig(arch=config.arch, image_size=image_size)).to(device)
    opt = torch.optim.Adadelta(model.parameters(), lr=config.lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=config.gamma)
    return model, opt, sched


def _resume(out: Path | None, model: nn.Module, opt: torch.optim.Optimizer,
            sched: torch.optim.lr_scheduler.LRScheduler, device: torch.device, stage: dict,
            monitor_ids: dict[str, str]) -> tuple[int, int, list[dict]]:
    """(epoch, step, log) to continue from: `out`'s checkpoint restored into model, optimizer,
    schedule and the global generators, or (0, 0, []) when there is none to resume."""
    if out is None or not (out / CHECKPOINT).is_file():
        return 0, 0, []
    if config_hash(checkpoint_stage(out / CHECKPOINT)) != config_hash(stage):  # only an unreadable one gets here
        logger.warning("%s: unreadable checkpoint; starting over", out / CHECKPOINT)
        return 0, 0, []
    epoch, step, log, saved_ids = _load_checkpoint(out / CHECKPOINT, model, opt, sched, device)
    logger.info("resuming %s after epoch %d (step %d)", out, epoch, step)
    return epoch, step, _drop_stale_monitoring(log, saved_ids, monitor_ids)


def _finish(out: Path, model: Classifier, stage: dict, log: list[dict], metrics: MetricsLog,
            monitor_ids: dict[str, str], extra: dict | None = None) -> None:
    """Write the finished classifier into `out`: log, model, and the manifest last (with `extra` entries)."""
    _write_log(metrics, log)  # again: a run killed between its last checkpoint and its log resumes here
    metrics.close()
    model.save_pretrained(out)
    write_manifest(out, stage, files=("config.json", "model.safetensors"), log=log, n_params=model.get_num_params(),
                   train_seconds=round(sum(r["seconds"] for r in log), 2),
                   monitor=monitor_ids, **(extra or {}))


class _StoredBatches:
    """Stored (images, labels), optionally a seeded subset (`_subset`), read in a seeded random order
    per epoch (`_epoch_order`), kept on the GPU when they fit."""

    def __init__(self, images: Tensor, labels: Tensor, config: ClassifierConfig, device: torch.device) -> None:
        keep = _subset(len(labels), config)
        if keep is not None:
            images, labels = images[keep], labels[keep]
        self.n, self.config, self.device, self.image_size = len(labels), config, device, images.shape[-1]
        self.steps_per_epoch = _schedule(self.n, config)[0]
        # a GPU run keeps the whole set on the GPU (uint8: 100k MNIST-size images are 300 MB) when it fits
        # comfortably: one copy instead of one per step
        on_device = device.type != "cpu" and images.element_size() * images.numel() <= _MAX_DEVICE_DATA_BYTES
        self.x, self.y = (images.to(device), labels.to(device)) if on_device else (images, labels)

    def epoch(self, epoch: int) -> Callable[[int, int], tuple[Tensor, Tensor]]:
        """(batch index in the epoch, global step) → (images float [B, 3, H, W], labels) on the device."""
        order = _epoch_order(self.n, self.config, epoch).to(self.x.device)
        bs = self.config.batch_size

        def take(b: int, step: int) -> tuple[Tensor, Tensor]:
            idx = order[b * bs:(b + 1) * bs]
            return to_float(self.x[idx]).to(self.device, non_blocking=True), self.y[idx].to(self.device, non_blocking=True)
        return take


class _StreamedBatches:
    """A `CounterfactualStream` as a batch source: batch b of any epoch is the stream's batch at the global step."""

    def __init__(self, stream: CounterfactualStream, config: ClassifierConfig, device: torch.device) -> None:
        self.stream, self.batch_size = stream.to(device), config.batch_size
        self.steps_per_epoch, self.image_size = stream.steps_per_epoch, stream.image_size

    def epoch(self, epoch: int) -> Callable[[int, int], tuple[Tensor, Tensor]]:
        """(batch index in the epoch, global step) → the stream's batch `step`, on the device."""
        return lambda b, step: self.stream.batch(step, self.batch_size)


def _train_classifier(data: tuple[Tensor, Tensor] | CounterfactualStream, config: ClassifierConfig | None,
                      out: Path | None, progress: bool, on_epoch_end: Callable[[int, dict], None] | None,
                      monitor: dict[str, tuple[Tensor, Tensor]] | None, overwrite: bool) -> Classifier:
    streamed = not isinstance(data, tuple)
    config, stage, monitor_ids, device = (_prepare_stream(data, config, monitor) if streamed
                                          else _prepare(*data, config, monitor))
    if out is not None and _claim(out, stage, overwrite):
        from .models.pretrained import load_model
        return load_model(out).to(device)

    source = _StreamedBatches(data, config, device) if streamed else _StoredBatches(*data, config, device)
    steps_per_epoch, total_steps = _schedule(0, config, source.steps_per_epoch)

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(derive_seed(config.seed, "init"))
        model, opt, sched = _new_classifier(config, source.image_size, device)
        epoch, step, log = _resume(out, model, opt, sched, device, stage, monitor_ids)
        metrics = MetricsLog(out / LOG, LOG_FIELDS, "epoch", resumed_at=epoch) if out is not None else None
        while epoch < config.epochs and step < total_steps:
            model.train()
            t0 = time.perf_counter()
            take = source.epoch(epoch)  # (batch b of this epoch, global step) → (x, y) on the device
            n_batches = min(steps_per_epoch, total_steps - step)
            # running sums stay on the device (float64: the same sums as Python floats) so that a GPU
            # step does not wait for the previous one; read every 50 steps for the progress bar
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            correct = torch.zeros((), dtype=torch.int64, device=device)
            seen = 0
            lr = opt.param_groups[0]["lr"]
            bar = tqdm(range(n_batches), desc=f"epoch {epoch + 1}/{config.epochs}", unit="step",
                       disable=not progress, dynamic_ncols=True, leave=False)
            for b in bar:
                x, y = take(b, step)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
                    logits = model(x)
                loss = F.cross_entropy(logits.float(), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                loss_sum += loss.detach().double() * len(y)
                correct += (logits.argmax(1) == y).sum()
                seen += len(y)
                if b % 50 == 0 and progress:
                    bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", acc=f"{correct.item() / seen:.3f}")
            bar.close()
            sched.step()
            epoch += 1
            row = {"epoch": epoch, "steps": step, "lr": lr, "loss": round(loss_sum.item() / seen, 6),
                   "accuracy": round(correct.item() / seen, 6), "seconds": round(time.perf_counter() - t0, 2)}
            for name, (mx, my) in (monitor or {}).items():
                row[f"{name}_accuracy"] = round(accuracy(model, mx, my), 6)  # eval mode: BN statistics untouched
            log.append(row)
            logger.info("epoch %d: loss %.4f, train accuracy %.4f, %.1f s", epoch, row["loss"], row["accuracy"],
                        row["seconds"])
            if out is not None:
                _save_checkpoint(out / CHECKPOINT, model, opt, sched, epoch, step, log, device, stage, monitor_ids)
                _write_log(metrics, log)
            if on_epoch_end is not None:
                on_epoch_end(epoch, row)
    model.eval()
    if out is not None:
        _finish(out, model, stage, log, metrics, monitor_ids, {"cgn": data.cgn_name} if streamed else None)
    return model


@torch.no_grad()
def predict(classifier: nn.Module, images: Tensor, batch_size: int = 1000) -> Tensor:
    """Predicted classes int64 [N] of images [N, 3, H, W], uint8 [0, 255] or float in [-1, 1]
    (other ranges and dtypes refused: `images.check_images`)."""
    preds = _per_batch(classifier, images, batch_size, lambda logits: logits.argmax(1))
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)


@torch.no_grad()
def probabilities(classifier: nn.Module, images: Tensor, batch_size: int = 1000) -> Tensor:
    """Softmax probabilities float32 [N, K] of `classifier` (eval mode) on images [N, 3, H, W],
    uint8 [0, 255] or float in [-1, 1] (other ranges and dtypes refused: `images.check_images`)."""
    probs = _per_batch(classifier, images, batch_size, lambda logits: torch.softmax(logits.float(), 1))
    return torch.cat(probs) if probs else torch.zeros(0, 0)


def _per_batch(classifier: nn.Module, images: Tensor, batch_size: int, fn: Callable[[Tensor], Tensor]) -> list[Tensor]:
    """fn(logits) of each batch of `batch_size` images, on the CPU; the classifier in eval mode."""
    classifier.eval()
    device = next(classifier.parameters()).device
    validate_images(images)
    return [fn(classifier(to_float(images[i:i + batch_size]).to(device))).cpu() for i in range(0, len(images), batch_size)]


def accuracy(classifier: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy in [0, 1] of `classifier` on (images, labels)."""
    _check_data(images, labels, n_classes=10**9, check_range=False)  # predict checks the range
    return (predict(classifier, images, batch_size) == labels).float().mean().item()


# ---- data sources -------------------------------------------------------------------------------

def load_source(spec: str, dtype: torch.dtype = torch.uint8) -> tuple[Tensor, Tensor]:
    """`variant:NAME[:SPLIT]` (split defaults to train) or a dataset folder (counterfactuals).

    Images come as uint8 by default: variants and counterfactual datasets are stored that way,
    so nothing is lost, and training converts each batch to float in [-1, 1].
    """
    if spec.startswith(VARIANT_PREFIX):
        name, _, split = spec[len(VARIANT_PREFIX):].partition(":")
        return load_variant_split(name, split or "train", dtype)
    from .counterfactuals import load_image_dataset
    return load_image_dataset(spec, dtype=dtype)


def load_variant_split(name: str, split: str, dtype: torch.dtype = torch.uint8, seed: int = 0) -> tuple[Tensor, Tensor]:
    """(images, labels int64) of a split of an MNIST variant; images uint8 (as cached) or float32 in [-1, 1]."""
    from .data import load_variant_uint8

    if split not in SPLITS:
        raise SkdcgnError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    images, labels = load_variant_uint8(name, split, seed=seed)
    return (images if dtype == torch.uint8 else to_float(images)), labels


def load_training_data(specs: list[str]) -> tuple[Tensor, Tensor]:
    """Concatenate one or more sources (`load_source` specs): images uint8, labels int64."""
    if not specs:
        raise SkdcgnError("no training data given")
    parts = [load_source(s) for s in specs]
    for spec, (_, y) in zip(specs, parts):
        if len(y) == 0:
            raise SkdcgnError(f"{spec}: holds no images")
    shapes = {tuple(x.shape[1:]) for x, _ in parts}
    if len(shapes) != 1:
        raise SkdcgnError(f"training sources have different image shapes: {sorted(shapes)}")
    return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])
