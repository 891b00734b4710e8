"""Distil each mechanism of a CGN teacher into a student: transfer set -> training -> evaluation.

    distill(teacher_cgn, ["shape", "foreground", "background"], "runs/NAME", DistillConfig())

writes, per mechanism m,

    runs/NAME/transfer/m/                     shards + manifest.json (see query.py)
    runs/NAME/distill/students/m/             config.json + model.safetensors + manifest.json,
                                              checkpoint.safetensors, losses.csv, samples/step_*.png,
                                              snapshots/step_*.safetensors (the student's weights at
                                              each sample step: its learning curve, `evaluate`)
    runs/NAME/distill/eval.json, compare_*.png

Each stage is skipped when its manifest matches the config, and resumes from its checkpoint
when interrupted. Resume is exact: the checkpoint holds the weights of student, discriminator
and EMA, both optimizers, the step and the loss log; the data order and every random draw are
pure functions of (seed, step), so on CPU a resumed run ends with bitwise the same weights.

The same loop serves the ImageNet track (presets `imagenet-128`, `imagenet-256`):
- `online=True` queries the teacher for every batch instead of reading a stored transfer set
  (`query.OnlineTeacher`; same seeded inputs, same quantised targets, nothing on disk);
- under `torchrun` (WORLD_SIZE > 1) it trains data-parallel with DistributedDataParallel: every
  rank takes its contiguous slice of the same seeded global batch (batch_size is global),
  gradients are averaged, rank 0 writes checkpoints, samples, logs and the final student, and
  all ranks resume from rank 0's checkpoint. Results are deterministic for a fixed world size
  (batch-norm statistics are per rank, so they differ from a single-process run). The
  discriminator's step then calls it once on real and fake together (DDP needs one forward per
  backward). Transfer sets are written in parallel too: shard i by rank i % world_size.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
import time
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

from ..checkpoint import load_checkpoint, save_checkpoint
from ..config import (config_from_dict, identity, load_presets, preset_values, resolve_device, set_threads, setting,
                      validate_config)
from ..errors import SkdcgnError
from ..runlog import MetricsLog
from ..training import cosine_scale, due, restore, set_lr, update_ema, usable_checkpoint
from ..hashing import derive_seed
from ..grids import image_grid, save_png, stack_grids
from ..io import (MANIFEST, config_hash, folder_lock, read_json, refuse_other_settings, remove_stale_temporaries,
                  save_tensors, stage_complete, verify_manifest, write_manifest)
from ..models.cgn import MECHANISMS
from ..models.discriminators import DiscriminatorConfig, ProjectionDiscriminator
from ..models.pretrained import load_model
from ..models.students import OUTPUT_NORMS, StudentConfig, StudentGenerator, make_student
from .calibrate import match_noise_scale
from .losses import PIXEL_LOSSES, DistillLoss, LossWeights
from .distributed import barrier, broadcast_state, init_distributed, wrap
from .evaluate import SNAPSHOTS, evaluate_distillation
from .query import SHARD_FORMATS, OnlineTeacher, TransferSet, query_teacher, transfer_config

logger = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.safetensors"  # skdcgn.checkpoint's format
LEGACY_CHECKPOINT = "checkpoint.pt"  # skdcgn 0.1.0: refused with one line
LOG_FIELDS = ("step", "g_loss", "pixel", "adv", "fm", "d_loss", "d_real", "d_fake", "lr_g", "seconds")


@dataclasses.dataclass
class DistillConfig:
    """Settings of a distillation (TinyGAN-style, Chang & Lu, ACCV 2020): transfer set, student and
    discriminator sizes, Adam optimisation, loss weights, bookkeeping. Each field's unit, range and
    help line are its `setting` metadata (shown by `skdcgn distill --help`): counts of samples or
    steps, channels, learning rates per step; `*_interval` fields count steps. `validate()` checks
    every range (counts ≥ 1 up to 10⁷, rates and betas in [0, 1], β₂ and EMA decay < 1) and the
    cross-field rules, and raises `SkdcgnError` naming the field. Presets: `PRESETS` / `preset`
    (YAML files in skdcgn/configs/distill/).

    Stage identity (`config_record`): `device` and `threads` are hashed at their defaults (where a
    student was trained is not what it is: students made with `--threads 1` or `--device cpu` are
    reused by a run without them, and manifests written with the defaults keep their hash); the
    ImageNet-track fields only when they differ from their defaults, so CGN-MNIST runs made before
    they existed are still recognised.
    """

    # transfer set
    n_transfer: int = setting(20_000, lo=1, hi=10_000_000, unit="samples", help="teacher queries per mechanism")
    shard_size: int = setting(5_000, lo=1, hi=10_000_000, unit="samples", help="samples per transfer-set shard")
    u_dtype: str = setting("float32", choices=("float32", "float16"), help="how the noise u is stored")
    # student and discriminator
    student_widths: tuple[int, ...] = setting((16, 48, 32), unit="channels", help="student channels at 4, 8, 16 px")
    student_extra_blocks: int = setting(1, lo=0, hi=16, unit="blocks", help="extra residual blocks of the student")
    student_embed_dim: int = setting(16, lo=1, hi=4096, unit="dims", help="class embedding size of the student")
    shape_widths: tuple[int, ...] = setting((), identity="changed", unit="channels",
                                            help="the shape student's own channels at 4, 8, 16 px (none given: those of --student-widths)")
    shape_extra_blocks: int = setting(-1, lo=-1, hi=16, identity="changed", unit="blocks",
                                      help="the shape student's own extra residual blocks (-1: as --student-extra-blocks)")
    shape_output_norm: str = setting("none", choices=OUTPUT_NORMS, identity="changed",
                                     help="shape student's logits: 'instance' normalises them per image (as the teacher's last layer)")
    shape_noise_scale: float = setting(1.0, lo=0.0, hi=100.0, identity="changed",
                                       help="the shape student reads s·u (s > 1: more varied shapes); 0: s fitted after training "
                                            "so its masks vary as much as the teacher's (distill.calibrate, on the transfer set)")
    disc_widths: tuple[int, ...] = setting((8, 16, 32), unit="channels", help="discriminator channels")
    # optimisation (TinyGAN: Adam, betas (0, 0.9))
    steps: int = setting(3_000, lo=1, hi=10_000_000, unit="steps", help="training steps of the shape student")
    texture_steps: int = setting(1_500, lo=0, hi=10_000_000, unit="steps",
                                 help="training steps of each texture student (their mapping is simpler); 0: same as steps")
    batch_size: int = setting(64, lo=1, hi=65_536, unit="samples")
    lr_g: float = setting(2e-3, lo=0.0, hi=1.0, unit="per step", help="student (generator) learning rate")
    lr_d: float = setting(4e-4, lo=0.0, hi=1.0, unit="per step", help="discriminator learning rate")
    beta1: float = setting(0.0, lo=0.0, hi=1.0, help="Adam beta1")
    beta2: float = setting(0.9, lo=0.0, hi=1.0, hi_open=True, help="Adam beta2")
    cosine_decay: bool = setting(True, help="learning rates decay to 0 along a cosine")
    ema_decay: float = setting(0.0, lo=0.0, hi=1.0, hi_open=True, help="EMA copy of the student; 0: none")
    # loss weights (0 switches a term off; see losses.py)
    pixel_weight: float = setting(1.0, lo=0.0, hi=1e4, help="weight of the pixel loss")
    adversarial_weight: float = setting(0.01, lo=0.0, hi=1e4, help="weight of the adversarial loss")
    feature_matching_weight: float = setting(0.1, lo=0.0, hi=1e4, help="weight of the feature-matching loss")
    mask_loss: str = setting("bce", choices=PIXEL_LOSSES, help="pixel loss of the shape student")
    adv_start: float = setting(0.75, lo=0.0, hi=1.0, unit="fraction of steps",
                               help="steps trained on the pixel loss alone before D joins (0: from the start)")
    # bookkeeping
    seed: int = setting(0, lo=0, hi=2**62)
    eval_seed: int = setting(1_000_003, lo=0, hi=2**62, help="held-out (u, y) for evaluation, never in a transfer set")
    n_eval: int = setting(2_000, lo=1, hi=1_000_000, unit="samples", help="held-out samples for evaluation")
    log_interval: int = setting(50, lo=1, hi=10_000_000, unit="steps")
    sample_interval: int = setting(500, lo=1, hi=10_000_000, unit="steps")
    checkpoint_interval: int = setting(200, lo=1, hi=10_000_000, unit="steps")
    benchmark: bool = setting(True, help="measure composites/s of teacher and students after distilling")
    device: str = setting("auto", identity="default", help="auto | cpu | cuda[:N]")
    threads: int = setting(0, lo=0, hi=1024, identity="default", unit="threads",
                           help="CPU threads for torch (0: leave torch's setting); 1 is fastest on a crowded machine")
    bf16: bool = setting(False, help="bf16 autocast (CUDA only)")
    # ImageNet track (defaults: the CGN-MNIST behaviour; left out of stage hashes while at their defaults)
    student_image_size: int = setting(32, identity="changed", unit="px",
                                      help="student output side: 32, 128 or 256 (must match the teacher's)")
    shifted_texture: bool = setting(True, identity="changed",
                                    help="texture students shifted at composition (CGN-MNIST); false for ImageNet")
    online: bool = setting(False, identity="changed",
                           help="query the teacher during training instead of storing a transfer set")
    query_batch_size: int = setting(1000, lo=1, hi=65_536, identity="changed", unit="samples",
                                    help="teacher batch when writing a transfer set")
    shard_format: str = setting("safetensors", choices=SHARD_FORMATS, identity="changed",
                                help="tar: WebDataset-style PNG shards, for large sets")
    stream_window: int = setting(0, lo=0, hi=100_000, identity="changed", unit="shards",
                                 help="0: the transfer set in memory; k: stream it, k shards shuffled at a time")

    def validate(self) -> None:
        """Check every field's range and choice (`validate_config`) and the cross-field rules (a
        batch no larger than a stored transfer set, bf16 only on CUDA, the student and
        discriminator it describes); raises `SkdcgnError`."""
        validate_config(self)
        if self.batch_size > self.n_transfer and not self.online:
            raise SkdcgnError(f"batch_size: {self.batch_size} is larger than n_transfer ({self.n_transfer})")
        self.loss_weights().validate()
        for mechanism, field in (("shape", "shape_widths" if self.shape_widths else "student_widths"),
                                 ("foreground", "student_widths")):
            try:
                self.student_config(mechanism).validate()
            except SkdcgnError as e:  # name the option that set the widths: a shape student's may be its own
                text = str(e)
                raise SkdcgnError(f"{field}: {text[len('widths: '):]}" if text.startswith("widths: ") else text) from None
        DiscriminatorConfig(1, 10, tuple(self.disc_widths)).validate()
        if self.bf16 and not self.device.startswith(("cuda", "auto")):
            raise SkdcgnError("bf16: autocast is only used on CUDA; set device to auto or cuda")

    def steps_for(self, mechanism: str) -> int:
        """Training steps of `mechanism`'s student: `steps` for the shape, `texture_steps` (when > 0) for textures."""
        return self.texture_steps if mechanism != "shape" and self.texture_steps > 0 else self.steps

    def loss_weights(self) -> LossWeights:
        """The loss terms' weights and the mask loss (`losses.LossWeights`)."""
        return LossWeights(self.pixel_weight, self.adversarial_weight, self.feature_matching_weight, self.mask_loss)

    def student_config(self, mechanism: str, n_classes: int = 10, latent_dim: int = 32) -> StudentConfig:
        """The validated `StudentConfig` of `mechanism`'s student for a teacher of `n_classes`
        classes and `latent_dim`-dimensional noise: `student_*` sizes, and for the shape student
        `shape_widths` / `shape_extra_blocks` / `shape_output_norm` where set (the mask is where
        the students lose accuracy: issue #20, docs/shape_students.md)."""
        extra = {"image_size": self.student_image_size} if self.student_image_size != 32 else {}
        shape = mechanism == "shape"
        cfg = StudentConfig(mechanism=mechanism, n_classes=n_classes, latent_dim=latent_dim,
                            embed_dim=self.student_embed_dim,
                            widths=tuple(self.shape_widths if shape and self.shape_widths else self.student_widths),
                            extra_blocks=(self.shape_extra_blocks if shape and self.shape_extra_blocks >= 0
                                          else self.student_extra_blocks),
                            output_norm=self.shape_output_norm if mechanism == "shape" else "none",
                            shifted_texture=mechanism != "shape" and self.shifted_texture, **extra)
        cfg.validate()
        return cfg


# quick (the smoke run), default, long (GPU minutes, CPU overnight), tiny (unit tests), imagenet-256/-128 (GPUs under torchrun), imagenet-tiny:
# one YAML file each in skdcgn/configs/distill/, with what it is for
PRESETS: dict[str, dict] = load_presets("distill", DistillConfig)


def config_record(config: DistillConfig) -> dict:
    """The config as hashed into stage manifests (`config.identity`): the ImageNet-track fields
    only when they differ from their defaults, so CGN-MNIST runs made before they existed are still
    recognised, and the placement fields (device, threads) at their defaults."""
    return identity(config)


def preset(name: str, **overrides) -> DistillConfig:
    """The validated `DistillConfig` of preset `name` (`PRESETS`) with `overrides`; raises
    `SkdcgnError` for an unknown preset or a bad value."""
    return config_from_dict(DistillConfig, {**preset_values(PRESETS, name), **overrides}, f"preset {name}")


# ---- the pipeline -------------------------------------------------------------------------------

def distill(teacher_cgn: nn.Module, mechanisms: list[str] | tuple[str, ...], run_dir: str | os.PathLike,
            config: DistillConfig, progress: bool = True, evaluate: bool = True, overwrite: bool = False) -> dict:
    """Transfer set, student and evaluation for each mechanism; returns the evaluation dict.

    A student that is finished (its manifest matches and verifies) is skipped without reading
    its transfer set, which may then be gone. overwrite: replace transfer sets and students made
    with other settings (otherwise such a folder is a one-line SkdcgnError naming the first
    difference). Raises SkdcgnError for bad settings or bad files.
    """
    config.validate()
    for m in mechanisms:
        if m not in MECHANISMS:
            raise SkdcgnError(f"mechanism: {m!r} is not one of {', '.join(MECHANISMS)}")
    run_dir = Path(run_dir)
    env, device = init_distributed(resolve_device(config.device))
    set_threads(config.threads)
    teacher_cgn = teacher_cgn.to(device).eval()
    timings = {}
    for m in mechanisms:
        mech = teacher_cgn.mechanisms()[m]
        t0 = time.perf_counter()
        student_dir = run_dir / "distill" / "students" / m
        if not config.online:  # a finished student needs its transfer set no more
            tcfg = transfer_config(mech, config.n_transfer, config.shard_size,
                                   derive_seed(config.seed, MECHANISMS.index(m)), u_dtype=config.u_dtype,
                                   latent_dim=mech.config.latent_dim, n_classes=mech.config.n_classes, device=device,
                                   shard_format=config.shard_format)
            if stage_complete(student_dir, student_stage(m, config, tcfg, env), verify=False):
                try:
                    verify_manifest(student_dir)
                    continue
                except SkdcgnError:
                    pass  # train_student says which file changed, and regenerates it
        source: TransferSet | OnlineTeacher
        if config.online:
            source = OnlineTeacher(mech, mech.config.latent_dim, mech.config.n_classes, device=device)
        else:
            folder = query_teacher(mech, run_dir / "transfer" / m, config.n_transfer, config.shard_size,
                                   derive_seed(config.seed, MECHANISMS.index(m)), u_dtype=config.u_dtype,
                                   latent_dim=mech.config.latent_dim, n_classes=mech.config.n_classes,
                                   device=device, progress=progress and env.is_main,
                                   batch_size=config.query_batch_size, rank=env.rank, world_size=env.world_size,
                                   shard_format=config.shard_format, overwrite=overwrite)
            source = TransferSet(folder, stream_window=config.stream_window)
        t1 = time.perf_counter()
        manifest = student_dir / MANIFEST
        before = manifest.stat().st_mtime_ns if manifest.is_file() else None
        train_student(m, source, student_dir, config, progress=progress, overwrite=overwrite)
        if not manifest.is_file() or manifest.stat().st_mtime_ns != before:  # trained now, not a reused student
            timings[m] = {"query_s": round(t1 - t0, 2), "train_s": round(time.perf_counter() - t1, 2)}
    if not evaluate or not env.is_main:
        return {}
    with folder_lock(run_dir / "distill"):
        result = evaluate_distillation(teacher_cgn, run_dir, config, mechanisms, timings=timings)
        remove_stale_temporaries(run_dir / "distill", depth=0)  # eval.json and grids of a killed evaluation
    return result


def student_stage(mechanism: str, config: DistillConfig, transfer_cfg: dict, env=None) -> dict:
    """What a student is (hashed into its manifest): mechanism, distillation config, transfer set
    (and the world size of a data-parallel run, which is deterministic only for a fixed one)."""
    stage = {"mechanism": mechanism, "distill": config_record(config), "transfer": config_hash(transfer_cfg)}
    if env is not None and env.enabled:
        stage["world_size"] = env.world_size
    return stage


def train_student(mechanism: str, transfer: TransferSet | OnlineTeacher, out_dir: str | os.PathLike,
                  config: DistillConfig, progress: bool = True, stop_after: int | None = None,
                  overwrite: bool = False) -> StudentGenerator | None:
    """Train (or resume, or skip) one student; `stop_after` ends early as a kill would (tests).

    `transfer` is a stored transfer set or an `OnlineTeacher`. Under torchrun every rank calls
    this; each returns the same final student. overwrite: replace a student (finished, or its
    checkpoint) made with other settings; without it such a folder is refused in one line naming
    the first difference (`io.refuse_other_settings`): a checkpoint is never discarded silently.
    A single process holds `out_dir`'s lock (`io.folder_lock`) while it trains.
    Raises SkdcgnError for bad settings, an unusable checkpoint or a folder of other settings.
    """
    env, _ = init_distributed(resolve_device(config.device))
    if env.enabled:  # the ranks write one folder together (rank 0 its files)
        return _train_student(mechanism, transfer, Path(out_dir), config, progress, stop_after, overwrite)
    with folder_lock(out_dir):
        return _train_student(mechanism, transfer, Path(out_dir), config, progress, stop_after, overwrite)


def _train_student(mechanism: str, transfer: TransferSet | OnlineTeacher, out_dir: Path, config: DistillConfig,
                   progress: bool, stop_after: int | None, overwrite: bool) -> StudentGenerator | None:
    tcfg = transfer.config
    env, device = init_distributed(resolve_device(config.device))
    stage = student_stage(mechanism, config, tcfg, env)
    if env.enabled and config.batch_size % env.world_size:
        raise SkdcgnError(f"batch_size: {config.batch_size} (global) is not divisible by WORLD_SIZE={env.world_size}")
    if stage_complete(out_dir, stage):
        return load_model(out_dir)  # type: ignore[return-value]
    ckpt = out_dir / CHECKPOINT
    if (out_dir / LEGACY_CHECKPOINT).is_file() and not overwrite:
        _load_checkpoint(out_dir / LEGACY_CHECKPOINT)  # refuses, naming it
    state = _load_checkpoint(ckpt) if ckpt.is_file() else None
    if (out_dir / MANIFEST).is_file():
        recorded = read_json(out_dir / MANIFEST).get("config")
    else:
        recorded = None if state is None else state["stage"]
    if recorded is not None and not isinstance(recorded, dict):
        recorded = {}  # a malformed record: other settings
    if refuse_other_settings(out_dir, f"a {mechanism} student", recorded, stage, overwrite):
        if env.is_main:  # (rank 0 writes the folder; the others wait for it)
            for name in (MANIFEST, CHECKPOINT, LEGACY_CHECKPOINT, "losses.csv", "model.safetensors", "config.json"):
                (out_dir / name).unlink(missing_ok=True)
            for old in [*(out_dir / "samples").glob("step_*.png"), *(out_dir / SNAPSHOTS).glob("step_*.safetensors")]:
                old.unlink()
        barrier(env)
        state = None
    n_steps = config.steps_for(mechanism)
    is_mask = mechanism == "shape"
    progress = progress and env.is_main
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if config.bf16 and device.type == "cuda"
                else contextlib.nullcontext())
    loss_fn = DistillLoss(config.loss_weights(), is_mask, autocast)
    student_cfg = config.student_config(mechanism, int(tcfg["n_classes"]), int(tcfg["latent_dim"]))

    torch.manual_seed(derive_seed(config.seed, MECHANISMS.index(mechanism), 1))  # weight init (and spectral norm's u)
    G = make_student(student_cfg).to(device)
    D = None
    if loss_fn.uses_discriminator:
        D = ProjectionDiscriminator(DiscriminatorConfig(1 if is_mask else 3, student_cfg.n_classes,
                                                        tuple(config.disc_widths))).to(device)
    ema = copy.deepcopy(G).eval().requires_grad_(False) if config.ema_decay > 0 else None
    betas = (config.beta1, config.beta2)
    opt_g = torch.optim.Adam(G.parameters(), lr=config.lr_g, betas=betas)
    opt_d = torch.optim.Adam(D.parameters(), lr=config.lr_d, betas=betas) if D is not None else None
    if env.enabled:  # gradients averaged in backward; the student's logits are its DDP "forward"
        forward_g: nn.Module = wrap(_Logits(G), env, device)
        D_ddp = wrap(D, env, device) if D is not None else None
    else:
        forward_g, D_ddp = G.pre_activation, None  # type: ignore[assignment]

    step, rows, elapsed = 0, [], 0.0
    logs: dict[str, float] = {}
    if state is not None and state.get("stage_hash") == config_hash(stage):
        with usable_checkpoint(ckpt, "delete it to start this mechanism over"):
            step, rows, elapsed = int(state["step"]), [list(r) for r in state["rows"]], float(state["elapsed"])
            logs = {str(k): float(v) for k, v in state.get("logs", {}).items()}  # the last step's losses
            if not 0 <= step <= n_steps:
                raise ValueError(f"step {step} is outside [0, {n_steps}]")
        restore(state, {"G": G, "opt_g": opt_g, "D": D, "opt_d": opt_d, "ema": ema}, ckpt,
                "delete it to start this mechanism over")

    fixed = torch.arange(min(16, len(transfer)))  # the same teacher samples in every grid
    data_seed = derive_seed(config.seed, MECHANISMS.index(mechanism), 2)
    losses = MetricsLog(out_dir / "losses.csv", LOG_FIELDS, "step", resumed_at=step)
    bar = tqdm(total=n_steps, initial=step, desc=f"distill {mechanism}", disable=not progress, unit="step")
    t_start = time.perf_counter() - elapsed
    while step < n_steps:
        lr_scale = cosine_scale(step, n_steps) if config.cosine_decay else 1.0
        set_lr(opt_g, config.lr_g * lr_scale)
        set_lr(opt_d, config.lr_d * lr_scale)
        u, y, real = (t.to(device) for t in transfer.batch(step, config.batch_size, data_seed, env.part))
        G.train()
        with loss_fn.autocast:
            logits = forward_g(u, y)                                  # [B, C, S, S]
            fake = G.activate(logits)
        logs = {}
        adversarial = D is not None and step >= int(config.adv_start * n_steps)
        if adversarial:
            opt_d.zero_grad(set_to_none=True)  # type: ignore[union-attr]
            logs.update(loss_fn.accumulate_gradients("D", D if D_ddp is None else D_ddp, real, fake, y,
                                                     fused=D_ddp is not None))
            opt_d.step()  # type: ignore[union-attr]
        opt_g.zero_grad(set_to_none=True)
        logs.update(loss_fn.accumulate_gradients("G", D if adversarial else None, real, fake, y, logits=logits))
        opt_g.step()
        update_ema(ema, G, config.ema_decay)
        step += 1
        bar.update(1)
        if due(step, config.log_interval, n_steps):
            rows.append([float(step), *(float(logs.get(k, float("nan"))) for k in LOG_FIELDS[1:-2]),
                         config.lr_g * lr_scale, round(time.perf_counter() - t_start, 3)])
            bar.set_postfix({k: f"{v:.4f}" for k, v in logs.items() if k in ("pixel", "d_loss")})
        if env.is_main and due(step, config.sample_interval, n_steps):
            _save_samples(ema or G, transfer, fixed, out_dir / "samples" / f"step_{step:07d}.png", device, is_mask)
            save_tensors(out_dir / SNAPSHOTS / f"step_{step:07d}.safetensors",
                         {k: v.detach().cpu().contiguous() for k, v in (ema or G).state_dict().items()})
        if due(step, config.checkpoint_interval, n_steps):
            if env.is_main:
                _save_checkpoint(ckpt, stage, step, rows, time.perf_counter() - t_start, G, D, ema, opt_g, opt_d, logs)
                _write_log(losses, rows)
            barrier(env)
        if stop_after is not None and step >= stop_after and step < n_steps:
            bar.close()
            losses.close()
            return None
    bar.close()
    losses.close()
    final = (ema or G).eval()
    broadcast_state(final, env)  # batch-norm statistics are per rank: every rank ends with rank 0's
    if is_mask and config.shape_noise_scale != 1.0:  # set after training: the training itself is unchanged
        final.config.noise_scale = config.shape_noise_scale or calibrated_noise_scale(final, transfer)  # every rank
    if env.is_main:
        final.save_pretrained(out_dir)
        _write_log(losses, rows)
        write_manifest(out_dir, stage, files=("config.json", "model.safetensors"), params=final.get_num_params(), steps=step,
                       train_seconds=round(time.perf_counter() - t_start, 2),
                       final_losses={k: v for k, v in logs.items()})
    barrier(env)
    return final


CALIBRATION_MASKS = 10_000  # transfer-set masks the noise scale is fitted on: diversity to about ±0.5%


def calibrated_noise_scale(student: StudentGenerator, transfer: TransferSet | OnlineTeacher) -> float:
    """The noise scale `--shape-noise-scale 0` gives a trained shape student:
    `calibrate.match_noise_scale` on the first `CALIBRATION_MASKS` samples of its transfer set (the
    teacher's outputs it was trained on: no new query of a stored set). Returns s in [1, 2]."""
    u, y, masks = transfer.sample(torch.arange(min(len(transfer), CALIBRATION_MASKS)))
    scale = match_noise_scale(student, u.float(), y.long(), masks)
    logger.info("shape student: noise scale %.4f matches the teacher's mask diversity", scale)
    return scale


class _Logits(nn.Module):
    """DDP wraps a module's forward; a student's forward applies the activation, this one does not."""

    def __init__(self, G: StudentGenerator) -> None:
        super().__init__()
        self.G = G

    def forward(self, u: Tensor, y: Tensor) -> Tensor:
        return self.G.pre_activation(u, y)


# ---- helpers ------------------------------------------------------------------------------------

def _save_checkpoint(path: Path, stage: dict, step: int, rows: list, elapsed: float, G: nn.Module,
                     D: nn.Module | None, ema: nn.Module | None, opt_g, opt_d, logs: dict[str, float]) -> None:
    state = {"step": step, "rows": rows, "elapsed": elapsed, "logs": {k: float(v) for k, v in logs.items()},
             "G": G.state_dict(), "opt_g": opt_g.state_dict()}
    if D is not None:
        state["D"], state["opt_d"] = D.state_dict(), opt_d.state_dict()
    if ema is not None:
        state["ema"] = ema.state_dict()
    save_checkpoint(path, state, stage)


def _load_checkpoint(path: Path) -> dict:
    """The training state at `path` (`checkpoint.load_checkpoint`: stage and its hash included);
    a checkpoint of skdcgn 0.1.0 (`checkpoint.pt`, a torch.save pickle) is refused in one line."""
    if path.name == LEGACY_CHECKPOINT:
        raise SkdcgnError(f"{path}: a checkpoint of skdcgn 0.1.0 (torch.save format), which this version does "
                          "not resume; delete it to start this mechanism over")
    state = load_checkpoint(path)
    if "step" not in state:
        raise SkdcgnError(f"{path}: not a distillation checkpoint; delete it to start this mechanism over")
    return state


def _write_log(losses: MetricsLog, rows: list) -> None:
    """The losses so far (rows of LOG_FIELDS values) through the one metrics writer (CSV + JSONL)."""
    losses.write([{"step": int(r[0]), **dict(zip(LOG_FIELDS[1:], r[1:]))} for r in rows])


@torch.no_grad()
def _save_samples(G: StudentGenerator, transfer: TransferSet, index: Tensor, path: Path, device, is_mask: bool) -> None:
    was_training = G.training
    G.eval()
    u, y, teacher = transfer.sample(index)
    student = G(u.to(device), y.to(device)).float().cpu()
    G.train(was_training)
    save_png(stack_grids([image_grid(teacher, 4, title="teacher"), image_grid(student, 4, title="student")]), path)
