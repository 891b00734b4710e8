"""The run report's figures on a hand-made run folder (seconds, no training): classifier curves,
teacher-training losses, cost vs quality; each skipped without its input, a malformed input one
`SkdcgnError` naming its file."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from skdcgn.errors import SkdcgnError
from skdcgn.io import write_json
from skdcgn.results.figures import plot_bench_cost_vs_fid, read_training_log
from skdcgn.results.report import write_run_report
from skdcgn.teacher_training import LOSS_COLUMNS

FIGURES = ("cost_quality.png", "colored/classifiers/curves.png", "colored/teacher/train/losses.png")
TRAINING_SETS = ("original", "teacher_cf", "student_cf")


def _acc(mean: float, n: int = 2) -> dict:
    return {s: {"mean": mean, "std": 1.5, "n": n} for s in ("train", "test", "test_iid")}


def _summary(curves: bool = True) -> dict:
    res = {"table": {"original": _acc(30.0), "teacher_cf": _acc(80.0), "student_cf": _acc(70.0)},
           "timings_s": {"data": 1.0}}
    if curves:
        res["test_by_epoch"] = {r: {"seeds": [0, 1], "mean": [40.0, 60.0, 70.0]} for r in ("teacher_cf", "student_cf")}
    return {"config": {"students": ""}, "results": {"colored": res}, "seconds": 3.0}


def _fake_run(run_dir: Path) -> dict:
    """The artifacts the report reads, written by hand: classifier logs (manifests, one CSV), the
    distillation's eval.json and a trained teacher's losses.csv."""
    vdir = run_dir / "colored"
    for row in TRAINING_SETS:
        for s in range(2):
            i = TRAINING_SETS.index(row)
            log = [{"epoch": e, "steps": 10 * e, "lr": 1.0, "loss": (2.0 + i) / e ** 2 + 0.1 * s, "accuracy": 0.3 * e,
                    "seconds": 1.0, **({"test_accuracy": 0.2 * e + 0.1 * s + 0.05 * i} if row != "original" else {})}
                   for e in (1, 2, 3)]
            out = vdir / "classifiers" / row / f"seed{s}"
            out.mkdir(parents=True)
            if row == "original" and s == 1:  # no manifest (e.g. copied without it): the CSV log is read
                with open(out / "train_log.csv", "w", newline="") as f:
                    w = csv.DictWriter(f, fieldnames=list(log[0]))
                    w.writeheader()
                    w.writerows(log)
            else:
                write_json(out / "manifest.json", {"log": log, "monitor": {"test": "abc"}})
    mechs = {m: {"l1": 0.1, "params": p, "teacher_params": 4 * p} for m, p in
             (("shape", 46_388), ("foreground", 48_700), ("background", 48_700))}
    write_json(vdir / "distill" / "eval.json",
               {"mechanisms": mechs, "composite": {"l1": 0.2, "params": {"teacher": 659_992, "students": 143_788}}})
    (vdir / "teacher" / "train").mkdir(parents=True)
    with open(vdir / "teacher" / "train" / "losses.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(LOSS_COLUMNS)
        for step in range(50, 1001, 50):
            w.writerow([step, step / 10, 0.25, 0.6, 0.4, 0.3 - step / 1e4, 0.5 / step ** 0.5, 0.0, 1.0 + 10 / step, 0.3])
    return _summary()


def _png(path: Path) -> tuple[int, int]:
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.load()
        return im.size


def test_every_figure_is_drawn_and_embedded(tmp_path):
    summary = _fake_run(tmp_path)
    html = write_run_report(tmp_path, summary).read_text()
    for fig in FIGURES:
        w, h = _png(tmp_path / fig)
        assert w > 300 and h > 200
        assert f"src='{fig}'" in html
    assert not list(tmp_path.rglob("*.tmp"))  # written atomically


def test_the_accuracy_panel_needs_monitored_seeds(tmp_path):
    summary = _fake_run(tmp_path)
    write_run_report(tmp_path, summary)
    both_panels = _png(tmp_path / "colored/classifiers/curves.png")
    write_run_report(tmp_path, _summary(curves=False))  # monitored on other test images: no accuracy panel
    loss_only = _png(tmp_path / "colored/classifiers/curves.png")
    assert loss_only[0] < both_panels[0]


def test_figures_without_their_inputs_are_skipped(tmp_path):
    html = write_run_report(tmp_path, _summary()).read_text()  # a summary and no artifacts at all
    for fig in FIGURES:
        assert not (tmp_path / fig).exists() and fig not in html
    assert (tmp_path / "accuracy.png").is_file()
    # partial inputs: a header-only losses.csv, fewer than three students evaluated, logs without entries
    _fake_run(tmp_path / "p")
    vdir = tmp_path / "p" / "colored"
    (vdir / "teacher" / "train" / "losses.csv").write_text(",".join(LOSS_COLUMNS) + "\n")
    write_json(vdir / "distill" / "eval.json", {"mechanisms": {"shape": {"params": 5, "teacher_params": 9}}})
    for p in (vdir / "classifiers").rglob("*"):
        if p.name == "manifest.json":
            write_json(p, {"monitor": {}})
        elif p.name == "train_log.csv":
            p.unlink()
    html = write_run_report(tmp_path / "p", _summary()).read_text()
    for fig in FIGURES:
        assert not (tmp_path / "p" / fig).exists() and fig not in html


@pytest.mark.parametrize("where, text", [
    ("colored/teacher/train/losses.csv", "step,seconds\n1,oops\n"),
    ("colored/classifiers/original/seed1/train_log.csv", "epoch,loss\n1,not-a-number\n"),
    ("colored/classifiers/teacher_cf/seed0/manifest.json", json.dumps({"log": [{"epoch": 1}]})),
    ("colored/distill/eval.json", json.dumps({"composite": {"params": {"teacher": "many", "students": 3}}})),
])
def test_a_malformed_input_is_one_line_naming_it(tmp_path, where, text):
    summary = _fake_run(tmp_path)
    (tmp_path / where).write_text(text)
    with pytest.raises(SkdcgnError) as e:
        write_run_report(tmp_path, summary)
    assert where.split("/")[-1] in str(e.value) and "\n" not in str(e.value)


def test_a_malformed_epoch_curve_in_the_summary_is_refused(tmp_path):
    summary = _summary()
    summary["results"]["colored"]["test_by_epoch"]["student_cf"] = {"seeds": "all", "mean": []}
    with pytest.raises(SkdcgnError, match="test_by_epoch"):
        write_run_report(tmp_path, summary)


def test_training_logs_read_from_manifest_or_csv(tmp_path):
    _fake_run(tmp_path)
    root = tmp_path / "colored" / "classifiers" / "original"
    from_manifest, from_csv = read_training_log(root / "seed0"), read_training_log(root / "seed1")
    assert [r["epoch"] for r in from_manifest] == [r["epoch"] for r in from_csv] == [1, 2, 3]
    assert from_csv[0]["loss"] == pytest.approx(from_manifest[0]["loss"] + 0.1)
    assert read_training_log(root / "seed7") is None


def test_parameter_counts_from_the_composite_or_the_three_mechanisms(tmp_path):
    from skdcgn.results.figures import cgn_params

    _fake_run(tmp_path)
    ev = tmp_path / "colored" / "distill" / "eval.json"
    assert cgn_params(ev) == {"teacher": 659_992, "students": 143_788}
    doc = json.loads(ev.read_text())
    del doc["composite"]
    write_json(ev, doc)
    assert cgn_params(ev) == {"teacher": 4 * 143_788, "students": 143_788}
    del doc["mechanisms"]["shape"]["teacher_params"]  # an incomplete evaluation: no point, no error
    write_json(ev, doc)
    assert cgn_params(ev) is None and cgn_params(tmp_path / "nowhere.json") is None


def test_bench_record_cost_vs_fid(tmp_path):
    cost = {"rows": [{"unit": u, "model": m, "params": 1, "macs_per_image": macs}
                     for u, m, macs in (("composite", "teacher", 63_922_176), ("composite", "student", 8_722_944),
                                        ("shape", "teacher", 5_185_536), ("shape", "student", 2_514_432))]}
    quality = {"rows": [{"unit": "composite", "pair": "student vs teacher", "fid": 1.9},
                        {"unit": "composite", "pair": "teacher vs teacher (seed 2): floor", "fid": 0.09},
                        {"unit": "composite", "pair": "student vs real", "fid": 3.0},
                        {"unit": "shape", "pair": "student vs teacher", "fid": 2.3},
                        {"unit": "shape", "pair": "teacher vs teacher (seed 2): floor", "fid": 0.05}]}
    record = {"key": "quick-cpu", "cost": cost, "quality": quality}
    assert plot_bench_cost_vs_fid(record, tmp_path / "bench.png")
    _png(tmp_path / "bench.png")
    assert not plot_bench_cost_vs_fid({**record, "quality": None}, tmp_path / "none.png")  # a cost-only bench
    assert not (tmp_path / "none.png").exists()
    with pytest.raises(SkdcgnError, match="quick-cpu"):
        plot_bench_cost_vs_fid({**record, "quality": {"rows": [{"unit": "shape", "pair": "student vs teacher"}]}},
                               tmp_path / "bad.png")


def test_distillation_learning_curves(tmp_path):
    from skdcgn.results.figures import plot_distillation_curves

    ev = tmp_path / "eval.json"
    assert not plot_distillation_curves(ev, tmp_path / "c.png")  # no evaluation yet
    shape = [{"step": s, "l1": 0.3 / s, "iou@0.5": 0.2 * s, "binariness": 0.3 * s, "soft_fraction": 0.1,
              "teacher_binariness": 0.95} for s in (1, 2, 3)]
    write_json(ev, {"mechanisms": {"shape": {"l1": 0.1}}})
    assert not plot_distillation_curves(ev, tmp_path / "c.png")  # students evaluated before curves existed
    write_json(ev, {"mechanisms": {"shape": {"curve": shape}, "foreground": {"curve": [{"step": 3, "l1": 0.5}]}}})
    assert plot_distillation_curves(ev, tmp_path / "c.png")
    _png(tmp_path / "c.png")
    write_json(ev, {"mechanisms": {"shape": {"curve": [{"step": 1}]}}})
    with pytest.raises(SkdcgnError, match="eval.json: not a distillation evaluation with learning curves"):
        plot_distillation_curves(ev, tmp_path / "bad.png")
