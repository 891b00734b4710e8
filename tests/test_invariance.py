"""Counterfactual datasets, invariant classifiers: tiny settings, a few seconds each."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

import skdcgn
from skdcgn import counterfactuals as cf_module
from skdcgn.cli import main
from skdcgn.compose import COMPOSERS
from skdcgn.counterfactuals import generate_counterfactuals, load_image_dataset
from skdcgn.images import to_float
from skdcgn.errors import SkdcgnError
from skdcgn.invariance import ClassifierConfig, accuracy, train_classifier
from skdcgn.models.cgn import CGN
from skdcgn.models.classifier import Classifier, ClassifierNetConfig
from skdcgn.models.pretrained import PretrainedModel



# ---- a fake CGN whose classes can be read back from the composite's pixels ----------------------

@dataclasses.dataclass
class FakeConfig:
    mechanism: str = "shape"
    n_classes: int = 10
    latent_dim: int = 4
    shifted_texture: bool = False


def _level(y: torch.Tensor) -> torch.Tensor:
    return -1 + 2 * y.float() / 9  # class k ↦ a grey level, 0.22 apart (survives uint8 rounding)


class FakeMechanism(PretrainedModel):
    """shape: a mask covering columns 3y..3y+2; textures: channel 0 encodes the class, channel 1
    is +1 (foreground) or -1 (background), so the mask can be read back from the composite."""
    Config = FakeConfig

    def __init__(self, config: FakeConfig) -> None:
        super().__init__(config)
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, u: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n = len(y)
        if self.config.mechanism == "shape":
            cols = torch.arange(32)[None, :]
            on = (cols >= 3 * y[:, None]) & (cols < 3 * y[:, None] + 3)  # [N, 32]
            return on[:, None, None, :].expand(n, 1, 32, 32).float()
        sign = 1.0 if self.config.mechanism == "foreground" else -1.0
        out = torch.zeros(n, 3, 32, 32)
        out[:, 0] = _level(y)[:, None, None]
        out[:, 1] = sign
        return out


def fake_cgn() -> CGN:
    return CGN(*(FakeMechanism(FakeConfig(m)) for m in ("shape", "foreground", "background")))


def decode(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(shape class, foreground class, background class) read from composites' pixels."""
    x = to_float(images)
    mask_cols = x[:, 1, 0, :] > 0                       # [N, 32]
    shape = mask_cols.float().argmax(1) // 3            # first masked column
    fg = ((x[torch.arange(len(x)), 0, 0, 3 * shape] + 1) * 4.5).round().long()
    bg = ((x[:, 0, 0, 31] + 1) * 4.5).round().long()   # column 31 is outside every mask
    return shape, fg, bg


# ---- counterfactual datasets ----------------------------------------------------------------------

def test_labels_follow_the_shape_not_the_texture(tmp_path):
    out = generate_counterfactuals(fake_cgn(), tmp_path / "cf", n=2000, per_shape=10, seed=1,
                                   shard_size=700, progress=False)
    images, labels, (y_fg, y_bg) = load_image_dataset(out, dtype=torch.uint8, with_classes=True)
    assert images.shape == (2000, 3, 32, 32) and images.dtype == torch.uint8 and labels.dtype == torch.int64
    shape, fg, bg = decode(images)
    assert torch.equal(labels, shape)                  # the label is what the mask shows
    assert torch.equal(fg, y_fg) and torch.equal(bg, y_bg)
    assert torch.equal(labels.view(-1, 10), labels.view(-1, 10)[:, :1].expand(-1, 10))  # 10 per shape
    for a, b in ((fg, labels), (bg, labels), (fg, bg)):  # textures independent of the label, ~10%
        assert 0.06 < (a == b).float().mean().item() < 0.14
    assert len(set(fg.tolist())) == 10 and len(set(bg.tolist())) == 10


def test_no_counterfactual_ties_all_mechanisms_to_the_shape(tmp_path):
    out = generate_counterfactuals(fake_cgn(), tmp_path / "same", n=300, per_shape=3, seed=0,
                                   counterfactual=False, progress=False)
    images, labels = load_image_dataset(out)
    shape, fg, bg = decode(images)
    assert torch.equal(shape, labels) and torch.equal(fg, labels) and torch.equal(bg, labels)


def test_shipped_teacher_counterfactuals(tmp_path):
    cgn = skdcgn.load_cgn("double_colored")
    out = generate_counterfactuals(cgn, tmp_path / "teacher", n=200, per_shape=10, seed=0,
                                   cgn_name="double_colored", progress=False)
    images, labels, (y_fg, y_bg) = load_image_dataset(out, with_classes=True)
    assert images.shape == (200, 3, 32, 32) and images.dtype == torch.float32
    assert -1 <= images.min() and images.max() <= 1 and images.std() > 0.1
    assert torch.equal(labels.view(-1, 10), labels.view(-1, 10)[:, :1].expand(-1, 10))
    assert (y_fg == labels).float().mean() < 0.3 and (y_bg == labels).float().mean() < 0.3
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["cgn"] == "double_colored" and sum(manifest["label_counts"]) == 200
    assert (out / "preview.png").stat().st_size > 0


def test_interrupted_dataset_resumes_without_duplicates(tmp_path, monkeypatch):
    kwargs = dict(n=50, per_shape=5, seed=3, shard_size=20, progress=False)  # shards of 20, 20, 10
    ref = load_image_dataset(generate_counterfactuals(fake_cgn(), tmp_path / "ref", **kwargs), dtype=torch.uint8)

    real_save, calls = cf_module.save_tensors, []

    def flaky_save(path, tensors, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed while writing the second shard
        real_save(path, tensors, metadata)

    monkeypatch.setattr(cf_module, "save_tensors", flaky_save)
    with pytest.raises(KeyboardInterrupt):
        generate_counterfactuals(fake_cgn(), tmp_path / "run", **kwargs)
    monkeypatch.setattr(cf_module, "save_tensors", real_save)
    assert not (tmp_path / "run" / "manifest.json").exists()
    assert sorted(p.name for p in (tmp_path / "run").glob("shard_*")) == ["shard_00000.safetensors"]
    with pytest.raises(SkdcgnError, match="did not finish"):
        load_image_dataset(tmp_path / "run")

    generate_counterfactuals(fake_cgn(), tmp_path / "run", **kwargs)
    images, labels = load_image_dataset(tmp_path / "run", dtype=torch.uint8)
    assert len(labels) == 50 and torch.equal(images, ref[0]) and torch.equal(labels, ref[1])

    with pytest.raises(SkdcgnError, match="other settings"):  # same folder, other recipe
        generate_counterfactuals(fake_cgn(), tmp_path / "run", **{**kwargs, "seed": 4})
    generate_counterfactuals(fake_cgn(), tmp_path / "run", **{**kwargs, "seed": 4}, overwrite=True)
    assert not torch.equal(load_image_dataset(tmp_path / "run", dtype=torch.uint8)[0], ref[0])


def test_a_foreign_shard_in_a_resumed_dataset_is_rewritten(tmp_path):
    kwargs = dict(n=40, per_shape=5, shard_size=20, progress=False)  # two shards of the same size
    ref = load_image_dataset(generate_counterfactuals(fake_cgn(), tmp_path / "a", seed=3, **kwargs), dtype=torch.uint8)
    generate_counterfactuals(fake_cgn(), tmp_path / "b", seed=4, **kwargs)
    # a shard of another recipe (right keys, right count) where an interrupted run left shard 1
    (tmp_path / "a" / "shard_00001.safetensors").write_bytes((tmp_path / "b" / "shard_00001.safetensors").read_bytes())
    (tmp_path / "a" / "manifest.json").unlink()
    generate_counterfactuals(fake_cgn(), tmp_path / "a", seed=3, **kwargs)
    images, labels = load_image_dataset(tmp_path / "a", dtype=torch.uint8)
    assert torch.equal(images, ref[0]) and torch.equal(labels, ref[1])


@pytest.mark.parametrize("composer", COMPOSERS)
def test_every_composer_writes_a_dataset(tmp_path, composer):
    out = generate_counterfactuals(fake_cgn(), tmp_path / composer, n=20, per_shape=2, seed=0,
                                   composer=composer, progress=False)
    images, labels = load_image_dataset(out)
    assert images.shape == (20, 3, 32, 32) and labels.shape == (20,)


@pytest.mark.parametrize("kwargs, match", [
    (dict(composer="sideways"), "unknown composer 'sideways'"),
    (dict(n=-5), "n: expected an integer"),
    (dict(per_shape=0), "per_shape"),
    (dict(seed=-1), "seed"),
])
def test_bad_generation_settings_are_one_line_errors(tmp_path, kwargs, match):
    args = {"n": 10, "per_shape": 2, "seed": 0, **kwargs}
    with pytest.raises(SkdcgnError, match=match) as e:
        generate_counterfactuals(fake_cgn(), tmp_path / "bad", progress=False, **args)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "bad").exists()


def test_reader_refuses_escaping_paths_and_wrong_dtypes(tmp_path):
    out = generate_counterfactuals(fake_cgn(), tmp_path / "d", n=10, per_shape=2, seed=0, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"][0]["file"] = "../elsewhere.safetensors"
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SkdcgnError, match="leaves its folder"):
        load_image_dataset(out)
    manifest["shards"][0]["file"] = "bad.safetensors"
    del manifest["shards"][0]["sha256"]  # a hand-made manifest without digests: the content is still checked
    (out / "manifest.json").write_text(json.dumps(manifest))
    from skdcgn.io import save_tensors
    save_tensors(out / "bad.safetensors", {"images": torch.zeros(10, 3, 32, 32), "labels": torch.zeros(10, dtype=torch.long)})
    with pytest.raises(SkdcgnError, match="uint8"):
        load_image_dataset(out)


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["counterfactuals", "--cgn", "double_colored", "--n", "-3", "--out", str(tmp_path / "x")]) == 2
    assert main(["counterfactuals", "--composer", "nope", "--n", "10", "--out", str(tmp_path / "x")]) == 2
    assert main(["classify", "eval", "--classifier", str(tmp_path), "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("skdcgn: error: ") for line in err)


# ---- classifiers ----------------------------------------------------------------------------------

def separable_set(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Class k: a bright 6 × 6 square at one of 10 positions on a noisy dark image (uint8)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(10, (n,), generator=g)
    x = torch.rand(n, 3, 32, 32, generator=g) * 0.4 - 1
    for k in range(10):
        r, c = divmod(k, 5)
        x[labels == k, :, 4 + 14 * r:10 + 14 * r, 2 + 6 * c:8 + 6 * c] = 1.0
    return ((x + 1) * 127.5).round().to(torch.uint8), labels


def test_tiny_training_learns(tmp_path):
    images, labels = separable_set(256)
    config = ClassifierConfig(epochs=3, batch_size=32, seed=0, device="cpu")
    model = train_classifier(images, labels, config, tmp_path, progress=False)
    log = json.loads((tmp_path / "manifest.json").read_text())["log"]
    assert log[-1]["loss"] < log[0]["loss"]
    test_x, test_y = separable_set(200, seed=1)
    assert accuracy(model, test_x, test_y) > 0.3  # chance is 0.1; 24 steps reach 0.46–0.64 over seeds
    assert (tmp_path / "train_log.csv").read_text().count("\n") == 4
    assert isinstance(skdcgn.load_classifier(tmp_path), Classifier)
    again = train_classifier(images, labels, config, tmp_path, progress=False)  # complete: loaded, not retrained
    assert all(torch.equal(v, w) for v, w in zip(model.state_dict().values(), again.state_dict().values()))


def test_monitoring_a_test_set_logs_each_epoch_and_changes_nothing(tmp_path):
    images, labels = separable_set(96)
    test_x, test_y = separable_set(64, seed=1)
    config = ClassifierConfig(epochs=3, batch_size=16, seed=2, device="cpu")
    plain = train_classifier(images, labels, config, progress=False)
    watched = train_classifier(images, labels, config, tmp_path, progress=False, monitor={"test": (test_x, test_y)})
    assert all(torch.equal(v, w) for v, w in zip(plain.state_dict().values(), watched.state_dict().values()))
    log = json.loads((tmp_path / "manifest.json").read_text())["log"]
    assert len(log) == 3 and all(0 <= r["test_accuracy"] <= 1 for r in log)
    assert log[-1]["test_accuracy"] == round(accuracy(watched, test_x, test_y), 6)
    header = (tmp_path / "train_log.csv").read_text().splitlines()[0]
    assert header.endswith(",seconds,test_accuracy")
    with pytest.raises(SkdcgnError, match="labels"):  # refused before training, nothing written
        train_classifier(images, labels, config, tmp_path / "bad", progress=False, monitor={"test": (test_x, test_y[:5])})
    assert not (tmp_path / "bad").exists()


def test_interrupted_training_resumes_bitwise(tmp_path):
    images, labels = separable_set(64)
    config = ClassifierConfig(epochs=2, batch_size=16, seed=5, device="cpu")
    model = train_classifier(images, labels, config, tmp_path / "a", progress=False)

    def stop_after_first(epoch, row):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_classifier(images, labels, config, tmp_path / "b", progress=False, on_epoch_end=stop_after_first)
    assert not (tmp_path / "b" / "manifest.json").exists()
    resumed = train_classifier(images, labels, config, tmp_path / "b", progress=False)
    for (k, v), (_, w) in zip(model.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(v, w), k
    logs = [json.loads((tmp_path / d / "manifest.json").read_text())["log"] for d in "ab"]
    assert [[{**r, "seconds": 0} for r in log] for log in logs] == [[{**r, "seconds": 0} for r in logs[0]]] * 2


@pytest.mark.parametrize("same_test_set", [True, False])
def test_a_resumed_curve_never_mixes_two_test_sets(tmp_path, same_test_set):
    images, labels = separable_set(64)
    old_x, old_y = separable_set(40, seed=1)
    new_x, new_y = (old_x, old_y) if same_test_set else separable_set(40, seed=3)  # e.g. another data build
    config = ClassifierConfig(epochs=2, batch_size=16, seed=5, device="cpu")

    def stop_after_first(epoch, row):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_classifier(images, labels, config, tmp_path, progress=False, on_epoch_end=stop_after_first,
                         monitor={"test": (old_x, old_y)})
    model = train_classifier(images, labels, config, tmp_path, progress=False, monitor={"test": (new_x, new_y)})
    log = json.loads((tmp_path / "manifest.json").read_text())["log"]
    assert log[1]["test_accuracy"] == round(accuracy(model, new_x, new_y), 6)
    assert ("test_accuracy" in log[0]) == same_test_set  # epoch 1 was scored on the old images: dropped
    assert (tmp_path / "train_log.csv").read_text().splitlines()[1].endswith(",") != same_test_set


def test_max_steps_and_max_examples_cap_training(tmp_path):
    images, labels = separable_set(200)
    config = ClassifierConfig(epochs=5, batch_size=16, max_steps=7, max_examples=100, device="cpu")
    train_classifier(images, labels, config, tmp_path, progress=False)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["log"][-1]["steps"] == 7 and len(manifest["log"]) == 1


@pytest.mark.parametrize("arch", ["cgn", "mnist_example"])
def test_classifier_save_load_round_trip(tmp_path, arch):
    torch.manual_seed(0)
    model = Classifier(ClassifierNetConfig(arch=arch)).eval()
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    model.save_pretrained(tmp_path)
    loaded = skdcgn.load_classifier(tmp_path)
    assert isinstance(loaded, Classifier) and not loaded.training
    with torch.no_grad():
        a, b = model(x), loaded(x)
    assert a.shape == (4, 10) and torch.equal(a, b)


def test_bad_classifier_inputs_are_one_line_errors():
    with pytest.raises(SkdcgnError, match="arch"):
        ClassifierConfig(arch="resnet").validate()
    with pytest.raises(SkdcgnError, match="labels"):
        train_classifier(torch.zeros(4, 3, 32, 32), torch.tensor([0, 1, 2, 10]), ClassifierConfig(), progress=False)
    with pytest.raises(SkdcgnError, match="classifier input"):
        Classifier(ClassifierNetConfig())(torch.zeros(2, 1, 28, 28))


# ---- a CGN's palette ------------------------------------------------------------------------------

def test_cgn_palette_reads_each_class_colour():
    from skdcgn.metrics.palette import cgn_palette, palette_test_set

    fg, bg = cgn_palette(fake_cgn(), n_per_class=3)
    k = torch.arange(10).float() / 9  # the fake's channel 0 is the class level, mapped to [0, 1]
    assert torch.allclose(torch.from_numpy(fg), torch.stack([k, torch.ones(10), torch.full((10,), 0.5)], 1), atol=1e-6)
    assert torch.allclose(torch.from_numpy(bg), torch.stack([k, torch.zeros(10), torch.full((10,), 0.5)], 1), atol=1e-6)
    x, y = palette_test_set("double_colored", fake_cgn(), split="test_iid")
    corner = x[:, :, 0, 0].double() / 255  # background, tied to the label in test_iid
    assert (corner - torch.stack([k, torch.zeros(10), torch.full((10,), 0.5)], 1).double()[y]).abs().max() < 0.07
    with pytest.raises(SkdcgnError, match="textures, not colours"):
        palette_test_set("wildlife", fake_cgn())


def test_palette_test_set_checks_the_split_before_sampling_the_cgn():
    from skdcgn.metrics.palette import palette_test_set

    class Unsampleable:  # a bad split must fail before the (costly) CGN is asked for anything
        n_classes = 10

        def sample(self, *args, **kwargs):
            raise AssertionError("sampled the CGN before checking the split")

    with pytest.raises(SkdcgnError, match="unknown split 'val'"):
        palette_test_set("colored", Unsampleable(), split="val")
