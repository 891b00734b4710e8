"""Train a new CGN-MNIST teacher on an MNIST variant (the CGN objective, seeded, resumable).

The objective (Sauer & Geiger 2021, MNIST setting), per generator step on a batch of real images
x with labels y; the generator draws one composite per real image, *of the same class*:

    m, f, b = shape(u1, y), shift(foreground(u2, y)), shift(background(u3, y));  x̂ = m·f + (1 − m)·b
    L_G = λ_adv · ½(D(x̂, y) − 1)²                      LSGAN, class-conditional discriminator
        + λ_bin · mean H(m)                            binary entropy: mask pixels towards 0 or 1
        + λ_prior · relu(lo − m̄)² + relu(m̄ − hi)²      mask-size prior on each image's mean m̄
        + λ_tex · patch-statistics loss(x̂, x | y)       texture term (below)
    L_D = ½(D(x, y) − 1)² + ½ D(x̂, y)²

`shift` is the seeded random circular shift of the CGN tile-and-crop step: it destroys the
position of whatever a texture mechanism draws, so only the shape mechanism can place a digit.

Texture term. The CGN authors use Gram matrices of ImageNet VGG features; no pretrained
ImageNet network is available offline here. We use the statistics (channel means and Gram
matrices) of a *fixed, random* two-layer conv filter bank plus the raw pixels, computed on
composites and real images and averaged per class. Justification: random shallow conv features
are known to suffice for texture statistics (Ustyuzhaninov et al., "What does it take to generate
natural textures?", ICLR 2017); they need no training, no data and no download, are rebuilt
bit-identically from a seed, and cost a few MFLOPs per image. Averaging per class over the batch
(the composites share the real batch's labels) compares like with like: the term pulls each
class's colour and texture statistics towards the real ones without tying a composite to the
layout of one particular real digit, and the Gram matrices are translation invariant anyway.

BatchNorm. The mechanisms train in train mode (batch statistics), as in the original code, but
teachers are used in eval mode (running statistics). Before export, the running statistics are
recalibrated as exact population averages over fresh batches of uniform classes
(`recalibrate_batchnorm`); grids written during training use the current running statistics,
i.e. show what eval mode gives at that step.

Reproducibility. All randomness comes from explicit generators: weight init from
`seed`, the data order from a per-epoch permutation that is a pure function of (seed, epoch), and
noise, texture shifts and dropout from one generator whose state is checkpointed. On the CPU a
resumed run is bitwise identical to an uninterrupted one.

Layout of `run_dir/teacher/`: the CGN (`cgn.json`, `shape/`, `foreground/`, `background/`),
`grid.png` + `grid_mechanisms.png` (eval mode), `train/` (checkpoint.safetensors and its previous copy,
losses.csv, samples/step_NNNNNN.png, config.json) and, written last, `manifest.json`.
"""
from __future__ import annotations

import logging
import copy
import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import load_checkpoint, save_checkpoint
from .compose import compose
from .config import (config_from_dict, identity, load_presets, preset_values, resolve_device, set_threads, setting,
                     validate_config)
from .data.variants import VARIANTS
from .errors import SkdcgnError
from .images import to_float
from .runlog import MetricsLog
from .training import due, restore, usable_checkpoint
from .io import MANIFEST, check_finite, folder_lock, stage_complete, write_json, write_manifest
from .models.cgn import CGN
from .models.cgn_discriminator import CGNDiscriminator, CGNDiscriminatorConfig
from .models.cgn_mnist import teacher_mechanisms

logger = logging.getLogger(__name__)

STAGE = "teacher"
LOSS_COLUMNS = ("step", "seconds", "loss_d", "d_real", "d_fake", "adv", "binary", "mask_prior", "texture", "mask_mean")
# Fields that may change between a checkpoint and its resumption (they do not alter the math).
RESUMABLE_FIELDS = ("steps", "sample_every", "checkpoint_every", "log_every", "device", "threads")


@dataclasses.dataclass
class TeacherTrainConfig:
    """Training of a CGN-MNIST teacher (the CGN authors' losses: LSGAN, binary mask entropy,
    mask-size prior, texture term). Each field's unit, range and help line are its `setting`
    metadata (shown by `skdcgn teacher train --help`); `*_every` fields count steps, 0 switches the
    action off. `validate()` checks the ranges (steps 1–10⁸, batch 2–65,536, lr in [1e-8, 1], β in
    [0, 1), weights ≥ 0, mask bounds in [0, 1]), the choices and the cross-field rules (mask_min <
    mask_max, a positive adversarial weight); raises `SkdcgnError` naming the field. `device` and
    `threads` are not part of the stage identity (`_stage_config`)."""

    steps: int = setting(1000, lo=1, hi=10**8, unit="steps", help="generator (and discriminator) updates")
    batch_size: int = setting(16, lo=2, hi=65536, unit="images")
    lr: float = setting(2e-4, lo=1e-8, hi=1.0, unit="per step", help="Adam, generator and discriminator")
    beta1: float = setting(0.5, lo=0.0, hi=0.9999, help="Adam beta1")
    beta2: float = setting(0.999, lo=0.0, hi=0.999999, help="Adam beta2")
    adv_weight: float = setting(1.0, lo=0.0, hi=1e6, help="λ_adv: LSGAN generator loss")
    binary_weight: float = setting(0.3, lo=0.0, hi=1e6, help="λ_bin: binary entropy of the mask (CGN-MNIST: 0.3)")
    mask_prior_weight: float = setting(5.0, lo=0.0, hi=1e6, help="λ_prior: hinge on each image's mean mask")
    mask_min: float = setting(0.1, lo=0.0, hi=1.0, unit="fraction of the image",
                              help="mask-size prior lower bound (binarised MNIST digits cover 9-33% of 32×32)")
    mask_max: float = setting(0.35, lo=0.0, hi=1.0, unit="fraction of the image", help="mask-size prior upper bound")
    texture_weight: float = setting(1.0, lo=0.0, hi=1e6, help="λ_tex: per-class patch statistics of random conv features")
    disc: str = setting("auto", choices=("auto", "linear", "conv"),
                        help="discriminator (auto: conv for wildlife, linear otherwise, as in CGN)")
    ndf: int = setting(0, lo=0, hi=4096, unit="channels", help="discriminator width; 0: 512 (linear) or 32 (conv)")
    ngf: int = setting(32, lo=1, hi=1024, unit="channels", help="teacher width (32 = the released teachers' architecture)")
    init_gain: float = setting(0.2, lo=1e-6, hi=10.0, help="orthogonal init gain of the mechanisms (CGN-MNIST: 0.2)")
    seed: int = setting(0, lo=0, hi=2**62, help="weights, data order, noise")
    data_seed: int = setting(0, lo=0, hi=2**62, help="seed of the variant's build (colour jitter, texture crops)")
    sample_every: int = setting(250, lo=0, hi=10**8, unit="steps", help="grid of samples every N steps (0: never)")
    checkpoint_every: int = setting(250, lo=0, hi=10**8, unit="steps",
                                    help="resumable checkpoint every N steps (and always at the end)")
    log_every: int = setting(25, lo=1, hi=10**8, unit="steps", help="a row of losses.csv every N steps")
    bn_recalibration_batches: int = setting(10, lo=0, hi=10**6, unit="batches of 256",
                                            help="batches for the final BatchNorm statistics")
    device: str = setting("auto", identity=False, help="auto | cpu | cuda[:N]")
    threads: int = setting(0, lo=0, hi=1024, identity=False, unit="threads",
                           help="torch CPU threads for this run; 0: leave PyTorch's default")

    def validate(self) -> None:
        """Check each field's range and choice (`validate_config`) and the cross-field rules;
        raises `SkdcgnError`."""
        validate_config(self)
        if self.mask_min >= self.mask_max:
            raise SkdcgnError(f"mask_min ({self.mask_min}) must be below mask_max ({self.mask_max})")
        if self.adv_weight == 0:
            raise SkdcgnError("adv_weight: must be positive (the adversarial loss is what makes digits)")


# quick (minutes on a 2-core CPU) and full (the CGN paper's MNIST setting): skdcgn/configs/teacher/
PRESETS: dict[str, dict[str, Any]] = load_presets("teacher", TeacherTrainConfig)


def preset_config(name: str = "quick", **overrides: Any) -> TeacherTrainConfig:
    """A preset's config with `overrides` applied (validated: bad values are a one-line error)."""
    return config_from_dict(TeacherTrainConfig, {**preset_values(PRESETS, name), **overrides}, f"preset {name}")


# ---- losses -------------------------------------------------------------------------------------

def binary_entropy(mask: Tensor) -> Tensor:
    """Mean binary entropy of mask pixels (0 at 0 or 1, log 2 at 0.5): pushes masks to 0/1."""
    m = mask.clamp(1e-6, 1 - 1e-6)
    return -(m * m.log() + (1 - m) * (1 - m).log()).mean()


def mask_size_prior(mask: Tensor, lo: float, hi: float) -> Tensor:
    """Squared hinge on each image's mean mask outside [lo, hi]; zero inside."""
    area = mask.flatten(1).mean(1)  # [N]
    return (F.relu(lo - area) ** 2 + F.relu(area - hi) ** 2).mean()


class PatchStatistics(nn.Module):
    """Per-class channel means and Gram matrices of pixels and of a fixed random conv filter bank.

    Layers: pixels [3, 32, 32] → conv 3×3 (3 → 32) + ReLU [32, 32, 32] → avg-pool 2 → conv 3×3
    (32 → 64) + ReLU [64, 16, 16]. Filters are zero-mean, unit-variance Gaussians scaled by
    1/sqrt(fan-in), drawn from `seed`; they are buffers, never trained.
    """

    def __init__(self, seed: int = 0, widths: tuple[int, int] = (32, 64)) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        w1 = torch.randn(widths[0], 3, 3, 3, generator=g)
        w2 = torch.randn(widths[1], widths[0], 3, 3, generator=g)
        self.register_buffer("w1", (w1 - w1.mean((1, 2, 3), keepdim=True)) / math.sqrt(3 * 9), persistent=False)
        self.register_buffer("w2", (w2 - w2.mean((1, 2, 3), keepdim=True)) / math.sqrt(widths[0] * 9), persistent=False)

    def features(self, x: Tensor) -> list[Tensor]:
        """Images [N, 3, 32, 32] in [-1, 1] → [pixels, conv1 [N, 32, 32, 32], conv2 [N, 64, 16, 16]] (ReLU)."""
        h1 = F.relu(F.conv2d(x, self.w1, padding=1))                   # [N, 32, 32, 32]
        h2 = F.relu(F.conv2d(F.avg_pool2d(h1, 2), self.w2, padding=1))  # [N, 64, 16, 16]
        return [x, h1, h2]

    @staticmethod
    def _stats(f: Tensor) -> tuple[Tensor, Tensor]:
        flat = f.flatten(2)                                             # [N, C, HW]
        return flat.mean(2), flat @ flat.transpose(1, 2) / flat.shape[2]  # [N, C], [N, C, C]

    def forward(self, fake: Tensor, real: Tensor, y: Tensor, n_classes: int) -> Tensor:
        """Squared distance of per-class feature statistics, summed over layers, mean over classes."""
        onehot = F.one_hot(y, n_classes).to(fake.dtype)               # [N, K]
        count = onehot.sum(0)                                           # [K]
        present = count > 0
        weight = (onehot / count.clamp(min=1)).t()[present]            # [K', N]: per-class mean
        with torch.no_grad():
            real_feats = self.features(real)
        loss = fake.new_zeros(())
        for ff, fr in zip(self.features(fake), real_feats):
            for sf, sr in zip(self._stats(ff), self._stats(fr)):
                cf, cr = weight @ sf.flatten(1), weight @ sr.flatten(1)  # [K', D]
                loss = loss + (cf - cr).pow(2).mean()
        return loss


class CGNLoss:
    """The CGN-MNIST objective of the module doc behind stylegan2-ada's interface
    (NVlabs/stylegan2-ada-pytorch `training/loss.py`): `accumulate_gradients(phase, ...)` computes
    a phase's loss and backpropagates it; the loop zeroes and steps the optimizers.

    phase "G": composites of the real batch's classes, L_G; returns the detached composites
    [B, 3, 32, 32] and the terms. phase "D": L_D on the real batch and those composites.
    Noise, texture shifts and the discriminator's dropout come from `generator`, in a fixed order,
    so a resumed run draws what an uninterrupted one draws."""

    def __init__(self, cgn: CGN, disc: nn.Module, stats: PatchStatistics, config: TeacherTrainConfig,
                 generator: torch.Generator) -> None:
        self.cgn, self.disc, self.stats, self.config, self.gen = cgn, disc, stats, config, generator

    def accumulate_gradients(self, phase: str, x_real: Tensor, y: Tensor,
                             x_fake: Tensor | None = None) -> dict[str, Tensor]:
        """x_real [B, 3, 32, 32] in [-1, 1], y int64 [B]; `x_fake` (phase "D"): the composites of
        phase "G". Returns {term: 0-d tensor} (phase "G" also "x_fake"). Raises `ValueError` for
        another phase."""
        c, gen = self.config, self.gen
        if phase == "G":
            mask = self.cgn.run_mechanism("shape", y, gen)       # [B, 1, 32, 32]
            fg = self.cgn.run_mechanism("foreground", y, gen)    # [B, 3, 32, 32], shifted
            bg = self.cgn.run_mechanism("background", y, gen)
            x_fake = compose(mask, fg, bg)
            adv = 0.5 * (self.disc(x_fake, y, gen) - 1).pow(2).mean()
            binary = binary_entropy(mask)
            prior = mask_size_prior(mask, c.mask_min, c.mask_max)
            texture = (self.stats(x_fake, x_real, y, self.cgn.n_classes) if c.texture_weight > 0
                       else x_fake.new_zeros(()))
            loss = (c.adv_weight * adv + c.binary_weight * binary + c.mask_prior_weight * prior
                    + c.texture_weight * texture)
            loss.backward()
            return {"loss_g": loss.detach(), "x_fake": x_fake.detach(), "adv": adv.detach(), "binary": binary.detach(),
                    "mask_prior": prior.detach(), "texture": texture.detach(), "mask_mean": mask.detach().mean()}
        if phase == "D":
            d_real = self.disc(x_real, y, gen)
            d_fake = self.disc(x_fake, y, gen)
            loss = 0.5 * ((d_real - 1).pow(2).mean() + d_fake.pow(2).mean())
            loss.backward()
            return {"loss_d": loss.detach(), "d_real": d_real.detach().mean(), "d_fake": d_fake.detach().mean()}
        raise ValueError(f"phase must be 'G' or 'D', not {phase!r}")


# ---- models -------------------------------------------------------------------------------------

def _init_mechanisms(cgn: CGN, gain: float, generator: torch.Generator) -> None:
    """CGN-MNIST init: orthogonal conv/linear weights (gain), zero biases, BN weights ~ N(1, 0.02)."""
    with torch.no_grad():
        for mod in cgn.modules():
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                nn.init.orthogonal_(mod.weight, gain, generator=generator)
                if mod.bias is not None:
                    mod.bias.zero_()
            elif isinstance(mod, nn.BatchNorm2d):
                nn.init.normal_(mod.weight, 1.0, 0.02, generator=generator)
                mod.bias.zero_()
            elif isinstance(mod, nn.Embedding):
                nn.init.normal_(mod.weight, 0.0, 1.0, generator=generator)


def build_models(variant: str, config: TeacherTrainConfig) -> tuple[CGN, CGNDiscriminator]:
    """A fresh CGN (three teacher mechanisms, shared embedding) and its discriminator, seeded."""
    kind = config.disc if config.disc != "auto" else ("conv" if variant == "wildlife" else "linear")
    ndf = config.ndf or (32 if kind == "conv" else 512)
    # Default initialisers use the global RNG: fork it so the caller's RNG state is left as found.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        cgn = CGN(**teacher_mechanisms(ngf=config.ngf))
        disc = CGNDiscriminator(CGNDiscriminatorConfig(kind=kind, ndf=ndf))
    _init_mechanisms(cgn, config.init_gain, torch.Generator().manual_seed(config.seed))
    return cgn, disc


@torch.no_grad()
def recalibrate_batchnorm(cgn: CGN, batches: int, batch_size: int = 256, seed: int = 0) -> CGN:
    """Set every BatchNorm's running statistics to the exact average over `batches` fresh batches
    of uniform classes (train-mode forward passes, no gradient), then switch to eval mode."""
    bns = [m for m in cgn.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if batches <= 0 or not bns:
        return cgn.eval()
    saved = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average: the exact mean over the batches seen
    cgn.train()
    g = torch.Generator().manual_seed(seed)
    for _ in range(batches):
        y = torch.randint(0, cgn.n_classes, (batch_size,), generator=g)
        for name in ("shape", "foreground", "background"):
            cgn.run_mechanism(name, y, g)
    for bn, momentum in zip(bns, saved):
        bn.momentum = momentum
    return cgn.eval()


# ---- data ---------------------------------------------------------------------------------------

def load_train_set(variant: str, data_seed: int = 0) -> tuple[Tensor, Tensor]:
    """The variant's label-tied training split: (uint8 or float images [N, 3, 32, 32], labels [N])."""
    from .data import variants

    loader = getattr(variants, "load_variant_uint8", None) or variants.load_variant  # uint8: 4× less memory
    return loader(variant, "train", seed=data_seed)


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> Tensor:
    """Indices of the batch at `step`: epochs are permutations that depend only on (seed, epoch),
    so resuming needs no data-loader state. The tail of a permutation that does not fill a batch
    is dropped."""
    per_epoch = n // batch_size
    epoch, i = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch + 1))
    return perm[i * batch_size:(i + 1) * batch_size]


# ---- checkpoints --------------------------------------------------------------------------------

CHECKPOINT, PREV_CHECKPOINT = "checkpoint.safetensors", "checkpoint.prev.safetensors"  # skdcgn.checkpoint
LEGACY_CHECKPOINTS = ("checkpoint.pt", "checkpoint.prev.pt")  # skdcgn 0.1.0 (torch.save): refused in one line
TEACHER_STATE = {"step", "variant", "config", "cgn", "disc", "opt_g", "opt_d", "rng"}


def _save_checkpoint(path: Path, state: dict, stage: dict) -> None:
    """Atomically write `state` (`checkpoint.save_checkpoint`); the previous one is kept beside it."""
    if path.exists():
        os.replace(path, path.with_name(PREV_CHECKPOINT))
    save_checkpoint(path, state, stage)


def _load_checkpoint(path: Path) -> dict | None:
    """The newest readable checkpoint (`path`, else its previous copy), or None when there is none.
    NaN or infinite values are refused, not skipped over; a checkpoint of skdcgn 0.1.0 is refused."""
    legacy = [path.with_name(n) for n in LEGACY_CHECKPOINTS if path.with_name(n).is_file()]
    if legacy:
        raise SkdcgnError(f"{legacy[0]}: a checkpoint of skdcgn 0.1.0 (torch.save format), which this version "
                          "does not resume; delete it (or pass --overwrite) to start over")
    errors = []
    for p in (path, path.with_name(PREV_CHECKPOINT)):
        if not p.is_file():
            continue
        try:
            state = load_checkpoint(p, check_values=False)
        except SkdcgnError as e:  # a damaged file: try the older copy
            errors.append(f"{p.name}: {str(e)[len(str(p)) + 2:][:120]}")
            continue
        if TEACHER_STATE <= set(state):
            check_finite(state, str(p))
            return state
        errors.append(f"{p.name}: not a teacher-training checkpoint")
    if errors:
        raise SkdcgnError(f"{path.parent}: no usable checkpoint ({'; '.join(errors)}); delete it to start over")
    return None


def _check_resumable(saved: dict, current: dict, variant: str, saved_variant: str, where: Path) -> None:
    if saved_variant != variant:
        raise SkdcgnError(f"{where}: checkpoint was trained on {saved_variant!r}, not {variant!r}; use another run dir")
    for k, v in current.items():
        if k not in RESUMABLE_FIELDS and saved.get(k) != v:
            raise SkdcgnError(f"{where}: checkpoint has {k}={saved.get(k)!r}, this run asks for {v!r}; "
                              "use another run dir, the same settings, or --overwrite")


# ---- the loop -----------------------------------------------------------------------------------

def _stage_config(variant: str, config: TeacherTrainConfig) -> dict:
    # device and threads are identity=False: results do not depend on where they were computed
    # (up to float noise)
    return {"variant": variant, **identity(config)}


def _write_grids(cgn: CGN, folder: Path, stem: str) -> None:
    from .grids import counterfactual_grids, save_png, stack_grids

    was_training = cgn.training
    cf, mech = counterfactual_grids(cgn.eval(), seed=0)
    cgn.train(was_training)
    if stem == "grid":
        save_png(cf, folder / "grid.png")
        save_png(mech, folder / "grid_mechanisms.png")
    else:
        save_png(stack_grids([cf, mech]), folder / f"{stem}.png")


def train_teacher(variant: str, run_dir: str | os.PathLike, config: TeacherTrainConfig | None = None,
                  progress: bool = True, on_step: Callable[[int], None] | None = None, overwrite: bool = False) -> CGN:
    """Train a CGN teacher on `variant`'s training split; returns it (eval mode).

    Writes `run_dir/teacher/` (see the module doc). A complete stage with the same config is not
    retrained; an interrupted one resumes from its last checkpoint. `on_step(step)` is called
    after each completed step (tests use it to interrupt a run). A checkpoint or finished teacher
    of other settings is refused in one line naming the setting (the finished one is kept), unless
    `overwrite`: then the stage starts over. More `steps` are not other settings: training continues.
    `run_dir/teacher` is locked while training (`io.folder_lock`).
    """
    with folder_lock(Path(run_dir) / STAGE):
        return _train_teacher(variant, run_dir, config, progress, on_step, overwrite)


def _discard_teacher(stage_dir: Path) -> None:
    """Remove what teacher training writes (and nothing else): the start of an overwrite."""
    import shutil

    for name in (CHECKPOINT, PREV_CHECKPOINT, *LEGACY_CHECKPOINTS, "losses.csv", "config.json"):
        (stage_dir / "train" / name).unlink(missing_ok=True)
    shutil.rmtree(stage_dir / "train" / "samples", ignore_errors=True)
    for name in (MANIFEST, "cgn.json", "grid.png", "grid_mechanisms.png"):
        (stage_dir / name).unlink(missing_ok=True)
    for m in ("shape", "foreground", "background"):
        shutil.rmtree(stage_dir / m, ignore_errors=True)


def _train_teacher(variant: str, run_dir: str | os.PathLike, config: TeacherTrainConfig | None,
                   progress: bool, on_step: Callable[[int], None] | None, overwrite: bool = False) -> CGN:
    from tqdm import tqdm

    config = config or preset_config("quick")
    config.validate()
    if variant not in VARIANTS:
        raise SkdcgnError(f"unknown variant {variant!r}; valid: {', '.join(VARIANTS)}")
    stage_dir = Path(run_dir) / STAGE
    train_dir = stage_dir / "train"
    stage_cfg = _stage_config(variant, config)
    if stage_complete(stage_dir, stage_cfg):
        logger.info("%s: already trained with this config; skipping", stage_dir)
        return _load_teacher(stage_dir)
    device = resolve_device(config.device)
    set_threads(config.threads)

    images, labels = load_train_set(variant, config.data_seed)
    if images.ndim != 4 or tuple(images.shape[1:]) != (3, 32, 32) or labels.shape != (images.shape[0],):
        raise SkdcgnError(f"{variant}: expected images [N, 3, 32, 32] and labels [N], got {list(images.shape)}, {list(labels.shape)}")
    if images.shape[0] < config.batch_size:
        raise SkdcgnError(f"batch_size: {config.batch_size} exceeds the {images.shape[0]} training images")

    cgn, disc = build_models(variant, config)
    cgn.to(device).train()
    disc.to(device).train()
    opt_g = torch.optim.Adam(cgn.parameters(), lr=config.lr, betas=(config.beta1, config.beta2))
    opt_d = torch.optim.Adam(disc.parameters(), lr=config.lr, betas=(config.beta1, config.beta2))
    stats = PatchStatistics(seed=config.seed).to(device)
    gen = torch.Generator().manual_seed(config.seed + 1)  # noise, texture shifts, dropout (CPU)
    loss = CGNLoss(cgn, disc, stats, config, gen)

    # Resume, or start afresh. Any manifest goes (once the checkpoint is known to fit): the stage is
    # incomplete until the end.
    ckpt_path = train_dir / CHECKPOINT
    csv_path = train_dir / "losses.csv"
    step = 0
    if overwrite:  # a checkpoint of skdcgn 0.1.0 cannot be resumed: with --overwrite it goes
        for name in LEGACY_CHECKPOINTS:
            (train_dir / name).unlink(missing_ok=True)
    saved = _load_checkpoint(ckpt_path)
    if saved is not None and overwrite:
        try:
            _check_resumable(saved["config"] if isinstance(saved["config"], dict) else {}, dataclasses.asdict(config),
                             variant, saved.get("variant"), ckpt_path)
        except SkdcgnError:  # other settings, and asked to overwrite: start over
            _discard_teacher(stage_dir)
            saved = None
    if saved is not None:
        if not isinstance(saved["config"], dict):
            raise SkdcgnError(f"{ckpt_path}: not a teacher-training checkpoint (no config); delete it to start over")
        _check_resumable(saved["config"], dataclasses.asdict(config), variant, saved.get("variant"), ckpt_path)
        restore(saved, {"cgn": cgn, "disc": disc, "opt_g": opt_g, "opt_d": opt_d, "rng": gen}, ckpt_path)
        with usable_checkpoint(ckpt_path):
            step = int(saved["step"])
        if step < 0:
            raise SkdcgnError(f"{ckpt_path}: checkpoint is at step {step}; delete it to start over")
        if step > config.steps:
            raise SkdcgnError(f"{ckpt_path}: checkpoint is at step {step}, beyond steps={config.steps}; ask for more steps")
        (stage_dir / MANIFEST).unlink(missing_ok=True)
        logger.info("resuming %s from step %d", stage_dir, step)
    else:
        (stage_dir / MANIFEST).unlink(missing_ok=True)
        for stale in (csv_path, csv_path.with_suffix(".jsonl")):  # losses of a run whose checkpoint is gone
            stale.unlink(missing_ok=True)
    losses = MetricsLog(csv_path, LOSS_COLUMNS, "step", resumed_at=step)
    # rows logged after the checkpoint we resume from are written again
    loss_rows = [r for r in losses.read() if isinstance(r.get("step"), int) and r["step"] <= step]
    write_json(train_dir / "config.json", {"variant": variant, **dataclasses.asdict(config)})

    def checkpoint() -> None:
        _save_checkpoint(ckpt_path, {
            "step": step, "variant": variant, "config": dataclasses.asdict(config),
            "cgn": cgn.state_dict(), "disc": disc.state_dict(),
            "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(), "rng": gen.get_state(),
        }, _stage_config(variant, config))

    n = images.shape[0]
    resumed_at = step
    t0 = time.perf_counter()
    bar = tqdm(total=config.steps, initial=step, disable=not progress, desc=f"teacher {variant}", unit="step")
    try:
        while step < config.steps:
            idx = batch_indices(step, n, config.batch_size, config.seed)
            x_real = to_float(images[idx]).to(device)  # [B, 3, 32, 32]
            y = labels[idx].to(device)                  # [B]
            opt_g.zero_grad(set_to_none=True)
            g = loss.accumulate_gradients("G", x_real, y)
            opt_g.step()
            opt_d.zero_grad(set_to_none=True)
            d = loss.accumulate_gradients("D", x_real, y, g["x_fake"])
            opt_d.step()
            step += 1

            if not torch.isfinite(g["loss_g"]) or not torch.isfinite(d["loss_d"]):
                raise SkdcgnError(f"training diverged at step {step} (loss_g {g['loss_g'].item()}, "
                                  f"loss_d {d['loss_d'].item()}); try a smaller lr or another seed")
            if due(step, config.log_every, config.steps):
                row = {"step": step, "seconds": round(time.perf_counter() - t0, 2),
                       **{k: v.item() for k, v in {**d, **g}.items() if k in LOSS_COLUMNS}}
                loss_rows.append({k: row[k] for k in LOSS_COLUMNS})
                losses.write(loss_rows)  # rewritten atomically: a kill never leaves a torn line
                bar.set_postfix(d=f"{row['loss_d']:.3f}", adv=f"{row['adv']:.3f}", tex=f"{row['texture']:.3f}",
                                m=f"{row['mask_mean']:.2f}", refresh=False)
            bar.update(1)
            if config.sample_every and step % config.sample_every == 0:
                _write_grids(cgn, train_dir / "samples", f"step_{step:06d}")
            if config.checkpoint_every and step % config.checkpoint_every == 0 and step < config.steps:
                checkpoint()
            if on_step is not None:
                on_step(step)
    finally:
        bar.close()
        losses.close()
    if step != resumed_at:  # (a run killed during the export resumes at the final step: its checkpoints stay as they are)
        checkpoint()  # the final state: a later run with more steps continues from here
    train_seconds = time.perf_counter() - t0

    # Export: eval-mode teacher with recalibrated BatchNorm statistics, grids, manifest last.
    teacher = recalibrate_batchnorm(copy.deepcopy(cgn).cpu(), config.bn_recalibration_batches, seed=config.seed + 2)
    teacher.save_pretrained(stage_dir)
    _write_grids(teacher, stage_dir, "grid")
    write_manifest(stage_dir, stage_cfg, files=[f"{m}/{f}" for m in ("shape", "foreground", "background")
                                                for f in ("config.json", "model.safetensors")], steps_done=step, train_seconds_this_session=round(train_seconds, 1),
                   parameters=teacher.get_num_params(), discriminator=dataclasses.asdict(disc.config))
    return _load_teacher(stage_dir)


def _load_teacher(stage_dir: Path) -> CGN:
    with torch.random.fork_rng(devices=[]):  # model constructors draw default inits from the global RNG
        return CGN.from_pretrained(stage_dir)
