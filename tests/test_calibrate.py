"""The shape student's noise scale: exact at sampling, fitted to the teacher's mask diversity (issue #20)."""
from __future__ import annotations

import json

import pytest
import torch

from skdcgn.distill.calibrate import diversity, match_noise_scale
from skdcgn.distill.query import TransferSet, query_teacher
from skdcgn.distill.trainer import calibrated_noise_scale, config_record, preset, train_student
from skdcgn.errors import SkdcgnError
from skdcgn.models.cgn_mnist import teacher_mechanisms
from skdcgn.models.pretrained import load_model
from skdcgn.models.students import StudentConfig, make_student


def _student(noise_scale: float = 1.0, seed: int = 0):
    torch.manual_seed(seed)
    return make_student(StudentConfig(mechanism="shape", widths=(8, 8, 8), noise_scale=noise_scale)).eval()


def test_noise_scale_is_the_student_reading_scaled_noise():
    u, y = torch.randn(8, 32, generator=torch.Generator().manual_seed(1)), torch.arange(8)
    plain, scaled = _student(), _student(1.25)
    with torch.no_grad():
        assert torch.equal(scaled(u, y), plain(1.25 * u, y))
        assert not torch.equal(scaled(u, y), plain(u, y))
    with pytest.raises(SkdcgnError, match="noise_scale"):
        StudentConfig(mechanism="shape", noise_scale=0.0).validate()


def test_older_student_configs_load_with_noise_scale_one(tmp_path):
    s = _student()
    s.save_pretrained(tmp_path / "old")
    cfg = json.loads((tmp_path / "old" / "config.json").read_text())
    del cfg["config"]["noise_scale"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(cfg))
    assert load_model(tmp_path / "old").config.noise_scale == 1.0


def test_diversity_is_the_per_class_pixel_variance_of_thresholded_masks():
    masks = torch.zeros(4, 1, 4, 4)
    masks[1, 0, 0, 0] = 0.9  # class 0: two masks differing in 1 of 16 pixels (0.9 → 1 after thresholding)
    y = torch.tensor([0, 0, 1, 1])  # class 1: two equal masks
    # class 0: unbiased variance of {0, 1} = 0.5 at one pixel of 16; class 1: 0
    assert diversity(masks, y) == pytest.approx((0.5 / 16 + 0.0) / 2)
    assert diversity(torch.full((3, 1, 4, 4), 0.4), torch.zeros(3, dtype=torch.long)) == 0.0
    with pytest.raises(SkdcgnError, match="two masks"):
        diversity(masks[:2], torch.tensor([0, 1]))
    with pytest.raises(SkdcgnError, match="masks"):
        diversity(torch.zeros(4, 3, 4, 4), y)


def test_match_noise_scale_recovers_a_known_contraction():
    """A 'teacher' that is the student reading 1.3·u: the fitted scale is 1.3."""
    g = torch.Generator().manual_seed(2)
    u, y = torch.randn(2000, 32, generator=g), torch.arange(2000) % 10
    student, teacher = _student(seed=3), _student(1.3, seed=3)
    with torch.no_grad():
        target = teacher(u, y)
    assert match_noise_scale(student, u, y, target) == pytest.approx(1.3, abs=0.02)
    # a student that already varies as much as its teacher keeps its noise
    assert match_noise_scale(teacher, u, y, student(u, y).detach()) == 1.0


def test_distillation_with_a_shape_noise_scale_writes_it_or_the_fitted_one(tmp_path):
    torch.manual_seed(0)
    teacher = teacher_mechanisms(ngf=4)["shape"].eval()
    cfg = preset("tiny", device="cpu", shape_noise_scale=0.0)  # 0: fitted
    assert "shape_noise_scale" in config_record(cfg) and "shape_noise_scale" not in config_record(preset("tiny"))
    folder = query_teacher(teacher, tmp_path / "transfer", cfg.n_transfer, cfg.shard_size, seed=1, progress=False)
    trained = train_student("shape", TransferSet(folder), tmp_path / "s", cfg, progress=False)
    plain = train_student("shape", TransferSet(folder), tmp_path / "p", preset("tiny", device="cpu"), progress=False)
    # the same training; the scale is fitted afterwards on the transfer set, and saved with the student
    assert plain.config.noise_scale == 1.0
    assert trained.config.noise_scale == calibrated_noise_scale(plain, TransferSet(folder))
    assert 1.0 <= trained.config.noise_scale <= 2.0
    assert load_model(tmp_path / "s").config.noise_scale == trained.config.noise_scale
    assert all(torch.equal(a, b) for a, b in zip(trained.state_dict().values(), plain.state_dict().values()))
    fixed = train_student("shape", TransferSet(folder), tmp_path / "f", preset("tiny", device="cpu", shape_noise_scale=1.3),
                          progress=False)
    assert fixed.config.noise_scale == 1.3 and load_model(tmp_path / "f").config.noise_scale == 1.3
    with pytest.raises(SkdcgnError, match="shape_noise_scale"):
        preset("tiny", shape_noise_scale=-1.0).validate()
