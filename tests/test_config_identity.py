"""Stage identities must not move: every hash below was computed on commit 3312527 (before field
metadata and YAML presets) and must never change without a note in the changelog/commit, since run
folders written before are recognised by exactly these hashes (a changed one retrains a stage)."""
from __future__ import annotations


import pytest
import torch

from skdcgn.io import config_hash, read_json

# Computed on commit 3312527; must never change without a note.
DISTILL_RECORD = {'default': 'a5a002c27606b3e0',
                  'quick': '1f994018d84ea2ba',
                  'tiny': 'df001603982b9011',
                  'imagenet-tiny': 'e592d9149579d597',
                  'tiny-placed': 'df001603982b9011',
                  'default-tar': '3bc636794a96fbbc'}
STUDENT_STAGE = {'default/shape': 'd283dd9a7fcda2f7',
                 'default/foreground': 'f1955b2826fdb070',
                 'default/background': '03b1d2abc3d55157',
                 'quick/shape': 'bbca49b0e1913a9e',
                 'quick/foreground': '04a42a3631685d01',
                 'quick/background': '5ec69e4fc4e3bd5e',
                 'tiny/shape': '7c29afc03b7f4856',
                 'tiny/foreground': '7a9097c33a61e182',
                 'tiny/background': '86ce85b0ddb858e0',
                 'imagenet-tiny/shape': '8de71c507b971e9e',
                 'imagenet-tiny/foreground': '442bf8d2c2042a7c',
                 'imagenet-tiny/background': '64cc89bf1591b298',
                 'tiny-placed/shape': '7c29afc03b7f4856',
                 'tiny-placed/foreground': '7a9097c33a61e182',
                 'tiny-placed/background': '86ce85b0ddb858e0',
                 'default-tar/shape': '21a1191a88454c36',
                 'default-tar/foreground': 'bab62d1bf4f61eab',
                 'default-tar/background': '782cc415fb87809c'}
TRANSFER = {'default': '06d9f5bfc218fb44', 'tiny': '039f9a95473e15a2'}
TEACHER_STAGE = {'quick': 'd2c20b09db8312fc', 'full': '47fd48c56501a970', 'quick+placed': 'd2c20b09db8312fc'}
CLASSIFIER_STAGE = {'default': '3ed821546648bae3', 'example': '11b17dfeabfb5573'}
RUN_EVAL_STAGE = {'quick': '18b805be14fd789c', 'full': 'a6989c7aced6937a', 'tiny': '2d9d8f0d61b28475'}

FAKE_TRANSFER = {"n": 256, "shard_size": 64, "seed": 7, "teacher": "abc"}


def _distill_cases():
    from skdcgn.distill.trainer import preset

    return {
        "default": preset("default"),
        "quick": preset("quick"),
        "tiny": preset("tiny"),
        "imagenet-tiny": preset("imagenet-tiny"),
        # placement fields never enter the identity
        "tiny-placed": preset("tiny", device="cpu", threads=1),
        "default-tar": preset("default", shard_format="tar", stream_window=2),
    }


@pytest.mark.parametrize("name", sorted(DISTILL_RECORD))
def test_distill_stage_hashes_unchanged(name):
    from skdcgn.distill.trainer import config_record, student_stage

    cfg = _distill_cases()[name]
    assert config_hash(config_record(cfg)) == DISTILL_RECORD[name]
    for m in ("shape", "foreground", "background"):
        assert config_hash(student_stage(m, cfg, FAKE_TRANSFER)) == STUDENT_STAGE[f"{name}/{m}"]


def test_transfer_config_hash_unchanged():
    from skdcgn.api import load_cgn
    from skdcgn.distill.query import transfer_config
    from skdcgn.distill.trainer import preset
    from skdcgn.hashing import derive_seed

    mech = load_cgn("double_colored").mechanisms()["shape"]
    for name in ("default", "tiny"):
        cfg = preset(name)
        tcfg = transfer_config(mech, cfg.n_transfer, cfg.shard_size, derive_seed(cfg.seed, 0), u_dtype=cfg.u_dtype,
                               latent_dim=mech.config.latent_dim, n_classes=mech.config.n_classes,
                               shard_format=cfg.shard_format)
        assert config_hash(tcfg) == TRANSFER[name]


@pytest.mark.parametrize("name", sorted(TEACHER_STAGE))
def test_teacher_stage_hashes_unchanged(name):
    from skdcgn.teacher_training import _stage_config, preset_config

    preset_name, _, extra = name.partition("+")
    overrides = {"device": "cpu", "threads": 1} if extra == "placed" else {}
    assert config_hash(_stage_config("double_colored", preset_config(preset_name, **overrides))) == TEACHER_STAGE[name]


def _tiny_data(n=24):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.arange(n) % 10
    return images, labels


@pytest.mark.parametrize("name", sorted(CLASSIFIER_STAGE))
def test_classifier_stage_hashes_unchanged(name, tmp_path):
    from skdcgn.invariance import ClassifierConfig, train_classifier

    cfg = {"default": ClassifierConfig(epochs=1, max_steps=1, device="cpu"),
           "example": ClassifierConfig(arch="mnist_example", epochs=1, max_steps=1, batch_size=8, seed=3,
                                       max_examples=16, device="cpu")}[name]
    images, labels = _tiny_data()
    train_classifier(images, labels, cfg, tmp_path / "clf", progress=False)
    assert read_json(tmp_path / "clf" / "manifest.json")["config_hash"] == CLASSIFIER_STAGE[name]


@pytest.mark.parametrize("name", sorted(RUN_EVAL_STAGE))
def test_run_eval_stage_hashes_unchanged(name, tmp_path):
    from skdcgn import pipeline

    base = pipeline.PRESETS[name]
    config = pipeline.RunConfig(**{**base, "classifier_max_steps": 1, "eval_examples": 10, "device": "cpu"})
    images, labels = _tiny_data()
    tests = {"test": (images, labels)}
    pipeline._classifier_accuracy(tmp_path / "c", "original", 0, config, lambda: (images, labels), tests,
                                  {"test": "0123456789abcdef"}, progress=False)
    assert read_json(tmp_path / "c" / "eval" / "manifest.json")["config_hash"] == RUN_EVAL_STAGE[name]
