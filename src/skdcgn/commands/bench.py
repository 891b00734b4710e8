"""`skdcgn bench`: measure cost and quality, teacher vs students; write docs/results.md + .json."""
from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `bench` subcommand's parser to `subparsers` (the CLI's `add_subparsers()` object)."""
    p = subparsers.add_parser(
        "bench", help="measure cost (params, MACs, images/s) and quality (FID/KID, mask health); write docs/results.md",
        description="Measure teacher and students side by side in one run and write docs/results.md with its "
                    "JSON twin (runs of other presets/devices already there are kept).")
    p.add_argument("--preset", default="quick", help="quick (≤ 10 min on 2 CPU cores) or full (default: quick)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    p.add_argument("--students", default=None, metavar="RUN_DIR",
                   help="run directory (or folder) with distilled students; without it, the bench distils "
                        "them itself (distill preset quick, or default for --preset full) unless --no-distill")
    p.add_argument("--distill-dir", default=None, help="where to distil (default: runs/bench-<preset>-<teacher>)")
    p.add_argument("--no-distill", dest="distill", action="store_false", help="without --students: teacher only")
    p.add_argument("--teacher", default="double_colored", help="shipped teacher: colored, double_colored or wildlife")
    p.add_argument("--out", default="docs/results.md", help="markdown file; the JSON twin goes beside it")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--no-quality", dest="quality", action="store_false", help="cost tables only")
    p.add_argument("--imagenet", action="store_true",
                   help="instead: cost of the full-size random-weight CGN-ImageNet teacher (3x BigGAN-deep-256 + "
                        "U2-Net) vs the 256-px students (params, MACs, images/s); writes docs/imagenet_results.json")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1], help="with --imagenet (default: 1)")
    p.set_defaults(func=_bench)


def _bench(args: argparse.Namespace) -> int:
    from ..bench import run_bench
    from ..results.records import command_line

    if args.imagenet:
        from ..bench import run_imagenet_bench
        from ..results.render import render_imagenet

        print(render_imagenet(run_imagenet_bench(args.device, tuple(args.batch_sizes), threads=args.threads)))
        return 0
    run_bench(args.preset, args.device, args.teacher, args.students, args.out, command=command_line(),
              threads=args.threads, quality=args.quality,
              distill=args.distill, distill_dir=args.distill_dir)
    return 0
