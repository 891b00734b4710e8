"""`skdcgn evaluate`: Inception (or domain-net) FID, KID and IS of students against their teacher."""
from __future__ import annotations

import argparse

from ..errors import SkdcgnError
from ..metrics.inception_eval import UNITS, evaluate_against_teacher, render_markdown


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `evaluate` subcommand's parser to `subparsers` (the CLI's `add_subparsers()` object)."""
    p = subparsers.add_parser(
        "evaluate", help="FID / KID / IS of students vs the teacher on the same seeded inputs (Inception or domain net)",
        description="Sample the teacher and each student on identical seeded labels and noise, and report FID "
                    "student vs teacher with the teacher's own half-vs-half floor, KID, and Inception Score. "
                    "Inception needs the optional extra: pip install 'skdcgn[fid]'.")
    add_arguments(p)
    p.set_defaults(func=run_from_args)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options for a CLI subcommand (pair with `run_from_args`)."""
    parser.add_argument("--teacher", required=True, help="a teacher for skdcgn.load_cgn (e.g. imagenet-cgn:cgn.pth)")
    parser.add_argument("--student", action="append", required=True, metavar="[NAME=]SPEC",
                        help="a student CGN for load_cgn (e.g. students:runs/in256); repeat for several")
    parser.add_argument("--n", type=int, default=50_000, help="samples per model (default 50000)")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: auto)")
    parser.add_argument("--classes", default=None,
                        help="class indices to draw labels from, e.g. '0-9,207' (default: all)")
    parser.add_argument("--units", nargs="+", default=["composite"], choices=UNITS,
                        help="composite (default) and/or the mechanisms' outputs")
    parser.add_argument("--features", default="inception", choices=("inception", "domain"),
                        help="inception (the fid extra; default) or domain (the shipped CGN-MNIST domain net, "
                             "whose digit logits then give IS)")
    parser.add_argument("--inception-output", default=None, metavar="FILE",
                        help="Inception output layer for IS: a .safetensors with output.weight [1008, 2048] "
                             "(the shipped default_1.pt has none; docs/imagenet.md says how to convert NVlabs' file)")
    parser.add_argument("--splits", type=int, default=10, help="IS splits (default 10)")
    parser.add_argument("--kid-subsets", type=int, default=100)
    parser.add_argument("--kid-subset-size", type=int, default=1000)
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def parse_classes(text: str | None) -> list[int] | None:
    """'0-9,207' → [0, …, 9, 207]; None stays None."""
    if text is None:
        return None
    out: list[int] = []
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            lo, _, hi = part.partition("-")
            out.extend(range(int(lo), int(hi) + 1) if hi else [int(lo)])
    except ValueError:
        raise SkdcgnError(f"--classes: expected indices and ranges like '0-9,207', got {text!r}") from None
    if not out:
        raise SkdcgnError(f"--classes: no class indices in {text!r}")
    return out


def run_from_args(args: argparse.Namespace) -> int:
    """Load the models and the extractor, evaluate, print the table, write --out; exit code 0."""
    from ..api import load_cgn
    from ..config import resolve_device
    from ..io import write_json

    device = resolve_device(args.device)
    students: dict[str, object] = {}
    for i, spec in enumerate(args.student):
        name, eq, target = spec.partition("=")
        if not eq or ":" in name or "/" in name:  # a bare spec (load_cgn specs contain ':' or '/')
            name, target = (f"student{i + 1}" if len(args.student) > 1 else "student"), spec
        students[name] = load_cgn(target)
    teacher = load_cgn(args.teacher)
    classifier = None
    if args.features == "domain":
        from ..metrics.domain import load_domain_extractor

        if args.inception_output:
            raise SkdcgnError("--inception-output applies to --features inception only")
        extractor = load_domain_extractor(device)
        classifier = extractor.model
    else:
        from ..metrics.fid import load_inception_extractor

        extractor = load_inception_extractor(device, output_layer=args.inception_output)
    result = evaluate_against_teacher(teacher, students, args.n, extractor, args.batch_size, args.seed, device,
                                      not args.no_progress, parse_classes(args.classes), units=args.units,
                                      classifier=classifier, splits=args.splits, kid_subsets=args.kid_subsets,
                                      kid_subset_size=args.kid_subset_size)
    result["protocol"]["teacher"] = args.teacher
    result["protocol"]["students"] = {k: v for k, v in zip(students, args.student)}
    if args.inception_output and args.features == "inception":
        from ..metrics.fid import tensor_sha256

        result["protocol"]["inception_output_sha256"] = tensor_sha256(extractor.output_weight)
    print(render_markdown(result))
    if args.out:
        write_json(args.out, result)
        print(f"wrote {args.out}")
    return 0
