"""Untrusted input and failing disks: every bad input is one line on stderr and exit code 2.

- `test_bad_input_is_one_clean_line`: fuzzed CLI values (negative, huge, NaN, inf, wrong
  types), YAML configs (wrong types, unknown keys, tags that would run code), unknown names,
  truncated and corrupted files (safetensors, config.json, manifest.json, IDX, JPEG textures,
  .pth, results.json), wrong shapes, NaN weights, manifest paths that escape their folder.
- `test_malicious_pickle_is_refused_and_runs_nothing`: a pickle that creates a file when loaded,
  planted everywhere a .pth/.pt is read (the teacher loader and every resume checkpoint).
- `test_nan_in_a_resume_checkpoint_is_refused`: NaN planted in each stage's checkpoint.
- `test_full_disk_*`: a write that fails at any point loses no earlier artifact, leaves no
  partial file, reports "No space left on device" in one line, and the next run completes.
"""
from __future__ import annotations

import errno
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from skdcgn import teacher_training as tt
from skdcgn.cli import main
from skdcgn.data import variants
from skdcgn.data.mnist import mnist_files
from skdcgn.checkpoint import load_checkpoint, save_checkpoint
from skdcgn.io import load_tensors, save_tensors, write_manifest
from skdcgn.models.cgn import CGN
from skdcgn.models.cgn_mnist import shipped_teacher_path, teacher_mechanisms
from skdcgn.models.classifier import Classifier, ClassifierNetConfig

HAS_CUDA = torch.cuda.is_available()
PROGRESS_BAR = re.compile(r"^[\w ./-]+:\s+\d+%\|")  # tqdm's lines: progress, not messages



# ---- good artifacts, made once; each test corrupts its own copy ------------------------------------

def _synthetic_set(variant: str = "", data_seed: int = 0, n: int = 64):
    g = torch.Generator().manual_seed(data_seed)
    labels = torch.arange(n) % 10
    images = torch.randint(0, 90, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    for k in range(10):
        images[labels == k, :, 4:20, 2 + 3 * k:5 + 3 * k] = 255
    return images, labels


def _dataset(folder: Path, n: int = 64) -> Path:
    x, y = _synthetic_set(n=n)
    save_tensors(folder / "shard_00000.safetensors", {"images": x, "labels": y, "y_fg": y.clone(), "y_bg": y.clone()})
    write_manifest(folder, {"synthetic": n}, shards=[{"file": "shard_00000.safetensors", "count": n}], n_classes=10)
    return folder


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """{name: folder} of valid artifacts: a CGN folder, a classifier, a dataset, MNIST copies."""
    root = tmp_path_factory.mktemp("good")
    torch.manual_seed(0)
    CGN(**teacher_mechanisms(ngf=4)).eval().save_pretrained(root / "cgn")
    Classifier(ClassifierNetConfig()).save_pretrained(root / "classifier")
    _dataset(root / "dataset")
    (root / "mnist").mkdir()
    for f in mnist_files("train"):
        shutil.copy(f, root / "mnist" / f.name)
    return root


@pytest.fixture
def t(good, tmp_path):
    """A fresh copy of the good artifacts in this test's folder."""
    for name in ("cgn", "classifier", "dataset", "mnist"):
        shutil.copytree(good / name, tmp_path / name)
    return tmp_path


def _run(argv: list[str], capsys) -> tuple[int, list[str]]:
    """Exit code and stderr lines of `skdcgn ARGV` (argparse errors exit via SystemExit)."""
    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    return rc, [line for line in err.replace("\r", "\n").splitlines() if line.strip() and not PROGRESS_BAR.match(line)]


def _assert_one_line(rc: int, lines: list[str], match: str) -> None:
    assert rc == 2, lines
    assert not any("Traceback" in line for line in lines), lines
    errors = [line for line in lines if line.startswith("skdcgn") and ": error: " in line]
    assert len(errors) == 1, lines
    # the error is the whole of stderr, a malformed command line included (cli._OneLineParser)
    assert lines == errors and errors[0].startswith("skdcgn: error: "), lines
    assert match.lower() in errors[0].lower(), f"{match!r} not in {errors[0]!r}"


# ---- corrupting helpers -----------------------------------------------------------------------------

def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def _edit_json(path: Path, edit) -> None:
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj))


def _edit_tensors(path: Path, edit) -> None:
    tensors = dict(load_tensors(path))
    edit(tensors)
    save_tensors(path, tensors)


def _first_float(tensors: dict) -> str:
    return next(k for k, v in tensors.items() if v.is_floating_point() and v.numel() > 1)


def _nan(tensors: dict) -> None:
    k = _first_float(tensors)
    tensors[k] = tensors[k].clone()
    tensors[k].view(-1)[0] = float("nan")


def _yaml(t: Path, text: str | bytes) -> Path:
    p = t / "config.yaml"
    p.write_bytes(text if isinstance(text, bytes) else textwrap.dedent(text).encode())
    return p


def _clf_train(t: Path, *extra) -> list:
    return ["classify", "train", "--data", t / "dataset", "--out", t / "out", "--device", "cpu", *extra]


def _cf(t: Path, *extra) -> list:
    return ["counterfactuals", "--cgn", t / "cgn", "--n", "20", "--out", t / "out", "--device", "cpu", *extra]


def _distill(t: Path, *extra) -> list:
    return ["distill", "--teacher", t / "cgn", "--mechanism", "shape", "--run-dir", t / "run", "--preset", "tiny",
            "--device", "cpu", "--no-progress", *extra]


def _teacher_train(t: Path, *extra) -> list:
    return ["teacher", "train", "--variant", "colored", "--run-dir", t / "run", "--device", "cpu", "--no-progress", *extra]


def _sample(t: Path) -> list:
    return ["teacher", "sample", "--teacher", t / "cgn", "--out", t / "grid.png"]


def _eval(t: Path) -> list:
    return ["classify", "eval", "--classifier", t / "classifier", "--data", t / "dataset", "--device", "cpu"]


def _preview(t: Path, variant: str = "colored") -> list:
    return ["data", "preview", "--variant", variant, "--out", t / "p.png", "--mnist-dir", t / "mnist"]


def _gz(path: Path, data: bytes) -> None:
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(data)


def _mnist_images(t: Path) -> Path:
    return t / "mnist" / "train-images-idx3-ubyte.gz"


def _report(t: Path, summary) -> list:
    (t / "r").mkdir(exist_ok=True)
    (t / "r" / "results.json").write_text(json.dumps(summary))
    return ["report", t / "r"]


_GOOD_CELL = {"mean": 50.0, "std": 0.0, "n": 1}
_GOOD_ROW = {"train": _GOOD_CELL, "test": _GOOD_CELL, "test_iid": _GOOD_CELL}

# (id, builder(t) -> argv, fragment the one error line must contain)
CASES = [
    # -- fuzzed command-line values and unknown names
    ("cf-negative-n", lambda t: _cf(t)[:4] + ["-5"] + _cf(t)[5:], "n: expected an integer"),
    ("cf-huge-n", lambda t: _cf(t)[:4] + [str(10**15)] + _cf(t)[5:], "n: expected an integer"),
    ("cf-zero-per-shape", lambda t: _cf(t, "--per-shape", "0"), "per_shape"),
    ("cf-huge-shard-size", lambda t: _cf(t, "--shard-size", str(2**62)), "shard_size"),
    ("cf-n-not-an-int", lambda t: _cf(t)[:4] + ["1e3"] + _cf(t)[5:], "invalid int value"),
    ("cf-seed-negative", lambda t: _cf(t, "--seed", "-1"), "seed"),
    ("cf-unknown-composer", lambda t: _cf(t, "--composer", "nope"), "unknown composer"),
    ("cf-unknown-teacher", lambda t: ["counterfactuals", "--cgn", "nope", "--out", t / "o"], "not a shipped teacher"),
    ("cf-unknown-device", lambda t: _cf(t)[:-2] + ["--device", "tpu9"], "unknown device"),
    pytest.param("cf-cuda-absent", lambda t: _cf(t)[:-2] + ["--device", "cuda"], "no CUDA", id="cf-cuda-absent",
                 marks=pytest.mark.skipif(HAS_CUDA, reason="CUDA present")),
    ("cf-out-is-a-file", lambda t: _cf(t)[:-4] + ["--out", t / "dataset" / "manifest.json" / "x"], "manifest.json"),
    ("clf-lr-nan", lambda t: _clf_train(t, "--lr", "nan"), "NaN"),
    ("clf-lr-inf", lambda t: _clf_train(t, "--lr", "inf"), "lr"),
    ("clf-lr-negative", lambda t: _clf_train(t, "--lr", "-1"), "lr"),
    ("clf-epochs-negative", lambda t: _clf_train(t, "--epochs", "-1"), "epochs"),
    ("clf-batch-size-float", lambda t: _clf_train(t, "--batch-size", "1.5"), "invalid int value"),
    ("clf-gamma-zero", lambda t: _clf_train(t, "--gamma", "0"), "gamma"),
    ("clf-unknown-arch", lambda t: _clf_train(t, "--arch", "resnet"), "arch"),
    ("clf-unknown-variant", lambda t: ["classify", "train", "--data", "variant:nope", "--out", t / "o"], "unknown variant"),
    ("clf-unknown-split", lambda t: ["classify", "train", "--data", "variant:colored:val", "--out", t / "o"], "unknown split"),
    ("clf-missing-data", lambda t: ["classify", "train", "--data", t / "nowhere", "--out", t / "o"], "no such folder"),
    ("eval-batch-size-zero", lambda t: _eval(t) + ["--batch-size", "0"], "--batch-size"),
    ("distill-steps-zero", lambda t: _distill(t, "--steps", "0"), "steps"),
    ("distill-lr-nan", lambda t: _distill(t, "--lr-g", "nan"), "NaN"),
    ("distill-beta2-one", lambda t: _distill(t, "--beta2", "1"), "beta2"),
    ("distill-negative-width", lambda t: _distill(t, "--student-widths", "8", "-1", "8"), "width"),
    ("distill-unknown-mask-loss", lambda t: _distill(t, "--mask-loss", "nope"), "mask_loss"),
    ("distill-unknown-u-dtype", lambda t: _distill(t, "--u-dtype", "int8"), "u_dtype"),
    ("distill-batch-over-transfer", lambda t: _distill(t, "--batch-size", "100000"), "batch_size"),
    ("distill-from-students", lambda t: _distill(t)[:1] + ["--teacher", f"students:{t}"] + _distill(t)[3:],
     "distil from a teacher"),
    ("distill-unknown-preset", lambda t: _distill(t)[:-5] + ["--preset", "huge"], "invalid choice"),
    ("teacher-steps-zero", lambda t: _teacher_train(t, "--steps", "0"), "steps"),
    ("teacher-mask-bounds", lambda t: _teacher_train(t, "--mask-min", "0.5", "--mask-max", "0.4"), "mask_min"),
    ("teacher-lr-inf", lambda t: _teacher_train(t, "--lr", "inf"), "lr"),
    ("teacher-unknown-disc", lambda t: _teacher_train(t, "--disc", "nope"), "disc"),
    ("teacher-unknown-variant", lambda t: ["teacher", "train", "--variant", "nope", "--run-dir", t], "invalid choice"),
    ("run-seeds-zero", lambda t: ["run", "--preset", "tiny", "--seeds", "0", "--run-dir", t / "r"], "seeds"),
    ("run-unknown-composer", lambda t: ["run", "--preset", "tiny", "--composers", "nope", "--run-dir", t / "r"], "composers"),
    ("run-n-not-an-int", lambda t: ["run", "--preset", "tiny", "--n-counterfactuals", "ten", "--run-dir", t / "r"],
     "invalid int value"),
    ("bench-unknown-preset", lambda t: ["bench", "--preset", "huge", "--out", t / "r.md"], "unknown preset"),
    ("unknown-command", lambda t: ["frobnicate"], "invalid choice"),
    # -- YAML config files
    ("yaml-wrong-type", lambda t: _clf_train(t, "--config", _yaml(t, "lr: fast\n")), "field 'lr'"),
    ("yaml-unknown-key", lambda t: _clf_train(t, "--config", _yaml(t, "learning_rate: 1\n")), "learning_rate"),
    ("yaml-not-a-mapping", lambda t: _clf_train(t, "--config", _yaml(t, "- 1\n- 2\n")), "mapping"),
    ("yaml-syntax", lambda t: _clf_train(t, "--config", _yaml(t, "lr: [1, 2\n")), "not a valid YAML"),
    ("yaml-float-for-int", lambda t: _clf_train(t, "--config", _yaml(t, "epochs: 1.5\n")), "field 'epochs'"),
    ("yaml-bool-for-int", lambda t: _clf_train(t, "--config", _yaml(t, "epochs: true\n")), "field 'epochs'"),
    ("yaml-nan", lambda t: _clf_train(t, "--config", _yaml(t, "lr: .nan\n")), "NaN"),
    ("yaml-inf", lambda t: _distill(t, "--config", _yaml(t, "lr_d: .inf\n")), "lr_d"),
    ("yaml-huge-int", lambda t: _distill(t, "--config", _yaml(t, f"n_transfer: {10**30}\n")), "n_transfer"),
    ("yaml-list-for-tuple-of-str", lambda t: _distill(t, "--config", _yaml(t, "student_widths: [a, b]\n")), "width"),
    ("yaml-binary", lambda t: _clf_train(t, "--config", _yaml(t, b"\xff\xfe\x00\x81")), "not a valid YAML"),
    ("yaml-missing", lambda t: _clf_train(t, "--config", t / "nowhere.yaml"), "config file not found"),
    ("yaml-run-unknown-variant", lambda t: ["run", "--config", _yaml(t, "variants: [mnist]\n"), "--run-dir", t / "r"],
     "variants"),
    # -- CGN and classifier folders: truncated, corrupted, wrong shapes, NaN
    ("cgn-truncated-weights", lambda t: (_truncate(t / "cgn" / "shape" / "model.safetensors"), _sample(t))[1],
     "not a valid safetensors"),
    ("cgn-garbage-config", lambda t: ((t / "cgn" / "foreground" / "config.json").write_text("{oops"), _sample(t))[1],
     "not a valid JSON"),
    ("cgn-unknown-class", lambda t: (_edit_json(t / "cgn" / "shape" / "config.json",
                                                lambda o: o.update({"class": "os.system"})), _sample(t))[1],
     "unknown model class"),
    ("cgn-config-wrong-type", lambda t: (_edit_json(t / "cgn" / "shape" / "config.json",
                                                    lambda o: o["config"].update({"ngf": "big"})), _sample(t))[1],
     "field 'ngf'"),
    ("cgn-config-huge", lambda t: (_edit_json(t / "cgn" / "shape" / "config.json",
                                              lambda o: o["config"].update({"ngf": 10**9})), _sample(t))[1], "ngf"),
    ("cgn-config-unknown-key", lambda t: (_edit_json(t / "cgn" / "shape" / "config.json",
                                                     lambda o: o["config"].update({"evil": 1})), _sample(t))[1], "evil"),
    ("cgn-wrong-shape", lambda t: (_edit_tensors(t / "cgn" / "background" / "model.safetensors",
                                                 lambda d: d.update({_first_float(d): torch.zeros(3, 3)})), _sample(t))[1],
     "has shape"),
    ("cgn-nan-weights", lambda t: (_edit_tensors(t / "cgn" / "shape" / "model.safetensors", _nan), _sample(t))[1], "NaN"),
    ("cgn-missing-key", lambda t: (_edit_tensors(t / "cgn" / "shape" / "model.safetensors",
                                                 lambda d: d.pop(_first_float(d))), _sample(t))[1], "missing key"),
    ("cgn-missing-index", lambda t: ((t / "cgn" / "cgn.json").unlink(), _sample(t))[1], "not found"),
    ("cgn-wrong-index", lambda t: ((t / "cgn" / "cgn.json").write_text('{"mechanisms": ["shape"]}'), _sample(t))[1],
     "expected mechanisms"),
    ("clf-folder-missing", lambda t: ["classify", "eval", "--classifier", t / "nowhere", "--variant", "colored"],
     "not found"),
    ("clf-palette-without-variant", lambda t: [*_eval(t), "--palette-of", "colored"], "needs --variant"),
    ("clf-palette-of-wildlife", lambda t: ["classify", "eval", "--classifier", t / "classifier", "--variant", "wildlife",
                                           "--palette-of", "wildlife"], "textures, not colours"),
    ("clf-truncated-weights", lambda t: (_truncate(t / "classifier" / "model.safetensors", 0.1), _eval(t))[1],
     "not a valid safetensors"),
    ("clf-nan-weights", lambda t: (_edit_tensors(t / "classifier" / "model.safetensors", _nan), _eval(t))[1], "NaN"),
    ("clf-config-out-of-range", lambda t: (_edit_json(t / "classifier" / "config.json",
                                                      lambda o: o["config"].update({"image_size": 100000})), _eval(t))[1],
     "image_size"),
    ("clf-config-is-a-list", lambda t: ((t / "classifier" / "config.json").write_text("[]"), _eval(t))[1],
     "expected a JSON object"),
    # -- dataset folders: manifests that escape, truncated and corrupted shards
    ("manifest-escapes-folder", lambda t: (_edit_json(t / "dataset" / "manifest.json",
                                                      lambda o: o["shards"][0].update({"file": "../../../etc/passwd"})),
                                           _eval(t))[1], "leaves its folder"),
    ("manifest-absolute-path", lambda t: (_edit_json(t / "dataset" / "manifest.json",
                                                     lambda o: o["shards"][0].update({"file": "/etc/passwd"})),
                                          _eval(t))[1], "leaves its folder"),
    ("manifest-truncated", lambda t: (_truncate(t / "dataset" / "manifest.json"), _eval(t))[1], "not a valid JSON"),
    ("manifest-shards-not-a-list", lambda t: (_edit_json(t / "dataset" / "manifest.json", lambda o: o.update({"shards": 5})),
                                              _eval(t))[1], "shards"),
    ("manifest-shard-entry-wrong-type", lambda t: (_edit_json(t / "dataset" / "manifest.json",
                                                              lambda o: o["shards"][0].update({"count": "many"})),
                                                   _eval(t))[1], "malformed shard entry"),
    ("manifest-count-mismatch", lambda t: (_edit_json(t / "dataset" / "manifest.json",
                                                      lambda o: o["shards"][0].update({"count": 1000})),
                                           _eval(t))[1], "manifest says"),
    ("shard-truncated", lambda t: (_truncate(t / "dataset" / "shard_00000.safetensors"), _eval(t))[1],
     "not a valid safetensors"),
    ("shard-labels-out-of-range", lambda t: (_edit_tensors(t / "dataset" / "shard_00000.safetensors",
                                                           lambda d: d.update({"labels": d["labels"] + 40})),
                                             _eval(t))[1], "outside"),
    ("shard-float-images", lambda t: (_edit_tensors(t / "dataset" / "shard_00000.safetensors",
                                                    lambda d: d.update({"images": d["images"].float()})),
                                      _eval(t))[1], "uint8"),
    ("shard-wrong-image-shape", lambda t: (_edit_tensors(t / "dataset" / "shard_00000.safetensors",
                                                         lambda d: d.update({"images": d["images"][:, :1]})),
                                           _eval(t))[1], "uint8 [N, 3, H, W]"),
    # -- IDX files (through --mnist-dir)
    ("idx-truncated", lambda t: (_gz(_mnist_images(t), gzip.decompress(_mnist_images(t).read_bytes())[:5000]),
                                 _preview(t))[1], "truncated"),
    ("idx-bad-magic", lambda t: (_gz(_mnist_images(t), b"\x00\x00\x08\x01" + gzip.decompress(
        _mnist_images(t).read_bytes())[4:]), _preview(t))[1], "bad magic"),
    ("idx-corrupt-gzip", lambda t: (_truncate(_mnist_images(t), 0.3), _preview(t))[1], "not a readable gzip"),
    ("idx-missing", lambda t: (_mnist_images(t).unlink(), _preview(t))[1], "MNIST file not found"),
    ("idx-dir-is-a-file", lambda t: _preview(t)[:-1] + [_mnist_images(t)], "MNIST file not found"),
    # -- original CGN .pth checkpoints
    ("pth-truncated", lambda t: ((t / "x.pth").write_bytes(shipped_teacher_path("colored").read_bytes()[:20000]),
                                 ["teacher", "sample", "--teacher", t / "x.pth", "--out", t / "g.png"])[1], "x.pth"),
    ("pth-not-a-zip", lambda t: ((t / "x.pth").write_bytes(b"\x80\x02}q\x00."),
                                 ["teacher", "convert", t / "x.pth", "--out", t / "c"])[1], "not a PyTorch checkpoint"),
    ("pth-tensors-not-a-state-dict", lambda t: (torch.save([torch.ones(2)], t / "x.pth"),
                                                ["teacher", "convert", t / "x.pth", "--out", t / "c"])[1],
     "expected a state_dict"),
    # -- a run's results.json (it names folders: confined to known variants)
    ("report-missing", lambda t: ["report", t / "nowhere"], "not found"),
    ("report-results-not-an-object", lambda t: _report(t, {"results": 5}), "results"),
    ("report-variant-escapes", lambda t: _report(t, {"results": {"../../etc": {"table": {}}}}), "is not a variant"),
    ("report-bad-cell", lambda t: _report(t, {"results": {"colored": {"table": {"original": {"test": 5}}}}}),
     "original"),
    ("report-bad-losses-csv", lambda t: ((t / "r" / "colored" / "distill" / "students" / "shape").mkdir(parents=True),
                                         (t / "r" / "colored" / "distill" / "students" / "shape" / "losses.csv")
                                         .write_text("step,pixel\nfoo,bar\n"),
                                         _report(t, {"results": {"colored": {"table": {"original": _GOOD_ROW}}}}))[2],
     "losses.csv"),
]


@pytest.mark.parametrize("case_id, build, match",
                         [c if hasattr(c, "marks") else pytest.param(*c, id=c[0]) for c in CASES])
def test_bad_input_is_one_clean_line(case_id, build, match, t, capsys):
    argv = build(t)
    _assert_one_line(*_run(argv, capsys), match)


def test_suite_has_at_least_30_cases():
    assert len(CASES) >= 30


def test_corrupt_texture_jpeg_is_one_clean_line(t, capsys, monkeypatch):
    """Textures are read from the package; a damaged copy is refused before use."""
    tex = t / "textures"
    shutil.copytree(variants.TEXTURE_DIR, tex)
    victim = sorted((tex / "object").glob("*.jpg"))[3]
    _truncate(victim, 0.05)
    monkeypatch.setattr(variants, "TEXTURE_DIR", tex)
    variants._textures.cache_clear()
    try:
        _assert_one_line(*_run(_preview(t, "wildlife"), capsys), victim.name)
        victim.write_bytes(b"not a jpeg at all")
        variants._textures.cache_clear()
        _assert_one_line(*_run(_preview(t, "wildlife"), capsys), victim.name)
    finally:
        variants._textures.cache_clear()


def test_environment_mnist_dir_is_validated(t, capsys, monkeypatch):
    _truncate(_mnist_images(t), 0.3)
    monkeypatch.setenv("SKDCGN_MNIST_DIR", str(t / "mnist"))
    _assert_one_line(*_run(["data", "preview", "--variant", "colored", "--out", t / "p.png"], capsys),
                     "not a readable gzip")


def test_debug_shows_the_traceback(t):
    with pytest.raises(Exception, match="not a valid safetensors"):
        _truncate(t / "classifier" / "model.safetensors", 0.1)
        main(["--debug", *map(str, _eval(t))])


# ---- checkpoints from strangers: pickles that run code, NaN --------------------------------------

class _Evil:
    """Unpickling this creates a file: what a malicious checkpoint would do (or worse)."""

    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def _evil_pickle(path: Path, target: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"step": 1, "stage_hash": "x", "config": {}, "cgn": {}, "disc": {}, "opt_g": {}, "opt_d": {},
                "rng": _Evil(target)}, path)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, good):
    """Tiny finished runs of the three resumable training stages (copied by each test)."""
    root = tmp_path_factory.mktemp("finished")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tt, "load_train_set", lambda variant, data_seed=0: _synthetic_set(variant, data_seed))
        assert main(map(str, _teacher_train(root, "--steps", "2", "--batch-size", "8", "--ngf", "4", "--ndf", "8",
                                            "--checkpoint-every", "1", "--sample-every", "0",
                                            "--bn-recalibration-batches", "1"))) == 0
    assert main(map(str, ["classify", "train", "--data", good / "dataset", "--out", root / "clf", "--epochs", "2",
                          "--batch-size", "32", "--device", "cpu"])) == 0
    assert main(map(str, ["distill", "--teacher", good / "cgn", "--mechanism", "shape", "--run-dir", root / "distill",
                          "--preset", "tiny", "--steps", "2", "--device", "cpu", "--no-progress"])) == 0
    return root


def _resumable(stage: str, finished: Path, t: Path):
    """(argv that resumes `stage` in t, its checkpoint path) with the manifest removed, as if killed."""
    if stage == "teacher":
        shutil.copytree(finished / "run", t / "run")
        (t / "run" / "teacher" / "manifest.json").unlink()
        return (_teacher_train(t, "--steps", "2", "--batch-size", "8", "--ngf", "4", "--ndf", "8", "--checkpoint-every",
                               "1", "--sample-every", "0", "--bn-recalibration-batches", "1"),
                t / "run" / "teacher" / "train" / "checkpoint.safetensors")
    if stage == "classifier":
        shutil.copytree(finished / "clf", t / "clf")
        (t / "clf" / "manifest.json").unlink()
        return (["classify", "train", "--data", t / "dataset", "--out", t / "clf", "--epochs", "2", "--batch-size", "32",
                 "--device", "cpu"], t / "clf" / "checkpoint.safetensors")
    shutil.copytree(finished / "distill", t / "distill")
    (t / "distill" / "distill" / "students" / "shape" / "manifest.json").unlink()
    return (["distill", "--teacher", t / "cgn", "--mechanism", "shape", "--run-dir", t / "distill", "--preset", "tiny",
             "--steps", "2", "--device", "cpu", "--no-progress"],
            t / "distill" / "distill" / "students" / "shape" / "checkpoint.safetensors")


@pytest.fixture
def synthetic_teacher_data(monkeypatch):
    monkeypatch.setattr(tt, "load_train_set", lambda variant, data_seed=0: _synthetic_set(variant, data_seed))


@pytest.mark.parametrize("where", ["teacher-pth", "teacher-resume", "distill-resume", "classifier-resume"])
def test_malicious_pickle_is_refused_and_runs_nothing(where, finished, t, capsys, synthetic_teacher_data):
    target = t / "pwned"
    if where == "teacher-pth":
        _evil_pickle(t / "evil.pth", target)
        argv, match = ["teacher", "sample", "--teacher", t / "evil.pth", "--out", t / "g.png"], "refused to load"
    else:
        stage = where.split("-")[0]
        argv, ckpt = _resumable(stage, finished, t)
        if stage == "classifier":  # a planted .pt is simply never read
            _evil_pickle(ckpt.with_suffix(".pt"), target)
            ckpt.write_bytes(b"garbage that is not safetensors")
            assert _run(argv, capsys)[0] == 0
            assert not target.exists()
            return
        # a pickle where skdcgn 0.1.0 kept its checkpoints (checkpoint.pt): refused unread, and a
        # pickle in the place of today's checkpoint: not a training state, never unpickled
        _evil_pickle(ckpt.with_name("checkpoint.pt"), target)
        _assert_one_line(*_run(argv, capsys), "skdcgn 0.1.0")
        ckpt.with_name("checkpoint.pt").unlink()
        _evil_pickle(ckpt, target)
        if stage == "teacher":
            _evil_pickle(ckpt.with_name("checkpoint.prev.safetensors"), target)
        match = "checkpoint"
    _assert_one_line(*_run(argv, capsys), match)
    assert not target.exists(), "loading the checkpoint ran code"


@pytest.mark.parametrize("stage", ["teacher", "distill", "classifier"])
def test_nan_in_a_resume_checkpoint_is_refused(stage, finished, t, capsys, synthetic_teacher_data):
    argv, ckpt = _resumable(stage, finished, t)
    paths = [ckpt] + ([ckpt.with_name("checkpoint.prev.safetensors")] if stage == "teacher" else [])
    for p in paths:  # every trainer's checkpoint is one format (skdcgn.checkpoint)
        state = load_checkpoint(p)
        stage_of = state.pop("stage")
        state.pop("stage_hash")
        key = {"teacher": "cgn", "distill": "G", "classifier": "model"}[stage]
        name = _first_float(state[key])
        state[key][name] = torch.full_like(state[key][name], float("nan"))
        save_checkpoint(p, state, stage_of)
    _assert_one_line(*_run(argv, capsys), "NaN")


def test_yaml_tags_that_would_run_code_are_refused(t, capsys):
    target = t / "pwned"
    cfg = _yaml(t, f'lr: !!python/object/apply:os.system ["touch {target}"]\n')
    _assert_one_line(*_run(_clf_train(t, "--config", cfg), capsys), "not a valid YAML")
    assert not target.exists()


# ---- full disk ---------------------------------------------------------------------------------------

def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _deterministic(files: dict[str, bytes]) -> dict[str, bytes]:
    return {k: v for k, v in files.items() if k != "manifest.json"}  # the manifest records the seconds taken


def test_full_disk_at_every_write_loses_nothing(t, capsys, monkeypatch):
    """The disk fills up at the N-th file of a stage, for every N: earlier files stay intact, the
    failing one leaves neither a partial file nor a temporary, the error is one line, and the next
    run (with space again) completes with the files of a run that never failed."""
    argv = ["counterfactuals", "--cgn", t / "cgn", "--n", "100", "--per-shape", "5", "--shard-size", "20",
            "--device", "cpu"]
    real_replace = os.replace
    calls = {"n": 0, "fail_at": None}

    def replace(src, dst):
        if str(src).endswith(".tmp"):
            calls["n"] += 1
            if calls["n"] == calls["fail_at"]:
                with open(src, "r+b") as f:  # the disk filled up half-way through this file
                    f.truncate(os.path.getsize(src) // 2)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    assert _run(argv + ["--out", t / "ref"], capsys)[0] == 0
    reference, writes = _tree(t / "ref"), calls["n"]
    assert writes >= 7  # progress.json, 5 shards, preview.png, manifest.json
    for n in range(1, writes + 1):
        out = t / f"fail{n}"
        calls.update(n=0, fail_at=n)
        rc, lines = _run(argv + ["--out", out], capsys)
        _assert_one_line(rc, lines, "No space left on device")
        assert "could not write" in lines[0]
        files = _tree(out) if out.exists() else {}
        assert len(files) == n - 1, sorted(files)  # every earlier file, nothing else (no .tmp, no partial file)
        assert "manifest.json" not in files
        assert all(reference[k] == v for k, v in files.items() if k != "manifest.json")
        calls.update(n=0, fail_at=None)
        assert _run(argv + ["--out", out], capsys)[0] == 0
        assert _deterministic(_tree(out)) == _deterministic(reference)


def _can_mount_tmpfs() -> bool:
    if not sys.platform.startswith("linux") or not shutil.which("unshare"):
        return False
    r = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt 2>/dev/null || "
                        "mount -t tmpfs -o size=64k tmpfs /tmp"], capture_output=True)
    return r.returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs user namespaces to mount a small tmpfs")
@pytest.mark.parametrize("stage", ["counterfactuals", "teacher-checkpoint"])
def test_full_disk_on_a_real_small_filesystem(stage, t, good):
    """A 160 KiB tmpfs fills up mid-stage: the real ENOSPC (also through safetensors' writer) is
    one line, and what was written before is intact (checked inside the namespace)."""
    disk = t / "disk"
    disk.mkdir()
    if stage == "counterfactuals":
        argv = ["counterfactuals", "--cgn", t / "cgn", "--n", "200", "--per-shape", "5", "--shard-size", "40",
                "--device", "cpu", "--out", disk / "ds"]
        assert main(map(str, argv[:-1] + [t / "ref"])) == 0
    else:  # torch.save-d checkpoints of teacher training: 2.9 MB at ngf 8, more than the disk holds
        (t / "disk_run.py").write_text(textwrap.dedent("""
            import sys, torch
            from skdcgn import teacher_training as tt
            def data(variant, data_seed=0):
                g = torch.Generator().manual_seed(0)
                return torch.randint(0, 255, (64, 3, 32, 32), generator=g, dtype=torch.uint8), torch.arange(64) % 10
            tt.load_train_set = data
            from skdcgn.cli import main
            sys.exit(main(sys.argv[1:]))
        """))
        argv = ["teacher", "train", "--variant", "colored", "--run-dir", disk / "run", "--steps", "2", "--batch-size",
                "8", "--ngf", "8", "--checkpoint-every", "1", "--sample-every", "0", "--device", "cpu", "--no-progress"]
    runner = [sys.executable, "-m", "skdcgn"] if stage == "counterfactuals" else [sys.executable, str(t / "disk_run.py")]
    listing = (f"{sys.executable} -c \"import hashlib,pathlib,json; print('FILES', json.dumps({{str(p.relative_to('{disk}')): "
               f"hashlib.sha256(p.read_bytes()).hexdigest() for p in pathlib.Path('{disk}').rglob('*') if p.is_file()}}))\"")
    script = (f"mount -t tmpfs -o size=160k tmpfs {disk} && "
              f"{' '.join(map(str, runner + argv))} 2> {t}/err; echo RC $?; {listing}")
    r = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    rc = int(r.stdout.split("RC ")[1].split()[0])
    files = json.loads(r.stdout.split("FILES ")[1])
    lines = [line for line in (t / "err").read_text().replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("skdcgn")]
    assert rc == 2 and not any("Traceback" in line for line in lines), lines
    assert len(errors) == 1 and errors[0].startswith("skdcgn: error: could not write"), lines
    assert "No space left on device" in errors[0]
    assert not any(name.endswith(".tmp") for name in files), files
    assert not any(name.endswith("manifest.json") for name in files), files
    if stage == "counterfactuals":
        written = {k: v for k, v in files.items() if k.startswith("ds/shard_")}
        assert written, files  # some shards fitted before the disk was full: all intact
        for name, digest in written.items():
            assert hashlib.sha256((t / "ref" / name[3:]).read_bytes()).hexdigest() == digest, name
