"""The one training-state format (skdcgn.checkpoint): exact round trips of what trainers store,
the header alone tells whose state it is, and files of other formats are refused in one line."""
from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from skdcgn.checkpoint import checkpoint_stage, load_checkpoint, pack, save_checkpoint, unpack
from skdcgn.errors import SkdcgnError


def _trained(opt_cls, kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    opt = opt_cls(model.parameters(), **kw)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 3)).pow(2).mean().backward()
        opt.step()
        sched.step()
    return model, opt, sched


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("opt", [(torch.optim.Adam, {"lr": 1e-3, "betas": (0.5, 0.999)}), (torch.optim.Adadelta, {"lr": 1.0})])
def test_trainer_state_round_trips_exactly(tmp_path, opt):
    model, optim, sched = _trained(*opt)
    state = {"step": 3, "elapsed": 0.1 + 0.2, "log": [{"loss": 1 / 3, "n": None}], "model": model.state_dict(),
             "opt": optim.state_dict(), "sched": sched.state_dict(), "rng": torch.get_rng_state(),
             "gen": torch.Generator().manual_seed(5).get_state(), "pair": (1, "a"), "empty": torch.zeros(0)}
    stage = {"lr": 0.01, "mechanism": "shape"}
    save_checkpoint(tmp_path / "a.safetensors", state, stage)
    back = load_checkpoint(tmp_path / "a.safetensors")
    assert back.pop("stage") == stage and back.pop("stage_hash")
    assert _equal(back, state)
    save_checkpoint(tmp_path / "b.safetensors", state, stage)  # same state, same bytes
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    # the restored optimizer continues exactly as the original
    model2, optim2, sched2 = _trained(*opt)
    model2.load_state_dict(back["model"])
    optim2.load_state_dict(back["opt"])
    sched2.load_state_dict(back["sched"])
    x = torch.randn(5, 3)
    for m, o in ((model, optim), (model2, optim2)):
        o.zero_grad()
        m(x).pow(2).mean().backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))
    assert checkpoint_stage(tmp_path / "a.safetensors") == stage


def test_other_formats_and_damage_are_one_line(tmp_path):
    buf = io.BytesIO()
    torch.save({"step": 1}, buf)
    (tmp_path / "old.pt").write_bytes(buf.getvalue())
    with pytest.raises(SkdcgnError, match="not a training state of this skdcgn version.*torch.save") as e:
        load_checkpoint(tmp_path / "old.pt")
    assert "\n" not in str(e.value)
    assert checkpoint_stage(tmp_path / "old.pt") is None
    save_checkpoint(tmp_path / "nan.safetensors", {"w": torch.tensor([1.0, float("nan")])}, {})
    with pytest.raises(SkdcgnError, match="NaN"):
        load_checkpoint(tmp_path / "nan.safetensors")
    data = (tmp_path / "nan.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(SkdcgnError):
        load_checkpoint(tmp_path / "cut.safetensors")
    with pytest.raises(TypeError):
        pack({"x": object()})
    assert unpack(*pack({1: (2.5, [torch.ones(1)])})) == {1: (2.5, [torch.ones(1)])}
