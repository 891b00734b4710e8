"""How much of the gap to the published accuracy is the teacher's palette? (writes docs/palette_shift.md)

Every classifier of a `skdcgn run` (each row, each seed) is evaluated twice on the same OOD test
digits and random class draws: in our data's class colours, and in the colours the released
teacher draws (`skdcgn.metrics.palette`). Evaluation only: nothing is trained.

    python benchmarks/palette_shift.py [--runs 'runs/full-{variant}'] [--variants colored double_colored]
        [--rows teacher_cf student_cf]
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from skdcgn import load_cgn, load_classifier
from skdcgn.results.records import format_mean_std, hardware_info, mean_std
from skdcgn.data import load_variant_uint8
from skdcgn.data import variants as V
from skdcgn.invariance import accuracy
from skdcgn.io import write_bytes
from skdcgn.metrics.palette import cgn_palette
from skdcgn.results.render import table_rows

COLOUR_VARIANTS = ("colored", "double_colored")


def classifiers(vdir: Path, rows: list[str]) -> dict[str, list[Path]]:
    """{row: [seed folders]} of the finished classifiers of `rows` under a run's variant folder."""
    out: dict[str, list[Path]] = {}
    for d in sorted((vdir / "classifiers").glob("*/seed*")):
        if d.parent.name in rows and (d / "model.safetensors").is_file():
            out.setdefault(d.parent.name, []).append(d)
    return out


def _rgb(c) -> str:
    return "(" + ", ".join(f"{x:.2f}" for x in c) + ")"


def variant_section(variant: str, vdir: Path, found: dict[str, list[Path]]) -> list[str]:
    teacher = load_cgn(variant)
    fg, bg = cgn_palette(teacher)
    ours_fg, ours_bg = V.nominal_palette(variant)
    # as skdcgn.metrics.palette.palette_test_set, reusing the palette measured above
    sets = {"ours": load_variant_uint8(variant, "test"), "teacher": V.build_variant(variant, "test", palette=(fg, bg))}
    L = [f"## {variant}", "", f"Run folder `{vdir}`. The teacher's class colours (mean over 200 samples per class, "
         "foreground under the mask, background outside it) against ours:", ""]
    if ours_bg is None:
        L += ["| class | ours (digit) | teacher (digit) | largest channel difference |", "|---|---|---|---|"]
        L += [f"| {k} | {_rgb(ours_fg[k])} | {_rgb(fg[k])} | {abs(fg[k] - ours_fg[k]).max():.2f} |" for k in range(10)]
    else:
        L += ["| class | ours (digit / background) | teacher (digit / background) | largest channel difference |",
              "|---|---|---|---|"]
        L += [f"| {k} | {_rgb(ours_fg[k])} / {_rgb(ours_bg[k])} | {_rgb(fg[k])} / {_rgb(bg[k])} | "
              f"{max(abs(fg[k] - ours_fg[k]).max(), abs(bg[k] - ours_bg[k]).max()):.2f} |" for k in range(10)]
    L += ["", "OOD test accuracy (%), mean ± std over seeds (n), the same 10,000 digits and class draws:", ""]
    return L + accuracy_table(variant, found, sets, ("our colours", "the teacher's colours")) + [""]


def accuracy_table(variant: str, found: dict[str, list[Path]], sets: dict, columns: tuple[str, str]) -> list[str]:
    """Each row's classifiers on two test sets {name: (images, labels)}: mean ± std (n) and the difference."""
    a_name, b_name = sets
    L = [f"| trained on | {columns[0]} | {columns[1]} | difference |", "|---|---|---|---|"]
    for row in table_rows({variant: {"table": found}}):
        accs = []
        for d in found[row]:
            clf = load_classifier(d).eval()
            accs.append({k: accuracy(clf, x, y) for k, (x, y) in sets.items()})
        a = mean_std(accs)
        diff = mean_std([{"d": r[b_name] - r[a_name]} for r in accs])["d"]
        L.append(f"| {row} | {format_mean_std(a[a_name])} ({len(accs)}) | {format_mean_std(a[b_name])} ({len(accs)}) | "
                 f"{round(diff['mean'], 1) + 0.0:+.1f} |")
    return L


def run_benchmark(doc: str, script: str, title: str, variants: tuple[str, ...],
                  section: Callable[[str, Path, dict[str, list[Path]]], list[str]]) -> None:
    """The evaluation-only benchmarks' driver: options (`--runs --variants --rows --out`), then for each
    variant `section(variant, its run folder, {row: [classifier folders]})`, then the generated page
    docs/<script name>.md: title, what it measures (`doc`'s second paragraph), command, date, hardware."""
    name = Path(script).stem
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--runs", default="runs/full-{variant}", help="run folder per variant ({variant} is replaced)")
    p.add_argument("--variants", nargs="+", default=list(variants), choices=variants)
    p.add_argument("--rows", nargs="+", default=["teacher_cf", "student_cf"],
                   help="which rows' classifiers (default: the counterfactual rows the paper reports)")
    p.add_argument("--out", default=f"docs/{name}.md")
    args = p.parse_args()
    torch.manual_seed(0)
    t0 = time.time()
    found = {}
    for v in args.variants:  # all checked before any work: one line if a variant has no classifiers
        vdir = Path(args.runs.format(variant=v)) / v
        found[v] = (vdir, classifiers(vdir, args.rows))
        if not found[v][1]:
            sys.exit(f"{name}: no classifiers under {vdir}/classifiers (run `skdcgn run --variant {v}` first)")
    body = [line for v, (vdir, clfs) in found.items() for line in section(v, vdir, clfs)]
    hw = hardware_info(torch.device("cpu"))
    head = [f"# {title}", "", f"Written by `{script}`; do not edit by hand. " + doc.split("\n\n")[1].replace("\n", " "),
            "", "- command: `" + " ".join([f"python {script}", *sys.argv[1:]]) + "`",
            f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; skdcgn {hw['skdcgn']}; torch {hw['torch']}",
            f"- hardware: {hw['cpu']}, {hw['torch_threads']} torch threads; {time.time() - t0:.0f} s",
            f"- test images: data build {V.BUILD_VERSION} (`skdcgn.data.variants`)", ""]
    write_bytes(args.out, "\n".join(head + body).encode())
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_benchmark(__doc__, "benchmarks/palette_shift.py", "The teacher's palette and the OOD accuracy",
                  COLOUR_VARIANTS, variant_section)
