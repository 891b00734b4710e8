"""Field metadata, YAML presets and --dump-config (skdcgn.config): presets load exactly as the
literal tables they replaced, one validator with one message style, and a dumped config reads
back as the same config."""
from __future__ import annotations

import dataclasses

import pytest
import yaml

from skdcgn.cli import main
from skdcgn.config import (PRESET_KINDS, check_value, config_from_dict, dump_config, identity, load_presets,
                           load_yaml, setting, validate_config)
from skdcgn.errors import SkdcgnError

# The PRESETS tables as literal dicts on commit 3312527 (bench: dataclasses.asdict of each
# BenchPreset); the YAML files in src/skdcgn/configs/ must load to exactly these.
LITERAL_PRESETS = {'distill': {'long': {'n_transfer': 100000, 'shard_size': 10000, 'steps': 20000,
                                'texture_steps': 10000, 'batch_size': 128, 'ema_decay': 0.999, 'n_eval': 2000,
                                'sample_interval': 1000, 'checkpoint_interval': 1000, 'log_interval': 100},
                       'quick': {'n_transfer': 6000,
                       'shard_size': 3000,
                       'steps': 500,
                       'texture_steps': 250,
                       'n_eval': 500,
                       'sample_interval': 100,
                       'checkpoint_interval': 100,
                       'log_interval': 25},
             'default': {},
             'tiny': {'n_transfer': 256,
                      'shard_size': 64,
                      'steps': 6,
                      'texture_steps': 0,
                      'batch_size': 16,
                      'n_eval': 32,
                      'student_widths': (8, 8, 8),
                      'student_extra_blocks': 0,
                      'disc_widths': (8, 8),
                      'log_interval': 2,
                      'sample_interval': 3,
                      'checkpoint_interval': 2,
                      'benchmark': False,
                      'adv_start': 0.3},
             'imagenet-256': {'student_embed_dim': 128,
                              'student_extra_blocks': 0,
                              'shifted_texture': False,
                              'disc_widths': (16, 32, 64, 128, 256),
                              'n_transfer': 1000000,
                              'shard_format': 'tar',
                              'stream_window': 4,
                              'steps': 200000,
                              'texture_steps': 0,
                              'batch_size': 256,
                              'lr_g': 0.0002,
                              'lr_d': 0.0002,
                              'ema_decay': 0.999,
                              'n_eval': 1000,
                              'log_interval': 100,
                              'sample_interval': 2000,
                              'checkpoint_interval': 1000,
                              'benchmark': False,
                              'student_image_size': 256,
                              'student_widths': (256, 192, 128, 64, 32, 16),
                              'shard_size': 5000,
                              'query_batch_size': 50},
             'imagenet-128': {'student_embed_dim': 128,
                              'student_extra_blocks': 0,
                              'shifted_texture': False,
                              'disc_widths': (16, 32, 64, 128, 256),
                              'n_transfer': 1000000,
                              'shard_format': 'tar',
                              'stream_window': 4,
                              'steps': 200000,
                              'texture_steps': 0,
                              'batch_size': 256,
                              'lr_g': 0.0002,
                              'lr_d': 0.0002,
                              'ema_decay': 0.999,
                              'n_eval': 1000,
                              'log_interval': 100,
                              'sample_interval': 2000,
                              'checkpoint_interval': 1000,
                              'benchmark': False,
                              'student_image_size': 128,
                              'student_widths': (256, 192, 128, 64, 32),
                              'shard_size': 10000,
                              'query_batch_size': 100},
             'imagenet-tiny': {'n_transfer': 64,
                               'shard_size': 16,
                               'steps': 4,
                               'texture_steps': 0,
                               'batch_size': 8,
                               'n_eval': 8,
                               'student_widths': (8, 8, 8),
                               'student_extra_blocks': 0,
                               'student_embed_dim': 8,
                               'disc_widths': (8, 8),
                               'shifted_texture': False,
                               'query_batch_size': 16,
                               'log_interval': 1,
                               'sample_interval': 2,
                               'checkpoint_interval': 2,
                               'benchmark': False,
                               'adv_start': 0.5}},
 'teacher': {'quick': {'steps': 1000, 'batch_size': 16, 'sample_every': 250, 'checkpoint_every': 250},
             'full': {'steps': 46875,
                      'batch_size': 16,
                      'sample_every': 4000,
                      'checkpoint_every': 2000,
                      'log_every': 100}},
 'run': {'quick': {'distill_preset': 'quick',
                   'n_counterfactuals': 5000,
                   'classifier_arch': 'mnist_example',
                   'classifier_epochs': 10,
                   'classifier_max_steps': 300,
                   'classifier_max_examples': 5000,
                   'eval_examples': 5000},
         'full': {'variants': ('colored', 'double_colored', 'wildlife'),
                  'distill_preset': 'default',
                  'n_counterfactuals': 100000,
                  'seeds': 3,
                  'classifier_epochs': 10,
                  'composers': ('rotate', 'mask_noise', 'opacity', 'binary', 'swap_textures', 'shape_only'),
                  'eval_examples': 10000},
         'tiny': {'distill_preset': 'tiny',
                  'n_counterfactuals': 200,
                  'per_shape': 10,
                  'classifier_epochs': 1,
                  'classifier_max_steps': 3,
                  'classifier_max_examples': 200,
                  'eval_examples': 100}},
 'bench': {'quick': {'n_quality': 2000,
                     'kid_subsets': 50,
                     'kid_subset_size': 500,
                     'mask_per_class': 100,
                     'batch_sizes': (1, 64, 256),
                     'warmup': 2,
                     'repeats': 5,
                     'min_seconds': 0.05},
           'full': {'n_quality': 10000,
                    'kid_subsets': 100,
                    'kid_subset_size': 1000,
                    'mask_per_class': 500,
                    'batch_sizes': (1, 64, 256, 1024),
                    'warmup': 3,
                    'repeats': 10,
                    'min_seconds': 0.2}}}


def _tables():
    from skdcgn import bench, pipeline, teacher_training
    from skdcgn.distill import trainer

    return {"distill": trainer.PRESETS, "teacher": teacher_training.PRESETS, "run": pipeline.PRESETS,
            "bench": bench.PRESETS}


@pytest.mark.parametrize("kind", PRESET_KINDS)
def test_presets_load_exactly_as_the_old_tables(kind):
    table = _tables()[kind]
    assert table == LITERAL_PRESETS[kind]
    for name, values in table.items():  # same types too: tuples stay tuples, floats stay floats
        for k, v in values.items():
            assert type(v) is type(LITERAL_PRESETS[kind][name][k]), (kind, name, k)


def test_bench_presets_validate_into_bench_preset():
    from skdcgn.bench import BenchPreset, bench_preset

    for name, values in LITERAL_PRESETS["bench"].items():
        assert bench_preset(name) == BenchPreset(**values)
    with pytest.raises(SkdcgnError, match="unknown preset 'huge'"):
        bench_preset("huge")
    with pytest.raises(SkdcgnError, match="missing config field 'warmup'"):
        config_from_dict(BenchPreset, {k: v for k, v in LITERAL_PRESETS["bench"]["quick"].items() if k != "warmup"}, "x")


def test_load_presets_refuses_unknown_kind():
    with pytest.raises(SkdcgnError, match="unknown preset kind"):
        load_presets("nope")


def test_shipped_preset_files_are_listed_in_package_data():
    from pathlib import Path

    import skdcgn

    root = Path(skdcgn.__file__).parent / "configs"
    assert sorted(p.parent.name for p in root.glob("*/*.yaml")) == sorted(
        k for k, t in LITERAL_PRESETS.items() for _ in t)
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert '"configs/*/*.yaml"' in pyproject


@dataclasses.dataclass
class _Demo:
    count: int = setting(3, lo=1, hi=10, unit="steps", help="how many")
    rate: float = setting(0.5, lo=0.0, hi=1.0, hi_open=True)
    kind: str = setting("a", choices=("a", "b"))
    widths: tuple[int, ...] = setting((1, 2), lo=1, hi=8)
    where: str = setting("auto", identity=False)
    placed: int = setting(0, identity="default")
    extra: bool = setting(False, identity="changed")
    plain: int = 7  # no metadata: not checked, part of the identity


@pytest.mark.parametrize("values, message", [
    ({"count": 0}, "count: 0 is outside [1, 10]"),
    ({"count": 11}, "count: 11 is outside [1, 10]"),
    ({"rate": 1.0}, "rate: 1.0 is outside [0.0, 1.0)"),
    ({"rate": float("inf")}, "rate: inf is outside [0.0, 1.0)"),
    ({"kind": "c"}, "kind: 'c' is not one of a, b"),
    ({"widths": (1, 9)}, "widths: 9 is outside [1, 8]"),
    ({"count": "3"}, "count: expected a number, got '3'"),
])
def test_validate_config_one_message_style(values, message):
    with pytest.raises(SkdcgnError) as e:
        validate_config(_Demo(**values))
    assert str(e.value) == message


def test_validate_config_accepts_defaults_and_bounds():
    validate_config(_Demo())
    validate_config(_Demo(count=1, rate=0.0, widths=(8,)))
    check_value("x", 5, {"lo": 0, "hi": 5})
    with pytest.raises(SkdcgnError, match=r"x: 0 is outside \(0, 5\]"):
        check_value("x", 0, {"lo": 0, "hi": 5, "lo_open": True})


def test_identity_modes():
    assert identity(_Demo()) == {"count": 3, "rate": 0.5, "kind": "a", "widths": (1, 2), "placed": 0, "plain": 7}
    moved = identity(_Demo(where="cpu", placed=4, extra=True))
    assert "where" not in moved and moved["placed"] == 0 and moved["extra"] is True


def test_help_shows_unit_and_range(capsys):
    with pytest.raises(SystemExit):
        main(["distill", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--n-transfer N_TRANSFER teacher queries per mechanism ([1, 10000000] samples); default: 20000" in out
    assert "--dump-config" in out and "one of float32, float16" in out


def test_dump_config_writes_every_field_and_reads_back(tmp_path):
    from skdcgn.distill.trainer import DistillConfig, preset

    cfg = preset("imagenet-tiny", lr_g=1e-3)
    path = dump_config(cfg, tmp_path / "c.yaml")
    values = load_yaml(path)
    assert set(values) == {f.name for f in dataclasses.fields(DistillConfig)}
    assert config_from_dict(DistillConfig, values, "x") == cfg
    assert not list(tmp_path.glob(".*"))  # written atomically: no temporary left


def _dump(tmp_path, argv, name):
    out = tmp_path / f"{name}.yaml"
    assert main([*argv, "--dump-config", str(out)]) == 0
    return out


@pytest.mark.parametrize("argv, cls", [
    (["distill", "--teacher", "double_colored", "--preset", "tiny", "--steps", "7", "--student-widths", "8", "16", "8"],
     "skdcgn.distill.trainer:DistillConfig"),
    (["teacher", "train", "--variant", "wildlife", "--preset", "full", "--lr", "0.001", "--device", "cpu"],
     "skdcgn.teacher_training:TeacherTrainConfig"),
    (["classify", "train", "--data", "variant:colored", "--epochs", "3", "--arch", "mnist_example"],
     "skdcgn.invariance:ClassifierConfig"),
    (["run", "--preset", "tiny", "--variant", "all", "--rows", "original", "--seeds", "2"],
     "skdcgn.pipeline:RunConfig"),
])
def test_dump_config_round_trip_through_the_cli(tmp_path, capsys, argv, cls):
    import importlib

    mod, _, name = cls.partition(":")
    config_cls = getattr(importlib.import_module(mod), name)
    run_dir = ["--run-dir", str(tmp_path / "r")] if argv[0] in ("distill", "run") or argv[:2] == ["teacher", "train"] else \
        ["--out", str(tmp_path / "o")]
    first = _dump(tmp_path, [*argv, *run_dir], "first")
    assert "wrote" in capsys.readouterr().out
    assert not (tmp_path / "r").exists() and not (tmp_path / "o").exists()  # nothing ran
    preset = argv[argv.index("--preset"):argv.index("--preset") + 2] if "--preset" in argv else []
    head = argv[:argv.index("--preset")] if preset else argv[:2] + argv[2:4]
    second = _dump(tmp_path, [*head, *preset, "--config", str(first), *run_dir], "second")
    a, b = load_yaml(first), load_yaml(second)
    assert a == b
    assert dataclasses.asdict(config_from_dict(config_cls, a, "x")) == dataclasses.asdict(config_from_dict(config_cls, b, "x"))
    assert yaml.safe_load(first.read_text()) == a


def test_dump_config_of_a_bad_value_is_one_line(tmp_path, capsys):
    assert main(["distill", "--preset", "tiny", "--steps", "0", "--run-dir", str(tmp_path / "r"),
                 "--dump-config", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "skdcgn: error: steps: 0 is outside [1, 10000000]"
    assert "\n" not in err and not (tmp_path / "c.yaml").exists()
