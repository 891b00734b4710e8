"""`skdcgn imagenet train-classifier|in9|cue-conflict`: the CGN invariant classifier on ImageNet."""
from __future__ import annotations

import argparse
import time

from . import write_dumped_config
from ..config import add_config_arguments
from ..imagenet_classifier import EnsembleTrainConfig

HEAD_CHOICES = ("shape", "texture", "background", "mean", "shape_texture")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `imagenet` subcommand's parser to `subparsers` (the CLI's `add_subparsers()` object).

    Its actions: train-classifier, in9, cue-conflict.
    """
    parser = subparsers.add_parser("imagenet", help="ImageNet: train the invariant classifier, score IN-9 and cue-conflict",
                                   description="The CGN invariant classifier (ResNet-50 + shape/texture/background "
                                               "heads): training on real ImageNet plus counterfactuals, and its "
                                               "out-of-distribution scores beside the CGN paper's.")
    sub = parser.add_subparsers(dest="imagenet_command", metavar="ACTION")
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])

    t = sub.add_parser("train-classifier", help="train the invariant classifier (resumable; torchrun for DDP)",
                       description="Real images from an ImageFolder tree plus counterfactuals, stored or streamed "
                                   "from a CGN. Under torchrun it trains data-parallel (batch sizes are global).")
    t.add_argument("--real", required=True, help="ImageFolder tree of real images: ROOT/<class>/<image>")
    t.add_argument("--class-index", default=None, metavar="JSON",
                   help="{class folder: class index} (e.g. ImageNet synset -> index); default: sorted folder order")
    t.add_argument("--counterfactuals", default=None, metavar="SOURCE",
                   help="stream:<CGN spec> (sampled on the training device every step; any skdcgn.load_cgn spec, e.g. "
                        "students:runs/in256 or imagenet-cgn:cgn.pth), shards:<folder> (a tar set of `skdcgn "
                        "counterfactuals --format tar`, read epoch after epoch in seeded orders), or "
                        "tensors:<file.safetensors> ('images' uint8 [N,3,H,W], 'labels' int64 [N,3]); omit with --cf-ratio 0")
    t.add_argument("--backbone", default=None, metavar="PTH",
                   help="torchvision-layout ResNet-50 weights to start from (e.g. resnet50-11ad3fa6.pth); fc dropped")
    t.add_argument("--out", required=True, help="run folder: checkpoint, log, classifier, manifest")
    t.add_argument("--overwrite", action="store_true", help="replace a run in --out made with other settings")
    t.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    add_config_arguments(t, EnsembleTrainConfig)
    t.set_defaults(func=_train)

    for name, helper, default_heads in (("in9", "ImageNet-9 accuracies and BG-gap", ["mean", "shape_texture"]),
                                        ("cue-conflict", "cue-conflict shape bias", ["shape", "texture", "background",
                                                                                     "mean"])):
        e = sub.add_parser(name, help=f"{helper} of a trained classifier, beside the CGN paper's numbers",
                           description=f"{helper} (skdcgn.metrics.ood) of each head, printed beside the CGN paper's "
                                       "numbers; data and mappings are user-provided (docs/imagenet_ood.md).")
        e.add_argument("--classifier", required=True, help="folder written by `imagenet train-classifier`")
        e.add_argument("--root", required=True,
                       help="IN-9: bg_challenge/ (ROOT/<variant>/val/<class>/...)" if name == "in9" else
                       "cue-conflict stimuli: ROOT/<category>/<shape><i>-<texture><j>.png")
        e.add_argument("--mapping", required=True,
                       help="in_to_in9.json (ImageNet -> IN-9 class)" if name == "in9" else
                       "16-class mapping JSON {category: [ImageNet indices]}")
        e.add_argument("--heads", nargs="+", choices=HEAD_CHOICES, default=default_heads,
                       help=f"readouts to score: a head, mean (all three), shape_texture (shape and texture: "
                            f"the authors' BG-gap readout) (default: {' '.join(default_heads)})")
        if name == "in9":
            e.add_argument("--variants", nargs="+", default=None, help="variants to score (default: all present)")
        e.add_argument("--resize", type=int, default=None if name == "in9" else 256,
                       help="shorter side before the crop (default: " + ("none, as the challenge" if name == "in9"
                                                                        else "256, as the CGN authors") + ")")
        e.add_argument("--crop", type=int, default=None if name == "in9" else 224,
                       help="centre crop (default: " + ("none" if name == "in9" else "224") + ")")
        e.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
        e.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: auto)")
        e.add_argument("--out", default=None, metavar="JSON", help="also write the results (and the paper's) here")
        e.add_argument("--quiet", action="store_true", help="no progress bars")
        e.set_defaults(func=_in9 if name == "in9" else _cue_conflict)


def _counterfactuals(spec: str | None, size: int):
    from ..errors import SkdcgnError
    from ..imagenet_classifier import StoredCounterfactuals, StreamedCounterfactuals, load_counterfactual_tensors

    if spec is None:
        return None
    kind, _, target = spec.partition(":")
    if kind == "stream" and target:
        from ..api import load_cgn

        return StreamedCounterfactuals(load_cgn(target), size)
    if kind == "tensors" and target:
        return StoredCounterfactuals(load_counterfactual_tensors(target), size)
    if kind == "shards" and target:
        from ..data.shards import ShardEpochs

        return StoredCounterfactuals(ShardEpochs(target), size)
    raise SkdcgnError(f"--counterfactuals: expected stream:<CGN spec>, shards:<folder> or tensors:<file>, got {spec!r}")


def _train(args: argparse.Namespace) -> int:
    from ..config import config_from_args
    from ..imagenet_classifier import ImageFolderImages, train_ensemble

    config = config_from_args(EnsembleTrainConfig, args)
    if write_dumped_config(args, config):
        return 0
    real = ImageFolderImages(args.real, args.class_index)
    cf = _counterfactuals(args.counterfactuals, config.image_size) if config.cf_ratio > 0 else None
    t0 = time.perf_counter()
    model = train_ensemble(real, cf, config, args.out, backbone=args.backbone, progress=not args.quiet,
                           overwrite=args.overwrite)
    from ..distill.distributed import dist_env

    if model is not None and dist_env().is_main:  # under torchrun, one line from rank 0
        print(f"wrote {args.out} ({model.get_num_params():,} parameters, {config.steps} steps, "
              f"{time.perf_counter() - t0:.1f} s)")
    return 0


def _eval_setup(args: argparse.Namespace):
    from ..imagenet_classifier import load_ensemble
    from ..metrics.ood import Preprocess

    kw = {"batch_size": args.batch_size, "device": args.device, "progress": not args.quiet,
          "preprocess": Preprocess(resize=args.resize, crop=args.crop)}
    return load_ensemble(args.classifier), kw


def _in9(args: argparse.Namespace) -> int:
    from ..imagenet_classifier import PAPER_IN9, PAPER_SOURCE, evaluate_in9, in9_table
    from ..io import write_json

    model, kw = _eval_setup(args)
    res = evaluate_in9(model, args.root, args.mapping, heads=args.heads, variants=args.variants, **kw)
    print(in9_table(res))
    if args.out:
        write_json(args.out, {"heads": res, "paper": PAPER_IN9, "paper_source": PAPER_SOURCE, "units": "fractions; paper in %"})
    return 0


def _cue_conflict(args: argparse.Namespace) -> int:
    from ..imagenet_classifier import PAPER_SHAPE_BIAS, PAPER_SOURCE, PAPER_TOP1, cue_conflict_table, evaluate_cue_conflict
    from ..io import write_json

    model, kw = _eval_setup(args)
    res = evaluate_cue_conflict(model, args.root, args.mapping, heads=args.heads, **kw)
    print(cue_conflict_table(res))
    if args.out:
        write_json(args.out, {"heads": res, "paper": {"shape_bias": PAPER_SHAPE_BIAS, "top1": PAPER_TOP1},
                              "paper_source": PAPER_SOURCE, "units": "fractions; paper in %"})
    return 0
