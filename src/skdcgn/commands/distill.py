"""`skdcgn distill`: distil a CGN teacher's mechanisms into small students (black box, source-free)."""
from __future__ import annotations

import argparse
import json

from . import write_dumped_config
from ..config import add_config_arguments, config_from_args
from ..errors import SkdcgnError
from ..models.cgn import MECHANISMS


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `distill` subcommand's parser to `subparsers` (the CLI's `add_subparsers()` object)."""
    from ..distill.trainer import PRESETS, DistillConfig

    p = sub.add_parser("distill", help="distil a CGN teacher into three small students (transfer set, training, evaluation)",
                       description="Query the teacher's mechanisms on seeded (u, y), train one TinyGAN-style student per "
                                   "mechanism, and compare students with the teacher on held-out inputs. Interrupted runs "
                                   "resume; finished stages are skipped.")
    p.add_argument("--teacher", default="double_colored",
                   help="shipped teacher name, CGN folder or .pth (default: double_colored)")
    p.add_argument("--mechanism", default="all", choices=["all", *MECHANISMS], help="which mechanism(s) to distil")
    p.add_argument("--run-dir", required=True, help="run directory (writes transfer/ and distill/ in it)")
    p.add_argument("--preset", default="default", choices=list(PRESETS), help="starting config (default: default)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace transfer sets and students in --run-dir made with other settings (otherwise refused)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_config_arguments(p, DistillConfig)
    p.set_defaults(func=distill_command)


def distill_command(args: argparse.Namespace) -> None:
    """`skdcgn distill`: distil the teacher's mechanisms into students and print their size and held-out error.

    Raises `SkdcgnError` if `--teacher` names students (`students:...`).
    """
    import dataclasses

    from ..api import load_cgn
    from ..distill.trainer import PRESETS, DistillConfig, distill

    config = config_from_args(DistillConfig, args, base=PRESETS[args.preset])
    if write_dumped_config(args, config):
        return
    if args.dry_run:
        print(json.dumps(dataclasses.asdict(config), indent=2))
        return
    if args.teacher.startswith("students:"):
        raise SkdcgnError("--teacher: distil from a teacher, not from students")
    teacher = load_cgn(args.teacher)
    mechanisms = list(MECHANISMS) if args.mechanism == "all" else [args.mechanism]
    result = distill(teacher, mechanisms, args.run_dir, config, progress=not args.no_progress,
                     overwrite=args.overwrite)
    for m, r in result.get("mechanisms", {}).items():
        if m in mechanisms:
            extra = f", mask IoU@0.5 {r['iou@0.5']:.3f}" if "iou@0.5" in r else ""
            print(f"{m}: {r['params']:,} params ({r['params'] / r['teacher_params']:.0%} of the teacher), "
                  f"held-out L1 {r['l1']:.4f}{extra}")
    if "composites_per_s" in result.get("composite", {}):
        c = result["composite"]
        print(f"composites: held-out L1 {c['l1']:.4f}; {c['composites_per_s']['students']:.0f} vs "
              f"{c['composites_per_s']['teacher']:.0f} composites/s ({c['composites_per_s']['speedup']}x)")
    print(f"wrote {args.run_dir}/distill/ (students, eval.json, compare_*.png)")
