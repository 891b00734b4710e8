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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from palette_shift import accuracy_table, run_benchmark  # noqa: E402  (a sibling script)

from skdcgn.data import VARIANTS, build_variant, load_variant_uint8  # noqa: E402


def variant_section(variant: str, vdir: Path, found: dict[str, list[Path]]) -> list[str]:
    sets = {"train": load_variant_uint8(variant, "test"), "t10k": build_variant(variant, "test", digits="t10k")}
    return [f"## {variant}", "", f"Run folder `{vdir}`. OOD test accuracy (%), mean ± std over seeds (n):", "",
            *accuracy_table(variant, found, sets, ("training digits 50,000-59,999", "official test digits")), ""]


if __name__ == "__main__":
    run_benchmark(__doc__, "benchmarks/test_digits.py", "Which MNIST digits are tested, and the OOD accuracy",
                  VARIANTS, variant_section)
