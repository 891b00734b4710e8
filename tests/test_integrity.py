"""Integrity (issue #18): nothing corrupt is ever used, nothing is lost, whatever happens to the run folder.

Each test is one case a user met: a rerun with other settings, a flipped byte in an artifact, a
changed cache file, a deleted input of a finished stage, a SIGKILL in a crash window, two
processes in one folder, file permissions. All on tiny configs, through the CLI where a user
would meet them.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from skdcgn.checkpoint import load_checkpoint
from skdcgn.cli import main
from skdcgn.io import load_tensors, read_json, save_tensors, sha256_file, tensor_file_metadata

CPU = ["--device", "cpu"]


def _run(argv: list, capsys) -> tuple[int, list[str]]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    return rc, [line for line in err.replace("\r", "\n").splitlines() if line.startswith("skdcgn")]


def _one_line(rc: int, lines: list[str], *needles: str) -> None:
    assert rc == 2, lines
    assert len(lines) == 1 and lines[0].startswith("skdcgn: error: "), lines
    for needle in needles:
        assert needle in lines[0], lines


def _flip(path: Path, at: int | None = None) -> None:
    """Flip one byte, by default in the middle of the file (tensor data, past the header)."""
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if at is None else at
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


def _cf(out: Path, seed: int = 0, n: int = 40, extra: tuple = ()) -> list[str]:
    return ["counterfactuals", "--cgn", "colored", "--n", n, "--per-shape", 10, "--shard-size", 20, "--seed", seed,
            *CPU, "--out", out, *extra]


def _clf(data: Path, out: Path, *extra) -> list:
    return ["classify", "train", "--data", data, "--out", out, "--epochs", 2, "--batch-size", 16, "--seed", 1, *CPU, *extra]


def _distill(run_dir: Path, *extra) -> list:
    return ["distill", "--teacher", "colored", "--mechanism", "shape", "--run-dir", run_dir, "--preset", "tiny",
            "--steps", 8, "--checkpoint-interval", 4, "--sample-interval", 4, "--threads", 1, *CPU, "--no-progress", *extra]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A finished 40-image counterfactual dataset (two shards) of the shipped colored teacher."""
    out = tmp_path_factory.mktemp("cf") / "data"
    assert main([str(a) for a in _cf(out)]) == 0
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---- a changed setting never discards work silently ---------------------------------------------------

def test_distill_with_another_setting_is_refused_and_keeps_the_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    assert _run(_distill(run), capsys)[0] == 0
    student = run / "distill" / "students" / "shape"
    before = {p.name: p.read_bytes() for p in student.iterdir() if p.is_file()}
    # a finished student: refused, naming the setting; nothing changes
    rc, lines = _run(_distill(run, "--lr-g", "0.01"), capsys)
    _one_line(rc, lines, "other settings", "lr_g", "0.01", "--overwrite")
    assert {p.name: p.read_bytes() for p in student.iterdir() if p.is_file()} == before
    # an interrupted one (only its checkpoint): refused too, the checkpoint kept byte for byte
    for name in ("manifest.json", "model.safetensors", "config.json"):
        (student / name).unlink()
    rc, lines = _run(_distill(run, "--lr-g", "0.01"), capsys)
    _one_line(rc, lines, "other settings", "lr_g")
    assert (student / "checkpoint.safetensors").read_bytes() == before["checkpoint.safetensors"]
    # asked to overwrite: trained again with the new setting
    assert _run(_distill(run, "--lr-g", "0.01", "--overwrite"), capsys)[0] == 0
    assert read_json(student / "manifest.json")["config"]["distill"]["lr_g"] == 0.01


def test_classifier_with_another_setting_is_refused_and_keeps_its_work(dataset, tmp_path, capsys):
    out = tmp_path / "clf"
    assert _run(_clf(dataset, out), capsys)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    rc, lines = _run(_clf(dataset, out, "--lr", "0.5"), capsys)
    _one_line(rc, lines, "other settings", "train.lr: 1.0 there, 0.5 now")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    (out / "manifest.json").unlink()  # interrupted after its last checkpoint
    rc, lines = _run(_clf(dataset, out, "--lr", "0.5"), capsys)
    _one_line(rc, lines, "other settings", "train.lr")
    assert (out / "checkpoint.safetensors").read_bytes() == before["checkpoint.safetensors"]
    assert _run(_clf(dataset, out, "--lr", "0.5", "--overwrite"), capsys)[0] == 0
    assert read_json(out / "manifest.json")["config"]["train"]["lr"] == 0.5


# ---- flipped bytes are never used -----------------------------------------------------------------------

def test_a_flipped_byte_in_a_classifier_is_refused_on_load_and_repaired_by_a_rerun(dataset, tmp_path, capsys):
    out = tmp_path / "clf"
    assert _run(_clf(dataset, out), capsys)[0] == 0
    good = (out / "model.safetensors").read_bytes()
    _flip(out / "model.safetensors")
    rc, lines = _run(["classify", "eval", "--classifier", out, "--data", dataset, *CPU], capsys)
    _one_line(rc, lines, str(out / "model.safetensors"), "sha256")
    rc, lines = _run(_clf(dataset, out), capsys)  # the stage can regenerate it: from its final checkpoint
    assert rc == 0 and any("model.safetensors" in line and "regenerating" in line for line in lines), lines
    assert (out / "model.safetensors").read_bytes() == good


def test_a_flipped_byte_in_a_student_is_refused_and_the_student_regenerated(tmp_path, capsys):
    run = tmp_path / "run"
    assert _run(_distill(run), capsys)[0] == 0
    weights = run / "distill" / "students" / "shape" / "model.safetensors"
    good = weights.read_bytes()
    _flip(weights)
    from skdcgn.models.pretrained import load_model

    with pytest.raises(Exception, match="sha256") as e:
        load_model(weights.parent)
    assert str(weights) in str(e.value)
    rc, lines = _run(_distill(run), capsys)
    assert rc == 0 and sum(str(weights) in line and "regenerating" in line for line in lines) == 1, lines
    assert weights.read_bytes() == good


@pytest.mark.parametrize("damage", ["flipped-byte", "other-datasets-shard", "shard-listed-twice"])
def test_a_damaged_dataset_is_refused_by_training_and_repaired_by_its_command(dataset, tmp_path, capsys, damage):
    data = _copy(dataset, tmp_path / "data")
    shard = data / "shard_00001.safetensors"
    if damage == "flipped-byte":
        _flip(shard)
    elif damage == "other-datasets-shard":  # same size, same recipe but another seed
        other = tmp_path / "other"
        assert _run(_cf(other, seed=7), capsys)[0] == 0
        assert (other / shard.name).stat().st_size == shard.stat().st_size
        shutil.copy(other / shard.name, shard)
    else:  # 40 images from 20
        manifest = read_json(data / "manifest.json")
        manifest["shards"][1] = dict(manifest["shards"][0])
        (data / "manifest.json").write_text(json.dumps(manifest))
    rc, lines = _run(_clf(data, tmp_path / "clf"), capsys)
    _one_line(rc, lines, "shard_0000")
    assert not (tmp_path / "clf" / "manifest.json").exists()
    if damage != "shard-listed-twice":  # the dataset's own command repairs a changed shard
        rc, lines = _run(_cf(data), capsys)
        assert rc == 0 and any(str(shard) in line for line in lines), lines
        assert shard.read_bytes() == (dataset / shard.name).read_bytes()
        assert (data / "manifest.json").read_bytes() != b""
        assert _run(_clf(data, tmp_path / "clf"), capsys)[0] == 0


# ---- the cache is checked too ----------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["100-labels", "one-image-byte", "label-minus-one"])
def test_a_changed_cache_file_is_rebuilt(damage, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("SKDCGN_CACHE", str(tmp_path / "cache"))
    from skdcgn.data.variants import load_variant_uint8, variant_cache_path

    images, labels = load_variant_uint8("colored", "test")
    path = variant_cache_path("colored", "test")
    t, meta = load_tensors(path), tensor_file_metadata(path)
    if damage == "100-labels":
        t["labels"][:100] = (t["labels"][:100] + 1) % 10
    elif damage == "one-image-byte":
        t["images"][5, 1, 16, 16] ^= 1
    else:
        t["labels"][3] = -1
    save_tensors(path, t, metadata=meta)  # as a user editing the file would: its recorded digest kept
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="skdcgn"):
        again_images, again_labels = load_variant_uint8("colored", "test")
    err = caplog.text  # a warning of the skdcgn logger (the CLI prints it as `skdcgn: …` on stderr)
    assert "rebuilding" in err and str(path) in err, err
    assert torch.equal(again_images, images) and torch.equal(again_labels, labels)
    t2 = load_tensors(path)
    assert torch.equal(t2["images"], images) and torch.equal(t2["labels"], labels)  # repaired on disk


def test_temporaries_of_killed_cache_writes_are_removed(tmp_path, monkeypatch):
    monkeypatch.setenv("SKDCGN_CACHE", str(tmp_path / "cache"))
    from skdcgn.data.variants import load_variant_uint8

    folder = tmp_path / "cache" / "variants"
    folder.mkdir(parents=True)
    ours, theirs = folder / ".colored-test-x.safetensors.k1ll3d00.tmp", folder / ".tmpAb3De9"  # atomic_path's, safetensors'
    ours.write_bytes(b"half")
    theirs.write_bytes(b"half")
    load_variant_uint8("colored", "test")
    assert not ours.exists() and not theirs.exists()
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []


# ---- a finished stage does not need its inputs again -----------------------------------------------------

def test_a_finished_student_does_not_need_its_transfer_set(tmp_path, capsys):
    run = tmp_path / "run"
    assert _run(_distill(run), capsys)[0] == 0
    student = run / "distill" / "students" / "shape"
    before = {p.name: p.read_bytes() for p in student.iterdir() if p.is_file()}
    shard = run / "transfer" / "shape" / "shard_00001.safetensors"
    good = shard.read_bytes()
    shard.unlink()
    assert _run(_distill(run), capsys)[0] == 0  # skipped: the student is finished and verified
    assert not shard.exists()
    assert {p.name: p.read_bytes() for p in student.iterdir() if p.is_file()} == before
    # a student that must still read it: the transfer set writes the missing shard again, the same bytes
    (student / "manifest.json").unlink()
    (student / "checkpoint.safetensors").unlink()
    assert _run(_distill(run), capsys)[0] == 0
    assert shard.read_bytes() == good
    assert (student / "model.safetensors").read_bytes() == before["model.safetensors"]


def test_a_finished_run_does_not_need_a_deleted_transfer_shard(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["run", "--preset", "tiny", "--variant", "colored", "--run-dir", run, "--quiet", "--device", "cpu",
            "--rows", "student_cf", "--composers"]
    assert _run(argv, capsys)[0] == 0
    results = read_json(run / "results.json")["results"]
    (run / "colored" / "transfer" / "foreground" / "shard_00002.safetensors").unlink()
    assert _run(argv, capsys)[0] == 0
    assert read_json(run / "results.json")["results"]["colored"]["table"] == results["colored"]["table"]


# ---- crash windows -----------------------------------------------------------------------------------------

def test_classifier_killed_between_its_last_checkpoint_and_its_log(dataset, tmp_path, capsys):
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert _run(_clf(dataset, ref), capsys)[0] == 0
    assert _run(_clf(dataset, out), capsys)[0] == 0
    for name in ("train_log.csv", "model.safetensors", "config.json", "manifest.json"):  # the state after such a kill
        (out / name).unlink()
    assert _run(_clf(dataset, out), capsys)[0] == 0
    def untimed(path: Path) -> list[list[str]]:  # every column but the seconds each epoch took
        rows = [line.split(",") for line in path.read_text().splitlines()]
        keep = [i for i, name in enumerate(rows[0]) if name != "seconds"]
        return [[r[i] for i in keep] for r in rows]

    assert (out / "train_log.csv").is_file()
    assert untimed(out / "train_log.csv") == untimed(ref / "train_log.csv")


def test_student_killed_between_its_model_and_its_manifest(tmp_path, capsys):
    run = tmp_path / "run"
    assert _run(_distill(run), capsys)[0] == 0
    manifest = run / "distill" / "students" / "shape" / "manifest.json"
    final_losses = read_json(manifest)["final_losses"]
    assert final_losses
    manifest.unlink()
    assert _run(_distill(run), capsys)[0] == 0
    assert read_json(manifest)["final_losses"] == final_losses


def test_teacher_killed_during_its_export_keeps_the_checkpoints_of_an_uninterrupted_run(tmp_path, monkeypatch):
    from skdcgn import teacher_training as tt

    def data(variant, data_seed=0):
        g = torch.Generator().manual_seed(0)
        return torch.randint(0, 255, (64, 3, 32, 32), generator=g, dtype=torch.uint8), torch.arange(64) % 10

    monkeypatch.setattr(tt, "load_train_set", data)
    cfg = dict(steps=4, batch_size=8, ngf=8, ndf=32, checkpoint_every=2, sample_every=0, log_every=1,
               bn_recalibration_batches=1, device="cpu")
    tt.train_teacher("colored", tmp_path / "ref", tt.preset_config("quick", **cfg), progress=False)
    tt.train_teacher("colored", tmp_path / "out", tt.preset_config("quick", **cfg), progress=False)
    (tmp_path / "out" / "teacher" / "manifest.json").unlink()  # killed during the export
    tt.train_teacher("colored", tmp_path / "out", tt.preset_config("quick", **cfg), progress=False)
    for name in ("checkpoint.safetensors", "checkpoint.prev.safetensors"):
        a = load_checkpoint(tmp_path / "ref" / "teacher" / "train" / name)
        b = load_checkpoint(tmp_path / "out" / "teacher" / "train" / name)
        assert a["step"] == b["step"], name


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace to see every file a write creates")
def test_a_safetensors_write_creates_no_file_but_its_own_temporary(tmp_path):
    """What a SIGKILL during a shard or cache write can leave: only atomic_path's temporary, which
    the stage (or the cache) removes; safetensors' own `.tmpXXXXXX` writer is not used."""
    script = ("import torch; from skdcgn.io import save_tensors; "
              f"save_tensors({str(tmp_path / 'x.safetensors')!r}, {{'a': torch.zeros(1000)}}, metadata={{'k': 'v'}})")
    r = subprocess.run(["strace", "-f", "-e", "trace=openat", sys.executable, "-c", script], capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    created = {Path(line.split('"')[1]).name for line in r.stderr.splitlines()
               if "O_CREAT" in line and str(tmp_path) in line}
    from skdcgn.io import _TMP_NAME

    assert created and all(_TMP_NAME.match(name) for name in created), created


# ---- two processes in one folder -------------------------------------------------------------------------

def _holder(folder: Path) -> subprocess.Popen:
    """Another process holding the folder's lock (as a running `skdcgn` would)."""
    p = subprocess.Popen([sys.executable, "-c", f"from skdcgn.io import folder_lock\nimport time\n"
                          f"with folder_lock({str(folder)!r}):\n    print('locked', flush=True)\n    time.sleep(600)"],
                         stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert p.stdout.readline().strip() == "locked"
    return p


def test_a_second_writer_of_a_folder_gets_one_line_and_a_dead_ones_lock_is_stale(dataset, tmp_path, capsys):
    out = _copy(dataset, tmp_path / "data")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    p = _holder(out)
    try:
        rc, lines = _run(_cf(out, seed=5, extra=("--overwrite",)), capsys)
        _one_line(rc, lines, str(out), f"pid {p.pid}")
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != ".skdcgn.lock"} == before
    finally:
        p.kill()  # SIGKILL: no clean-up; the kernel releases its lock
        p.wait()
    assert _run(_cf(out, seed=5, extra=("--overwrite",)), capsys)[0] == 0
    assert read_json(out / "manifest.json")["config"]["seed"] == 5
    assert not (out / ".skdcgn.lock").exists()


def test_a_second_counterfactuals_into_a_folder_being_written_is_refused(tmp_path, capsys):
    """The issue's case, made deterministic: while one `skdcgn counterfactuals` writes a folder, another
    with another seed and --overwrite is refused in one line; the first finishes a dataset of its seed."""
    out = tmp_path / "data"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    first = subprocess.Popen([sys.executable, "-m", "skdcgn", *map(str, _cf(out, seed=1, n=1000))],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    end = time.monotonic() + 120
    while not (out / "shard_00001.safetensors").exists() and first.poll() is None and time.monotonic() < end:
        time.sleep(0.005)
    assert first.poll() is None, "the first run ended before the second started; make it larger"
    rc, lines = _run(_cf(out, seed=2, n=1000, extra=("--overwrite",)), capsys)
    _one_line(rc, lines, str(out), "is being written by", f"pid {first.pid}")
    assert first.wait(timeout=300) == 0
    manifest = read_json(out / "manifest.json")
    assert manifest["config"]["seed"] == 1
    assert {tensor_file_metadata(out / s["file"])["config_hash"] for s in manifest["shards"]} == {manifest["config_hash"]}


def test_two_counterfactual_runs_into_one_folder_never_mix(tmp_path):
    """Both with --overwrite and other seeds, started together: one finishes, the other gets one
    line (or, started after, replaces it whole); the result is always one seed's dataset."""
    out = tmp_path / "data"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [subprocess.Popen([sys.executable, "-m", "skdcgn", *map(str, _cf(out, seed=s, n=200, extra=("--overwrite",)))],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for s in (1, 2)]
    results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    assert any(rc == 0 for _, _, rc in results), results
    for _, err, rc in results:
        if rc != 0:
            assert rc == 2 and "is being written by" in err, err
    manifest = read_json(out / "manifest.json")
    tags = {tensor_file_metadata(out / s["file"])["config_hash"] for s in manifest["shards"]}
    assert tags == {manifest["config_hash"]}
    for s in manifest["shards"]:
        assert sha256_file(out / s["file"]) == s["sha256"]


# ---- permissions -------------------------------------------------------------------------------------------

def test_safetensors_artifacts_have_the_permissions_of_the_json_beside_them(dataset, tmp_path):
    old = os.umask(0o022)
    try:
        save_tensors(tmp_path / "x.safetensors", {"a": torch.zeros(3)})
    finally:
        os.umask(old)
    assert (tmp_path / "x.safetensors").stat().st_mode & 0o777 == 0o644
    modes = {p.suffix: p.stat().st_mode & 0o777 for p in dataset.iterdir() if p.suffix in (".json", ".safetensors")}
    assert modes[".safetensors"] == modes[".json"], modes
