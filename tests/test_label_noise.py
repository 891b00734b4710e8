"""Source-free label-noise filtering (confident learning on the masks of a counterfactual set)."""
from __future__ import annotations

import pytest
import torch

from skdcgn.cli import main
from skdcgn.counterfactuals import load_image_dataset
from skdcgn.errors import SkdcgnError
from skdcgn.invariance import ClassifierConfig
from skdcgn.io import read_json, save_tensors, sha256_file, write_manifest
from skdcgn.label_noise import filter_labels, fold_of_groups, group_mean, label_issues

PER_SHAPE, CLASSES, MASKS_PER_CLASS = 2, 4, 10
WRONG = (5, 26)  # masks whose label is another class's than the one they show


def test_confident_joint_flags_only_confident_off_diagonal_reads():
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    probs = torch.tensor([[.9, .1], [.8, .2], [.1, .9],     # the third 0 is confidently read as 1
                          [.2, .8], [.3, .7], [.55, .45]])  # the third 1: 0.55 < t_0, so not claimed by 0
    issue, read, t = label_issues(probs, labels)
    assert t.tolist() == pytest.approx([0.6, (0.8 + 0.7 + 0.45) / 3])
    assert issue.tolist() == [False, False, True, False, False, False]
    assert read.tolist() == [0, 0, 1, 1, 1, 1]
    # a class without samples never claims one
    assert not label_issues(torch.tensor([[0.2, 0.8]]), torch.tensor([0]))[0].any()


def test_folds_are_seeded_and_balanced_and_group_means_average():
    f = fold_of_groups(11, 3, seed=4)
    assert torch.equal(f, fold_of_groups(11, 3, seed=4)) and not torch.equal(f, fold_of_groups(11, 3, seed=5))
    assert sorted(torch.bincount(f).tolist()) == [3, 4, 4]
    m = group_mean(torch.tensor([[1., 0.], [0., 1.], [1., 1.]]), torch.tensor([0, 0, 1]), 2)
    assert m.tolist() == [[.5, .5], [1., 1.]]


def _dataset(folder):
    """Masks of CLASSES classes, each a bright square at its class's place, PER_SHAPE composites per
    mask (random colours), with the masks WRONG labelled as the next class."""
    g = torch.Generator().manual_seed(0)
    n_masks = CLASSES * MASKS_PER_CLASS
    shows = torch.arange(n_masks) % CLASSES
    labels = shows.clone()
    for w in WRONG:
        labels[w] = (shows[w] + 1) % CLASSES
    images = torch.zeros(n_masks * PER_SHAPE, 3, 32, 32, dtype=torch.uint8)
    for i in range(n_masks * PER_SHAPE):
        c = int(shows[i // PER_SHAPE])
        images[i] = (torch.rand(3, 1, 1, generator=g) * 60).to(torch.uint8)  # background
        images[i, :, 4 + 6 * c:10 + 6 * c, 8:24] = 255
    y = labels.repeat_interleave(PER_SHAPE)
    folder.mkdir()
    save_tensors(folder / "shard_00000.safetensors", {"images": images, "labels": y, "y_fg": y, "y_bg": y})
    write_manifest(folder, {"stage": "counterfactuals", "n": len(y), "per_shape": PER_SHAPE},
                   shards=[{"file": "shard_00000.safetensors", "count": len(y),
                            "sha256": sha256_file(folder / "shard_00000.safetensors")}], n_classes=10)
    return folder


def test_filter_drops_the_mislabelled_masks_and_writes_a_dataset(tmp_path):
    data = _dataset(tmp_path / "cf")
    cfg = ClassifierConfig(arch="mnist_example", epochs=2, batch_size=8, seed=1)
    summary = filter_labels(data, tmp_path / "clean", cfg, folds=2, progress=False)
    scores = read_json(tmp_path / "clean" / "manifest.json")["summary"]
    assert summary == scores and summary["masks"] == CLASSES * MASKS_PER_CLASS
    from skdcgn.io import load_tensors
    flagged = load_tensors(tmp_path / "clean" / "scores.safetensors")["issue"].nonzero().flatten().tolist()
    assert set(WRONG) <= set(flagged) and len(flagged) <= len(WRONG) + 2
    x, y = load_image_dataset(tmp_path / "clean", dtype=torch.uint8)
    assert len(y) == summary["kept_images"] == (CLASSES * MASKS_PER_CLASS - len(flagged)) * PER_SHAPE
    assert (tmp_path / "clean" / "flagged.png").stat().st_size > 0
    # finished: the same call returns the record without training; other settings are refused
    mtime = (tmp_path / "clean" / "manifest.json").stat().st_mtime_ns
    assert filter_labels(data, tmp_path / "clean", cfg, folds=2, progress=False) == summary
    assert (tmp_path / "clean" / "manifest.json").stat().st_mtime_ns == mtime
    with pytest.raises(SkdcgnError, match="other settings"):
        filter_labels(data, tmp_path / "clean", cfg, folds=3, progress=False)
    # fold classifiers that learnt nothing would flag most masks: refused, naming their accuracy
    weak = ClassifierConfig(arch="mnist_example", epochs=1, batch_size=8, max_steps=1, lr=1e-6)
    with pytest.raises(SkdcgnError, match=r"masks flagged, more than max_flagged=0.25; .* read only .*% of held-out"):
        filter_labels(data, tmp_path / "weak", weak, folds=2, progress=False)


def test_bad_input_is_one_line(tmp_path, capsys):
    data = _dataset(tmp_path / "cf")
    with pytest.raises(SkdcgnError, match="folds"):
        filter_labels(data, tmp_path / "o", folds=1)
    with pytest.raises(SkdcgnError, match="max_flagged"):
        filter_labels(data, tmp_path / "o", max_flagged=0)
    with pytest.raises(SkdcgnError, match="do not share a label"):
        filter_labels(data, tmp_path / "o", per_shape=3)
    assert main(["label-noise", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nowhere: no such folder" in err[0]
    # a tar set (ImageNet) is not what it filters; said in one line
    tars = tmp_path / "tars"
    tars.mkdir()
    write_manifest(tars, {"stage": "imagenet_counterfactuals"}, shards=[{"file": "shard-000000.tar", "count": 1}])
    with pytest.raises(SkdcgnError, match="a tar set"):
        filter_labels(tars, tmp_path / "o")
    # a malformed command line is one line too, not argparse's usage block
    with pytest.raises(SystemExit) as e:
        main(["label-noise", "--data", str(data), "--out", str(tmp_path / "o"), "--folds", "two"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1
    assert err[0].startswith("skdcgn: error: argument --folds") and err[0].endswith("see `skdcgn label-noise --help`")
