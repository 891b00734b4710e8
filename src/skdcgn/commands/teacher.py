"""`skdcgn teacher sample|convert|train`: look at, convert and train CGN teachers."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..api import load_cgn
from ..grids import image_grid, save_png, stack_grids
from ..models.cgn import CGN


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("teacher", help="sample, convert and train CGN teachers")
    tsub = p.add_subparsers(dest="teacher_command", metavar="ACTION", required=True)

    s = tsub.add_parser("sample", help="10 × 10 counterfactual grid (shape class by column, texture class by row) "
                                       "and a grid of masks, foregrounds and backgrounds")
    s.add_argument("--teacher", "--cgn", dest="cgn", default="double_colored",
                   help="shipped teacher name, students:<run dir>, CGN folder or .pth (default: double_colored)")
    s.add_argument("--out", default="grid.png", help="counterfactual grid PNG; the mechanism grid goes beside it")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=sample_command)

    c = tsub.add_parser("convert", help="convert an original CGN-MNIST .pth into config.json + model.safetensors folders")
    c.add_argument("pth", help="checkpoint as released by the CGN authors (loaded with weights_only=True)")
    c.add_argument("--out", required=True, help="output folder")
    c.set_defaults(func=convert_command)

    from ..config import add_config_arguments
    from ..teacher_training import PRESETS, VARIANTS, TeacherTrainConfig

    t = tsub.add_parser("train", help="train a new CGN teacher on an MNIST variant (resumes an interrupted run)",
                        description="Train a CGN teacher: LSGAN with a class-conditional discriminator, binary "
                                    "mask loss, mask-size prior and a texture term. Writes RUN_DIR/teacher/ "
                                    "(a CGN folder for load_cgn), checkpoints, sample grids and losses.csv.")
    t.add_argument("--variant", required=True, choices=VARIANTS, help="training data (label-tied train split)")
    t.add_argument("--run-dir", required=True, help="run directory; the teacher goes to RUN_DIR/teacher/")
    t.add_argument("--preset", default="quick", choices=sorted(PRESETS),
                   help="quick: minutes on a CPU; full: the CGN paper's setting (default: quick)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--overwrite", action="store_true",
                   help="start over when RUN_DIR/teacher holds a teacher or checkpoint of other settings (otherwise refused)")
    add_config_arguments(t, TeacherTrainConfig)
    t.set_defaults(func=train_command)


def counterfactual_grids(cgn: CGN, seed: int = 0):
    """(10 × 10 composites: shape class by column, texture/background class by row; mechanism grid)."""
    n = cgn.n_classes
    g = torch.Generator().manual_seed(seed)
    y_shape = torch.arange(n).repeat(n)
    y_tex = torch.arange(n).repeat_interleave(n)
    _, _, _, x = cgn.sample(y_shape, y_tex, y_tex, generator=g)
    classes = [str(i) for i in range(n)]
    cf = image_grid(x, n, row_labels=classes, col_labels=classes, title="shape class → (columns); texture class ↓ (rows)")
    m, f, b, x = cgn.sample(torch.arange(n), generator=g)
    mech = stack_grids([image_grid(t, 1, title=name) for name, t in
                        (("mask", m), ("fg", f), ("bg", b), ("x", x))], gap=2)
    return cf, mech


def sample_command(args: argparse.Namespace) -> None:
    cgn = load_cgn(args.cgn)
    cf, mech = counterfactual_grids(cgn, args.seed)
    out = Path(args.out)
    save_png(cf, out)
    mech_path = out.with_name(out.stem + "_mechanisms" + (out.suffix or ".png"))
    save_png(mech, mech_path)
    print(f"wrote {out} and {mech_path}")


def convert_command(args: argparse.Namespace) -> None:
    cgn = load_cgn(args.pth) if args.pth.endswith((".pth", ".pt")) else load_cgn(Path(args.pth))
    cgn.save_pretrained(args.out)
    print(f"wrote {args.out} ({cgn.get_num_params():,} parameters)")


def train_command(args: argparse.Namespace) -> None:
    from ..config import config_from_args
    from ..teacher_training import PRESETS, TeacherTrainConfig, train_teacher

    config = config_from_args(TeacherTrainConfig, args, base=PRESETS[args.preset])
    cgn = train_teacher(args.variant, args.run_dir, config, progress=not args.no_progress, overwrite=args.overwrite)
    out = Path(args.run_dir) / "teacher"
    print(f"wrote {out} ({cgn.get_num_params():,} parameters); grid: {out / 'grid.png'}")
