"""Does the gap to the published accuracy come from which MNIST digits are tested? (writes docs/test_digits.md)

Every classifier of a `skdcgn run` (each row, each seed) is evaluated on two OOD test sets with the
same random class draws: on MNIST training images 50,000-59,999 (the CGN authors' loaders, and
ours) and on MNIST's official 10,000 test digits (`build_variant(..., digits="t10k")`; the LNTL
colored MNIST that the released colored teacher learned from tests on these). Evaluation only:
nothing is trained.

    python benchmarks/test_digits.py [--runs 'runs/full-{variant}'] [--variants ...] [--rows teacher_cf student_cf]
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from palette_shift import accuracy_table, benchmark_args, classifiers, variant_dirs, write_report  # noqa: E402  (a sibling script)

from skdcgn.data import VARIANTS, build_variant, load_variant_uint8  # noqa: E402


def main() -> None:
    args = benchmark_args(__doc__, VARIANTS, "docs/test_digits.md")
    torch.manual_seed(0)
    t0 = time.time()
    body = []
    for v, vdir in variant_dirs(args, "test_digits"):
        sets = {"train": load_variant_uint8(v, "test"), "t10k": build_variant(v, "test", digits="t10k")}
        body += [f"## {v}", "", f"Run folder `{vdir}`. OOD test accuracy (%), mean ± std over seeds (n):", "",
                 *accuracy_table(v, classifiers(vdir, args.rows), sets,
                                 ("training digits 50,000-59,999", "official test digits")), ""]
    write_report(args.out, "Which MNIST digits are tested, and the OOD accuracy", "benchmarks/test_digits.py",
                 __doc__.split("\n\n")[1], t0, body)


if __name__ == "__main__":
    main()
