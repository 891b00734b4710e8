"""A student's learning curve from its weight snapshots (writes a markdown table and its JSON twin).

The distillation trainer keeps the student's weights at every sample step
(`<run>/distill/students/<mechanism>/snapshots/step_*.safetensors`); this scores each against the
teacher on held-out inputs with `skdcgn.distill.evaluate.learning_curve` (L1; for masks IoU@0.5,
binariness and soft fraction of student and teacher). Works on an unfinished run too (its
snapshots so far), which is how a CPU-overnight preset is read before it ends.

    python benchmarks/learning_curve.py --run-dir runs/long-dc --teacher double_colored --preset long \
        [--mechanism shape] [--out docs/learning_curve_long.md]
"""
from __future__ import annotations

import argparse
import datetime as _dt
import sys
from pathlib import Path

import torch

from skdcgn import load_cgn
from skdcgn.distill.evaluate import SNAPSHOTS, learning_curve
from skdcgn.distill.trainer import preset
from skdcgn.io import write_bytes, write_json
from skdcgn.models.students import make_student
from skdcgn.results.records import hardware_info


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", required=True, type=Path, help="a `skdcgn distill` run folder")
    ap.add_argument("--teacher", required=True, help="the teacher it distilled (a skdcgn.load_cgn spec)")
    ap.add_argument("--preset", required=True, help="the distillation preset it ran")
    ap.add_argument("--mechanism", default="shape")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = preset(args.preset)
    mech = load_cgn(args.teacher).eval().mechanisms()[args.mechanism]
    student = make_student(cfg.student_config(args.mechanism, mech.config.n_classes, mech.config.latent_dim))
    snaps = sorted((args.run_dir / "distill" / "students" / args.mechanism / SNAPSHOTS).glob("step_*.safetensors"))
    curve = learning_curve(mech, student, args.mechanism, snaps, n=cfg.n_eval, seed=cfg.eval_seed)
    total = cfg.steps_for(args.mechanism)
    record = {"command": "python " + " ".join(sys.argv), "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "hardware": hardware_info(torch.device("cpu")), "teacher": args.teacher, "preset": args.preset,
              "mechanism": args.mechanism, "steps_planned": total, "n_eval": cfg.n_eval, "curve": curve}
    keys = [k for k in ("l1", "iou@0.5", "binariness", "soft_fraction") if k in curve[0]] if curve else []
    lines = [f"# Learning curve: {args.mechanism} student of `{args.teacher}`, preset `{args.preset}`", "",
             "Written by `benchmarks/learning_curve.py`; do not edit by hand.", "",
             f"- command: `{record['command']}`", f"- date: {record['date']}; skdcgn {record['hardware']['skdcgn']}",
             f"- held-out: {cfg.n_eval} (u, y) from eval_seed {cfg.eval_seed}, never in the transfer set; the weights "
             f"are the EMA copy (decay {cfg.ema_decay}) where the preset keeps one",
             f"- snapshots scored: {len(curve)}, up to step {curve[-1]['step'] if curve else 0} of {total} planned "
             "(a run still training is read as far as it got)", ""]
    if "teacher_binariness" in (curve[0] if curve else {}):
        lines += [f"Teacher masks: binariness {curve[0]['teacher_binariness']:.4f}, soft fraction "
                  f"{curve[0]['teacher_soft_fraction']:.4f}.", ""]
    lines += ["| step | " + " | ".join(keys) + " |", "|---:|" + "---:|" * len(keys)]
    lines += [f"| {c['step']} | " + " | ".join(f"{c[k]:.4f}" for k in keys) + " |" for c in curve]
    write_json(args.out.with_suffix(".json"), record)
    write_bytes(args.out, ("\n".join(lines) + "\n").encode())
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
