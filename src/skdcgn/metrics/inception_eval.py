"""Students vs teacher in a feature space: FID, KID and Inception Score from the same inputs.

    from skdcgn import load_cgn
    from skdcgn.metrics.fid import load_inception_extractor
    from skdcgn.metrics.inception_eval import evaluate_against_teacher, render_markdown

    teacher = load_cgn("imagenet-cgn:weights/cgn.pth")
    students = {"in256": load_cgn("students:runs/in256")}
    ext = load_inception_extractor("cuda", output_layer="inception_output.safetensors")  # for IS
    result = evaluate_against_teacher(teacher, students, n=50_000, extractor=ext, batch_size=50,
                                      seed=0, device="cuda", progress=True)
    print(render_markdown(result))

Protocol (docs/imagenet.md, "Evaluation: Inception FID and IS"):

- Inputs. Each model gets a fresh `torch.Generator` seeded with `seed`; n class labels are drawn
  from it first (uniformly from `classes`, default all classes), then for each batch of
  `batch_size` labels `CGN.sample(y, generator=g)` draws the noise (shape, foreground, background,
  in that order). Teacher and students therefore see the same labels and the same noise, image
  for image (checked up front: the mechanisms' `latent_dim` and `shifted_texture` must agree).
  The numbers are a function of (models, n, seed, batch_size, classes).
- Units. The composite by default; `units` may add `foreground`, `background` (the mechanisms'
  images) and `shape` (the mask drawn white on black, as `metrics.masks.render_mask`).
- Distances. `fid` is FID(student, teacher) over all n vs n (paired inputs); the noise floor is
  FID(teacher[:n/2], teacher[n/2:]), two disjoint halves of the teacher's samples; `fid_halves` is
  FID(student[:n/2], teacher[n/2:]), the same sample sizes and independent inputs as the floor,
  so `fid_halves − floor` is the student's excess over sampling noise. KID on the same halves
  (its unbiased estimator assumes independent sets: paired samples would bias it down; the
  teacher's floor is ≈ 0). All from `metrics.fid` (`extract_features`, `fid`, `kid`, `fid_kid`).
- Inception Score. From the extractor's logits (`features_and_logits`, e.g. `InceptionExtractor`
  with its output layer: softmax over all 1008 outputs, no bias, as the references), or from
  `classifier(images) -> logits` when given; `metrics.fid.inception_score` with `splits` parts.
  Without either, IS is None (the shipped `default_1.pt` has no output layer).
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from ..config import resolve_device
from ..errors import SkdcgnError
from .fid import extract_features, fid, fid_kid, inception_score, kid, softmax_probs

logger = logging.getLogger(__name__)

UNITS = ("composite", "foreground", "background", "shape")
Classifier = Callable[[Tensor], Tensor]  # images [N, 3, H, W] in [-1, 1] → logits [N, K]


# ---- features (and logits) of one CGN -----------------------------------------------------------

class _WithLogits:
    """An extractor's features with logits appended as extra columns, so that `extract_features`
    (the one batching/validation path) returns both from one forward pass."""

    def __init__(self, extractor, classifier: Classifier | None) -> None:
        self.extractor, self.classifier = extractor, classifier
        self.name, self.dim = extractor.name, int(extractor.dim)

    def __call__(self, images: Tensor) -> Tensor:
        if self.classifier is not None:
            feats, logits = self.extractor(images), self.classifier(images)
        elif hasattr(self.extractor, "features_and_logits"):
            feats, logits = self.extractor.features_and_logits(images)
        else:
            feats, logits = self.extractor(images), None
        if feats.ndim != 2 or feats.shape[1] != self.dim:
            raise SkdcgnError(f"{self.name}: expected features [N, {self.dim}], got {list(feats.shape)}")
        if logits is None:
            return feats
        if logits.ndim != 2 or len(logits) != len(feats):
            raise SkdcgnError(f"{self.name}: expected logits [N, K], got {list(logits.shape)}")
        return torch.cat([feats.float(), logits.float().to(feats.device)], 1)


def draw_labels(n: int, n_classes: int, classes: Sequence[int] | None, generator: torch.Generator) -> Tensor:
    """n labels drawn uniformly from `classes` (default range(n_classes)) with `generator`."""
    pool = torch.arange(n_classes) if classes is None else torch.as_tensor(list(classes), dtype=torch.long)
    if pool.ndim != 1 or len(pool) == 0 or pool.min() < 0 or pool.max() >= n_classes:
        raise SkdcgnError(f"classes: expected a non-empty list of class indices in [0, {n_classes})")
    return pool[torch.randint(len(pool), (n,), generator=generator)]


def _unit_images(unit: str, mask: Tensor, fg: Tensor, bg: Tensor, x: Tensor) -> Tensor:
    if unit == "shape":
        from .masks import render_mask

        return render_mask(mask)
    return {"composite": x, "foreground": fg, "background": bg}[unit]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def cgn_features(cgn, n: int, extractor, batch_size: int = 50, seed: int = 0, device: torch.device | str = "cpu",
                 classes: Sequence[int] | None = None, units: Sequence[str] = ("composite",),
                 classifier: Classifier | None = None, progress: bool = True, desc: str = "") -> dict:
    """Features (and logits) of n seeded samples of `cgn`, per unit, batch by batch (see module doc).

    Returns {"labels": [n], "features": {unit: float32 [n, D]}, "logits": {unit: [n, K] or None},
    "sample_s", "features_s"}.
    """
    from tqdm.auto import tqdm

    device = resolve_device(device)
    joined = _WithLogits(extractor, classifier)
    g = torch.Generator().manual_seed(int(seed))
    labels = draw_labels(n, cgn.n_classes, classes, g)
    out: dict[str, list[np.ndarray]] = {u: [] for u in units}
    sample_s = features_s = 0.0
    with tqdm(total=n, desc=desc or "sampling", unit="img", disable=not progress) as bar:
        for y in labels.split(batch_size):
            t0 = time.perf_counter()
            mask, fg, bg, x = cgn.sample(y, generator=g)
            _sync(device)
            t1 = time.perf_counter()
            for unit in units:
                out[unit].append(extract_features(joined, _unit_images(unit, mask, fg, bg, x), batch_size=len(y),
                                                  device=device))
            t2 = time.perf_counter()
            sample_s += t1 - t0
            features_s += t2 - t1
            bar.update(len(y))
    d = joined.dim
    feats, logits = {}, {}
    for unit, parts in out.items():
        a = np.concatenate(parts) if parts else np.zeros((0, d), np.float32)
        feats[unit] = np.ascontiguousarray(a[:, :d])
        logits[unit] = np.ascontiguousarray(a[:, d:]) if a.shape[1] > d else None
    return {"labels": labels, "features": feats, "logits": logits, "sample_s": sample_s, "features_s": features_s}


# ---- the evaluation ------------------------------------------------------------------------------

def check_same_inputs(teacher, student, name: str = "student") -> None:
    """Refuse a student that cannot take the teacher's labels and noise (so inputs would differ)."""
    if student.n_classes != teacher.n_classes:
        raise SkdcgnError(f"{name}: {student.n_classes} classes, the teacher has {teacher.n_classes}")
    for m, t_mech in teacher.mechanisms().items():
        s_cfg, t_cfg = student.mechanisms()[m].config, t_mech.config
        for attr in ("latent_dim", "shifted_texture"):
            a, b = getattr(s_cfg, attr, False), getattr(t_cfg, attr, False)
            if a != b:
                raise SkdcgnError(f"{name}: {m}.{attr} is {a}, the teacher's is {b}; "
                                  "the same seeded inputs cannot be fed to both")


def _is(logits: np.ndarray | None, splits: int) -> tuple[float | None, float | None]:
    if logits is None:
        return None, None
    return inception_score(softmax_probs(logits), splits)


def evaluate_against_teacher(teacher, students, n: int = 50_000, extractor=None, batch_size: int = 50, seed: int = 0,
                             device: torch.device | str = "cpu", progress: bool = True,
                             classes: Sequence[int] | None = None, *, units: Sequence[str] = ("composite",),
                             classifier: Classifier | None = None, splits: int = 10, kid_subsets: int = 100,
                             kid_subset_size: int = 1000) -> dict:
    """FID, KID and IS of each student vs the teacher from the same seeded inputs (module doc).

    teacher: a CGN; students: a CGN or {name: CGN}; extractor: a `FeatureExtractor` (default: the
    Inception of the `fid` extra, features only); classifier: images → logits for IS when the
    extractor has none. Models are moved to `device` and put in eval mode for the run (their
    training flags are restored). Returns a JSON-able dict:

        {"protocol": {...}, "teacher": {unit: {"is", "is_std", "floor": {"fid", "kid", "kid_std"}}},
         "students": {name: {unit: {"fid", "fid_halves", "kid", "kid_std", "is", "is_std"}}},
         "timings": {model: {"sample_s", "features_s", "images_per_s"}, "metrics_s", "total_s"}}
    """
    t_start = time.perf_counter()
    if isinstance(students, torch.nn.Module):
        students = {"student": students}
    students = dict(students)
    units = tuple(units)
    if not units or any(u not in UNITS for u in units) or len(set(units)) != len(units):
        raise SkdcgnError(f"units: expected distinct names from {UNITS}, got {list(units)}")
    if n < 4 or n < splits:
        raise SkdcgnError(f"n: need at least 4 samples (two halves of 2) and at least `splits` ({splits}), got {n}")
    if batch_size < 1:
        raise SkdcgnError(f"batch_size must be positive, got {batch_size}")
    for name, s in students.items():
        check_same_inputs(teacher, s, name)
    device = resolve_device(device)
    if extractor is None:
        from .fid import load_inception_extractor

        extractor = load_inception_extractor(device)

    models = {"teacher": teacher, **{f"student:{k}": v for k, v in students.items()}}
    was_training = {k: m.training for k, m in models.items()}
    sets = {}
    try:
        for key, model in models.items():
            model.to(device).eval()
            sets[key] = cgn_features(model, n, extractor, batch_size, seed, device, classes, units, classifier,
                                     progress, desc=key)
            logger.info(f"{key}: {n} samples, sampling {sets[key]['sample_s']:.1f}s, features {sets[key]['features_s']:.1f}s")
    finally:
        for key, model in models.items():
            model.train(was_training[key])

    t_metrics = time.perf_counter()
    h = n // 2
    tea = sets["teacher"]
    k_logits = next((v.shape[1] for v in tea["logits"].values() if v is not None), None)
    result: dict = {"teacher": {}, "students": {name: {} for name in students}}
    for unit in units:
        tf, tl = tea["features"][unit], tea["logits"][unit]
        floor_kid = kid(tf[:h], tf[h:2 * h], kid_subsets, kid_subset_size, seed)
        is_mean, is_std = _is(tl, splits)
        result["teacher"][unit] = {"is": is_mean, "is_std": is_std,
                                   "floor": {"fid": fid(tf[:h], tf[h:2 * h]), "kid": floor_kid[0],
                                             "kid_std": floor_kid[1]}}
        for name in students:
            s = sets[f"student:{name}"]
            sf = s["features"][unit]
            halves = fid_kid(sf[:h], tf[h:2 * h], kid_subsets, kid_subset_size, seed)
            is_mean, is_std = _is(s["logits"][unit], splits)
            row = result["students"][name][unit] = {
                "fid": fid(sf, tf), "fid_halves": halves["fid"], "kid": halves["kid"], "kid_std": halves["kid_std"],
                "is": is_mean, "is_std": is_std}
            logger.info(f"{unit} {name}: FID {row['fid']:.3f}, halves {row['fid_halves']:.3f} "
                f"(floor {result['teacher'][unit]['floor']['fid']:.3f}), KID {row['kid']:.3g}")
    timings = {key: {"sample_s": round(s["sample_s"], 3), "features_s": round(s["features_s"], 3),
                     "images_per_s": round(n / max(s["sample_s"], 1e-9), 2)} for key, s in sets.items()}
    timings["metrics_s"] = round(time.perf_counter() - t_metrics, 3)
    timings["total_s"] = round(time.perf_counter() - t_start, 3)
    result["protocol"] = {
        "n": n, "n_half": h, "seed": seed, "batch_size": batch_size, "device": str(device),
        "classes": None if classes is None else [int(c) for c in classes], "n_classes": teacher.n_classes,
        "units": list(units), "extractor": extractor.name, "feature_dim": int(extractor.dim),
        "is_source": None if k_logits is None else ("classifier" if classifier is not None else f"{extractor.name} logits"),
        "is_classes": k_logits, "splits": splits if k_logits is not None else None,
        "kid_subsets": kid_subsets, "kid_subset_size": kid_subset_size,  # capped by the smaller set
        "fid": "student vs teacher, n vs n, same inputs",
        "fid_halves": "student[:n/2] vs teacher[n/2:], independent inputs, same sizes as the floor",
        "kid": "student[:n/2] vs teacher[n/2:] (the unbiased estimator needs independent sets)",
        "floor": "teacher[:n/2] vs teacher[n/2:]",
    }
    result["timings"] = timings
    return {"protocol": result.pop("protocol"), **result}


# ---- report --------------------------------------------------------------------------------------

def _f(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _pm(value: float | None, std: float | None) -> str:
    return "–" if value is None else f"{value:.2f} ± {std:.2f}"


def render_markdown(result: dict) -> str:
    """A markdown table of `evaluate_against_teacher`'s result, one row per unit and model."""
    p = result["protocol"]
    lines = [f"{p['extractor']} features, n = {p['n']} per model (halves of {p['n_half']}), seed {p['seed']}; "
             f"IS: {p['is_source'] or 'not available'}" + (f" ({p['is_classes']} classes, {p['splits']} splits)"
                                                             if p["is_source"] else ""),
             "",
             "| unit | model | FID vs teacher (n vs n, paired) | FID halves (n/2 vs n/2) | KID ×10³ (halves) | IS |",
             "|---|---|---:|---:|---:|---:|"]
    for unit in p["units"]:
        t = result["teacher"][unit]
        lines.append(f"| {unit} | teacher (floor: two halves) | – | {_f(t['floor']['fid'])} | "
                     f"{_f(t['floor']['kid'] * 1e3)} ± {_f(t['floor']['kid_std'] * 1e3)} | "
                     f"{_pm(t['is'], t['is_std'])} |")
        for name, rows in result["students"].items():
            r = rows[unit]
            lines.append(f"| {unit} | {name} | {_f(r['fid'])} | {_f(r['fid_halves'])} | "
                         f"{_f(r['kid'] * 1e3)} ± {_f(r['kid_std'] * 1e3)} | {_pm(r['is'], r['is_std'])} |")
    return "\n".join(lines)
