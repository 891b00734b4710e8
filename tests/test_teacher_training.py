"""Training a CGN teacher: tiny runs on a synthetic variant (a few steps, narrow networks)."""
from __future__ import annotations

import csv

import pytest
import torch

from skdcgn import load_cgn
from skdcgn.cli import main
from skdcgn.config import config_from_dict
from skdcgn.errors import SkdcgnError
from skdcgn.io import load_tensors, read_json
from skdcgn import teacher_training as tt


def _synthetic_set(variant: str, data_seed: int = 0):
    """64 uint8 images: a class-coloured square 'digit' on a class-coloured background."""
    g = torch.Generator().manual_seed(data_seed)
    labels = torch.arange(64) % 10
    images = torch.empty(64, 3, 32, 32, dtype=torch.uint8)
    images[:] = (labels * 25).view(-1, 1, 1, 1).to(torch.uint8)
    for i, k in enumerate(labels.tolist()):
        o = int(torch.randint(4, 12, (1,), generator=g))
        images[i, :, o:o + 12 + k, o:o + 8] = 255 - 20 * k
    return images, labels


@pytest.fixture
def synthetic(monkeypatch):
    monkeypatch.setattr(tt, "load_train_set", _synthetic_set)


def _tiny(**kw) -> tt.TeacherTrainConfig:
    base = dict(steps=6, batch_size=8, ngf=8, ndf=32, sample_every=3, checkpoint_every=2, log_every=1,
                bn_recalibration_batches=1, device="cpu")
    return config_from_dict(tt.TeacherTrainConfig, {**base, **kw}, "test")


def _weights(run_dir) -> dict[str, torch.Tensor]:
    out = {}
    for m in ("shape", "foreground", "background"):
        out.update({f"{m}.{k}": v for k, v in load_tensors(run_dir / "teacher" / m / "model.safetensors").items()})
    return out


def _loss_rows(run_dir) -> list[list[str]]:
    with open(run_dir / "teacher" / "train" / "losses.csv", newline="") as f:
        rows = list(csv.reader(f))
    seconds = rows[0].index("seconds")
    return [r[:seconds] + r[seconds + 1:] for r in rows]


def test_few_steps_write_a_loadable_cgn(tmp_path, synthetic, caplog):
    state = torch.get_rng_state()
    cgn = tt.train_teacher("double_colored", tmp_path, _tiny(), progress=False)
    assert torch.equal(state, torch.get_rng_state())  # training leaves the caller's global RNG alone
    stage = tmp_path / "teacher"
    assert (stage / "manifest.json").is_file() and (stage / "grid.png").is_file()
    assert (stage / "train" / "samples" / "step_000003.png").is_file()
    assert read_json(stage / "manifest.json")["steps_done"] == 6
    assert len(_loss_rows(tmp_path)) == 1 + 6

    loaded = load_cgn(stage)
    assert not loaded.training
    m, f, b, x = loaded.sample(torch.arange(10), generator=torch.Generator().manual_seed(0))
    assert m.shape == (10, 1, 32, 32) and f.shape == b.shape == x.shape == (10, 3, 32, 32)
    assert 0 <= m.min() and m.max() <= 1 and x.abs().max() <= 1
    ref = cgn.sample(torch.arange(10), generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a, r) for a, r in zip((m, f, b, x), ref))

    # the report's figure of the real losses table, beside it: the finished stage stays finished
    from skdcgn.results.figures import plot_teacher_losses

    assert plot_teacher_losses(stage / "train" / "losses.csv", stage / "train" / "losses.png")
    assert (stage / "train" / "losses.png").stat().st_size > 0

    # the same config again is a no-op
    with caplog.at_level("INFO", logger="skdcgn"):
        tt.train_teacher("double_colored", tmp_path, _tiny(), progress=False)
    assert "skipping" in caplog.text


def test_resume_after_interruption_is_bitwise_identical(tmp_path, synthetic):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    tt.train_teacher("wildlife", straight, _tiny(), progress=False)

    def interrupt(step: int) -> None:
        if step == 5:  # last checkpoint at step 4: step 5 is lost and redone
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tt.train_teacher("wildlife", broken, _tiny(), progress=False, on_step=interrupt)
    assert not (broken / "teacher" / "manifest.json").exists()
    tt.train_teacher("wildlife", broken, _tiny(), progress=False)

    a, b = _weights(straight), _weights(broken)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _loss_rows(straight) == _loss_rows(broken)


def test_resume_refuses_a_different_config(tmp_path, synthetic):
    tt.train_teacher("double_colored", tmp_path, _tiny(steps=2), progress=False)
    tt.train_teacher("double_colored", tmp_path, _tiny(steps=3), progress=False)  # more steps: continues
    assert read_json(tmp_path / "teacher" / "manifest.json")["steps_done"] == 3
    manifest = (tmp_path / "teacher" / "manifest.json").read_bytes()
    with pytest.raises(SkdcgnError, match="lr"):
        tt.train_teacher("double_colored", tmp_path, _tiny(steps=4, lr=1e-3), progress=False)
    assert (tmp_path / "teacher" / "manifest.json").read_bytes() == manifest  # the finished teacher is kept
    tt.train_teacher("double_colored", tmp_path, _tiny(steps=2, lr=1e-3), progress=False, overwrite=True)
    assert read_json(tmp_path / "teacher" / "manifest.json")["config"]["lr"] == 1e-3
    assert read_json(tmp_path / "teacher" / "manifest.json")["steps_done"] == 2


@pytest.mark.parametrize("values, match", [
    ({"lr": -1.0}, "lr"),
    ({"lr": float("nan")}, "lr"),
    ({"batch_size": 1}, "batch_size"),
    ({"steps": 0}, "steps"),
    ({"mask_min": 0.5, "mask_max": 0.2}, "mask_min"),
    ({"disc": "transformer"}, "disc"),
    ({"beta1": 1.5}, "beta1"),
    ({"steps": "many"}, "steps"),
    ({"learning_rate": 0.1}, "unknown config field"),
])
def test_bad_config_is_a_one_line_error(values, match):
    with pytest.raises(SkdcgnError, match=match) as info:
        config_from_dict(tt.TeacherTrainConfig, values, "config")
    assert "\n" not in str(info.value)


def test_cli_reports_bad_values_in_one_line(tmp_path, capsys):
    assert main(["teacher", "train", "--variant", "wildlife", "--run-dir", str(tmp_path), "--batch-size", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("skdcgn: error: batch_size") and "\n" not in err
    with pytest.raises(SkdcgnError, match="preset"):
        tt.preset_config("slow")
