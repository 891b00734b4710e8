"""The teacher's label noise, found without real images: confident learning on a counterfactual set.

A CGN's shape mechanism sometimes draws a mask that does not read as the class it was asked for
(the project's mask-health table reads the shipped teachers' masks as their digit about 89% of the
time; classes 6 and 8 about 64%). Every composite made from such a mask carries a wrong label.
This module finds those masks with nothing but the generated dataset and classifiers trained on
it, after Confident Learning (Northcutt, Jiang & Chuang, "Confident Learning: Estimating
Uncertainty in Dataset Labels", JAIR 2021):

1. the masks (a dataset's groups of `per_shape` consecutive composites) are split into `folds`
   seeded folds, so that no mask is seen by the classifier that scores it;
2. per fold, a classifier (`invariance.train_classifier`, resumable) trains on the other folds and
   gives the held-out composites' softmax probabilities;
3. a mask's probabilities are the mean over its composites (textures and backgrounds vary, the
   shape does not): p[g] in the simplex over K classes;
4. per-class thresholds t_j = mean of p[g, j] over the masks labelled j (the class's average
   self-confidence);
5. a mask is a label issue when, among the classes whose probability reaches their threshold,
   the most probable is not its label (an off-diagonal entry of the confident joint);
6. the dataset is written again without the composites of those masks (`filter_labels`).

Out of a folder `out`: `folds/<k>/` (the fold classifiers), `scores.safetensors` (per mask: label,
probabilities, issue flag), `flagged.png` (the first flagged masks' composites, each with
its label and the class it is read as), the filtered shards, and `manifest.json` last. The result is a dataset like any
other (`counterfactuals.load_image_dataset`, `skdcgn classify train --data`).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from pathlib import Path

import torch
from torch import Tensor

from .config import identity
from .counterfactuals import SHARD_PATTERN, load_image_dataset
from .errors import SkdcgnError
from .grids import image_grid, save_png
from .hashing import derive_seed
from .images import to_float
from .invariance import ClassifierConfig, data_hash, probabilities, train_classifier
from .io import (MANIFEST, folder_lock, read_json, refuse_other_settings, save_tensors, sha256_file, stage_complete,
                 write_manifest)

logger = logging.getLogger(__name__)

SCORES = "scores.safetensors"
FLAGGED = "flagged.png"


def mask_groups(n: int, per_shape: int) -> Tensor:
    """Group index int64 [n] of each composite: `per_shape` consecutive composites share a mask
    (the layout `counterfactuals.generate_counterfactuals` writes; the last group may be short)."""
    if per_shape < 1:
        raise SkdcgnError(f"per_shape: expected ≥ 1, got {per_shape}")
    return torch.arange(n) // per_shape


def fold_of_groups(n_groups: int, folds: int, seed: int) -> Tensor:
    """Fold int64 [n_groups] in [0, folds) of each mask: a seeded permutation dealt round-robin, so
    folds differ in size by at most one mask."""
    perm = torch.randperm(n_groups, generator=torch.Generator().manual_seed(derive_seed(seed, "folds")))
    fold = torch.empty(n_groups, dtype=torch.int64)
    fold[perm] = torch.arange(n_groups) % folds
    return fold


def group_mean(values: Tensor, groups: Tensor, n_groups: int) -> Tensor:
    """Mean of `values` [N, K] over each group (groups int64 [N] in [0, n_groups)): [n_groups, K]."""
    sums = torch.zeros(n_groups, values.shape[1], dtype=torch.float64).index_add_(0, groups, values.double())
    counts = torch.bincount(groups, minlength=n_groups).clamp(min=1).double()
    return (sums / counts[:, None]).float()


def label_issues(probs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Confident learning's off-diagonal test (Northcutt et al. 2021, the confident joint).

    probs float [G, K] (out-of-sample, rows sum to 1), labels int64 [G]. Returns (issue bool [G],
    read int64 [G]: the class the sample is confidently read as, its label where no class reaches
    its threshold, thresholds float [K]: the mean probability of class j over samples labelled j;
    a class without samples gets threshold 1, so it never claims a sample)."""
    k = probs.shape[1]
    counts = torch.bincount(labels, minlength=k).double()
    self_conf = torch.zeros(k, dtype=torch.float64).index_add_(0, labels, probs.double()[torch.arange(len(labels)), labels])
    thresholds = torch.where(counts > 0, self_conf / counts.clamp(min=1), torch.ones(k, dtype=torch.float64)).float()
    above = probs >= thresholds[None, :]
    read = torch.where(above, probs, torch.full_like(probs, -1.0)).argmax(1)
    read = torch.where(above.any(1), read, labels)
    return read != labels, read, thresholds


def filter_labels(data: str | os.PathLike, out_dir: str | os.PathLike, config: ClassifierConfig | None = None,
                  folds: int = 2, per_shape: int | None = None, max_flagged: float = 0.25, progress: bool = True,
                  overwrite: bool = False) -> dict:
    """Write `data` (a counterfactual dataset folder) without the composites of masks that
    confident learning flags as label issues (module doc) into `out_dir`; returns the summary
    (masks, flagged masks, images kept, flagged fraction per class).

    config: the fold classifiers' training (default: `ClassifierConfig()` at its defaults, the
    paper protocol; give a cheaper one for quick runs); its seed draws the folds and, derived
    per fold, the fold classifiers.
    folds: 2–20 folds of masks. per_shape: composites per mask (default: the dataset's manifest).
    max_flagged: the largest fraction of masks, in (0, 1], that may be dropped; more means the fold
    classifiers are too weak to tell a mislabelled mask from one they did not learn (confident
    learning assumes good out-of-sample probabilities), and is refused in one line that gives their
    out-of-fold accuracy: train them longer.
    The fold classifiers resume after an interruption; a finished folder of the same settings and
    source is returned as is; one of other settings is refused unless `overwrite`. Raises
    `SkdcgnError` for a bad dataset or setting.
    """
    data, out = Path(data), Path(out_dir)
    if not isinstance(folds, int) or isinstance(folds, bool) or not 2 <= folds <= 20:
        raise SkdcgnError(f"folds: expected an integer in [2, 20], got {folds!r}")
    if not 0 < max_flagged <= 1:
        raise SkdcgnError(f"max_flagged: expected a fraction in (0, 1], got {max_flagged!r}")
    config = config or ClassifierConfig()
    config.validate()
    source = read_json(data / MANIFEST) if (data / MANIFEST).is_file() else None
    images, labels, (y_fg, y_bg) = load_image_dataset(data, dtype=torch.uint8, with_classes=True)  # checks `data`
    if per_shape is None:
        per_shape = int((source or {}).get("config", {}).get("per_shape", 1))
    n, k = len(labels), int((source or {}).get("n_classes", int(labels.max()) + 1))
    groups = mask_groups(n, per_shape)
    n_groups = int(groups[-1]) + 1
    if not bool((labels == labels[torch.arange(n) // per_shape * per_shape]).all()):
        raise SkdcgnError(f"{data}: composites {per_shape} by {per_shape} do not share a label; "
                          "not a dataset of masks with per_shape counterfactuals (give --per-shape)")
    if n_groups < folds:
        raise SkdcgnError(f"{data}: {n_groups} masks are too few for {folds} folds")
    seed = config.seed
    stage = {"stage": "label_noise_filter", "source": data_hash(images, labels), "per_shape": per_shape,
             "folds": folds, "max_flagged": max_flagged, "classifier": identity(config)}
    with folder_lock(out):
        if stage_complete(out, stage):
            return read_json(out / MANIFEST)["summary"]
        recorded = read_json(out / MANIFEST).get("config") if (out / MANIFEST).is_file() else None
        if refuse_other_settings(out, "a filtered dataset", recorded, stage, overwrite):
            for p in [*out.glob("shard_*.safetensors"), out / SCORES, out / FLAGGED, out / MANIFEST]:
                p.unlink(missing_ok=True)
        t0 = time.perf_counter()
        fold = fold_of_groups(n_groups, folds, seed)[groups]  # [N]
        probs = torch.zeros(n, k)
        for f in range(folds):
            train, held = fold != f, fold == f
            cfg = dataclasses.replace(config, seed=derive_seed(seed, "fold", f) % 2**62)
            logger.info("label noise: fold %d/%d, training on %d composites", f + 1, folds, int(train.sum()))
            clf = train_classifier(images[train], labels[train], cfg, out / "folds" / str(f), progress=progress,
                                   overwrite=overwrite)
            probs[held] = probabilities(clf, images[held])
        group_probs = group_mean(probs, groups, n_groups)                   # [G, K]
        group_labels = labels[torch.arange(n_groups) * per_shape]            # [G]
        issue, read, thresholds = label_issues(group_probs, group_labels)
        oof_accuracy = float((group_probs.argmax(1) == group_labels).float().mean())
        if float(issue.float().mean()) > max_flagged:
            raise SkdcgnError(f"{out}: {int(issue.sum())} of {n_groups} masks flagged, more than max_flagged="
                              f"{max_flagged}; the fold classifiers read only {100 * oof_accuracy:.1f}% of held-out "
                              "masks as their label: train them longer (epochs, max_steps) before filtering")
        keep = ~issue[groups]                                                # [N]
        if not keep.any():
            raise SkdcgnError(f"{out}: every mask flagged, nothing to keep; the fold classifiers read "
                              f"{100 * oof_accuracy:.1f}% of held-out masks as their label: train them longer")
        save_tensors(out / SCORES, {"labels": group_labels, "probabilities": group_probs, "issue": issue.to(torch.uint8),
                                    "read": read, "thresholds": thresholds})
        _save_flagged(images, groups, issue, group_labels, read, per_shape, out / FLAGGED)
        shards = _write_kept(out, images[keep], labels[keep], y_fg[keep], y_bg[keep])
        per_class = [round(float(issue[group_labels == c].float().mean()) if (group_labels == c).any() else 0.0, 4)
                     for c in range(k)]
        summary = {"masks": n_groups, "flagged_masks": int(issue.sum()), "images": n, "kept_images": int(keep.sum()),
                   "out_of_fold_accuracy": round(oof_accuracy, 4),
                   "flagged_fraction": round(float(issue.float().mean()), 4), "flagged_by_class": per_class,
                   "seconds": round(time.perf_counter() - t0, 1)}
        logger.info("label noise: %d of %d masks flagged (%.1f%%); %d of %d images kept", summary["flagged_masks"],
                    n_groups, 100 * summary["flagged_fraction"], summary["kept_images"], n)
        write_manifest(out, stage, shards=shards, n_classes=k,
                       image_shape=list(images.shape[1:]), source=str(data), summary=summary,
                       files=(SCORES, FLAGGED))
    return summary


def _write_kept(out: Path, images: Tensor, labels: Tensor, y_fg: Tensor, y_bg: Tensor,
                shard_size: int = 10_000) -> list[dict]:
    """The kept composites as dataset shards (`counterfactuals` format); returns their manifest entries."""
    shards = []
    for i in range(max(1, math.ceil(len(labels) / shard_size))):
        sl = slice(i * shard_size, (i + 1) * shard_size)
        path = out / SHARD_PATTERN.format(i)
        save_tensors(path, {"images": images[sl].contiguous(), "labels": labels[sl].contiguous(),
                            "y_fg": y_fg[sl].contiguous(), "y_bg": y_bg[sl].contiguous()},
                     metadata={"shard": str(i)})
        shards.append({"file": path.name, "count": len(labels[sl]), "sha256": sha256_file(path)})
    return shards


def _save_flagged(images: Tensor, groups: Tensor, issue: Tensor, labels: Tensor, read: Tensor, per_shape: int,
                  path: Path, rows: int = 10) -> None:
    """A grid of the first flagged masks (one row each, up to 10 of its composites, labelled with the
    mask's class), titled with the class each is read as."""
    flagged = issue.nonzero().flatten()[:rows]
    cols = min(per_shape, 10)
    if len(flagged) == 0:
        idx, names = torch.zeros(0, dtype=torch.int64), []
    else:
        rows_idx = [(groups == g).nonzero().flatten()[:cols] for g in flagged.tolist()]
        # a short last mask group is padded with its last composite, so that rows stay aligned with their labels
        idx = torch.cat([torch.cat([r, r[-1:].repeat(cols - len(r))]) for r in rows_idx])
        names = [str(int(labels[g])) for g in flagged.tolist()]
    if len(idx) == 0:
        grid = image_grid(torch.zeros(1, 3, *images.shape[2:]) - 1, 1, title="no mask flagged")
    else:
        reads = ", ".join(f"{int(labels[g])} as {int(read[g])}" for g in flagged.tolist())
        shown = f"the first {len(flagged)} of {int(issue.sum())}" if int(issue.sum()) > len(flagged) else "all"
        grid = image_grid(to_float(images[idx]), cols, title=f"flagged masks, {shown} (label as read): {reads}",
                          row_labels=names)
    save_png(grid, path)
