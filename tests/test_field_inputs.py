"""The files, formats and values users bring (cases from the field's bug reports): checkpoints
with a DataParallel prefix or in PyTorch's pre-1.6 format, reduced precision, images in the wrong
range or dtype, devices and thread counts this machine cannot use, awkward paths, and Ctrl-C
before the command has started. Each case fails on the code before this test file existed."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

import skdcgn
from skdcgn.cli import main
from skdcgn.config import resolve_device, set_threads, usable_cpus
from skdcgn.errors import SkdcgnError, SkdcgnWarning
from skdcgn.grids import image_grid
from skdcgn.images import check_images, render_mask
from skdcgn.io import load_torch_state_dict, read_json, strip_wrapper_prefix, write_bytes, write_json
from skdcgn.models.cgn import CGN, MECHANISMS
from skdcgn.models.cgn_mnist import load_original_cgn_mnist, shipped_teacher_path
from skdcgn.models.pretrained import load_model
from skdcgn.models.students import StudentConfig, make_student

SRC = str(Path(skdcgn.__file__).resolve().parents[1])


def _legacy(obj: object, path: Path) -> Path:
    torch.save(obj, path, _use_new_zipfile_serialization=False)
    return path


@pytest.fixture(scope="module")
def teacher_sd() -> dict:
    return load_torch_state_dict(shipped_teacher_path("double_colored"))


def _same_samples(a: CGN, b: CGN) -> bool:
    y = torch.arange(4)
    sa = a.sample(y, generator=torch.Generator().manual_seed(0))
    sb = b.sample(y, generator=torch.Generator().manual_seed(0))
    return all(torch.equal(s, t) for s, t in zip(sa, sb))


# ---- 1, 2: checkpoint files as they exist in the wild ---------------------------------------------

def test_mnist_teacher_with_dataparallel_prefix_or_legacy_format_loads(teacher_sd, tmp_path):
    ref = load_original_cgn_mnist(shipped_teacher_path("double_colored"))
    dp = {f"module.{k}": v for k, v in teacher_sd.items()}
    for name, path in (("dp.pth", None), ("legacy.pth", None), ("legacy_dp.pth", None)):
        obj = dp if "dp" in name else teacher_sd
        path = tmp_path / name
        if name.startswith("legacy"):
            _legacy(obj, path)
            assert not __import__("zipfile").is_zipfile(path)
        else:
            torch.save(obj, path)
        assert _same_samples(load_original_cgn_mnist(path), ref), name
    # the CLI, as in the issue: `skdcgn teacher sample --teacher legacy.pth`
    assert main(["teacher", "sample", "--teacher", str(tmp_path / "legacy.pth"), "--out", str(tmp_path / "g.png")]) == 0
    assert (tmp_path / "g.png").stat().st_size > 0


def test_partial_or_nested_wrapper_prefixes(teacher_sd, tmp_path, capsys):
    partial = {(f"module.{k}" if i % 2 else k): v for i, (k, v) in enumerate(teacher_sd.items())}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(SkdcgnError, match=r"keys carry the wrapper prefix 'module\.'") as e:
        load_original_cgn_mnist(tmp_path / "partial.pth")
    assert "\n" not in str(e.value) and "partial.pth" in str(e.value)
    assert main(["teacher", "sample", "--teacher", str(tmp_path / "partial.pth"), "--out", str(tmp_path / "g.png")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    # DataParallel around a compiled model, and a Lightning-style {"state_dict": ...} wrapper
    nested = {"state_dict": {f"module._orig_mod.{k}": v for k, v in teacher_sd.items()}}
    torch.save(nested, tmp_path / "nested.pth")
    assert set(load_torch_state_dict(tmp_path / "nested.pth")) == set(teacher_sd)
    assert strip_wrapper_prefix({"a": 1}, "x") == {"a": 1}


def test_code_in_a_legacy_pickle_is_never_run(tmp_path):
    marker = tmp_path / "pwned"

    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    _legacy({"x": Boom()}, tmp_path / "evil.pth")
    with pytest.raises(SkdcgnError, match="refused to load"):
        load_torch_state_dict(tmp_path / "evil.pth")
    assert not marker.exists()
    (tmp_path / "text.pth").write_bytes(b"hello, not a checkpoint" * 4)
    with pytest.raises(SkdcgnError, match="not a PyTorch checkpoint"):
        load_torch_state_dict(tmp_path / "text.pth")
    (tmp_path / "cut.pth").write_bytes(_legacy({"a": torch.ones(100)}, tmp_path / "whole.pth").read_bytes()[:120])
    with pytest.raises(SkdcgnError, match="refused to load"):
        load_torch_state_dict(tmp_path / "cut.pth")


def test_saved_model_with_a_dataparallel_prefix_loads(tmp_path):
    student = make_student(StudentConfig(mechanism="shape"))
    student.save_pretrained(tmp_path / "s")
    from safetensors.torch import save_file
    sd = {f"module.{k}": v.contiguous() for k, v in student.state_dict().items()}
    save_file(sd, str(tmp_path / "s" / "model.safetensors"))
    again = load_model(tmp_path / "s")
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), student.state_dict().values()))


def test_imagenet_loaders_accept_legacy_files_and_dataparallel_prefixes(tmp_path):
    pytest.importorskip("pytorch_pretrained_biggan")
    from skdcgn.models.imagenet import (ImageNetMechanism, U2Net, load_biggan_folder, load_cgn_imagenet,
                                        random_cgn, save_biggan_folder, tiny_config, tiny_u2net_config)

    torch.manual_seed(1)
    src = ImageNetMechanism(tiny_config("foreground"))
    save_biggan_folder(src.biggan, src.config, tmp_path / "biggan")
    u2 = U2Net(tiny_u2net_config())
    weights = tmp_path / "biggan" / "pytorch_model.bin"
    # BigGAN-deep `pytorch_model.bin` and U2-Net `u2net.pth` as released: pre-1.6 format; u2net from DataParallel
    _legacy(torch.load(weights, weights_only=True), weights)
    _legacy({f"module.{k}": v for k, v in u2.state_dict().items()}, tmp_path / "u2net.pth")
    cgn = load_biggan_folder(tmp_path / "biggan", u2net=tmp_path / "u2net.pth", u2net_config=tiny_u2net_config())
    u, y = torch.randn(2, 16), torch.tensor([5, 998])
    with torch.no_grad():
        assert torch.equal(cgn.foreground(u, y), src(u, y))
        assert all(torch.equal(a, b) for a, b in zip(cgn.shape.u2net.state_dict().values(), u2.state_dict().values()))
    # a CGN-ImageNet state_dict saved from DataParallel, in the legacy format
    teacher = random_cgn(lambda m: tiny_config(m), seed=0)
    sd = {f"module.biggan_GT.{k}": v for k, v in src.biggan.state_dict().items()}
    for m, prefix in (("shape", "f_shape"), ("foreground", "f_text"), ("background", "f_bg")):
        sd.update({f"module.{prefix}.{k}": v for k, v in getattr(teacher, m).biggan.state_dict().items()})
    sd.update({f"module.u2net.{k}": v for k, v in teacher.shape.u2net.state_dict().items()})
    _legacy(sd, tmp_path / "cgn.pth")
    loaded = load_cgn_imagenet(tmp_path / "cgn.pth", biggan_config=tmp_path / "biggan" / "config.json",
                               u2net_config=tiny_u2net_config())
    assert _same_samples(loaded, teacher)


# ---- 3: reduced precision -------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_teacher_and_students_sample_in_the_models_dtype(dtype):
    ref = skdcgn.load_cgn("double_colored")
    low = skdcgn.load_cgn("double_colored").to(dtype)
    y = torch.arange(3)
    out = low.sample(y, generator=torch.Generator().manual_seed(0))
    assert all(t.dtype == dtype for t in out)
    full = ref.sample(y, generator=torch.Generator().manual_seed(0))
    # the same noise at any precision: reduced precision only rounds (mask, textures, composite)
    assert all((a.float() - b).abs().mean() < 0.05 for a, b in zip(out, full))
    students = CGN(*(make_student(StudentConfig(mechanism=m, shifted_texture=m != "shape")) for m in MECHANISMS)).eval()
    out = students.to(dtype).sample(y, generator=torch.Generator().manual_seed(0))
    assert all(t.dtype == dtype and torch.isfinite(t.float()).all() for t in out)


def test_imagenet_mechanism_samples_in_bfloat16():
    pytest.importorskip("pytorch_pretrained_biggan")
    from skdcgn.models.imagenet import random_cgn, tiny_config

    cgn = random_cgn(lambda m: tiny_config(m), seed=0).to(torch.bfloat16)
    out = cgn.sample(torch.tensor([1, 2]), generator=torch.Generator().manual_seed(0))
    assert all(t.dtype == torch.bfloat16 for t in out)


# ---- 4: image range and dtype ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def test_images() -> torch.Tensor:
    from skdcgn.data import load_variant_uint8

    images, _ = load_variant_uint8("double_colored", "test", 0)
    return images[:200]


def test_feature_extractor_converts_uint8_and_refuses_other_ranges(test_images):
    from skdcgn.metrics.domain import load_domain_extractor
    from skdcgn.metrics.fid import extract_features
    from skdcgn.images import to_float

    ext = load_domain_extractor()
    ref = extract_features(ext, to_float(test_images))
    # uint8 [0, 255] is converted explicitly: the same features (FID 226,390 before)
    assert (extract_features(ext, test_images) == ref).all()
    with pytest.raises(SkdcgnError, match=r"expected \[-1, 1\]"):
        extract_features(ext, test_images.float())                  # float [0, 255]
    with pytest.raises(SkdcgnError, match=r"expected uint8 \[0, 255\] or float"):
        extract_features(ext, test_images.to(torch.int32))
    nan = to_float(test_images)
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(SkdcgnError, match="NaN"):
        extract_features(ext, nan)
    with pytest.warns(SkdcgnWarning, match="no value below 0"):
        extract_features(ext, test_images.float() / 255)            # [0, 1]: legal, but warned
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        extract_features(ext, to_float(test_images))                # [-1, 1]: silent
    with pytest.raises(SkdcgnError, match=r"expected \[-1, 1\]"):
        ext.predict(test_images.float())


def test_every_public_image_function_applies_the_same_rule(test_images, tmp_path):
    from skdcgn.invariance import accuracy, predict
    from skdcgn.models.classifier import Classifier, ClassifierNetConfig

    clf = Classifier(ClassifierNetConfig()).eval()
    labels = torch.zeros(len(test_images), dtype=torch.long)
    assert torch.equal(predict(clf, test_images), predict(clf, check_images(test_images)))
    for fn in (lambda x: predict(clf, x), lambda x: accuracy(clf, x, labels), lambda x: image_grid(x, 10)):
        with pytest.raises(SkdcgnError, match=r"expected \[-1, 1\]"):
            fn(test_images.float())
    with pytest.raises(SkdcgnError, match="masks"):
        render_mask(torch.full((2, 1, 4, 4), 2.0))
    image_grid(torch.rand(4, 1, 8, 8), 2)  # masks in [0, 1]: fine, no warning
    with pytest.warns(SkdcgnWarning):
        assert check_images(torch.full((1, 3, 2, 2), 1.0005)).max() > 1  # within resampling's tolerance


# ---- 5: devices and threads -----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["meta", "mps", "tpu9", "cuda" if not torch.cuda.is_available() else "cuda:99"])
def test_unusable_devices_are_one_line_errors(name, capsys, tmp_path):
    with pytest.raises(SkdcgnError, match=repr(name).replace("'", ".")):
        resolve_device(name)
    code = main(["counterfactuals", "--cgn", "double_colored", "--n", "10", "--per-shape", "1",
                 "--out", str(tmp_path / "cf"), "--device", name])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "cf").exists()


def test_thread_counts_are_validated_the_same_way_everywhere(capsys, tmp_path):
    before = torch.get_num_threads()
    try:
        for bad in (-1, 100_000, usable_cpus() + 1, True):
            with pytest.raises(SkdcgnError, match="thread count"):
                set_threads(bad)
        set_threads(0)
        assert torch.get_num_threads() == before
        set_threads(1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    for argv in (["bench", "--threads", "-1", "--no-distill", "--out", str(tmp_path / "r.md")],
                 ["bench", "--threads", "100000", "--no-distill", "--out", str(tmp_path / "r.md")],
                 ["run", "--variant", "double_colored", "--preset", "quick", "--threads", "1024",
                  "--run-dir", str(tmp_path / "run")]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "thread count" in err, argv
    assert not (tmp_path / "r.md").exists()


# ---- 6: paths -------------------------------------------------------------------------------------

def test_a_run_folder_that_is_a_file_is_named(tmp_path, capsys):
    (tmp_path / "run").write_text("not a folder")
    assert main(["run", "--variant", "double_colored", "--preset", "quick", "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "run: is a file, but a folder is needed here" in err and err.count("\n") == 1
    assert (tmp_path / "run").read_text() == "not a folder"
    with pytest.raises(SkdcgnError, match="is a file, but .* needs it to be a folder"):
        write_json(tmp_path / "run" / "deeper" / "x.json", {})


def test_the_longest_legal_file_name_is_written_atomically(tmp_path):
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    for n in (250, limit):
        target = tmp_path / ("a" * (n - 5) + ".json")
        write_json(target, {"n": n})
        assert read_json(target) == {"n": n}
        write_bytes(target, b"again")  # the replace path too
        assert target.read_bytes() == b"again"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted("a" * (n - 5) + ".json" for n in {250, limit})
    # a multi-byte name is cut on a character boundary
    target = tmp_path / ("é" * 125 + ".md")
    write_bytes(target, b"x")
    assert target.read_bytes() == b"x"


# ---- 7: Ctrl-C before the command has started ------------------------------------------------------

def test_interrupt_while_the_command_loads_is_one_line(monkeypatch, capsys):
    import importlib

    def interrupted(name, *a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(importlib, "import_module", interrupted)
    assert main(["run", "--help"]) == 130
    err = capsys.readouterr().err
    assert err == "skdcgn: interrupted; run the same command again to resume\n"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the library user's handler is back


def _spawn(code: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env)


def test_ctrl_c_from_the_first_instruction_is_one_line_and_exit_130():
    # a signal while skdcgn and torch are still being imported: the console module's handler
    p = _spawn("import os, signal, skdcgn._console; os.kill(os.getpid(), signal.SIGINT); import torch; "
               "import time; time.sleep(30)")
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and err == "skdcgn: interrupted before the command started\n"
    # Ctrl-C pressed twice while a command runs and shuts down: one line, 130, no traceback
    p = _spawn("import sys; sys.argv = ['skdcgn', 'data', 'preview', '--variant', 'colored', '--out', '/dev/null']; "
               "from skdcgn._console import main; main()")
    time.sleep(1.5)
    p.send_signal(signal.SIGINT)
    time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "Traceback" not in err and err.strip().count("\n") == 0 and "interrupted" in err
