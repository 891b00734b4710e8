"""The shipped CGN-MNIST teachers: loading, conversion, refusal of bad files, sampling."""
from __future__ import annotations

import collections
import os
import pickle
import zipfile

import pytest
import torch

import skdcgn
from skdcgn.cli import main
from skdcgn.errors import SkdcgnError
from skdcgn.models.cgn import CGN
from skdcgn.models.cgn_mnist import ASSETS, SHIPPED_TEACHERS, load_original_cgn_mnist

VARIANTS = list(SHIPPED_TEACHERS)


def _sample(cgn: CGN, seed: int = 3):
    y = torch.arange(10).repeat(2)
    return cgn.sample(y, y.flip(0), (y + 3) % 10, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", VARIANTS)
def test_parameter_counts_match_release(name):
    cgn = skdcgn.load_cgn(name)
    emb = 10 * 10  # the class embedding, shared by the three mechanisms
    counts = {k: m.get_num_params() - emb for k, m in cgn.mechanisms().items()}
    assert counts == {"shape": 194_914, "foreground": 232_489, "background": 232_489}
    assert cgn.get_num_params() == 659_992


@pytest.mark.parametrize("name", VARIANTS)
def test_outputs_have_documented_ranges(name):
    m, f, b, x = _sample(skdcgn.load_cgn(name))
    assert m.shape == (20, 1, 32, 32) and f.shape == b.shape == x.shape == (20, 3, 32, 32)
    assert m.min() >= 1e-4 and m.max() <= 0.9999
    for t in (f, b, x):
        assert t.min() >= -1 and t.max() <= 1 and t.dtype == torch.float32
    # the mask is mostly decided (a digit on a background), not a uniform blur
    assert ((m < 0.1) | (m > 0.9)).float().mean() > 0.7
    assert 0.05 < m.mean() < 0.5


def test_double_colored_background_is_class_tied():
    """Backgrounds of one class share a colour; different classes differ (what the teacher learned)."""
    cgn = skdcgn.load_cgn("double_colored")
    y = torch.arange(10).repeat_interleave(8)
    bg = cgn.run_mechanism("background", y, torch.Generator().manual_seed(0)).mean(dim=(2, 3))  # [80, 3]
    per_class = bg.view(10, 8, 3)
    within = (per_class - per_class.mean(1, keepdim=True)).norm(dim=2).mean()
    between = torch.cdist(per_class.mean(1), per_class.mean(1)).sum() / (10 * 9)
    assert between > 4 * within


def test_same_seed_same_samples_other_seed_differs():
    cgn = skdcgn.load_cgn("wildlife")
    a, b, c = _sample(cgn, 1), _sample(cgn, 1), _sample(cgn, 2)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not torch.equal(a[3], c[3])


def test_round_trip_to_project_format_is_identical(tmp_path):
    cgn = skdcgn.load_cgn("double_colored")
    cgn.save_pretrained(tmp_path / "cgn")
    assert {p.name for p in (tmp_path / "cgn" / "shape").iterdir()} == {"config.json", "model.safetensors"}
    again = skdcgn.load_cgn(tmp_path / "cgn")
    assert all(torch.equal(p, q) for p, q in zip(_sample(cgn), _sample(again)))


def _state_dict():
    return torch.load(ASSETS / SHIPPED_TEACHERS["colored"][0], map_location="cpu", weights_only=True)


def test_truncated_file_is_refused(tmp_path):
    data = (ASSETS / SHIPPED_TEACHERS["colored"][0]).read_bytes()
    path = tmp_path / "cut.pth"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SkdcgnError, match="cut.pth"):
        load_original_cgn_mnist(path)


def test_renamed_key_is_refused(tmp_path):
    sd = _state_dict()
    sd["f_shape.0.weightX"] = sd.pop("f_shape.0.weight")
    torch.save(sd, tmp_path / "renamed.pth")
    with pytest.raises(SkdcgnError, match="missing key 'f_shape.0.weight'"):
        load_original_cgn_mnist(tmp_path / "renamed.pth")


def test_wrong_shape_is_refused(tmp_path):
    sd = _state_dict()
    sd["f_text1.3.weight"] = torch.zeros(64, 64, 5, 5)
    torch.save(sd, tmp_path / "shape.pth")
    with pytest.raises(SkdcgnError, match=r"'f_text1.3.weight' has shape \[64, 64, 5, 5\], expected \[64, 64, 3, 3\]"):
        load_original_cgn_mnist(tmp_path / "shape.pth")


def test_nan_weights_are_refused(tmp_path):
    sd = _state_dict()
    sd["f_shape.4.weight"][0, 0, 0, 0] = float("nan")
    torch.save(sd, tmp_path / "nan.pth")
    with pytest.raises(SkdcgnError, match="NaN"):
        load_original_cgn_mnist(tmp_path / "nan.pth")


class _Evil:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_pickle_that_runs_code_is_refused_and_runs_nothing(tmp_path):
    target = tmp_path / "pwned.txt"
    sd = collections.OrderedDict(_state_dict())
    sd["payload"] = _Evil(str(target))
    torch.save(sd, tmp_path / "evil.pth", pickle_protocol=2)
    assert zipfile.is_zipfile(tmp_path / "evil.pth")
    with pytest.raises(SkdcgnError, match="refused"):
        load_original_cgn_mnist(tmp_path / "evil.pth")
    assert not target.exists()
    # the same payload as a legacy (non-zip) pickle is refused before unpickling
    with open(tmp_path / "legacy.pth", "wb") as f:
        pickle.dump(_Evil(str(target)), f)
    with pytest.raises(SkdcgnError):
        load_original_cgn_mnist(tmp_path / "legacy.pth")
    assert not target.exists()


def test_foreign_state_dict_is_refused(tmp_path):
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "foreign.pth")
    with pytest.raises(SkdcgnError, match="missing key"):
        load_original_cgn_mnist(tmp_path / "foreign.pth")


def test_unknown_name_lists_shipped_teachers():
    with pytest.raises(SkdcgnError, match="colored, double_colored, wildlife"):
        skdcgn.load_cgn("mnist_rainbow")


def test_sample_rejects_out_of_range_classes():
    with pytest.raises(SkdcgnError, match="y_shape"):
        skdcgn.load_cgn("colored").sample(torch.tensor([3, 10]))


def test_cli_sample_writes_grids(tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["teacher", "sample", "--teacher", "double_colored", "--out", str(out)]) == 0
    assert out.stat().st_size > 1000 and (tmp_path / "grid_mechanisms.png").is_file()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_cli_bad_teacher_is_one_line_error(tmp_path, capsys):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    assert main(["teacher", "sample", "--teacher", str(bad), "--out", str(tmp_path / "g.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("skdcgn: error:") and len(err.splitlines()) == 1 and "bad.pth" in err
    assert not (tmp_path / "g.png").exists()
