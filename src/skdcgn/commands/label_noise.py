"""`skdcgn label-noise`: a counterfactual dataset without the masks that do not read as their label."""
from __future__ import annotations

import argparse

from . import write_dumped_config
from ..config import add_config_arguments
from ..invariance import ClassifierConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `label-noise` subcommand's parser to `subparsers` (the CLI's `add_subparsers()` object)."""
    p = subparsers.add_parser(
        "label-noise", help="drop the composites of masks that confident learning flags as mislabelled",
        description="Source-free label-noise filtering (Confident Learning, Northcutt et al. 2021): classifiers "
                    "trained on folds of the dataset's masks score the held-out masks; a mask confidently read "
                    "as another class is dropped with all its counterfactuals. Writes a dataset folder "
                    "(`classify train --data OUT`), scores.safetensors and flagged.png. Resumable.")
    p.add_argument("--data", required=True, help="a counterfactual dataset folder (`skdcgn counterfactuals`)")
    p.add_argument("--out", required=True, help="folder of the filtered dataset")
    p.add_argument("--folds", type=int, default=2, help="folds of masks, 2-20 (default 2)")
    p.add_argument("--per-shape", type=int, default=None,
                   help="composites per mask (default: the dataset's manifest)")
    p.add_argument("--max-flagged", type=float, default=0.25,
                   help="refuse to drop more than this fraction of masks (weak fold classifiers; default 0.25)")
    p.add_argument("--overwrite", action="store_true", help="replace a filtered dataset in --out made otherwise")
    add_config_arguments(p, ClassifierConfig)  # the fold classifiers' training; --seed: folds too
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ..config import config_from_args
    from ..label_noise import filter_labels

    config = config_from_args(ClassifierConfig, args)
    if write_dumped_config(args, config):
        return 0
    s = filter_labels(args.data, args.out, config, folds=args.folds, per_shape=args.per_shape,
                      max_flagged=args.max_flagged,
                      overwrite=args.overwrite)
    print(f"wrote {args.out}: {s['flagged_masks']} of {s['masks']} masks flagged ({100 * s['flagged_fraction']:.1f}%), "
          f"{s['kept_images']} of {s['images']} images kept; see {args.out}/flagged.png")
    return 0
