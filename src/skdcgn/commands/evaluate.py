"""`skdcgn evaluate`: Inception (or domain-net) FID, KID and IS of students against their teacher."""
from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..metrics import inception_eval

    p = subparsers.add_parser(
        "evaluate", help="FID / KID / IS of students vs the teacher on the same seeded inputs (Inception or domain net)",
        description="Sample the teacher and each student on identical seeded labels and noise, and report FID "
                    "student vs teacher with the teacher's own half-vs-half floor, KID, and Inception Score. "
                    "Inception needs the optional extra: pip install 'skdcgn[fid]'.")
    inception_eval.add_arguments(p)
    p.set_defaults(func=inception_eval.run_from_args)
