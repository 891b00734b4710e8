"""`skdcgn counterfactuals`: write a counterfactual dataset from a teacher or distilled students."""
from __future__ import annotations

import argparse
import time

from ..compose import COMPOSERS


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `counterfactuals` subcommand's parser to `subparsers` (the CLI's `add_subparsers()` object)."""
    p = subparsers.add_parser(
        "counterfactuals", help="sample a counterfactual dataset (sharded, resumable) from a CGN",
        description="Each shape sample gets --per-shape random foreground/background classes; "
                    "its label is the shape's class. Run the same command again to resume.")
    p.add_argument("--cgn", default="double_colored",
                   help="shipped teacher name, students:<run dir>, CGN folder or .pth (default: double_colored)")
    p.add_argument("--n", type=int, default=100_000, help="number of images (default 100000)")
    p.add_argument("--per-shape", type=int, default=10, help="counterfactuals per mask (default 10)")
    p.add_argument("--out", required=True, help="dataset folder")
    p.add_argument("--composer", default="standard", help=f"composition variant: {', '.join(COMPOSERS)} (default: standard)")
    p.add_argument("--no-counterfactual", dest="counterfactual", action="store_false",
                   help="tie foreground and background to the shape's class (no counterfactuals)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-size", type=int, default=10_000, help="images per shard file (default 10000)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: auto)")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset in --out made with other settings")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ..api import load_cgn
    from ..config import resolve_device
    from ..counterfactuals import generate_counterfactuals

    device = resolve_device(args.device)
    cgn = load_cgn(args.cgn).to(device)
    t0 = time.perf_counter()
    out = generate_counterfactuals(cgn, args.out, n=args.n, per_shape=args.per_shape, seed=args.seed,
                                   composer=args.composer, counterfactual=args.counterfactual,
                                   shard_size=args.shard_size, cgn_name=args.cgn, overwrite=args.overwrite)
    print(f"wrote {out} ({args.n} images, preview {out / 'preview.png'}) in {time.perf_counter() - t0:.1f} s")
    return 0
