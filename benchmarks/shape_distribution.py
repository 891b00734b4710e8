"""How a shape student's *set* of masks differs from its teacher's, and two sampling-time knobs (issue #20).

IoU compares masks one input at a time; a classifier trained on counterfactuals sees the set.
For one shape student and its teacher this measures, on n masks per row (classes balanced):
- binariness and soft fraction (`metrics.masks.sharpness`);
- diversity: the mean over classes of the per-pixel variance, across the noise u, of the masks
  thresholded at 0.5 (how much the shapes of one class vary);
- nearest neighbours: the mean L1 distance (pixels) from each mask to the closest mask of the same
  class in the other set, both ways (teacher → student: does the student cover the teacher's
  shapes; student → teacher: does it make shapes the teacher does not);
- FID in the shipped domain network's features (`metrics.domain`, masks rendered white on black)
  against the teacher's masks and against real MNIST digits 50,000–59,999 (never seen by the domain
  network; not the OOD test digits);
- the same for the teacher drawn with other noise: the floor a perfect student reaches.

Each row changes the trained student at sampling time only, so no training is repeated:
- temperature T: mask = sigmoid(logits / T) (T < 1 sharpens; the 0.5 contour does not move),
  done exactly by dividing the last convolution's weights and bias by T;
- noise scale s: the student reads s·u instead of u (`StudentConfig.noise_scale`; s > 1 widens
  its shapes' variety).
`--write DIR:T:s` writes such a student set (the three mechanisms, textures unchanged, with
manifests) for `skdcgn run --students DIR`, so the classifiers it trains can be compared.
`--match-diversity DIR` writes the set whose noise scale gives the student's masks the teacher's
diversity, fitted exactly as `skdcgn distill --shape-noise-scale 0` fits it
(`distill.calibrate.match_noise_scale` on the first masks of the run's transfer set): the same
student that distillation with that setting writes, without training it again.
`--teacher-set DIR:s` writes the teacher's own three mechanisms as such a set, its shape reading
s·u (its first linear layer's noise columns scaled by s, exact): the same widening given to the
teacher, so the two can be compared at equal noise scale (`skdcgn run --students DIR`, row
student_cf, then holds the teacher's counterfactuals at that scale).

    python benchmarks/shape_distribution.py --students runs/q-default-colored --variant colored \\
        --rows 1:1 0.5:1 1:1.1 1:1.2 --out docs/shape_distribution_colored.md \\
        --write runs/students-s11:1:1.1 --match-diversity runs/students-matched
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import sys
from pathlib import Path

import torch

from skdcgn import load_cgn
from skdcgn.cli import script_exit
from skdcgn.distill.calibrate import diversity
from skdcgn.distill.query import TransferSet
from skdcgn.distill.trainer import CALIBRATION_MASKS, calibrated_noise_scale
from skdcgn.errors import SkdcgnError
from skdcgn.images import render_mask
from skdcgn.io import MANIFEST, read_json, refuse_other_settings, write_bytes, write_json, write_manifest
from skdcgn.metrics.domain import load_domain_extractor, mnist_digits32
from skdcgn.metrics.fid import extract_features, fid
from skdcgn.metrics.masks import sharpness
from skdcgn.models.pretrained import load_model
from skdcgn.models.students import ShapeStudent
from skdcgn.results.records import hardware_info

MECHS = ("shape", "foreground", "background")


def parse_scale(spec: str, what: str) -> tuple[Path, float]:
    """'DIR:s' → (folder, noise scale > 0)."""
    folder, _, scale = spec.rpartition(":")
    try:
        value = float(scale)
    except ValueError:
        value = float("nan")
    if not folder or not value > 0:
        raise SkdcgnError(f"{what}: expected DIR:NOISE_SCALE with a scale > 0, such as runs/wide:1.3, got {spec!r}")
    return Path(folder), value


def save_mechanism(model: torch.nn.Module, folder: Path, stage: dict, overwrite: bool, **extra) -> None:
    """`model` into `folder` with its manifest written last; a folder holding a mechanism written
    with other settings is refused in one line unless `overwrite` (`io.refuse_other_settings`)."""
    recorded = read_json(folder / MANIFEST).get("config") if (folder / MANIFEST).is_file() else None
    if refuse_other_settings(folder, "a mechanism", recorded, stage, overwrite):
        (folder / MANIFEST).unlink()  # no longer complete while it is rewritten
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    write_manifest(folder, stage, files=("config.json", "model.safetensors"), **extra)


def parse_knobs(spec: str, what: str) -> tuple[float, float]:
    """'T:s' → (temperature, noise scale), each > 0."""
    try:
        t, s = (float(v) for v in spec.split(":"))
    except ValueError:
        raise SkdcgnError(f"{what}: expected TEMPERATURE:NOISE_SCALE such as 0.5:1.1, got {spec!r}") from None
    if not (t > 0 and s > 0):
        raise SkdcgnError(f"{what}: temperature and noise scale must be > 0, got {spec!r}")
    return t, s


def reparametrised(student: ShapeStudent, temperature: float, noise_scale: float) -> ShapeStudent:
    """A copy of `student` whose mask is sigmoid(logits(noise_scale·u, y) / temperature).

    The temperature is exact for students without an output norm: the logits are the last
    convolution's output (the pixel shuffle only moves values), so dividing its weights and bias
    by T divides the logits by T."""
    if temperature != 1.0 and student.config.output_norm != "none":
        raise SkdcgnError("a student with an output norm cannot be re-tempered by its last convolution")
    out = type(student)(dataclasses.replace(student.config, noise_scale=noise_scale))
    out.load_state_dict(student.state_dict())
    with torch.no_grad():
        out.out_conv.weight /= temperature
        out.out_conv.bias /= temperature
    return out.eval()


def set_statistics(masks: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Binariness, soft fraction and diversity of masks [n, 1, H, W] with classes y [n]."""
    return {**sharpness(masks), "diversity": diversity(masks, y)}


def nearest(a: torch.Tensor, b: torch.Tensor, y: torch.Tensor) -> float:
    """Mean L1 distance (pixels) from each thresholded mask of `a` to the nearest one of `b`, same class."""
    d = []
    for k in y.unique():
        A, B = (a[y == k] > 0.5).flatten(1).float(), (b[y == k] > 0.5).flatten(1).float()
        d.append(torch.cat([torch.cdist(x, B, p=1).min(1).values for x in A.split(1000)]).mean())
    return float(torch.stack(d).mean())


def write_teacher_set(teacher_cgn: torch.nn.Module, dst: Path, noise_scale: float, overwrite: bool = False) -> None:
    """The teacher's mechanisms as a student set in `dst`, the shape reading noise_scale·u."""
    for m, mech in teacher_cgn.mechanisms().items():
        if m == "shape":
            mech = type(mech)(mech.config)
            mech.load_state_dict(teacher_cgn.shape.state_dict())
            with torch.no_grad():  # the net reads cat(u, embed(y)) through its first linear layer only
                mech.net[0].weight[:, :mech.config.latent_dim] *= noise_scale
        save_mechanism(mech, dst / "distill" / "students" / m, {"teacher_mechanism": m, "noise_scale": noise_scale},
                       overwrite)


def write_set(src: Path, dst: Path, student: ShapeStudent, temperature: float, noise_scale: float,
              overwrite: bool = False) -> None:
    """A student set for `skdcgn run --students dst`: `src`'s textures and the reparametrised shape."""
    base = src / "distill" / "students"
    for m in MECHS:
        manifest = read_json(base / m / "manifest.json")
        model = reparametrised(student, temperature, noise_scale) if m == "shape" else load_model(base / m)
        stage = {**manifest["config"], "reparametrised": {"from": str(base / m), "temperature": temperature,
                                                          "noise_scale": noise_scale}}
        save_mechanism(model, dst / "distill" / "students" / m, stage, overwrite,
                       train_seconds=manifest.get("train_seconds", 0))


@torch.no_grad()
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--students", type=Path, required=True, help="a `skdcgn run` folder with <variant>/distill/students")
    ap.add_argument("--variant", required=True, help="the variant, also the teacher (a skdcgn.load_cgn spec)")
    ap.add_argument("--rows", nargs="+", default=["1:1"], help="TEMPERATURE:NOISE_SCALE per row (default: 1:1)")
    ap.add_argument("--n", type=int, default=10_000, help="masks per set, classes balanced (default: 10000)")
    ap.add_argument("--write", action="append", default=[], help="DIR:T:s, a student set to write (repeatable)")
    ap.add_argument("--match-diversity", type=Path, default=None,
                    help="DIR: write the student set whose noise scale matches the teacher's mask diversity")
    ap.add_argument("--teacher-set", action="append", default=[],
                    help="DIR:s, the teacher's own mechanisms written as a set, its shape reading s·u (repeatable)")
    ap.add_argument("--overwrite", action="store_true", help="replace sets written before with other settings")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    ap.add_argument("--out", type=Path, required=True, help="markdown table (and its .json twin)")
    args = ap.parse_args()
    src = args.students / args.variant
    if not (src / "distill" / "students" / "shape" / "manifest.json").is_file():
        raise SkdcgnError(f"--students: {src}/distill/students/shape is not a finished student")
    if args.match_diversity is not None and not (src / "transfer" / "shape" / "manifest.json").is_file():
        raise SkdcgnError(f"--match-diversity: {src}/transfer/shape (the transfer set it is fitted on) is not there")
    rows = [parse_knobs(r, "--rows") for r in args.rows]
    writes = []
    for w in args.write:
        folder, _, knobs = w.partition(":")
        writes.append((Path(folder), *parse_knobs(knobs, "--write")))
    teacher_sets = [parse_scale(spec, "--teacher-set") for spec in args.teacher_set]
    if args.n < 10:
        raise SkdcgnError(f"--n: at least 10, got {args.n}")
    torch.set_num_threads(args.threads)
    teacher_cgn = load_cgn(args.variant).eval()
    teacher = teacher_cgn.shape
    student = load_model(src / "distill" / "students" / "shape").eval()
    matched = None
    if args.match_diversity is not None:
        transfer = TransferSet(src / "transfer" / "shape")
        _, y_fit, masks = transfer.sample(torch.arange(min(len(transfer), CALIBRATION_MASKS)))
        scale = calibrated_noise_scale(student, transfer)
        matched = {"folder": str(args.match_diversity), "noise_scale": scale,
                   "teacher_diversity": diversity(masks, y_fit.long())}
        writes.append((args.match_diversity, 1.0, scale))
        if (1.0, scale) not in rows:
            rows.append((1.0, scale))
    for folder, scale in teacher_sets:
        write_teacher_set(teacher_cgn, folder / args.variant, scale, args.overwrite)
        print(f"wrote {folder / args.variant} (the teacher, noise scale {scale})")
    for folder, t, s in writes:
        write_set(src, folder / args.variant, student, t, s, args.overwrite)
        print(f"wrote {folder / args.variant} (temperature {t}, noise scale {s})")

    extractor = load_domain_extractor()
    features = lambda masks: extract_features(extractor, render_mask(masks))  # noqa: E731
    y = torch.arange(args.n) % student.config.n_classes
    u_a = torch.randn(args.n, student.config.latent_dim, generator=torch.Generator().manual_seed(1))
    u_b = torch.randn(args.n, student.config.latent_dim, generator=torch.Generator().manual_seed(2))
    m_t, m_t2 = teacher(u_a, y), teacher(u_b, y)
    f_t = features(m_t)
    f_real = features(mnist_digits32(50_000, 50_000 + args.n)[0])
    record = {"command": "python " + " ".join(sys.argv),
              "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "hardware": hardware_info(torch.device("cpu")), "students": str(src), "n": args.n,
              "teacher": {**set_statistics(m_t2, y), "nn_teacher_to_set": nearest(m_t, m_t2, y),
                          "nn_set_to_teacher": nearest(m_t2, m_t, y), "fid_teacher": fid(features(m_t2), f_t),
                          "fid_real": fid(features(m_t2), f_real)},
              "matched": matched, "rows": []}
    for t, s in rows:
        m_s = reparametrised(student, t, s)(u_b, y)
        f_s = features(m_s)
        record["rows"].append({"temperature": t, "noise_scale": s, **set_statistics(m_s, y),
                               "nn_teacher_to_set": nearest(m_t, m_s, y), "nn_set_to_teacher": nearest(m_s, m_t, y),
                               "fid_teacher": fid(f_s, f_t), "fid_real": fid(f_s, f_real)})
    write_json(args.out.with_suffix(".json"), record)
    write_bytes(args.out, render(record).encode())
    print(f"wrote {args.out}")
    return 0


def render(record: dict) -> str:
    """The markdown page of one run of this script."""
    cols = ("binariness", "soft_fraction", "diversity", "nn_teacher_to_set", "nn_set_to_teacher", "fid_teacher", "fid_real")
    fmt = lambda r: " | ".join(f"{r[c]:.4f}" if c in ("binariness", "soft_fraction", "diversity") else f"{r[c]:.3f}"  # noqa: E731
                                for c in cols)
    lines = [f"# The shape student's set of masks against its teacher's: `{record['students']}`", "",
             "Written by `benchmarks/shape_distribution.py`; do not edit by hand.", "",
             f"- command: `{record['command']}`", f"- date: {record['date']}; skdcgn {record['hardware']['skdcgn']}",
             f"- {record['n']:,} masks per set, classes balanced; the teacher's own row is drawn with other noise "
             "(the floor a perfect student reaches)",
             "- diversity: mean over classes of the per-pixel variance of the masks thresholded at 0.5; NN: mean L1 "
             "distance (pixels) to the nearest mask of the same class in the other set; FID in the domain network's "
             "features, against the teacher's masks and against real MNIST digits 50,000–59,999", "",
             "| masks | binariness | soft fraction | diversity | NN teacher → set | NN set → teacher | FID to teacher | FID to real digits |",
             "|---|---:|---:|---:|---:|---:|---:|---:|",
             f"| teacher, other noise | {fmt(record['teacher'])} |"]
    lines += [f"| student, T {r['temperature']:g}, noise × {r['noise_scale']:g} | {fmt(r)} |" for r in record["rows"]]
    if record.get("matched"):
        m = record["matched"]
        lines += ["", f"Noise scale matching the teacher's diversity ({m['teacher_diversity']:.4f} on the first "
                  f"{CALIBRATION_MASKS:,} masks of the transfer set): "
                  f"**{m['noise_scale']:g}**; that student set is in `{m['folder']}`."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    script_exit(main, "shape_distribution.py")
