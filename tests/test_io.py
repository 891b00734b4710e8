"""Shared file and config mechanisms: atomic writes, manifests, validated configs and models."""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from skdcgn.config import config_from_dict, resolve_device
from skdcgn.errors import SkdcgnError
from skdcgn.io import (atomic_path, confined, load_tensors, read_json, save_tensors, stage_complete, write_json,
                       write_manifest)
from skdcgn.models.cgn_mnist import TeacherConfig, TeacherMechanism
from skdcgn.models.pretrained import load_model


def test_failed_write_leaves_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "a.json"
    write_json(path, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert read_json(path) == {"v": 1}
    assert os.listdir(tmp_path) == ["a.json"]


def test_stage_complete_only_for_same_config(tmp_path):
    assert not stage_complete(tmp_path, {"a": 1})
    write_manifest(tmp_path, {"a": 1})
    assert stage_complete(tmp_path, {"a": 1})
    assert not stage_complete(tmp_path, {"a": 2})
    (tmp_path / "manifest.json").write_text("{broken")
    assert not stage_complete(tmp_path, {"a": 1})


@pytest.mark.parametrize("content, match", [(b"", "not a valid JSON"), (b"[1, 2]", "expected a JSON object"),
                                            (b"\xff\xfe", "not a valid JSON")])
def test_read_json_rejects_bad_files(tmp_path, content, match):
    (tmp_path / "x.json").write_bytes(content)
    with pytest.raises(SkdcgnError, match=match):
        read_json(tmp_path / "x.json")


def test_safetensors_truncated_is_refused(tmp_path):
    save_tensors(tmp_path / "t.safetensors", {"w": torch.ones(100)})
    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[:-40])
    with pytest.raises(SkdcgnError, match="not a valid safetensors"):
        load_tensors(tmp_path / "t.safetensors")


def test_confined_refuses_escaping_paths(tmp_path):
    assert confined(tmp_path, "shard_0.safetensors") == tmp_path.resolve() / "shard_0.safetensors"
    for bad in ("../x", "/etc/passwd", "a/../../x"):
        with pytest.raises(SkdcgnError, match="leaves its folder"):
            confined(tmp_path, bad)


@dataclasses.dataclass
class _Cfg:
    steps: int = 10
    lr: float = 1e-3
    name: str = "a"
    flag: bool = False


@pytest.mark.parametrize("values, match", [
    ({"stepz": 3}, "unknown config field 'stepz'"),
    ({"steps": "10"}, "field 'steps' should be int"),
    ({"steps": True}, "field 'steps' should be int"),
    ({"lr": float("nan")}, "field 'lr' is NaN"),
    ({"flag": 1}, "field 'flag' should be bool"),
])
def test_config_from_dict_names_the_bad_field(values, match):
    with pytest.raises(SkdcgnError, match=match):
        config_from_dict(_Cfg, values, "cfg")


def test_config_from_dict_accepts_int_for_float():
    assert config_from_dict(_Cfg, {"lr": 1, "steps": 3}, "cfg") == _Cfg(steps=3, lr=1.0)


def test_model_round_trip_and_tampered_config(tmp_path):
    model = TeacherMechanism(TeacherConfig(mechanism="shape", ngf=4, init_size=2))
    model.save_pretrained(tmp_path / "m")
    again = load_model(tmp_path / "m")
    u, y = torch.randn(3, 32), torch.tensor([0, 1, 2])
    assert torch.equal(model.eval()(u, y), again(u, y))
    write_json(tmp_path / "m" / "config.json", {"class": "os.system", "config": {}})
    with pytest.raises(SkdcgnError, match="unknown model class 'os.system'"):
        load_model(tmp_path / "m")
    write_json(tmp_path / "m" / "config.json", {"class": "TeacherMechanism", "config": {"mechanism": "hair"}})
    with pytest.raises(SkdcgnError, match="mechanism: 'hair'"):
        load_model(tmp_path / "m")
    write_json(tmp_path / "m" / "config.json", {"class": "TeacherMechanism", "config": {"mechanism": "shape", "ngf": 8, "init_size": 2}})
    with pytest.raises(SkdcgnError, match="has shape"):
        load_model(tmp_path / "m")


def test_cuda_requested_without_cuda_is_clear():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(SkdcgnError, match="no CUDA device"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"


def test_first_difference_names_the_dotted_setting():
    from skdcgn.io import first_difference

    assert first_difference({"a": 1, "b": {"c": 2, "d": 3}}, {"a": 1, "b": {"c": 2, "d": 4}}) == "b.d: 3 there, 4 now"
    assert first_difference({"a": 1}, {"a": 1, "z": (1, 2)}) == "z: '<absent>' there, (1, 2) now"


def test_refuse_other_settings_is_the_one_rerun_rule(tmp_path):
    from skdcgn.io import refuse_other_settings

    assert refuse_other_settings(tmp_path, "a thing", None, {"lr": 1}, overwrite=False) is False  # nothing there
    assert refuse_other_settings(tmp_path, "a thing", {"lr": 1}, {"lr": 1}, overwrite=False) is False  # the same
    with pytest.raises(SkdcgnError, match=r"holds a thing made with other settings \(lr: 1 there, 2 now\).*--overwrite"):
        refuse_other_settings(tmp_path, "a thing", {"lr": 1}, {"lr": 2}, overwrite=False)
    assert refuse_other_settings(tmp_path, "a thing", {"lr": 1}, {"lr": 2}, overwrite=True) is True


def test_manifest_digests_are_checked_by_stage_complete_and_check_recorded(tmp_path, caplog):
    from skdcgn.io import check_recorded, stage_complete, write_bytes, write_manifest

    write_bytes(tmp_path / "sub" / "a.bin", b"abc")
    write_manifest(tmp_path, {"x": 1}, files=["sub/a.bin"])
    assert stage_complete(tmp_path, {"x": 1})
    check_recorded(tmp_path / "sub" / "a.bin")  # recorded one folder up: checked, fine
    write_bytes(tmp_path / "sub" / "a.bin", b"abd")
    with caplog.at_level("WARNING", logger="skdcgn"):
        assert not stage_complete(tmp_path, {"x": 1})
    assert "a.bin" in caplog.text  # a warning of the skdcgn logger: the CLI prints it on stderr
    with pytest.raises(SkdcgnError, match="a.bin: sha256 .* differs"):
        check_recorded(tmp_path / "sub" / "a.bin")
    check_recorded(tmp_path / "unrecorded.bin")  # nothing recorded: nothing to check
    (tmp_path / "sub" / "a.bin").unlink()
    caplog.clear()
    with caplog.at_level("WARNING", logger="skdcgn"):
        assert not stage_complete(tmp_path, {"x": 1})
    assert "missing" in caplog.text


def test_folder_lock_is_reentrant_leaves_nothing_and_removes_a_folder_it_made(tmp_path):
    from skdcgn.io import LOCK, folder_lock

    with folder_lock(tmp_path / "new" / "deep"):
        assert (tmp_path / "new" / "deep" / LOCK).is_file()
        with folder_lock(tmp_path / "new" / "deep"):  # the same process: re-entered, not refused
            pass
        assert (tmp_path / "new" / "deep" / LOCK).is_file()
    assert not (tmp_path / "new").exists()  # made for the lock, left empty: removed
    with folder_lock(tmp_path / "kept"):
        (tmp_path / "kept" / "result").write_text("x")
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["result"]
