"""Streamed counterfactuals: the stream's batches, classifiers trained on it, the CLI (tiny sizes)."""
from __future__ import annotations

import json

import pytest
import torch

import skdcgn
from skdcgn.cli import main
from skdcgn.counterfactuals import CounterfactualStream, weights_hash
from skdcgn.errors import SkdcgnError
from skdcgn.hashing import sha256_of
from skdcgn.images import to_float, to_uint8
from skdcgn.invariance import ClassifierConfig, train_classifier_on_stream


@pytest.fixture(scope="module")
def teacher():
    return skdcgn.load_cgn("colored")


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(v, w) for v, w in zip(a.state_dict().values(), b.state_dict().values()))


def test_a_batch_is_a_pure_function_of_seed_and_step(teacher):
    stream = CounterfactualStream(teacher, per_shape=4, seed=3, steps_per_epoch=2)
    x, y = stream.batch(5, 10)
    stream.batch(0, 10)  # drawing other steps in between changes nothing: the stream holds no state
    again = stream.batch(5, 10)
    fresh = CounterfactualStream(teacher, per_shape=4, seed=3, steps_per_epoch=2).batch(5, 10)
    for other in (again, fresh):
        assert torch.equal(other[0], x) and torch.equal(other[1], y)
    assert x.shape == (10, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(to_float(to_uint8(x)), x)  # on the uint8 grid of a stored dataset
    assert torch.equal(y[:8].view(2, 4), y[:8].view(2, 4)[:, :1].expand(2, 4)) and y[8] == y[9]  # 4 per mask
    assert not torch.equal(CounterfactualStream(teacher, per_shape=4, seed=4).batch(5, 10)[0], x)


def test_no_composite_is_seen_twice(teacher):
    stream = CounterfactualStream(teacher, per_shape=5, seed=0, steps_per_epoch=3)
    batches = [stream.batch(s, 10) for s in range(9)]  # three "epochs"
    seen = [sha256_of(img) for x, _ in batches for img in x]
    assert len(set(seen)) == 90
    held_out, labels = stream.sample(20, "train-eval")  # composites for scoring: never among the training batches
    assert held_out.dtype == torch.uint8 and labels.shape == (20,)
    assert not {sha256_of(img) for img in to_float(held_out)} & set(seen)


def test_stream_training_is_deterministic_and_resumes_bitwise(teacher, tmp_path):
    config = ClassifierConfig(arch="mnist_example", epochs=2, batch_size=8, seed=1, device="cpu")

    def stream(seed: int = 1) -> CounterfactualStream:
        return CounterfactualStream(teacher, per_shape=4, seed=seed, steps_per_epoch=2, cgn_name="colored")

    model = train_classifier_on_stream(stream(), config, tmp_path / "a", progress=False)
    assert _same_weights(model, train_classifier_on_stream(stream(), config, progress=False))
    assert not _same_weights(model, train_classifier_on_stream(stream(2), config, progress=False))

    def stop_after_first(epoch, row):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_classifier_on_stream(stream(), config, tmp_path / "b", progress=False, on_epoch_end=stop_after_first)
    assert not (tmp_path / "b" / "manifest.json").exists()
    resumed = train_classifier_on_stream(stream(), config, tmp_path / "b", progress=False)
    assert _same_weights(model, resumed)
    logs = [json.loads((tmp_path / d / "manifest.json").read_text())["log"] for d in "ab"]
    assert [{**r, "seconds": 0} for r in logs[0]] == [{**r, "seconds": 0} for r in logs[1]]
    assert [r["steps"] for r in logs[0]] == [2, 4]

    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["config"]["stream"] == stream().identity() and "data" not in manifest["config"]
    assert manifest["config"]["stream"]["cgn_weights"] == weights_hash(teacher) and manifest["cgn"] == "colored"
    assert _same_weights(model, skdcgn.load_classifier(tmp_path / "a"))
    assert _same_weights(model, train_classifier_on_stream(stream(), config, tmp_path / "a", progress=False))  # reused
    with pytest.raises(SkdcgnError, match="other settings"):  # another stream seed is another classifier
        train_classifier_on_stream(stream(2), config, tmp_path / "a", progress=False)


def test_max_steps_caps_a_stream_and_max_examples_is_refused(teacher, tmp_path):
    stream = CounterfactualStream(teacher, per_shape=2, seed=0, steps_per_epoch=2)
    config = ClassifierConfig(arch="mnist_example", epochs=5, batch_size=4, max_steps=3, device="cpu")
    train_classifier_on_stream(stream, config, tmp_path / "a", progress=False)
    log = json.loads((tmp_path / "a" / "manifest.json").read_text())["log"]
    assert [r["steps"] for r in log] == [2, 3]
    with pytest.raises(SkdcgnError, match="max_examples"):
        train_classifier_on_stream(stream, ClassifierConfig(max_examples=10, device="cpu"), tmp_path / "b", progress=False)
    assert not (tmp_path / "b").exists()
    for bad in ({"per_shape": 0}, {"steps_per_epoch": 0}, {"composer": "smudge"}, {"seed": -1}):
        with pytest.raises(SkdcgnError):
            CounterfactualStream(stream.cgn, **bad)


def test_cli_trains_on_a_stream_and_refuses_bad_specs(tmp_path, capsys):
    out = tmp_path / "clf"
    assert main(["classify", "train", "--data", "stream:colored", "--per-shape", "4", "--steps-per-epoch", "2",
                 "--epochs", "1", "--batch-size", "8", "--arch", "mnist_example", "--seed", "7", "--device", "cpu",
                 "--out", str(out)]) == 0
    stage = json.loads((out / "manifest.json").read_text())["config"]
    assert stage["stream"]["per_shape"] == 4 and stage["stream"]["seed"] == 7 and stage["stream"]["steps_per_epoch"] == 2
    capsys.readouterr()
    bad = (["--data", "stream:"], ["--data", "stream:nope"], ["--data", "variant:colored", "--per-shape", "3"],
           ["--data", "stream:colored", "--mix", "variant:colored"], ["--data", "stream:colored", "--per-shape", "0"])
    for argv in bad:
        assert main(["classify", "train", *argv, "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == len(bad) and all(line.startswith("skdcgn: error: ") for line in err)
    assert not (tmp_path / "bad").exists()
