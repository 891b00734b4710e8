"""The helpers every trainer shares (skdcgn.training) and the losses' accumulate_gradients phases."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from skdcgn.distill.losses import DistillLoss, LossWeights
from skdcgn.errors import SkdcgnError, first_line
from skdcgn.models.discriminators import DiscriminatorConfig, ProjectionDiscriminator
from skdcgn.training import cosine_scale, due, restore, set_lr, update_ema


def test_restore_loads_every_part_and_a_mismatch_is_one_line(tmp_path):
    src, dst = nn.Linear(3, 2), nn.Linear(3, 2)
    opt = torch.optim.Adam(dst.parameters())
    g = torch.Generator().manual_seed(5)
    state = {"model": src.state_dict(), "opt": opt.state_dict(), "rng": torch.Generator().manual_seed(9).get_state()}
    seen = []
    restore({**state, "extra": 7}, {"model": dst, "opt": opt, "rng": g, "extra": seen.append, "absent": None}, "ck")
    assert torch.equal(dst.weight, src.weight) and seen == [7]
    assert torch.equal(torch.rand(3, generator=g), torch.rand(3, generator=torch.Generator().manual_seed(9)))
    with pytest.raises(SkdcgnError, match=r"^ck: not a usable checkpoint for this run \(.*\); start afresh$") as e:
        restore({"model": nn.Linear(4, 2).state_dict()}, {"model": dst}, "ck", "start afresh")
    assert "\n" not in str(e.value)
    with pytest.raises(SkdcgnError, match="'opt'"):  # a part the checkpoint lacks
        restore({"model": src.state_dict()}, {"model": dst, "opt": opt}, "ck")


def test_due_cosine_set_lr_and_ema():
    assert [s for s in range(1, 11) if due(s, 4, 10)] == [4, 8, 10]
    assert [s for s in range(1, 6) if due(s, 0, 5)] == [5]
    assert cosine_scale(0, 10) == 1.0 and cosine_scale(5, 10) == pytest.approx(0.5) and cosine_scale(10, 10) == 0.0
    net = nn.BatchNorm1d(2)
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    set_lr(opt, 0.25)
    set_lr(None, 1.0)  # no optimizer: nothing to do
    assert opt.param_groups[0]["lr"] == 0.25
    ema = nn.BatchNorm1d(2)
    with torch.no_grad():
        net.weight.fill_(3.0)
        net.running_mean.fill_(2.0)
    update_ema(ema, net, 0.75)  # 0.75·1 + 0.25·3
    assert torch.allclose(ema.weight, torch.full((2,), 1.5)) and torch.equal(ema.running_mean, net.running_mean)


def test_distill_phases_give_gradients_to_their_own_network_only():
    torch.manual_seed(0)
    D = ProjectionDiscriminator(DiscriminatorConfig(3, 10, (4, 8)))
    student = nn.Conv2d(3, 3, 1)
    real, y = torch.rand(4, 3, 16, 16) * 2 - 1, torch.arange(4)
    logits = student(torch.randn(4, 3, 16, 16))
    fake = torch.tanh(logits)
    loss = DistillLoss(LossWeights(), is_mask=False)
    logs = loss.accumulate_gradients("D", D, real, fake, y)
    assert {"d_loss", "d_real", "d_fake"} <= set(logs)
    assert all(p.grad is not None for p in D.parameters()) and student.weight.grad is None  # fake was detached
    assert not any(p.requires_grad for p in D.parameters())  # off again after its phase
    for p in D.parameters():
        p.grad = None
    logs = loss.accumulate_gradients("G", D, real, fake, y, logits=logits)
    assert {"pixel", "adv", "fm", "g_loss"} <= set(logs)
    assert student.weight.grad is not None and all(p.grad is None for p in D.parameters())
    with pytest.raises(ValueError, match="phase"):
        loss.accumulate_gradients("E", D, real, fake, y)


def test_first_line():
    assert first_line(ValueError("a\nb")) == "a" and first_line(KeyError()) == "KeyError"
    assert len(first_line(ValueError("x" * 500))) == 200


def test_benchmark_scripts_fail_in_one_line_like_the_cli(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from skdcgn.cli import script_exit

    def bad() -> None:
        raise SkdcgnError("--n: at least 1\nsecond line")

    with pytest.raises(SystemExit) as e:
        script_exit(bad, "x.py")
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        script_exit(lambda: {"a record": 1}, "x.py")
    assert e.value.code == 0
    root = Path(__file__).resolve().parents[1]
    for argv in (["benchmarks/shape_students.py", "--run-root", str(tmp_path), "--out", str(tmp_path / "o.md"),
                  "--variant", "a:", "--variant", "b:nonsense=1"],
                 ["benchmarks/mask_errors.py", "--run-dir", str(tmp_path / "nope"), "--teacher", "double_colored",
                  "--out", str(tmp_path / "m.md")],
                 ["benchmarks/sampling_speed.py", "--device", "cpu", "--batch-sizes", "0"]):
        r = subprocess.run([sys.executable, *argv], cwd=root, capture_output=True, text=True)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "error:" in r.stderr, (argv, r.stderr)
    assert not any(tmp_path.iterdir())  # refused before any work
