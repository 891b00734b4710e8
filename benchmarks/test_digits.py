"""Does the gap to the published accuracy come from which MNIST digits are tested? (writes docs/test_digits.md)

Every classifier of a `skdcgn run` (each row, each seed) is evaluated on two OOD test sets with the
same random class draws: on MNIST training images 50,000-59,999 (the CGN authors' loaders, and
ours) and on MNIST's official 10,000 test digits (`build_variant(..., digits="t10k")`; the LNTL
colored MNIST that the released colored teacher learned from tests on these). Evaluation only:
nothing is trained.

    python benchmarks/test_digits.py [--runs 'runs/full-{variant}'] [--variants ...] [--rows teacher_cf student_cf]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from palette_shift import accuracy_table, classifiers, write_report  # noqa: E402  (a sibling script)

from skdcgn.data import VARIANTS, build_variant, load_variant_uint8  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default="runs/full-{variant}", help="run folder per variant ({variant} is replaced)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--rows", nargs="+", default=["teacher_cf", "student_cf"],
                   help="which rows' classifiers (default: the counterfactual rows the paper reports)")
    p.add_argument("--out", default="docs/test_digits.md")
    args = p.parse_args()
    torch.manual_seed(0)
    t0 = time.time()
    body = []
    for v in args.variants:
        vdir = Path(args.runs.format(variant=v)) / v
        found = classifiers(vdir, args.rows)
        if not found:
            sys.exit(f"test_digits: no classifiers under {vdir}/classifiers (run `skdcgn run --variant {v}` first)")
        sets = {"train": load_variant_uint8(v, "test"), "t10k": build_variant(v, "test", digits="t10k")}
        body += [f"## {v}", "", f"Run folder `{vdir}`. OOD test accuracy (%), mean ± std over seeds (n):", "",
                 *accuracy_table(v, found, sets, ("training digits 50,000-59,999", "official test digits")), ""]
    write_report(args.out, "Which MNIST digits are tested, and the OOD accuracy", "benchmarks/test_digits.py",
                 __doc__.split("\n\n")[1], t0, body)


if __name__ == "__main__":
    main()
