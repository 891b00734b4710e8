"""`skdcgn data preview|build`: look at and pre-build the MNIST variants."""
from __future__ import annotations

import argparse
import time

import torch

from ..errors import SkdcgnError
from ..grids import image_grid, save_png


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `data` subcommand's parser to `subparsers` (the CLI's `add_subparsers()` object).

    Its actions: preview, build.
    """
    parser = subparsers.add_parser("data", help="preview or pre-build the MNIST variants",
                                   description="Preview or pre-build the MNIST variants (colored, "
                                               "double_colored, wildlife; splits train, test, test_iid).")
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION")
    # Without an action, show this command's help (exit code 2, like the top-level CLI).
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])

    # Variant and split are validated by the library (not argparse `choices`), so a bad name is a
    # one-line SkdcgnError listing the valid ones.
    p = sub.add_parser("preview", help="write a labelled grid of images (one row per class) as PNG")
    p.add_argument("--variant", required=True, help="colored, double_colored or wildlife")
    p.add_argument("--split", default="train", help="train, test or test_iid (default: train)")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--n", type=int, default=100, help="number of images, rounded up to a multiple of 10 (default 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mnist-dir", default=None, help="MNIST IDX folder (default: $SKDCGN_MNIST_DIR or the shipped copy)")
    p.set_defaults(func=_preview)

    b = sub.add_parser("build", help="build and cache variants, printing the time each takes")
    b.add_argument("--variant", default="all", help="all (default), colored, double_colored or wildlife")
    b.add_argument("--split", default="all", help="all (default), train, test or test_iid")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--mnist-dir", default=None)
    b.set_defaults(func=_build)


def _preview(args: argparse.Namespace) -> int:
    from ..data import load_variant

    if not 1 <= args.n <= 1000:
        raise SkdcgnError(f"--n must be between 1 and 1000, got {args.n}")
    images, labels = load_variant(args.variant, args.split, seed=args.seed, mnist_dir=args.mnist_dir)
    per_class = -(-args.n // 10)
    # Row k shows the first images labelled k: the row label is each image's label.
    idx = torch.cat([torch.nonzero(labels == k).flatten()[:per_class] for k in range(10)])
    grid = image_grid(images[idx], nrow=per_class, row_labels=[str(k) for k in range(10)],
                      title=f"{args.variant} / {args.split} / seed {args.seed}  (row = label)")
    save_png(grid, args.out)
    print(f"wrote {args.out} ({len(idx)} images)")
    return 0


def _build(args: argparse.Namespace) -> int:
    from ..data import SPLITS, VARIANTS
    from ..data.variants import load_variant_uint8, variant_cache_path

    variants = VARIANTS if args.variant == "all" else (args.variant,)
    splits = SPLITS if args.split == "all" else (args.split,)
    for v in variants:
        for s in splits:
            cached = variant_cache_path(v, s, args.seed, args.mnist_dir).is_file()
            t0 = time.perf_counter()
            images, _ = load_variant_uint8(v, s, seed=args.seed, mnist_dir=args.mnist_dir)
            dt = time.perf_counter() - t0
            print(f"{v:15s} {s:9s} {images.shape[0]:6d} images  {dt:6.2f} s  ({'cached' if cached else 'built'})")
    return 0
