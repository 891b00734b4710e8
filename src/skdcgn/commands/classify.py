"""`skdcgn classify train|eval`: invariant classifiers on variants, counterfactuals or a mix."""
from __future__ import annotations

import argparse
import time

from . import write_dumped_config
from ..config import add_config_arguments
from ..counterfactuals import STREAM_PREFIX
from ..errors import SkdcgnError
from ..invariance import ClassifierConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `classify` subcommand's parser to `subparsers` (the CLI's `add_subparsers()` object).

    Its actions: train, eval.
    """
    parser = subparsers.add_parser("classify", help="train and evaluate invariant classifiers",
                                   description="Train a classifier (CGN MNIST protocol by default) and "
                                               "evaluate it in and out of distribution.")
    sub = parser.add_subparsers(dest="classify_command", metavar="ACTION")
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])

    t = sub.add_parser("train", help="train a classifier (resumable; run again to continue)")
    t.add_argument("--data", required=True,
                   help="a counterfactual dataset folder, variant:NAME[:SPLIT] (original data, split train by "
                        "default), or stream:CGN: counterfactuals sampled at every step from CGN (a shipped teacher "
                        "name, students:<run dir>, hybrid:..., a CGN folder), seeded by --seed and the step, never "
                        "one twice, nothing stored")
    t.add_argument("--mix", nargs="+", default=[], metavar="SOURCE",
                   help="more sources (folders or variant:NAME) concatenated with --data (not with a stream)")
    t.add_argument("--per-shape", type=int, default=None, metavar="K",
                   help="with stream:CGN: composites per mask within a batch (default 10, as the stored sets; 1: a "
                        "mask per composite)")
    t.add_argument("--steps-per-epoch", type=int, default=None, metavar="N",
                   help="with stream:CGN: steps per epoch, the StepLR and checkpoint period (default 1563: the "
                        "CGN paper's 100,000 counterfactuals at batch 64)")
    t.add_argument("--composer", default=None, metavar="NAME",
                   help="with stream:CGN: the composition-study variant (default standard)")
    t.add_argument("--out", required=True, help="run folder: checkpoint, log, classifier, manifest")
    t.add_argument("--overwrite", action="store_true",
                   help="replace a classifier (or its checkpoint) in --out made with other settings or data")
    add_config_arguments(t, ClassifierConfig)
    t.set_defaults(func=_train)

    e = sub.add_parser("eval", help="print a classifier's accuracy on a variant split or a dataset folder")
    e.add_argument("--classifier", required=True, help="folder written by `classify train`")
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--variant", help="colored, double_colored or wildlife")
    src.add_argument("--data", help="a counterfactual dataset folder")
    e.add_argument("--split", default="test", help="test (out of distribution, default), test_iid or train")
    e.add_argument("--palette-of", default=None, metavar="CGN",
                   help="with --variant colored|double_colored: rebuild the split in the class colours this CGN "
                        "draws (a skdcgn.load_cgn spec, e.g. the teacher's name), same digits and draws")
    e.add_argument("--batch-size", type=int, default=1000)
    e.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: auto)")
    e.set_defaults(func=_eval)


def _train(args: argparse.Namespace) -> int:
    from ..config import config_from_args
    from ..invariance import load_training_data, train_classifier

    config = config_from_args(ClassifierConfig, args)
    stream_options = {"per_shape": args.per_shape, "steps_per_epoch": args.steps_per_epoch, "composer": args.composer}
    streamed = args.data.startswith(STREAM_PREFIX)
    if not streamed and any(v is not None for v in stream_options.values()):
        given = [f"--{k.replace('_', '-')}" for k, v in stream_options.items() if v is not None]
        raise SkdcgnError(f"{', '.join(given)}: only with --data stream:CGN")
    if streamed and args.mix:
        raise SkdcgnError("--mix: a stream is not concatenated with stored sources; train on one or the other")
    if write_dumped_config(args, config):
        return 0
    if streamed:
        return _train_on_stream(args, config, {k: v for k, v in stream_options.items() if v is not None})
    images, labels = load_training_data([args.data, *args.mix])
    t0 = time.perf_counter()
    model = train_classifier(images, labels, config, args.out, overwrite=args.overwrite)
    used = min(len(labels), config.max_examples or len(labels))
    print(f"wrote {args.out} ({model.get_num_params():,} parameters, {used} of {len(labels)} training images, "
          f"{time.perf_counter() - t0:.1f} s)")
    return 0


def _train_on_stream(args: argparse.Namespace, config: ClassifierConfig, options: dict) -> int:
    from ..api import load_cgn
    from ..counterfactuals import CounterfactualStream, parse_stream_spec
    from ..invariance import train_classifier_on_stream

    spec = parse_stream_spec(args.data)
    stream = CounterfactualStream(load_cgn(spec), seed=config.seed, cgn_name=spec, **options)
    t0 = time.perf_counter()
    model = train_classifier_on_stream(stream, config, args.out, overwrite=args.overwrite)
    steps = min(config.epochs * stream.steps_per_epoch, config.max_steps or config.epochs * stream.steps_per_epoch)
    print(f"wrote {args.out} ({model.get_num_params():,} parameters, {steps} steps of {config.batch_size} streamed "
          f"counterfactuals of {spec}, {time.perf_counter() - t0:.1f} s)")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from ..api import load_classifier
    from ..config import resolve_device
    from ..errors import SkdcgnError
    from ..invariance import accuracy, load_source

    if not 1 <= args.batch_size <= 1_000_000:
        raise SkdcgnError(f"--batch-size must be between 1 and 1000000, got {args.batch_size}")
    if args.palette_of is not None and not args.variant:
        raise SkdcgnError("--palette-of needs --variant (colored or double_colored)")
    model = load_classifier(args.classifier).to(resolve_device(args.device))
    where = f"{args.variant} {args.split}" if args.variant else args.data
    if args.palette_of is not None:
        from ..api import load_cgn
        from ..metrics.palette import palette_test_set

        images, labels = palette_test_set(args.variant, load_cgn(args.palette_of), args.split)
        where += f" in the colours of {args.palette_of}"
    else:
        images, labels = load_source(f"variant:{args.variant}:{args.split}" if args.variant else args.data)
    acc = accuracy(model, images, labels, batch_size=args.batch_size)
    print(f"accuracy {acc:.4f} on {where} ({len(labels)} images)")
    return 0
