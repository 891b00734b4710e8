"""A run's report: `results.md` (tables) and `report.html` (grids, loss and training curves, accuracy and
cost-vs-quality charts; the newer figures are drawn in `figures`).

Everything here is read back from a run directory's artifacts; nothing is recomputed, so the
report of a finished run can be regenerated at any time (`skdcgn report RUN_DIR`).
"""
from __future__ import annotations

import html
import os
from pathlib import Path

from matplotlib import colormaps
from matplotlib.figure import Figure

from ..data.variants import VARIANTS
from ..errors import SkdcgnError
from ..runlog import read_table
from ..io import read_json, write_bytes
from ..models.cgn import MECHANISMS
from .figures import (plot_classifier_curves, plot_cost_vs_accuracy, plot_distillation_curves, plot_teacher_losses,
                      save_fig as _save_fig)
from .records import format_mean_std
from .render import format_table, table_rows


def _plot_losses(vdir: Path, out: Path) -> bool:
    """Distillation losses per mechanism (generator and discriminator) as one PNG."""
    logs = {m: vdir / "distill" / "students" / m / "losses.csv" for m in MECHANISMS}
    logs = {m: p for m, p in logs.items() if p.is_file()}
    if not logs:
        return False
    fig = Figure(figsize=(4 * len(logs), 3))  # a Figure of its own: no pyplot state, no backend switch
    axes = fig.subplots(1, len(logs), squeeze=False)
    for ax, (m, path) in zip(axes[0], logs.items()):
        rows = read_table(path)
        try:
            steps = [float(r["step"]) for r in rows]
            series = {key: [float(r[key]) for r in rows if key in r] for key in ("pixel", "g_loss", "d_loss")}
        except (KeyError, ValueError, TypeError) as e:
            raise SkdcgnError(f"{path}: not a losses table ({type(e).__name__}: {str(e)[:100]})") from None
        for key, vals in series.items():
            if len(vals) == len(steps):
                ax.plot(steps, vals, label=key)
        ax.set_title(m)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save_fig(fig, out)
    return True


def _plot_accuracy(summary: dict, out: Path) -> None:
    """Out-of-distribution test accuracy per training set, one group of bars per variant."""
    results = summary["results"]
    variants = list(results)
    rows = table_rows(results)
    fig = Figure(figsize=(max(6, 0.6 * len(rows) * len(variants)), 3.5))
    ax = fig.subplots()
    tab20 = colormaps["tab20"]
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        xs, means, stds = [], [], []
        for j, v in enumerate(variants):
            acc = results[v]["table"].get(row)
            if acc:
                xs.append(j + i * width)
                means.append(acc["test"]["mean"])
                stds.append(acc["test"]["std"])
        ax.bar(xs, means, width, yerr=stds, label=row, color=tab20(i % 20))  # distinct colours for ≤ 20 rows
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(variants))], variants)
    ax.set_ylabel("test accuracy (OOD), %")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    _save_fig(fig, out)


def results_markdown(summary: dict) -> str:
    """results.md of one run: the accuracy table (%) and the stage times (seconds) of each variant."""
    lines = ["# Results of this run", "",
             "Accuracy (%) of the invariant classifier, trained on each set (rows) and evaluated on the",
             "training data, the out-of-distribution `test` split and the in-distribution `test_iid` split.", "",
             format_table(summary), ""]
    for v, res in summary["results"].items():
        lines.append(f"- {v}: stage times (s) " + ", ".join(f"{k} {s}" for k, s in res.get("timings_s", {}).items()))
    lines += [f"- total: {summary.get('seconds', '?')} s", ""]
    return "\n".join(lines)


def check_summary(summary: object, source: str) -> dict:
    """Validate a run summary read back from `results.json` (untrusted: it names folders to read)."""
    def bad(where: str, what: str) -> SkdcgnError:
        return SkdcgnError(f"{source}: '{where}' {what}")

    if not isinstance(summary, dict):
        raise bad("", "should be an object")
    results = summary.get("results")
    if not isinstance(results, dict) or not results:
        raise bad("results", "should be a non-empty object of variants")
    if not isinstance(summary.get("seconds", 0), (int, float)):
        raise bad("seconds", "should be a number")
    for v, res in results.items():
        if v not in VARIANTS:  # it names a folder of the run: only the known ones
            raise bad(f"results.{v}", f"is not a variant ({', '.join(VARIANTS)})")
        if not isinstance(res, dict) or not isinstance(res.get("table"), dict):
            raise bad(f"results.{v}.table", "should be an object of rows")
        if not isinstance(res.get("timings_s", {}), dict):
            raise bad(f"results.{v}.timings_s", "should be an object")
        for row, acc in res["table"].items():
            for split in ("train", "test", "test_iid"):
                cell = acc.get(split) if isinstance(acc, dict) else None
                if not isinstance(cell, dict) or not all(
                        isinstance(cell.get(k), (int, float)) and not isinstance(cell.get(k), bool)
                        for k in ("mean", "std", "n")):
                    raise bad(f"results.{v}.table.{row}.{split}", "should hold numbers mean, std and n")
        curves = res.get("test_by_epoch", {})
        if not isinstance(curves, dict) or not all(
                isinstance(c, dict) and isinstance(c.get("seeds"), list) and isinstance(c.get("mean"), list)
                and all(isinstance(s, int) and not isinstance(s, bool) for s in c["seeds"])
                and all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in c["mean"])
                for c in curves.values()):
            raise bad(f"results.{v}.test_by_epoch", "should map rows to lists seeds (integers) and mean (numbers)")
    return summary


def write_run_report(run_dir: str | os.PathLike, summary: dict) -> Path:
    """Write results.md, accuracy.png and report.html into `run_dir` from its `summary`; returns the
    path of report.html.

    The figures, each drawn only when its artifacts are there: `cost_quality.png` (CGN parameters
    against the OOD accuracy of `teacher_cf` / `student_cf`, `figures.plot_cost_vs_accuracy`), and
    per variant `teacher/train/losses.png` (a trained teacher's losses), `distill/curves.png` (the
    students' held-out learning curves, `figures.plot_distillation_curves`), `distill/losses.png`,
    `classifiers/curves.png` (train loss and OOD accuracy per epoch, `figures.plot_classifier_curves`).
    Raises `SkdcgnError` if `summary` is malformed (`check_summary`) or an artifact it reads is.
    """
    run_dir = Path(run_dir)
    check_summary(summary, str(run_dir / "results.json"))
    write_bytes(run_dir / "results.md", results_markdown(summary).encode())
    _plot_accuracy(summary, run_dir / "accuracy.png")
    parts = ["<!doctype html><meta charset='utf-8'><title>skdcgn run report</title>",
             "<style>body{font-family:sans-serif;max-width:1200px;margin:auto}img{max-width:100%;image-rendering:pixelated}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 6px}</style>",
             f"<h1>skdcgn run: {html.escape(run_dir.name)}</h1>", "<h2>Out-of-distribution accuracy</h2>",
             "<img src='accuracy.png'>", _table_html(summary)]
    if plot_cost_vs_accuracy(run_dir, summary, run_dir / "cost_quality.png"):
        parts.append("<h2>Cost vs quality: teacher and students</h2><img src='cost_quality.png'>")
    all_rows = table_rows(summary["results"])
    for v, res in summary["results"].items():
        vdir = run_dir / v
        parts.append(f"<h2>{html.escape(v)}</h2>")
        if plot_teacher_losses(vdir / "teacher" / "train" / "losses.csv", vdir / "teacher" / "train" / "losses.png",
                               title=f"{v}: teacher training (teacher/train/losses.csv)"):
            parts.append(f"<h3>Teacher training losses</h3><img src='{v}/teacher/train/losses.png'>")
        ev = vdir / "distill" / "eval.json"
        if ev.is_file():
            parts.append("<h3>Students vs teacher on held-out (u, y)</h3><pre>" +
                         html.escape(_eval_summary(read_json(ev))) + "</pre>")
        for name in ("composite", *MECHANISMS):
            img = vdir / "distill" / f"compare_{name}.png"
            if img.is_file():
                parts.append(f"<h4>teacher | student: {name}</h4><img src='{v}/distill/compare_{name}.png'>")
        if plot_distillation_curves(ev, vdir / "distill" / "curves.png", title=f"{v}: students' learning curves"):
            parts.append(f"<h3>Students' learning curves (held-out, against the teacher)</h3>"
                         f"<img src='{v}/distill/curves.png'>")
        if _plot_losses(vdir, vdir / "distill" / "losses.png"):
            parts.append(f"<h3>Distillation losses</h3><img src='{v}/distill/losses.png'>")
        if plot_classifier_curves(vdir, v, res, vdir / "classifiers" / "curves.png", all_rows):
            parts.append(f"<h3>Classifier training curves</h3><img src='{v}/classifiers/curves.png'>")
        datasets = sorted((vdir / "datasets").glob("*/preview.png")) if (vdir / "datasets").is_dir() else []
        if datasets:
            parts.append("<h3>Datasets (one shape per row)</h3>")
        for p in datasets:
            parts.append(f"<h4>{html.escape(p.parent.name)}</h4><img src='{v}/datasets/{p.parent.name}/preview.png'>")
    out = run_dir / "report.html"
    write_bytes(out, "\n".join(parts).encode())
    return out


def _table_html(summary: dict) -> str:
    results = summary["results"]
    variants = list(results)
    rows = table_rows(results)
    head = "<tr><th>trained on</th>" + "".join(f"<th>{html.escape(v)}<br>train / test (OOD) / test_iid</th>" for v in variants) + "</tr>"
    body = []
    for row in rows:
        cells = []
        for v in variants:
            acc = results[v]["table"].get(row)
            cells.append("–" if acc is None else " / ".join(
                format_mean_std(acc[s]) for s in ("train", "test", "test_iid")))
        body.append(f"<tr><td>{html.escape(row)}</td>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return "<table>" + head + "".join(body) + "</table>"


def _eval_summary(ev: dict) -> str:
    lines = []
    mechanisms = ev.get("mechanisms", ev)
    if not isinstance(mechanisms, dict):
        return ""
    for m, d in mechanisms.items():
        if isinstance(d, dict):
            lines.append(f"{m}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in d.items()
                                             if not isinstance(v, (dict, list))))
    return "\n".join(lines)
