"""`skdcgn teacher sample|convert|train`: look at, convert and train CGN teachers."""
from __future__ import annotations

import argparse
from pathlib import Path

from . import write_dumped_config
from ..api import load_cgn
from ..grids import counterfactual_grids, save_png


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `teacher` subcommand's parser to `subparsers` (the CLI's `add_subparsers()` object).

    Its actions: sample, convert, train.
    """
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


def sample_command(args: argparse.Namespace) -> None:
    """`skdcgn teacher sample`: write the counterfactual grid PNG and, beside it, the mechanism grid."""
    cgn = load_cgn(args.cgn)
    cf, mech = counterfactual_grids(cgn, args.seed)
    out = Path(args.out)
    save_png(cf, out)
    mech_path = out.with_name(out.stem + "_mechanisms" + (out.suffix or ".png"))
    save_png(mech, mech_path)
    print(f"wrote {out} and {mech_path}")


def convert_command(args: argparse.Namespace) -> None:
    """`skdcgn teacher convert`: load a CGN checkpoint and save it as a CGN folder."""
    cgn = load_cgn(args.pth)
    cgn.save_pretrained(args.out)
    print(f"wrote {args.out} ({cgn.get_num_params():,} parameters)")


def train_command(args: argparse.Namespace) -> None:
    """`skdcgn teacher train`: train a CGN teacher on a variant into RUN_DIR/teacher/."""
    from ..config import config_from_args
    from ..teacher_training import PRESETS, TeacherTrainConfig, train_teacher

    config = config_from_args(TeacherTrainConfig, args, base=PRESETS[args.preset])
    if write_dumped_config(args, config):
        return
    cgn = train_teacher(args.variant, args.run_dir, config, progress=not args.no_progress, overwrite=args.overwrite)
    out = Path(args.run_dir) / "teacher"
    print(f"wrote {out} ({cgn.get_num_params():,} parameters); grid: {out / 'grid.png'}")
