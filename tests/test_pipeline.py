"""`skdcgn run` end to end on the tiny preset: every stage, the table, the report, the resume."""
from __future__ import annotations

import json
import time

import pytest

from skdcgn.cli import main
from skdcgn.io import read_json
from skdcgn.results.records import TRAINING_SETS


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    t0 = time.perf_counter()
    assert main(["run", "--preset", "tiny", "--variant", "colored", "--run-dir", str(run_dir), "--quiet"]) == 0
    return run_dir, time.perf_counter() - t0


def test_every_stage_leaves_its_artifacts(tiny_run):
    run_dir, _ = tiny_run
    vdir = run_dir / "colored"
    for m in ("shape", "foreground", "background"):
        assert (vdir / "transfer" / m / "manifest.json").is_file()
        assert (vdir / "distill" / "students" / m / "model.safetensors").is_file()
    for d in ("teacher_samples", "teacher_cf", "student_cf"):
        assert (vdir / "datasets" / d / "manifest.json").is_file()
    for row in TRAINING_SETS:
        assert (vdir / "classifiers" / row / "seed0" / "eval" / "manifest.json").is_file()
    assert not list(run_dir.rglob("*.tmp"))


def test_table_and_report(tiny_run):
    run_dir, _ = tiny_run
    summary = read_json(run_dir / "results.json")
    table = summary["results"]["colored"]["table"]
    assert set(table) == set(TRAINING_SETS)
    stage_s = summary["results"]["colored"]["stage_seconds"]  # read back from the stages' manifests
    assert stage_s["students"] > 0 and stage_s["counterfactuals"] > 0 and stage_s["classifiers"] > 0
    for row in TRAINING_SETS:
        for split in ("train", "test", "test_iid"):
            assert 0.0 <= table[row][split]["mean"] <= 100.0
    md = (run_dir / "results.md").read_text()
    assert "| student_cf |" in md and "test (OOD)" in md
    curves = summary["results"]["colored"]["test_by_epoch"]  # each classifier's OOD accuracy after each epoch
    assert set(curves) == set(TRAINING_SETS)
    for row in TRAINING_SETS:
        assert curves[row]["seeds"] == [0] and len(curves[row]["mean"]) == summary["config"]["classifier_epochs"]
        assert curves[row]["mean"][-1] == pytest.approx(table[row]["test"]["mean"], abs=0.01)  # same images and model
    from skdcgn.pipeline import record_results

    record_results(run_dir / "record.md", run_dir, summary, "tiny")
    recorded = (run_dir / "record.md").read_text()
    assert "after each epoch" in recorded and f"| colored | student_cf | 0 | {curves['student_cf']['mean'][0]:.1f} |" in recorded
    html = (run_dir / "report.html").read_text()
    for img in ("accuracy.png", "colored/distill/compare_composite.png", "colored/datasets/student_cf/preview.png",
                "cost_quality.png", "colored/classifiers/curves.png"):  # the last two: params from eval.json, logs
        assert f"src='{img}'" in html and (run_dir / img).is_file()
    assert "teacher/train/losses.png" not in html  # the shipped teacher: no training losses to draw


def test_second_run_resumes_from_manifests(tiny_run, capsys):
    run_dir, first = tiny_run
    before = json.loads((run_dir / "colored" / "results.json").read_text())
    t0 = time.perf_counter()
    assert main(["run", "--preset", "tiny", "--variant", "colored", "--run-dir", str(run_dir), "--quiet"]) == 0
    again = time.perf_counter() - t0
    after = json.loads((run_dir / "colored" / "results.json").read_text())
    assert after["table"] == before["table"]  # nothing retrained: the same numbers
    assert again < first / 2


def test_bad_values_are_one_line_errors(tmp_path, capsys):
    for argv, needle in ((["--variant", "fashion"], "argument --variant"),
                         (["--n-counterfactuals", "-5"], "n_counterfactuals"),
                         (["--composers", "smudge"], "composers"),
                         (["--rows", "teacher_cf", "everything"], "rows")):
        code = None
        try:
            code = main(["run", "--preset", "tiny", "--run-dir", str(tmp_path / "r"), *argv])
        except SystemExit as e:  # argparse's own usage errors
            code = e.code
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and needle in err[-1]
    assert not (tmp_path / "r" / "colored").exists()


def test_a_subset_of_rows_trains_and_generates_only_what_they_need(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    import shutil

    sub = tmp_path / "sub"
    shutil.copytree(run_dir / "colored" / "transfer", sub / "colored" / "transfer")  # reuse the students' stages
    shutil.copytree(run_dir / "colored" / "distill", sub / "colored" / "distill")
    assert main(["run", "--preset", "tiny", "--variant", "colored", "--run-dir", str(sub), "--quiet",
                 "--rows", "original", "student_cf+original", "--composers", "--threads", "1"]) == 0
    table = read_json(sub / "results.json")["results"]["colored"]["table"]
    assert set(table) == {"original", "student_cf+original"}
    assert sorted(p.name for p in (sub / "colored" / "datasets").iterdir()) == ["student_cf"]
    # the same classifier config on the same data as the full run: the same accuracies
    full = read_json(run_dir / "results.json")["results"]["colored"]["table"]
    assert table["original"] == full["original"] and table["student_cf+original"] == full["student_cf+original"]


def test_record_keys_say_what_differs_from_the_preset():
    from skdcgn.pipeline import record_key

    def summary(distill_preset, teacher="shipped", seeds=1):
        return {"config": {"distill_preset": distill_preset, "teacher": teacher, "seeds": seeds, "rows": list(TRAINING_SETS)},
                "results": {"wildlife": {}, "colored": {}}}

    assert record_key(summary("quick"), "quick") == "run-quick-wildlife+colored"
    assert record_key(summary("default"), "quick") == "run-quick-wildlife+colored-default-students"
    assert record_key(summary("default", seeds=3), "full") == "run-full-wildlife+colored"
    assert record_key(summary("quick", "train"), "quick") == "run-quick-wildlife+colored-trained-teacher"
    partial = summary("default")
    partial["config"].update(rows=["teacher_cf", "student_cf"], seeds=1)
    assert record_key(partial, "full") == "run-full-wildlife+colored-teacher_cf+student_cf-1seed"
    partial["config"].update(per_shape=1)  # other counterfactual sets: their own record
    assert record_key(partial, "full") == "run-full-wildlife+colored-teacher_cf+student_cf-per-shape1-1seed"
    reused = summary("default")
    reused["config"].update(students="runs/students-wide")  # other students: their own record, named by their folder
    assert record_key(reused, "quick") == "run-quick-wildlife+colored-students-students-wide"


def test_a_record_replaces_the_records_of_its_row_subsets(tmp_path):
    import dataclasses

    from skdcgn.pipeline import RunConfig, record_results

    def summary(rows, seeds=1):
        config = {**dataclasses.asdict(RunConfig(device="cpu", distill_preset="default")), "rows": list(rows), "seeds": seeds,
                  "composers": []}
        table = {r: {s: {"mean": 50.0, "std": 0.0, "n": seeds} for s in ("train", "test", "test_iid")} for r in rows}
        return {"config": config, "results": {"colored": {"table": table}}, "seconds": 1.0}

    md = tmp_path / "results.md"
    record_results(md, "runs/x", summary(["teacher_cf", "student_cf"]), "full")
    record_results(md, "runs/x", summary(["original"], seeds=3), "full")  # other seeds: other classifiers
    record_results(md, "runs/y", summary(["original"]), "full")  # another run folder
    assert record_results(md, "runs/x", summary(TRAINING_SETS), "full") == ["run-full-colored-teacher_cf+student_cf-1seed"]
    keys = set(read_json(tmp_path / "results.json")["runs"])
    assert keys == {"run-full-colored-1seed", "run-full-colored-original", "run-full-colored-original-1seed"}
    assert "teacher_cf+student_cf" not in md.read_text()
    # more seeds of the same classifiers (seeds 0..n-1): the records with fewer seeds are parts of it
    assert sorted(record_results(md, "runs/x", summary(TRAINING_SETS, seeds=3), "full")) == ["run-full-colored-1seed",
                                                                                    "run-full-colored-original"]
    assert set(read_json(tmp_path / "results.json")["runs"]) == {"run-full-colored", "run-full-colored-original-1seed"}
    # a record made before a config field existed ran with its default: still a part of the new one
    older = summary(["teacher_cf"], seeds=3)
    del older["config"]["students"]
    record_results(md, "runs/z", older, "full")
    assert record_results(md, "runs/z", summary(TRAINING_SETS, seeds=3), "full") == ["run-full-colored-teacher_cf"]
    # resumed with another thread count: the same classifiers; other settings: other classifiers
    one_thread = summary(TRAINING_SETS, seeds=5)
    one_thread["config"]["threads"] = 1
    assert record_results(md, "runs/z", one_thread, "full") == ["run-full-colored"]
    other = summary(TRAINING_SETS, seeds=6)
    other["config"]["classifier_epochs"] = 3
    assert record_results(md, "runs/z", other, "full") == []


def test_epoch_curves_average_only_the_monitored_seeds(tmp_path):
    from skdcgn.io import write_json
    from skdcgn.pipeline import _test_by_epoch

    logs = [[{"epoch": 1}, {"epoch": 2}],  # trained before monitoring existed
            [{"epoch": 1, "test_accuracy": 0.5}, {"epoch": 2, "test_accuracy": 0.7}],
            [{"epoch": 1, "test_accuracy": 0.6}, {"epoch": 2, "test_accuracy": 0.8}],
            [{"epoch": 1, "test_accuracy": 0.9}, {"epoch": 2, "test_accuracy": 0.9}]]  # other test images
    monitors = [{}, {"test": "abc"}, {"test": "abc"}, {"test": "old"}]
    outs = [tmp_path / f"seed{s}" for s in range(4)]
    for out, log, monitor in zip(outs, logs, monitors):
        out.mkdir()
        write_json(out / "manifest.json", {"log": log, "monitor": monitor})
    assert _test_by_epoch(outs, "abc") == {"seeds": [1, 2], "mean": [55.0, 75.0]}
    assert _test_by_epoch(outs[:1], "abc") is None
    assert _test_by_epoch(outs, "old") == {"seeds": [3], "mean": [90.0, 90.0]}


def test_students_of_an_earlier_run_are_reused_without_its_transfer_sets(tiny_run, tmp_path, capsys):
    run_dir, _ = tiny_run
    import shutil

    earlier = tmp_path / "earlier"  # only the students travel (e.g. to a GPU machine)
    shutil.copytree(run_dir / "colored" / "distill" / "students", earlier / "colored" / "distill" / "students")
    new = tmp_path / "new"
    assert main(["run", "--preset", "tiny", "--variant", "colored", "--run-dir", str(new), "--quiet",
                 "--students", str(earlier), "--rows", "student_cf", "--composers"]) == 0
    assert sorted(p.name for p in (new / "colored").iterdir()) == ["classifiers", "datasets", "results.json"]
    summary = read_json(new / "results.json")
    full = read_json(run_dir / "results.json")["results"]["colored"]
    assert summary["results"]["colored"]["table"]["student_cf"] == full["table"]["student_cf"]  # the same students
    assert summary["results"]["colored"]["stage_seconds"]["students"] == full["stage_seconds"]["students"]

    shutil.rmtree(earlier / "colored" / "distill" / "students" / "foreground")
    capsys.readouterr()
    assert main(["run", "--preset", "tiny", "--variant", "colored", "--run-dir", str(tmp_path / "bad"), "--quiet",
                 "--students", str(earlier)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "students:" in err[0] and "foreground" in err[0]
    assert not (tmp_path / "bad").exists()


def test_new_test_images_are_scored_again_without_retraining(tiny_run, tmp_path, monkeypatch):
    # e.g. a new data build: the stored scores and epoch curves were for other test images
    import shutil

    from skdcgn import invariance

    run_dir, _ = tiny_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    model = copy / "colored" / "classifiers" / "student_cf" / "seed0" / "model.safetensors"
    before = model.stat().st_mtime_ns
    load = invariance.load_variant_split

    def relabelled(name, split, *args, **kwargs):
        x, y = load(name, split, *args, **kwargs)
        return (x, (y + 1) % 10) if split == "test" else (x, y)

    monkeypatch.setattr(invariance, "load_variant_split", relabelled)
    assert main(["run", "--preset", "tiny", "--variant", "colored", "--run-dir", str(copy), "--quiet",
                 "--rows", "student_cf", "--composers"]) == 0
    new = read_json(copy / "results.json")["results"]["colored"]
    old = read_json(run_dir / "results.json")["results"]["colored"]
    assert model.stat().st_mtime_ns == before  # not retrained
    assert new["table"]["student_cf"]["test_iid"] == old["table"]["student_cf"]["test_iid"]
    assert new["table"]["student_cf"]["test"] != old["table"]["student_cf"]["test"]
    assert "test_by_epoch" not in new  # monitored on the old test images


def test_picked_rows_leave_out_the_presets_study_rows_unless_composers_are_given(tmp_path):
    from skdcgn.cli import build_parser
    from skdcgn.commands.run import run_config

    def config(*argv):
        return run_config(build_parser().parse_args(["run", "--preset", "full", *argv]))

    assert len(config().composers) == 6  # the preset's six study rows by default
    assert config("--rows", "original").composers == ()
    assert config("--rows", "original", "--composers", "rotate").composers == ("rotate",)
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("rows: [teacher_cf]\n")
    assert config("--config", str(yaml_file)).composers == ()
    yaml_file.write_text("rows: [teacher_cf]\ncomposers: [binary]\n")
    assert config("--config", str(yaml_file)).composers == ("binary",)


def test_summaries_combine_the_records_of_one_protocol_cell_by_cell():
    import dataclasses

    from skdcgn.pipeline import RunConfig
    from skdcgn.results.render import render_summaries

    def record(key, variant, rows, seeds, date, mean, **cfg):
        config = {**dataclasses.asdict(RunConfig(distill_preset="default", **cfg)), "rows": list(rows), "seeds": seeds}
        acc = {s: {"mean": mean, "std": 0.5, "n": seeds} for s in ("train", "test", "test_iid")}
        return key, {"kind": "pipeline", "key": key, "date": date, "config": config, "hardware": {"device": "cpu"},
                     "results": {variant: {"table": {r: acc for r in rows}}}}

    runs = dict([record("run-full-colored-1seed", "colored", TRAINING_SETS, 1, "2026-01-01", 11.0),
                 record("run-full-colored-teacher_cf", "colored", ["teacher_cf"], 3, "2026-01-02", 33.0),
                 record("run-full-wildlife-1seed", "wildlife", ["original"], 1, "2026-01-01", 22.0),
                 record("run-full-wildlife-x", "wildlife", ["original"], 1, "2026-01-03", 44.0),  # equal seeds: the later
                 record("run-full-colored-other", "colored", ["original"], 3, "2026-01-04", 55.0, n_counterfactuals=10)])
    md = "\n".join(render_summaries(runs))
    assert md.count("## Summary") == 1  # the 10-image record is another protocol, alone: no summary
    assert "| teacher_cf | 33.0 ± 0.5 (3) | – |" in md and "| original | 11.0 (1) | 44.0 (1) |" in md
    assert "| student_cf | 11.0 (1) | – |" in md and "55.0" not in md
    # records measured on another data build are summarised apart, the newest build first
    for key, rec in [record("run-full-colored-1seed-data2", "colored", TRAINING_SETS, 1, "2026-01-05", 66.0),
                     record("run-full-colored-original-data2", "colored", ["original"], 3, "2026-01-06", 77.0)]:
        runs[key] = {**rec, "data_build": 2}
    md = "\n".join(render_summaries(runs))
    assert md.count("## Summary") == 2 and md.index("data build 2") < md.index("data build 1")
    build2 = md[:md.index("data build 1")]
    assert "| original | 77.0 ± 0.5 (3) |" in build2 and "| teacher_cf | 66.0 (1) |" in build2 and "33.0" not in build2


def test_records_of_another_data_build_stand_beside_the_earlier_ones(tmp_path):
    import dataclasses

    from skdcgn.pipeline import RunConfig, record_key, record_results

    config = {**dataclasses.asdict(RunConfig(device="cpu", distill_preset="default")), "rows": list(TRAINING_SETS), "seeds": 1}
    table = {r: {s: {"mean": 50.0, "std": 0.0, "n": 1} for s in ("train", "test", "test_iid")} for r in TRAINING_SETS}
    old = {"config": config, "results": {"colored": {"table": table}}, "seconds": 1.0}  # before builds were kept
    new = {**old, "data_build": 2}
    assert record_key(old, "full") == "run-full-colored-1seed" and record_key(new, "full") == "run-full-colored-1seed-data2"
    md = tmp_path / "results.md"
    record_results(md, "runs/x", old, "full")
    three = {**new, "config": {**config, "seeds": 3}}
    assert record_results(md, "runs/x", three, "full") == []  # more seeds, but other test images: both stay
    assert set(read_json(tmp_path / "results.json")["runs"]) == {"run-full-colored-1seed", "run-full-colored-data2"}


def test_hybrid_rows_train_on_a_mix_of_teacher_and_student_mechanisms(tiny_run, tmp_path):
    """The hybrid rows reuse the tiny run's students and datasets and add one dataset each, whose
    masks come from one CGN and textures from the other."""
    import torch

    from skdcgn.counterfactuals import load_image_dataset

    run_dir, _ = tiny_run
    argv = ["run", "--preset", "tiny", "--variant", "colored", "--run-dir", str(run_dir), "--quiet",
            "--rows", "teacher_cf", "hybrid_teacher_shape", "hybrid_student_shape"]
    assert main(argv) == 0
    summary = read_json(run_dir / "results.json")
    assert set(summary["results"]["colored"]["table"]) == {"teacher_cf", "hybrid_teacher_shape", "hybrid_student_shape"}
    vdir = run_dir / "colored"
    x_t, _ = load_image_dataset(vdir / "datasets" / "teacher_cf", dtype=torch.uint8)
    x_s, _ = load_image_dataset(vdir / "datasets" / "student_cf", dtype=torch.uint8)
    x_h, _ = load_image_dataset(vdir / "datasets" / "hybrid_teacher_shape", dtype=torch.uint8)
    assert not torch.equal(x_h, x_t) and not torch.equal(x_h, x_s)
    assert "| hybrid_teacher_shape |" in (run_dir / "results.md").read_text()


def test_hybrid_cgn_spec():
    import torch

    import skdcgn
    from skdcgn.errors import SkdcgnError

    hybrid = skdcgn.load_cgn("hybrid:colored,shape=double_colored")
    shape_of, texture_of = skdcgn.load_cgn("double_colored"), skdcgn.load_cgn("colored")
    y = torch.arange(3)
    h, a, b = (c.sample(y, generator=torch.Generator().manual_seed(0)) for c in (hybrid, shape_of, texture_of))
    assert torch.equal(h.mask, a.mask) and torch.equal(h.foreground, b.foreground)
    assert torch.equal(h.background, b.background) and not torch.equal(h.composite, b.composite)
    for bad in ("hybrid:colored,shape", "hybrid:colored,texture=colored", "hybrid:shape=colored",
                "hybrid:colored,shape=colored,shape=wildlife"):
        with pytest.raises(SkdcgnError, match="hybrid"):
            skdcgn.load_cgn(bad)


def test_stream_rows_train_as_many_steps_as_the_stored_rows(tiny_run, tmp_path):
    """The stream rows reuse the tiny run's students, store no dataset, and train for the stored
    rows' steps (× --stream-budget), each classifier seed on its own stream."""
    import skdcgn
    from skdcgn.counterfactuals import weights_hash
    from skdcgn.pipeline import record_key

    run_dir, _ = tiny_run
    sub = tmp_path / "stream"
    assert main(["run", "--preset", "tiny", "--variant", "colored", "--run-dir", str(sub), "--quiet", "--students",
                 str(run_dir), "--rows", "student_cf", "teacher_stream", "student_stream", "--threads", "1"]) == 0
    summary = read_json(sub / "results.json")
    assert set(summary["results"]["colored"]["table"]) == {"student_cf", "teacher_stream", "student_stream"}
    assert sorted(p.name for p in (sub / "colored" / "datasets").iterdir()) == ["student_cf"]
    clf = sub / "colored" / "classifiers"
    steps = read_json(clf / "student_cf" / "seed0" / "manifest.json")["log"][-1]["steps"]
    for row, cgn in (("teacher_stream", "colored"), ("student_stream", f"students:{run_dir / 'colored'}")):
        manifest = read_json(clf / row / "seed0" / "manifest.json")
        assert manifest["log"][-1]["steps"] == steps
        assert manifest["config"]["stream"]["cgn_weights"] == weights_hash(skdcgn.load_cgn(cgn))
    assert "| student_stream |" in (sub / "results.md").read_text()
    assert "-stream" not in record_key(summary, "tiny")

    longer = tmp_path / "stream2x"
    assert main(["run", "--preset", "tiny", "--variant", "colored", "--run-dir", str(longer), "--quiet", "--students",
                 str(run_dir), "--rows", "student_stream", "--stream-budget", "2", "--stream-per-shape", "1",
                 "--threads", "1"]) == 0
    manifest = read_json(longer / "colored" / "classifiers" / "student_stream" / "seed0" / "manifest.json")
    assert manifest["log"][-1]["steps"] == 2 * steps and manifest["config"]["stream"]["per_shape"] == 1
    assert "-student_stream-stream2x-stream-per-shape1" in record_key(read_json(longer / "results.json"), "tiny")


def test_batched_classifiers_give_the_table_of_one_by_one_training(tiny_run, tmp_path, monkeypatch):
    """`--batch-classifiers on` (CPU): the tiny run's students and datasets, every (row, seed) classifier
    trained in one multitrain call; the same table within float tolerance, the same classifier stages."""
    import shutil

    from skdcgn import multitrain

    run_dir, _ = tiny_run
    new = tmp_path / "batched"
    for part in ("datasets", "distill", "transfer"):
        shutil.copytree(run_dir / "colored" / part, new / "colored" / part)
    calls = []
    real = multitrain.train_classifiers
    monkeypatch.setattr(multitrain, "train_classifiers", lambda jobs, **kw: calls.append(len(jobs)) or real(jobs, **kw))
    argv = ["run", "--preset", "tiny", "--variant", "colored", "--run-dir", str(new), "--quiet", "--batch-classifiers", "on"]
    assert main(argv) == 0
    assert calls == [len(TRAINING_SETS)]  # one call, every row (1 seed)
    assert set(read_json(new / "results.json")["results"]["colored"]["table"]) == set(TRAINING_SETS)
    for row in TRAINING_SETS:  # each classifier's scores (the module's run_dir table may hold other rows by now)
        one, batched = (d / "colored" / "classifiers" / row / "seed0" for d in (run_dir, new))
        ours, theirs = (read_json(d / "eval" / "manifest.json")["accuracy"] for d in (batched, one))
        assert ours.keys() == theirs.keys()
        for split in theirs:
            assert ours[split] == pytest.approx(theirs[split], abs=0.02), (row, split)  # 2 of 100 images
        assert read_json(one / "manifest.json")["config"] == read_json(batched / "manifest.json")["config"]
    assert main(argv) == 0 and calls == [len(TRAINING_SETS)]  # complete: nothing trained or loaded again
