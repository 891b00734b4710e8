"""Where a shape student's masks differ from its teacher's (issue #20: the measured cause of the IoU gap).

For one shape student and its teacher, on the same inputs:

- IoU@0.5 on inputs of the student's own transfer set (what it was fitted on) against held-out
  inputs (`eval_seed`): equal values mean the student under-fits (capacity or optimisation), a
  lower held-out value that it over-fits (more transfer data would help);
- where the thresholded masks disagree: the fraction of disagreeing pixels on the teacher mask's
  boundary (pixels whose 3×3, resp. 5×5, neighbourhood holds both mask and background), i.e.
  edges drawn a pixel off, against whole strokes missed or added;
- IoU per class;
- the teacher against itself with its noise perturbed, u + ε·n (n standard normal): how precisely
  the student must reproduce the map u → mask to reach a given IoU.

    python benchmarks/mask_errors.py --run-dir runs/long-dc --teacher double_colored --out docs/mask_errors.md
"""
from __future__ import annotations

import argparse
import datetime as _dt
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from skdcgn import load_cgn
from skdcgn.distill.evaluate import mask_iou
from skdcgn.distill.query import TransferSet
from skdcgn.cli import script_exit
from skdcgn.errors import SkdcgnError
from skdcgn.io import write_bytes, write_json
from skdcgn.models.pretrained import load_model
from skdcgn.results.records import hardware_info

EPSILONS = (0.01, 0.05, 0.1, 0.2)


def boundary(mask: torch.Tensor, k: int) -> torch.Tensor:
    """Pixels of a binary mask [N, 1, H, W] whose k×k neighbourhood holds both values."""
    m = mask.float()
    hi = F.max_pool2d(m, k, 1, k // 2)
    lo = -F.max_pool2d(-m, k, 1, k // 2)
    return hi != lo


@torch.no_grad()
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", type=Path, required=True, help="a `skdcgn distill` run folder with a shape student")
    ap.add_argument("--teacher", required=True, help="its teacher (a skdcgn.load_cgn spec)")
    ap.add_argument("--n", type=int, default=2000, help="inputs of each kind (default: 2000)")
    ap.add_argument("--eval-seed", type=int, default=1_000_003, help="the held-out inputs' seed (DistillConfig.eval_seed)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for need in ("distill/students/shape/manifest.json", "transfer/shape/manifest.json"):
        if not (args.run_dir / need).is_file():
            raise SkdcgnError(f"--run-dir: {args.run_dir / need} not found (a finished `skdcgn distill` run with its transfer set)")
    if args.n < 1:
        raise SkdcgnError(f"--n: at least 1, got {args.n}")
    teacher = load_cgn(args.teacher).eval().shape
    student = load_model(args.run_dir / "distill" / "students" / "shape").eval()
    transfer = TransferSet(args.run_dir / "transfer" / "shape")
    idx = torch.arange(min(args.n, len(transfer)))
    u_fit, y_fit = transfer.u[idx].float(), transfer.y[idx].long()
    g = torch.Generator().manual_seed(args.eval_seed)
    y = torch.randint(0, student.config.n_classes, (args.n,), generator=g)
    u = torch.randn(args.n, student.config.latent_dim, generator=g)

    t, s = teacher(u, y) > 0.5, student(u, y) > 0.5
    iou = mask_iou(t.float(), s.float())
    wrong = t ^ s
    n_wrong = int(wrong.sum())
    record = {
        "command": "python " + " ".join(sys.argv),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "hardware": hardware_info(torch.device("cpu")), "teacher": args.teacher, "run_dir": str(args.run_dir),
        "student_params": student.get_num_params(), "n": args.n,
        "iou_transfer_set": float(mask_iou(teacher(u_fit, y_fit), student(u_fit, y_fit)).mean()),
        "iou_held_out": float(iou.mean()),
        "iou_quantiles": {str(q): float(v) for q, v in zip((0.05, 0.25, 0.5, 0.75), torch.quantile(iou, torch.tensor([0.05, 0.25, 0.5, 0.75])))},
        "teacher_mask_pixels": float(t.float().sum((1, 2, 3)).mean()),
        "wrong_pixels": n_wrong / args.n,
        "wrong_on_boundary_3x3": float((wrong & boundary(t, 3)).sum()) / max(n_wrong, 1),
        "wrong_on_boundary_5x5": float((wrong & boundary(t, 5)).sum()) / max(n_wrong, 1),
        "teacher_boundary_pixels": float(boundary(t, 3).float().sum((1, 2, 3)).mean()),
        "iou_per_class": [float(iou[y == c].mean()) for c in range(student.config.n_classes)],
        "teacher_vs_perturbed": {str(e): float(mask_iou(teacher(u, y), teacher(u + e * torch.randn(u.shape, generator=g), y)).mean())
                                 for e in EPSILONS},
    }
    lines = [f"# Where the shape student's masks differ from `{args.teacher}`'s", "",
             "Written by `benchmarks/mask_errors.py`; do not edit by hand.", "",
             f"- command: `{record['command']}`", f"- date: {record['date']}; skdcgn {record['hardware']['skdcgn']}",
             f"- student: `{args.run_dir}/distill/students/shape` ({record['student_params']:,} parameters); "
             f"{args.n} inputs of each kind", "",
             "| measure | value |", "|---|---:|",
             f"| IoU@0.5 on inputs of its transfer set (fitted) | {record['iou_transfer_set']:.4f} |",
             f"| IoU@0.5 on held-out inputs | {record['iou_held_out']:.4f} |",
             "| held-out IoU quantiles 5 / 25 / 50 / 75 % | " + " / ".join(f"{v:.3f}" for v in record["iou_quantiles"].values()) + " |",
             f"| teacher mask pixels per image | {record['teacher_mask_pixels']:.1f} |",
             f"| teacher boundary pixels per image (3×3) | {record['teacher_boundary_pixels']:.1f} |",
             f"| disagreeing pixels per image | {record['wrong_pixels']:.1f} |",
             f"| … of them on the teacher's boundary (3×3) | {record['wrong_on_boundary_3x3']:.1%} |",
             f"| … within 2 px of it (5×5) | {record['wrong_on_boundary_5x5']:.1%} |", "",
             "IoU per class: " + ", ".join(f"{c}: {v:.3f}" for c, v in enumerate(record["iou_per_class"])), "",
             "The teacher against itself, its noise perturbed (u + ε·n, |u| ≈ √32 ≈ 5.7):", "",
             "| ε | " + " | ".join(str(e) for e in EPSILONS) + " |", "|---|" + "---:|" * len(EPSILONS),
             "| IoU@0.5 | " + " | ".join(f"{v:.4f}" for v in record["teacher_vs_perturbed"].values()) + " |"]
    write_json(args.out.with_suffix(".json"), record)
    write_bytes(args.out, ("\n".join(lines) + "\n").encode())
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    script_exit(main, "mask_errors.py")
