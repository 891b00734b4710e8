"""Figures of a run's report read back from its artifacts (nothing is recomputed): classifier
training curves, teacher-training losses, and cost against quality (parameters against OOD
accuracy from a run; MACs against FID from a `skdcgn bench` record).

Each `plot_*` function draws a `matplotlib.figure.Figure` of its own (no pyplot, no backend
switch), writes it atomically as a PNG and returns True, or returns False and writes nothing when
its inputs are missing or incomplete. A malformed input file is a one-line `SkdcgnError` naming it.
"""
from __future__ import annotations

import io
import math
import statistics
from pathlib import Path

from matplotlib import colormaps
from matplotlib.axis import Axis
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from ..errors import SkdcgnError
from ..runlog import read_table
from ..io import read_json, write_bytes
from ..models.cgn import MECHANISMS
from ..teacher_training import LOSS_COLUMNS
from .render import table_rows

_ROW_COLOURS = colormaps["tab20"]  # the accuracy chart's colours: row i of the table is colour i


def save_fig(fig: Figure, out: Path) -> None:
    """Write `fig` as a PNG (110 dpi) to `out` atomically (`io.write_bytes`)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    write_bytes(out, buf.getvalue())


def _finish_scatter(fig: Figure, ax, out: Path) -> None:
    """Grid, legend outside the axes, tight layout, saved atomically: the end of each scatter plot."""
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    save_fig(fig, out)


def _log_ticks(axis: Axis, fmt=lambda v: f"{v:g}") -> None:
    """Readable ticks on a log-scaled axis: labels at 1, 2 and 5 per decade, written by `fmt`."""
    axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: fmt(v)))
    axis.set_minor_formatter(NullFormatter())


def _params_text(n: float) -> str:
    return f"{n / 1e6:g}M" if n >= 1e6 else f"{n / 1e3:g}k" if n >= 1e3 else f"{n:g}"


def _number(x: object) -> float:
    """A finite float from a JSON number or a CSV cell; ValueError / TypeError otherwise."""
    if isinstance(x, bool):
        raise TypeError("a boolean is not a number")
    v = float(x)  # type: ignore[arg-type]
    if not math.isfinite(v):
        raise ValueError(f"{x!r} is not finite")
    return v


def _bad(path: Path, what: str, e: Exception) -> SkdcgnError:
    return SkdcgnError(f"{path}: not {what} ({type(e).__name__}: {str(e)[:100]})")


# ---- classifier training curves -----------------------------------------------------------------


def read_training_log(seed_dir: Path) -> list[dict[str, float]] | None:
    """The per-epoch log of one trained classifier: the `log` of its manifest.json, else its
    train_log.csv; None if it has neither. Each entry holds `epoch` and `loss` (mean train
    cross-entropy, nats) and, when the run monitored it, `test_accuracy` (fraction in [0, 1]).
    Raises `SkdcgnError` naming the file when it is not such a log."""
    manifest, table = seed_dir / "manifest.json", seed_dir / "train_log.csv"
    if manifest.is_file():
        path, entries = manifest, read_json(manifest).get("log")
        if entries is None:
            return None
    elif table.is_file():
        path, entries = table, read_table(table)
    else:
        return None
    try:
        if not isinstance(entries, list):
            raise TypeError(f"log is a {type(entries).__name__}, not a list")
        out = []
        for r in entries:
            row = {"epoch": _number(r["epoch"]), "loss": _number(r["loss"])}
            if r.get("test_accuracy") not in (None, ""):
                row["test_accuracy"] = _number(r["test_accuracy"])
            out.append(row)
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise _bad(path, "a training log", e) from None
    return out or None


def _mean_by_epoch(logs: list[list[dict[str, float]]], key: str) -> tuple[list[float], list[float]]:
    """Epochs and the mean of `key` over the logs that have it at that epoch."""
    by_epoch: dict[float, list[float]] = {}
    for log in logs:
        for r in log:
            if key in r:
                by_epoch.setdefault(r["epoch"], []).append(r[key])
    epochs = sorted(by_epoch)
    return epochs, [statistics.fmean(by_epoch[e]) for e in epochs]


def plot_classifier_curves(vdir: Path, variant: str, result: dict, out: Path, all_rows: list[str] | None = None) -> bool:
    """Training curves of a variant's classifiers: mean train loss (cross-entropy, log scale) and
    OOD test accuracy (%) per epoch, one line per table row, mean over its seeds.

    `result` is the variant's entry of the run summary: its `table` names the rows and their seed
    counts (`n`: seeds 0..n-1 under `vdir/classifiers/<row>/seed<k>/`), its `test_by_epoch[row]
    ["seeds"]` the seeds monitored on the table's test images (only those give the accuracy panel).
    `all_rows` fixes the colours (row i of the whole table is colour i, as in accuracy.png).
    Returns False (nothing written) when no seed has a log; raises `SkdcgnError` on a malformed one.
    """
    rows = table_rows({variant: result})
    colours = {r: _ROW_COLOURS(i % 20) for i, r in enumerate(all_rows or rows)}
    monitored = result.get("test_by_epoch", {})
    curves = {}
    for row in rows:
        n = min(int(result["table"][row]["train"]["n"]), 1000)  # seeds 0..n-1 (a run has at most 100)
        logs = {s: read_training_log(vdir / "classifiers" / row / f"seed{s}") for s in range(n)}
        logs = {s: log for s, log in logs.items() if log}
        if not logs:
            continue
        test_seeds = [s for s in monitored.get(row, {}).get("seeds", [])
                      if s in logs and all("test_accuracy" in r for r in logs[s])]
        curves[row] = (_mean_by_epoch(list(logs.values()), "loss"),
                       _mean_by_epoch([logs[s] for s in test_seeds], "test_accuracy"), len(logs), len(test_seeds))
    if not curves:
        return False
    has_test = any(c[1][0] for c in curves.values())
    fig = Figure(figsize=(11 if has_test else 6.5, 3.6))
    axes = fig.subplots(1, 2 if has_test else 1, squeeze=False)[0]
    for row, ((ep, loss), (ep_t, acc), n_loss, n_test) in curves.items():
        label = f"{row} ({n_loss} seed{'s' * (n_loss > 1)}" + (f", {n_test} monitored)" if has_test else ")")
        axes[0].plot(ep, loss, "o-", ms=3, color=colours.get(row), label=label)
        if has_test and ep_t:
            axes[1].plot(ep_t, [100 * a for a in acc], "o-", ms=3, color=colours.get(row))
    axes[0].set_title("train loss (mean over seeds)")
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("cross-entropy (nats), log scale")
    axes[0].set_yscale("log")
    _log_ticks(axes[0].yaxis)
    if has_test:
        axes[1].set_title("OOD test accuracy after each epoch (mean over monitored seeds)")
        axes[1].set_xlabel("epoch")
        axes[1].set_ylabel("test accuracy (OOD), %")
        axes[1].set_ylim(0, 100)
    epochs = sorted({e for (ep, _), _, _, _ in curves.values() for e in ep})
    for ax in axes:
        if len(epochs) <= 20:  # a tick per epoch; one epoch (the tiny preset) is not a 0.96..1.04 axis
            ax.set_xticks(epochs)
            ax.set_xlim(epochs[0] - 0.5, epochs[-1] + 0.5)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()  # every row has a loss; not every row was monitored
    axes[-1].legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(f"{variant}: invariant classifiers, one line per training set", fontsize=10)
    fig.tight_layout()
    save_fig(fig, out)
    return True


# ---- teacher training ---------------------------------------------------------------------------

_TEACHER_PANELS = (("discriminator (LSGAN)", ("loss_d", "d_real", "d_fake"), "loss / mean D output", False),
                   ("generator loss terms (unweighted)", ("adv", "binary", "mask_prior", "texture"), "loss, log scale", True),
                   ("mask", ("mask_mean",), "mean mask value (fraction of pixels)", False))


def plot_teacher_losses(losses_csv: Path, out: Path, title: str = "teacher training") -> bool:
    """The losses a trained teacher logged (`teacher_training.LOSS_COLUMNS`) against its step, in
    three panels: discriminator (loss_d, mean D(real), mean D(fake)), the generator's unweighted
    loss terms (adv, binary, mask_prior, texture; log scale, all-zero terms left out) and the mean
    mask value. Returns False (nothing written) without the CSV or with no logged step; raises
    `SkdcgnError` naming the file when it is not such a table."""
    if not losses_csv.is_file():
        return False
    rows = read_table(losses_csv)
    try:
        series = {c: [_number(r[c]) for r in rows] for c in LOSS_COLUMNS if c != "seconds"}
    except (KeyError, ValueError, TypeError) as e:
        raise _bad(losses_csv, "a teacher losses table", e) from None
    if not rows:
        return False
    steps = series["step"]
    fig = Figure(figsize=(13, 3.4))
    for ax, (name, keys, ylabel, log) in zip(fig.subplots(1, 3), _TEACHER_PANELS):
        for k in keys:
            if not log or any(v > 0 for v in series[k]):
                ax.plot(steps, series[k], label=k, lw=1)
        if log:
            ax.set_yscale("log")
            _log_ticks(ax.yaxis)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_fig(fig, out)
    return True


def plot_distillation_curves(eval_json: Path, out: Path, title: str = "distillation") -> bool:
    """Learning curves of the students of a distillation's eval.json (`distill.evaluate`, from the
    weight snapshots taken at each sample step), against the training step: held-out L1 to the
    teacher per mechanism (left); for the shape student, IoU@0.5 with the teacher's masks and the
    masks' binariness, the teacher's binariness dashed (right). Returns False (nothing written)
    without the file or without curves; raises `SkdcgnError` naming the file when it is malformed."""
    if not eval_json.is_file():
        return False
    try:
        mechanisms = read_json(eval_json).get("mechanisms", {})
        curves = {m: [(_number(c["step"]), c) for c in e["curve"]] for m, e in mechanisms.items()
                  if isinstance(e, dict) and e.get("curve")}
        if not curves:
            return False
        fig = Figure(figsize=(11, 3.6))
        left, right = fig.subplots(1, 2)
        for m, curve in curves.items():
            left.plot([s for s, _ in curve], [_number(c["l1"]) for _, c in curve], "o-", ms=3, lw=1, label=m)
        shape = curves.get("shape", [])
        if shape:
            steps = [s for s, _ in shape]
            right.plot(steps, [_number(c["iou@0.5"]) for _, c in shape], "o-", ms=3, lw=1, label="IoU@0.5 with the teacher")
            right.plot(steps, [_number(c["binariness"]) for _, c in shape], "s-", ms=3, lw=1, label="binariness (student)")
            right.axhline(_number(shape[-1][1]["teacher_binariness"]), ls="--", color="grey", lw=1,
                          label="binariness (teacher)")
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise _bad(eval_json, "a distillation evaluation with learning curves", e) from None
    left.set_title("held-out L1 to the teacher (masks in [0, 1], textures in [-1, 1])", fontsize=9)
    right.set_title("shape student: masks", fontsize=9)
    right.set_ylim(0, 1.02)
    for ax in (left, right):
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_fig(fig, out)
    return True


# ---- cost against quality -----------------------------------------------------------------------


def cgn_params(eval_json: Path) -> dict[str, int] | None:
    """Parameters of the teacher CGN and of the students' CGN from a distillation's eval.json
    (`distill.evaluate.evaluate_distillation`): {"teacher": n, "students": n}, from its
    `composite.params`, else summed over the three mechanisms' `teacher_params` / `params`; None
    when the file is missing or holds fewer than all three mechanisms' counts. Raises `SkdcgnError` naming
    the file when a count is not a positive integer."""
    if not eval_json.is_file():
        return None
    ev = read_json(eval_json)
    try:
        composite = ev.get("composite")
        if isinstance(composite, dict) and "params" in composite:
            counts = {k: composite["params"][k] for k in ("teacher", "students")}
        else:
            mechs = ev.get("mechanisms", {})
            if not isinstance(mechs, dict) or not all(isinstance(mechs.get(m), dict) and "params" in mechs[m]
                                                      and "teacher_params" in mechs[m] for m in MECHANISMS):
                return None
            counts = {"teacher": sum(_count(mechs[m]["teacher_params"]) for m in MECHANISMS),
                      "students": sum(_count(mechs[m]["params"]) for m in MECHANISMS)}
        return {k: _count(v) for k, v in counts.items()}
    except (KeyError, ValueError, TypeError) as e:
        raise _bad(eval_json, "a distillation evaluation with parameter counts", e) from None


def _count(x: object) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or x <= 0:
        raise ValueError(f"{x!r} is not a positive parameter count")
    return x


def plot_cost_vs_accuracy(run_dir: Path, summary: dict, out: Path) -> bool:
    """Cost against quality of a run: parameters of the CGN that made a counterfactual set (x, log
    scale) against the OOD test accuracy (%, mean ± std over seeds) of the classifiers trained on
    it (y): the teacher with the `teacher_cf` row, the students with `student_cf`, one colour per
    variant. Parameters come from `<variant>/distill/eval.json` (`cgn_params`), or from that of the
    run whose students were reused (`config.students`). Returns False (nothing written) when no
    variant has both a count and an accuracy."""
    students_from = summary.get("config", {}).get("students") if isinstance(summary.get("config"), dict) else None
    points = []  # (variant, who, params, mean, std)
    for v, res in summary["results"].items():
        params = cgn_params(run_dir / v / "distill" / "eval.json")
        if params is None and isinstance(students_from, str) and students_from:
            params = cgn_params(Path(students_from) / v / "distill" / "eval.json")
        if params is None:
            continue
        for who, row in (("teacher", "teacher_cf"), ("students", "student_cf")):
            acc = res["table"].get(row)
            if acc:
                points.append((v, who, params[who], acc["test"]["mean"], acc["test"]["std"]))
    if not points:
        return False
    fig = Figure(figsize=(6.5, 4))
    ax = fig.subplots()
    variants = list(dict.fromkeys(p[0] for p in points))
    tab10 = colormaps["tab10"]
    for i, v in enumerate(variants):
        mine = [p for p in points if p[0] == v]
        if len(mine) == 2:
            ax.plot([p[2] for p in mine], [p[3] for p in mine], ":", color=tab10(i % 10), lw=1)
        for _, who, x, mean, std in mine:
            ax.errorbar([x], [mean], yerr=[std], fmt="o" if who == "teacher" else "s", ms=7, capsize=3,
                        color=tab10(i % 10), mfc="white" if who == "teacher" else tab10(i % 10),
                        label=f"{v}: {who} ({'teacher_cf' if who == 'teacher' else 'student_cf'})")
            ax.annotate(f"{x / 1e3:,.0f}k params", (x, mean), textcoords="offset points", xytext=(6, -12), fontsize=7)
    ax.set_xscale("log")
    _log_ticks(ax.xaxis, _params_text)
    lo, hi = min(p[2] for p in points), max(p[2] for p in points)
    ax.set_xlim(lo / 2, hi * 2)
    ax.set_ylim(0, 100)
    ax.set_xlabel("parameters of the CGN (shape + foreground + background), log scale")
    ax.set_ylabel("test accuracy (OOD), %")
    ax.set_title("Cost vs quality: generator size against the OOD accuracy\nof classifiers trained on its "
                 "counterfactuals (mean ± std over seeds)", fontsize=9)
    _finish_scatter(fig, ax, out)
    return True


def plot_bench_cost_vs_fid(record: dict, out: Path) -> bool:
    """Cost against quality of a `skdcgn bench` record (an entry of docs/results.json `runs`): MACs
    per image (x, millions, log scale; for `composite`, MACs per composite) against FID (y, log
    scale), per unit (shape, foreground, background, composite): the students at FID(student,
    teacher), the teacher at its floor FID(teacher, teacher of another seed). Returns False (nothing
    written) when the record has no cost rows or no quality rows; raises `SkdcgnError` when it is
    malformed."""
    try:
        cost = {(r["unit"], r["model"]): _number(r["macs_per_image"]) for r in record.get("cost", {}).get("rows", [])}
        quality = record.get("quality") or {}
        fid = {}
        for r in quality.get("rows", []):
            pair = str(r["pair"])
            if pair == "student vs teacher":
                fid[(r["unit"], "student")] = _number(r["fid"])
            elif pair.startswith("teacher vs teacher"):
                fid[(r["unit"], "teacher")] = _number(r["fid"])
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise SkdcgnError(f"bench record {record.get('key', '?') if isinstance(record, dict) else '?'}: "
                          f"not a cost and quality record ({type(e).__name__}: {str(e)[:100]})") from None
    units = [u for u in dict.fromkeys(u for u, _ in fid) if all((u, m) in cost and (u, m) in fid
                                                                for m in ("teacher", "student"))]
    if not units:
        return False
    fig = Figure(figsize=(8.5, 4.5))
    ax = fig.subplots()
    tab10 = colormaps["tab10"]
    for i, u in enumerate(units):
        xs = [cost[(u, m)] / 1e6 for m in ("teacher", "student")]
        ys = [fid[(u, m)] for m in ("teacher", "student")]
        ax.plot(xs, ys, ":", color=tab10(i % 10), lw=1)
        ax.plot(xs[:1], ys[:1], "o", ms=7, color=tab10(i % 10), mfc="white", label=f"{u}: teacher (floor: vs teacher seed 2)")
        ax.plot(xs[1:], ys[1:], "s", ms=7, color=tab10(i % 10), label=f"{u}: student (vs teacher)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    _log_ticks(ax.xaxis)
    _log_ticks(ax.yaxis)
    ax.set_xlabel("MACs per image, millions (composite: per composite), log scale")
    ax.set_ylabel("FID (domain-network features), log scale")
    ax.set_title(f"Cost vs quality: {record.get('key', 'bench')}\n(lower left is better; the teacher's "
                 "point is the finite-sample floor)", fontsize=9)
    _finish_scatter(fig, ax, out)
    return True
