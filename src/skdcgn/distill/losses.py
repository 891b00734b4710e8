"""The TinyGAN distillation objective, behind one interface so the training loop stays generic.

For a batch of teacher inputs (u, y) and the teacher's outputs `real` for them:

- pixel: the student's output vs the teacher's for the *same* (u, y). Textures: L1. Masks: binary
  cross-entropy on the student's logits (default) or L1. The teacher's masks are nearly binary
  (~93% of pixels at 1e-4 or 0.9999), so they behave like per-pixel targets of a classifier; BCE
  on logits has the gradient (p − t), which does not vanish where the sigmoid saturates on the
  wrong side (L1's gradient through a saturated sigmoid does), and it sharpens edges.
- adversarial (hinge): a projection discriminator D sees teacher outputs as real and student
  outputs as fake; D minimises E[relu(1 − D(real))] + E[relu(1 + D(fake))], the student −E[D(fake)].
- feature matching: L1 between D's intermediate activations for the student's and the
  teacher's output of the same (u, y) (TinyGAN's "feature-level distillation").

A weight of 0 switches a term off; with adversarial and feature-matching weights both 0, no
discriminator is built or trained.
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import setting, validate_config
from ..errors import SkdcgnError

PIXEL_LOSSES = ("l1", "bce")


@dataclasses.dataclass
class LossWeights:
    """Weights of the distillation loss terms (TinyGAN, Chang & Lu, ACCV 2020); 0 switches a term off.

    Fields:
        pixel: weight of the pixel term (L1, or BCE on logits for masks), in [0, 10000].
        adversarial: weight of the student's hinge adversarial term, in [0, 10000].
        feature_matching: weight of the discriminator feature-matching L1 term, in [0, 10000].
        mask_loss: pixel loss of the shape mechanism, "bce" or "l1" (textures always use L1).
    At least one weight must be positive.
    """
    pixel: float = setting(1.0, lo=0.0, hi=1e4)
    adversarial: float = setting(0.01, lo=0.0, hi=1e4)
    feature_matching: float = setting(0.1, lo=0.0, hi=1e4)
    mask_loss: str = setting("bce", choices=PIXEL_LOSSES, help="for the shape mechanism (textures always use L1)")

    def validate(self) -> None:
        """Check the weights and `mask_loss` (`validate_config`); raises `SkdcgnError` for a value out of range or all weights 0."""
        validate_config(self)
        if self.pixel == self.adversarial == self.feature_matching == 0:
            raise SkdcgnError("pixel_weight: all loss weights are 0; nothing to learn")


class DistillLoss:
    """The distillation objective of one mechanism. The training loop calls
    `accumulate_gradients(phase, ...)` (stylegan2-ada's interface, NVlabs/stylegan2-ada-pytorch
    `training/loss.py`): "D" for the discriminator's hinge loss, "G" for the student's loss; each
    computes its loss (under `autocast`, e.g. bf16 on CUDA) and calls backward, and the loop zeroes
    and steps the optimizers. `discriminator_loss` and `generator_loss` return (loss, logs)."""

    def __init__(self, weights: LossWeights, is_mask: bool,
                 autocast: contextlib.AbstractContextManager | None = None) -> None:
        weights.validate()
        self.w = weights
        self.is_mask = is_mask
        self.autocast = autocast or contextlib.nullcontext()

    def accumulate_gradients(self, phase: str, disc: nn.Module | None, real: Tensor, fake: Tensor, y: Tensor,
                             logits: Tensor | None = None, fused: bool = False) -> dict[str, float]:
        """Backpropagate one phase's loss and return its logs ({name: value}).

        phase "D": the hinge loss of `disc` on the teacher's outputs `real` [B, C, S, S] against the
        student's `fake` (detached here: only D learns); D's parameters require gradients for the
        phase only. `fused`: one call of D on both (DDP, see `discriminator_loss`).
        phase "G": the student's loss (`generator_loss`) from its pre-activation `logits` and
        `fake` = activation(logits); `disc` None: the pixel term alone. Raises `ValueError` for
        another phase.
        """
        if phase == "D":
            disc.requires_grad_(True)
            with self.autocast:
                loss, logs = self.discriminator_loss(disc, real, fake.detach(), y, fused=fused)
            loss.backward()
            disc.requires_grad_(False)  # the student's phase does not need D's gradients
            return logs
        if phase == "G":
            with self.autocast:
                loss, logs = self.generator_loss(disc, logits, fake, real, y)
            loss.backward()
            return logs
        raise ValueError(f"phase must be 'D' or 'G', not {phase!r}")

    @property
    def uses_discriminator(self) -> bool:
        """Whether a discriminator is needed (adversarial or feature-matching weight > 0)."""
        return self.w.adversarial > 0 or self.w.feature_matching > 0

    def discriminator_loss(self, disc: nn.Module, real: Tensor, fake: Tensor, y: Tensor,
                           fused: bool = False) -> tuple[Tensor, dict[str, float]]:
        """Hinge loss; `fake` must be detached from the student's graph.

        `fused`: one call of `disc` on real and fake together (what DistributedDataParallel
        needs: one forward per backward); the same loss up to spectral norm's power iteration,
        which then runs once per step instead of twice.
        """
        if fused:
            logits, _ = disc(torch.cat([real, fake.to(real.dtype)]), torch.cat([y, y]))
            logits_real, logits_fake = logits[:len(real)], logits[len(real):]
        else:
            logits_real, _ = disc(real, y)
            logits_fake, _ = disc(fake, y)
        loss_real = F.relu(1.0 - logits_real).mean()
        loss_fake = F.relu(1.0 + logits_fake).mean()
        loss = loss_real + loss_fake
        return loss, {"d_loss": loss.item(), "d_real": logits_real.mean().item(), "d_fake": logits_fake.mean().item()}

    def generator_loss(self, disc: nn.Module | None, logits: Tensor, fake: Tensor, real: Tensor,
                       y: Tensor) -> tuple[Tensor, dict[str, float]]:
        """The student's loss: `logits` before the output activation, `fake` = activation(logits).

        With `disc` None only the pixel term is used (the trainer's pixel-only warm-up phase).
        """
        logs: dict[str, float] = {}
        total = torch.zeros((), device=fake.device)
        if self.w.pixel > 0:
            if self.is_mask and self.w.mask_loss == "bce":
                pixel = F.binary_cross_entropy_with_logits(logits.float(), real.float())
            else:
                pixel = F.l1_loss(fake.float(), real.float())
            total = total + self.w.pixel * pixel
            logs["pixel"] = pixel.item()
        if self.uses_discriminator and disc is not None:  # None: a pixel-only phase
            logits_fake, feats_fake = disc(fake, y)
            if self.w.adversarial > 0:
                adv = -logits_fake.float().mean()
                total = total + self.w.adversarial * adv
                logs["adv"] = adv.item()
            if self.w.feature_matching > 0:
                with torch.no_grad():
                    _, feats_real = disc(real, y)
                fm = sum(F.l1_loss(a.float(), b.float()) for a, b in zip(feats_fake, feats_real)) / len(feats_fake)
                total = total + self.w.feature_matching * fm
                logs["fm"] = float(fm.detach())
        logs["g_loss"] = total.item()
        return total, logs
