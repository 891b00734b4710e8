"""Distillation on tiny configs: transfer sets, students, losses, resume, determinism, source-freeness."""
from __future__ import annotations

import csv
import subprocess
import sys

import pytest
import torch

from skdcgn.errors import SkdcgnError
from skdcgn.models.cgn_mnist import teacher_mechanisms
from skdcgn.models.pretrained import load_model
from skdcgn.models.students import ShapeStudent, StudentConfig, TextureStudent, make_student
from skdcgn.distill.query import TransferSet, query_teacher
from skdcgn.distill.trainer import DistillConfig, PRESETS, distill, preset, train_student


@pytest.fixture(scope="module")
def tiny_teacher():
    torch.manual_seed(0)
    mechs = teacher_mechanisms(ngf=4)
    for m in mechs.values():
        m.eval()
    return mechs


def tiny(**overrides) -> DistillConfig:
    return preset("tiny", device="cpu", **overrides)


def _tensors_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_transfer_set_resumes_without_losing_or_duplicating_shards(tiny_teacher, tmp_path):
    mech = tiny_teacher["foreground"]
    full = query_teacher(mech, tmp_path / "full", n=100, shard_size=30, seed=7, progress=False)
    part = tmp_path / "part"
    query_teacher(mech, part, n=100, shard_size=30, seed=7, progress=False, max_shards=2)  # "killed" after 2 shards
    assert sorted(p.name for p in part.glob("shard_*")) == ["shard_00000.safetensors", "shard_00001.safetensors"]
    assert not (part / "manifest.json").exists()
    (part / ".shard_00002.safetensors.abc.tmp").write_bytes(b"half a shard")  # left by a kill mid-write
    (part / "shard_00001.safetensors").write_bytes(b"\x00" * 10)  # a damaged shard is rewritten
    query_teacher(mech, part, n=100, shard_size=30, seed=7, progress=False)
    assert sorted(p.name for p in part.iterdir()) == sorted(p.name for p in full.iterdir())
    a, b = TransferSet(full), TransferSet(part)
    assert len(a) == len(b) == 100
    assert torch.equal(a.u, b.u) and torch.equal(a.y, b.y) and torch.equal(a.out, b.out)
    for i in range(4):
        assert (full / f"shard_{i:05d}.safetensors").read_bytes() == (part / f"shard_{i:05d}.safetensors").read_bytes()
    # decoded targets are within half a quantisation step of the teacher
    with torch.no_grad():
        t = mech(a.u[:10], a.y[:10])
    assert (a.targets(torch.arange(10)) - t).abs().max() <= 1 / 255 + 1e-6
    # batches are a pure function of the step
    u1, y1, _ = a.batch(5, 16, seed=3)
    u2, y2, _ = b.batch(5, 16, seed=3)
    assert torch.equal(u1, u2) and torch.equal(y1, y2)


def test_transfer_set_refuses_paths_outside_its_folder(tiny_teacher, tmp_path):
    folder = query_teacher(tiny_teacher["shape"], tmp_path / "t", n=20, shard_size=10, seed=0, progress=False)
    import json
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["shards"][0]["file"] = "../../etc/passwd"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SkdcgnError, match="leaves its folder"):
        TransferSet(folder)


def _train(tiny_teacher, tmp_path, name, mechanism="shape", stop_after=None, overwrite=False, **overrides):
    cfg = tiny(**overrides)
    folder = query_teacher(tiny_teacher[mechanism], tmp_path / "transfer" / mechanism, cfg.n_transfer, cfg.shard_size,
                           seed=1, progress=False)
    out = tmp_path / name
    return train_student(mechanism, TransferSet(folder), out, cfg, progress=False, stop_after=stop_after,
                         overwrite=overwrite), out


def test_a_few_steps_lower_the_distillation_loss(tiny_teacher, tmp_path):
    _, out = _train(tiny_teacher, tmp_path, "s", mechanism="foreground", steps=30, log_interval=1, lr_g=3e-3,
                    checkpoint_interval=100, sample_interval=100)
    with open(out / "losses.csv") as f:
        pixel = [float(r["pixel"]) for r in csv.DictReader(f)]
    assert len(pixel) == 30
    assert sum(pixel[-5:]) / 5 < 0.8 * sum(pixel[:5]) / 5


def test_training_is_deterministic_and_resumes_bitwise(tiny_teacher, tmp_path):
    a, _ = _train(tiny_teacher, tmp_path, "a")
    b, _ = _train(tiny_teacher, tmp_path, "b")
    assert _tensors_equal(a.state_dict(), b.state_dict())  # same seed, same weights
    killed, out = _train(tiny_teacher, tmp_path, "c", stop_after=3)  # checkpoints every 2 steps: resumes from 2
    assert killed is None and (out / "checkpoint.safetensors").is_file() and not (out / "manifest.json").exists()
    c, _ = _train(tiny_teacher, tmp_path, "c")
    assert _tensors_equal(a.state_dict(), c.state_dict())
    with open(out / "losses.csv") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f)]
    assert steps == sorted(set(steps))  # no duplicated log rows after resuming


def test_students_round_trip_and_keep_their_interface(tmp_path):
    u, y = torch.randn(5, 32), torch.tensor([0, 3, 9, 1, 2])
    for mechanism, cls in (("shape", ShapeStudent), ("background", TextureStudent)):
        s = make_student(StudentConfig(mechanism=mechanism, widths=(8, 8, 8), shifted_texture=mechanism != "shape")).eval()
        s.save_pretrained(tmp_path / mechanism)
        t = load_model(tmp_path / mechanism)
        assert type(t) is cls
        with torch.no_grad():
            out, out2 = s(u, y), t(u, y)
        assert torch.equal(out, out2)
        assert out.shape == (5, 1 if mechanism == "shape" else 3, 32, 32)
        lo, hi = (0, 1) if mechanism == "shape" else (-1, 1)
        assert out.min() >= lo and out.max() <= hi


def test_instance_normed_shape_student_round_trips_and_older_configs_still_load(tmp_path):
    import json

    u, y = torch.randn(6, 32, generator=torch.Generator().manual_seed(1)), torch.arange(6)
    s = make_student(StudentConfig(mechanism="shape", widths=(8, 8, 8), output_norm="instance")).eval()
    with torch.no_grad():
        s.out_norm.weight.fill_(3.0)
        s.out_norm.bias.fill_(-1.0)
        logits = s.pre_activation(u, y)
    # per image: g · (x − mean) / std + b, so every image's logits have mean b and std g
    assert torch.allclose(logits.mean((1, 2, 3)), torch.full((6,), -1.0), atol=1e-4)
    assert torch.allclose(logits.std((1, 2, 3), unbiased=False), torch.full((6,), 3.0), atol=1e-2)
    s.save_pretrained(tmp_path / "inorm")
    t = load_model(tmp_path / "inorm")
    assert t.config.output_norm == "instance" and torch.equal(t(u, y), s(u, y))
    # a student saved before the field existed loads as "none"
    plain = make_student(StudentConfig(mechanism="shape", widths=(8, 8, 8))).eval()
    plain.save_pretrained(tmp_path / "old")
    cfg = json.loads((tmp_path / "old" / "config.json").read_text())
    del cfg["config"]["output_norm"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(cfg))
    old = load_model(tmp_path / "old")
    assert old.config.output_norm == "none" and old.out_norm is None and torch.equal(old(u, y), plain(u, y))
    with pytest.raises(SkdcgnError, match="output_norm"):
        StudentConfig(mechanism="shape", output_norm="batch").validate()
    # only the shape student gets it from a distillation config; the stage identity is unchanged at the default
    cfg = preset("tiny", shape_output_norm="instance")
    assert cfg.student_config("shape").output_norm == "instance" and cfg.student_config("foreground").output_norm == "none"
    from skdcgn.distill.trainer import config_record
    assert "shape_output_norm" not in config_record(preset("tiny")) and "shape_output_norm" in config_record(cfg)
    # the shape student may be sized apart from the textures (empty / -1: the shared student_* sizes)
    cfg = preset("tiny", shape_widths=(8, 16, 12), shape_extra_blocks=2)
    assert (cfg.student_config("shape").widths, cfg.student_config("shape").extra_blocks) == ((8, 16, 12), 2)
    assert (cfg.student_config("background").widths, cfg.student_config("background").extra_blocks) == ((8, 8, 8), 0)
    assert {"shape_widths", "shape_extra_blocks"} <= set(config_record(cfg))
    assert not {"shape_widths", "shape_extra_blocks"} & set(config_record(preset("tiny")))
    with pytest.raises(SkdcgnError, match="widths"):
        preset("tiny", shape_widths=(8, 8))


def test_default_students_fit_the_parameter_budget():
    from skdcgn import load_cgn

    teacher = load_cgn("double_colored")
    emb = teacher.shape.label_emb.weight.numel()  # shared by the teacher's mechanisms
    cfg = DistillConfig()
    for m, t in teacher.mechanisms().items():
        s = make_student(cfg.student_config(m))
        assert s.get_num_params() <= 0.25 * (t.get_num_params() - emb), m


def test_distill_end_to_end_writes_loadable_students_and_skips_when_done(tiny_teacher, tmp_path):
    from skdcgn import load_cgn
    from skdcgn.models.cgn import CGN

    teacher = CGN(**tiny_teacher).eval()
    cfg = tiny()
    result = distill(teacher, ["shape", "foreground", "background"], tmp_path, cfg, progress=False)
    assert set(result["mechanisms"]) == {"shape", "foreground", "background"}
    assert 0 <= result["mechanisms"]["shape"]["iou@0.5"] <= 1
    for name in ("eval.json", "compare_shape.png", "compare_composite.png"):
        assert (tmp_path / "distill" / name).is_file()
    # the learning curve: one entry per weight snapshot (sample_interval 3 of 6 steps), the last one the student's
    curve = result["mechanisms"]["shape"]["curve"]
    assert [c["step"] for c in curve] == [3, 6]
    assert curve[-1]["iou@0.5"] == pytest.approx(result["mechanisms"]["shape"]["iou@0.5"])
    assert 0 <= curve[0]["binariness"] <= 1 and 0 < curve[0]["teacher_binariness"] <= 1
    assert [c["step"] for c in result["mechanisms"]["foreground"]["curve"]] == [3, 6]
    students = load_cgn(f"students:{tmp_path}")
    m, f, b, x = students.sample(torch.arange(4), generator=torch.Generator().manual_seed(0))
    assert m.shape == (4, 1, 32, 32) and x.shape == (4, 3, 32, 32)
    stamp = (tmp_path / "distill" / "students" / "shape" / "model.safetensors").stat().st_mtime_ns
    first = result["mechanisms"]["shape"]["train_s"]
    again = distill(teacher, ["shape"], tmp_path, cfg, progress=False)  # finished: skipped
    assert (tmp_path / "distill" / "students" / "shape" / "model.safetensors").stat().st_mtime_ns == stamp
    assert again["mechanisms"]["shape"]["train_s"] == first  # the reused student keeps its training time
    # nothing new to measure: the evaluation is not repeated (eval.json untouched)...
    eval_json = tmp_path / "distill" / "eval.json"
    stamp = eval_json.stat().st_mtime_ns
    assert distill(teacher, ["shape"], tmp_path, cfg, progress=False) == again
    assert eval_json.stat().st_mtime_ns == stamp
    # ...but it is when what it depends on differs from what it was made with
    import json
    stored = json.loads(eval_json.read_text())
    stored["inputs"]["students"]["shape"] = "another student"
    stored["mechanisms"]["shape"]["l1"] = -1.0
    eval_json.write_text(json.dumps(stored))
    assert distill(teacher, ["shape"], tmp_path, cfg, progress=False)["mechanisms"]["shape"]["l1"] == again["mechanisms"]["shape"]["l1"]


def test_where_a_student_was_trained_is_not_part_of_what_it_is(tiny_teacher, tmp_path):
    a, out = _train(tiny_teacher, tmp_path, "s", threads=1)  # and device="cpu" (tiny's), hashed as "auto"
    stamp = (out / "manifest.json").stat().st_mtime_ns
    b, _ = _train(tiny_teacher, tmp_path, "s", threads=0)  # reused, not trained again
    assert (out / "manifest.json").stat().st_mtime_ns == stamp and _tensors_equal(a.state_dict(), b.state_dict())
    with pytest.raises(SkdcgnError, match=r"other settings \(distill.steps: 6 there, 7 now\)"):
        _train(tiny_teacher, tmp_path, "s", steps=7)  # what it is: refused, the finished student kept...
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    _train(tiny_teacher, tmp_path, "s", steps=7, overwrite=True)  # ...unless asked: trained again
    assert (out / "manifest.json").stat().st_mtime_ns != stamp


def test_distill_package_is_source_free():
    code = ("import sys, skdcgn.distill.query, skdcgn.distill.losses, skdcgn.distill.trainer, "
            "skdcgn.distill.evaluate, skdcgn.commands.distill\n"
            "bad = [m for m in sys.modules if m == 'skdcgn.data' or m.startswith('skdcgn.data.')]\n"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("field,value,message", [("batch_size", 0, "batch_size"), ("lr_g", -1.0, "lr_g"),
                                                 ("mask_loss", "dice", "mask_loss"), ("student_widths", (8, 8), "widths"),
                                                 ("beta2", 1.0, "beta2")])
def test_bad_config_values_are_one_line_errors(field, value, message):
    with pytest.raises(SkdcgnError, match=message) as e:
        preset("tiny", **{field: value})
    assert "\n" not in str(e.value)


def test_cli_reports_bad_values_in_one_line(tmp_path, capsys):
    from skdcgn.cli import main

    assert main(["distill", "--run-dir", str(tmp_path), "--preset", "tiny", "--lr-g", "-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("skdcgn: error:") and "lr_g" in err and "\n" not in err
    assert set(PRESETS) >= {"tiny", "quick", "default"}
