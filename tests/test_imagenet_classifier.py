"""The CGN invariant classifier on ImageNet, on tiny configs: torchvision-compatible ResNet-50 keys,
backbone loading, training from real images plus stored or streamed counterfactuals (one process
and 2 gloo processes), exact resume, and the IN-9 / cue-conflict commands on fake trees."""
from __future__ import annotations

import io
import json
import math
import os
import socket
from pathlib import Path

import pytest
import torch
from PIL import Image

from skdcgn.cli import main
from skdcgn.errors import SkdcgnError
from skdcgn.imagenet_classifier import (EnsembleTrainConfig, ImageFolderImages, StoredCounterfactuals,
                                        StreamedCounterfactuals, TensorCounterfactuals, random_resized_crop,
                                        train_ensemble)
from skdcgn.io import write_bytes
from skdcgn.models.cgn import CGN
from skdcgn.models.imagenet.resnet import (InvariantEnsemble, InvariantEnsembleConfig, ResNet, load_torchvision_resnet,
                                           resnet50_config, tiny_resnet_config)
from skdcgn.models.students import imagenet_student_config, make_student


# ---- torchvision compatibility ---------------------------------------------------------------------

def torchvision_resnet50_keys() -> dict[str, tuple[int, ...]]:
    """torchvision's resnet50() state_dict names and shapes, written out from its definition
    (torchvision/models/resnet.py: Bottleneck with expansion 4, blocks [3, 4, 6, 3], widths 64-512,
    stride on conv2, downsample on the first block of each stage), independently of skdcgn's module."""
    keys: dict[str, tuple[int, ...]] = {}

    def bn(name: str, c: int) -> None:
        keys.update({f"{name}.weight": (c,), f"{name}.bias": (c,), f"{name}.running_mean": (c,),
                     f"{name}.running_var": (c,), f"{name}.num_batches_tracked": ()})

    keys["conv1.weight"] = (64, 3, 7, 7)
    bn("bn1", 64)
    inplanes = 64
    for stage, (n, planes) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512)), start=1):
        for j in range(n):
            p = f"layer{stage}.{j}"
            keys[f"{p}.conv1.weight"] = (planes, inplanes, 1, 1)
            bn(f"{p}.bn1", planes)
            keys[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            bn(f"{p}.bn2", planes)
            keys[f"{p}.conv3.weight"] = (planes * 4, planes, 1, 1)
            bn(f"{p}.bn3", planes * 4)
            if j == 0:
                keys[f"{p}.downsample.0.weight"] = (planes * 4, inplanes, 1, 1)
                bn(f"{p}.downsample.1", planes * 4)
            inplanes = planes * 4
    keys["fc.weight"] = (1000, 2048)
    keys["fc.bias"] = (1000,)
    return keys


def test_resnet50_has_torchvision_keys_shapes_and_parameter_count():
    expected = torchvision_resnet50_keys()
    with torch.device("meta"):
        model = ResNet(resnet50_config())
    found = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert list(found) == list(expected)  # same names, same order
    assert found == expected
    n_params = sum(math.prod(s) for k, s in expected.items() if not k.endswith(("running_mean", "running_var",
                                                                                "num_batches_tracked")))
    assert n_params == model.get_num_params() == 25_557_032  # torchvision's documented count for resnet50


def test_backbone_loads_legacy_and_prefixed_files_and_refuses_bad_ones(tmp_path):
    torch.manual_seed(1)
    src = ResNet(tiny_resnet_config(n_classes=1000)).eval()
    sd = {k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}  # as torchvision's old files
    legacy = tmp_path / "legacy.pth"
    torch.save(sd, legacy, _use_new_zipfile_serialization=False)
    prefixed = tmp_path / "module.pth"
    torch.save({f"module.{k}": v for k, v in sd.items()}, prefixed)
    x = torch.randn(2, 3, 32, 32)
    for path in (legacy, prefixed):
        ens = InvariantEnsemble(InvariantEnsembleConfig.from_resnet(tiny_resnet_config(), 10)).eval()
        ens.load_backbone(path)
        assert torch.equal(ens.backbone.features(x), src.features(x))  # the fc is dropped, features equal
    bad = dict(sd)
    bad["layer1.0.conv1.weight"] = torch.zeros(3, 3, 1, 1)
    torch.save(bad, tmp_path / "shape.pth")
    with pytest.raises(SkdcgnError, match="layer1.0.conv1.weight' has shape"):
        load_torchvision_resnet(tmp_path / "shape.pth", ResNet(tiny_resnet_config(0)))
    torch.save({**sd, "layer5.weight": torch.zeros(1)}, tmp_path / "extra.pth")
    with pytest.raises(SkdcgnError, match="unexpected key 'layer5.weight'"):
        load_torchvision_resnet(tmp_path / "extra.pth", ResNet(tiny_resnet_config(0)))

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    buf = io.BytesIO()
    torch.save({"conv1.weight": Evil()}, buf)
    write_bytes(tmp_path / "evil.pth", buf.getvalue())
    with pytest.raises(SkdcgnError, match="refused to load"):
        load_torchvision_resnet(tmp_path / "evil.pth", ResNet(tiny_resnet_config(0)))


def test_readouts_of_the_ensemble():
    from skdcgn.models.imagenet.resnet import HeadLogits

    ens = InvariantEnsemble(InvariantEnsembleConfig.from_resnet(tiny_resnet_config(), 7)).eval()
    x = torch.randn(3, 3, 32, 32)
    out = ens(x)
    assert torch.allclose(out.mean, (out.shape + out.texture + out.background) / 3)
    assert torch.allclose(HeadLogits(ens, "shape_texture")(x), (out.shape + out.texture) / 2)
    assert torch.equal(HeadLogits(ens, "background")(x), out.background)
    with pytest.raises(SkdcgnError, match="head: 'foreground'"):
        HeadLogits(ens, "foreground")


def test_random_resized_crop_is_seeded_and_sized():
    img = torch.randint(0, 256, (3, 40, 56), dtype=torch.uint8)
    a = random_resized_crop(img, 32, torch.Generator().manual_seed(3))
    b = random_resized_crop(img, 32, torch.Generator().manual_seed(3))
    c = random_resized_crop(img, 32, torch.Generator().manual_seed(4))
    assert a.shape == (3, 32, 32) and a.dtype == torch.uint8 and torch.equal(a, b) and not torch.equal(a, c)
    whole = random_resized_crop(img, 40, torch.Generator().manual_seed(0), scale=(1.0, 1.0), ratio=(1.4, 1.4), flip=False)
    assert whole.shape == (3, 40, 40)


# ---- training ---------------------------------------------------------------------------------------

def real_tree(root: Path, classes: int = 3, per_class: int = 4) -> Path:
    g = torch.Generator().manual_seed(0)
    for c in range(classes):
        (root / f"n{c:08d}").mkdir(parents=True)
        for i in range(per_class):
            arr = torch.randint(0, 256, (36 + 2 * i, 40, 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(arr).save(root / f"n{c:08d}" / f"img{i}.png")
    return root


def tiny_students(seed: int = 0) -> CGN:
    torch.manual_seed(seed)
    return CGN(*(make_student(imagenet_student_config(m, 32, widths=(8, 8, 8), embed_dim=8))
                 for m in ("shape", "foreground", "background"))).eval()


def tiny(**kw) -> EnsembleTrainConfig:
    values = dict(arch="tiny", image_size=32, steps=4, batch_size=4, cf_ratio=0.5, lr=0.05, checkpoint_interval=2,
                  log_interval=1, device="cpu")
    values.update(kw)
    return EnsembleTrainConfig(**values)


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_trains_from_stored_and_streamed_counterfactuals_and_resumes_exactly(tmp_path):
    real = ImageFolderImages(real_tree(tmp_path / "real"))
    assert real.n_classes == 3 and len(real) == 12
    g = torch.Generator().manual_seed(5)
    stored = TensorCounterfactuals(torch.randint(0, 256, (6, 3, 24, 24), dtype=torch.uint8, generator=g),
                                   torch.randint(0, 1000, (6, 3), generator=g))
    cfg = tiny(real_loss="heads", freeze_bn=False)
    a = train_ensemble(real, StoredCounterfactuals(stored, 32), cfg, tmp_path / "a", progress=False)
    assert train_ensemble(real, StoredCounterfactuals(stored, 32), cfg, tmp_path / "b", progress=False, stop_after=2) is None
    assert not (tmp_path / "b" / "manifest.json").exists()
    b = train_ensemble(real, StoredCounterfactuals(stored, 32), cfg, tmp_path / "b", progress=False)
    assert _equal(a.state_dict(), b.state_dict())
    assert not _equal(a.state_dict(), InvariantEnsemble(cfg.model_config()).state_dict())  # it did train
    log = [json.loads(line) for line in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(r["loss"] > 0 for r in log)
    # streamed from (tiny, random) students, the authors' loss and frozen batch norm; resumes exactly too
    students = tiny_students()
    c = train_ensemble(real, StreamedCounterfactuals(students, 32), tiny(), tmp_path / "c", progress=False)
    train_ensemble(real, StreamedCounterfactuals(students, 32), tiny(), tmp_path / "d", progress=False, stop_after=2)
    d = train_ensemble(real, StreamedCounterfactuals(students, 32), tiny(), tmp_path / "d", progress=False)
    assert _equal(c.state_dict(), d.state_dict())
    # decoding in DataLoader workers changes nothing: every draw is seeded by the sample's index
    e = train_ensemble(real, StreamedCounterfactuals(students, 32), tiny(workers=2), None, progress=False)
    assert _equal(c.state_dict(), e.state_dict())
    bn = {k: v for k, v in c.state_dict().items() if "running_mean" in k}
    assert all(torch.equal(v, torch.zeros_like(v)) for v in bn.values())  # frozen: statistics untouched
    # a rerun with other settings is refused in one line; the finished run is skipped
    with pytest.raises(SkdcgnError, match="other settings .*lr"):
        train_ensemble(real, StreamedCounterfactuals(students, 32), tiny(lr=0.01), tmp_path / "c", progress=False)
    again = train_ensemble(real, StreamedCounterfactuals(students, 32), tiny(), tmp_path / "c", progress=False)
    assert _equal(again.state_dict(), c.state_dict())


def test_bad_counterfactuals_and_settings_are_one_line_errors(tmp_path):
    real = ImageFolderImages(real_tree(tmp_path / "real", classes=2, per_class=2))
    wrong = TensorCounterfactuals(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.full((4, 3), 5))
    with pytest.raises(SkdcgnError, match=r"counterfactual classes must lie in \[0, 3\)"):
        train_ensemble(real, StoredCounterfactuals(wrong, 32), tiny(n_classes=3), progress=False)
    with pytest.raises(SkdcgnError, match="no source"):
        train_ensemble(real, None, tiny(), progress=False)
    with pytest.raises(SkdcgnError, match="labels int64"):
        TensorCounterfactuals(torch.zeros(4, 3, 8, 8), torch.zeros(4, dtype=torch.long))
    with pytest.raises(SkdcgnError, match="bf16"):
        tiny(bf16=True).validate()
    (tmp_path / "real" / "n00000000" / "notes.txt").write_text("x")
    with pytest.raises(SkdcgnError, match="notes.txt: not an image"):
        ImageFolderImages(tmp_path / "real")


def _worker(rank: int, world: int, port: int, root: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from skdcgn.distill.distributed import init_distributed

    root_ = Path(root)
    init_distributed(torch.device("cpu"))
    real = ImageFolderImages(root_ / "real")
    students = tiny_students()
    full = train_ensemble(real, StreamedCounterfactuals(students, 32), tiny(), root_ / "full", progress=False)
    assert train_ensemble(real, StreamedCounterfactuals(students, 32), tiny(), root_ / "resumed", progress=False,
                          stop_after=2) is None
    resumed = train_ensemble(real, StreamedCounterfactuals(students, 32), tiny(), root_ / "resumed", progress=False)
    torch.save({"full": full.state_dict(), "resumed": resumed.state_dict()}, root_ / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_two_gloo_processes_agree_and_resume_exactly(tmp_path):
    import torch.multiprocessing as mp

    real_tree(tmp_path / "real")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert _equal(r0["full"], r1["full"]) and _equal(r0["resumed"], r1["resumed"])
    assert _equal(r0["full"], r0["resumed"])
    manifest = json.loads((tmp_path / "full" / "manifest.json").read_text())
    assert manifest["config"]["world_size"] == 2 and manifest["steps"] == 4


# ---- the CLI: training and evaluation -------------------------------------------------------------

def test_cli_trains_then_scores_in9_and_cue_conflict(tmp_path, capsys):
    from test_ood import cue_root, in9_root

    real = real_tree(tmp_path / "real")
    cgn = tiny_students()
    cgn.save_pretrained(tmp_path / "cgn")
    out = tmp_path / "clf"
    assert main(["imagenet", "train-classifier", "--real", str(real), "--counterfactuals", f"stream:{tmp_path / 'cgn'}",
                 "--out", str(out), "--arch", "tiny", "--image-size", "32", "--steps", "2", "--batch-size", "2",
                 "--device", "cpu", "--quiet"]) == 0
    assert (out / "manifest.json").is_file()
    # IN-9 and cue-conflict on the tests' fake trees (8 x 8 images: no resize, no crop)
    in9 = in9_root(tmp_path)
    mapping = tmp_path / "in_to_in9.json"
    mapping.write_text(json.dumps({str(i): i % 10 - 1 for i in range(1000)}))
    capsys.readouterr()
    assert main(["imagenet", "in9", "--classifier", str(out), "--root", str(in9), "--mapping", str(mapping),
                 "--heads", "shape", "shape_texture", "mean", "--resize", "32", "--crop", "32", "--device", "cpu", "--quiet",
                 "--out", str(tmp_path / "in9.json")]) == 0
    text = capsys.readouterr().out
    assert "this classifier, shape" in text and "94.2" in text and "83.4" in text and "80.1" in text
    res = json.loads((tmp_path / "in9.json").read_text())
    assert set(res["heads"]) == {"shape", "shape_texture", "mean"}
    assert res["heads"]["mean"]["variants"]["original"]["images"] == 10
    assert res["paper"]["bg_gap"] == 3.3
    cue = cue_root(tmp_path)
    cats = {c: [i * 16 + k for i in range(3)] for k, c in enumerate(sorted(p.name for p in cue.iterdir()))}
    (tmp_path / "sixteen.json").write_text(json.dumps(cats))
    assert main(["imagenet", "cue-conflict", "--classifier", str(out), "--root", str(cue), "--mapping",
                 str(tmp_path / "sixteen.json"), "--resize", "32", "--crop", "32", "--device", "cpu", "--quiet",
                 "--out", str(tmp_path / "cue.json")]) == 0
    text = capsys.readouterr().out
    assert "54.8" in text and "16.7" in text and "22.9" in text
    res = json.loads((tmp_path / "cue.json").read_text())
    assert set(res["heads"]) == {"shape", "texture", "background", "mean"}
    assert all(r["images"] == 9 for r in res["heads"].values())
    # a missing root is one line, exit 2
    assert main(["imagenet", "in9", "--classifier", str(out), "--root", str(tmp_path / "nope"), "--mapping",
                 str(mapping), "--quiet"]) == 2
    assert "IN-9 folder not found" in capsys.readouterr().err


def test_throughput_benchmark_runs_at_tiny_size(tmp_path):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "imagenet_classifier_throughput.py"
    spec = importlib.util.spec_from_file_location("imagenet_classifier_throughput", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "t.json"
    assert bench.main(["--tiny", "--device", "cpu", "--steps", "2", "--warmup", "1", "--workers", "0",
                       "--sources", "stored", "students", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    runs = {r["source"]: r for r in record["runs"]}
    assert list(runs) == ["real", "stored", "students"]  # the real-only run is always measured first
    assert runs["real"]["counterfactuals_per_step"] == 0 and runs["students"]["counterfactuals_per_step"] == 8
    for r in runs.values():
        assert r["images_per_s"] > 0
        assert r["ratio_to_real"] == pytest.approx(r["images_per_s"] / runs["real"]["images_per_s"], rel=1e-3)
    assert "| students | 16 |" in out.with_suffix(".md").read_text()


class OneByOne:
    """An iterable (no __len__/__getitem__), as a shard reader is: the same samples in the same order."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __iter__(self):
        while True:
            yield from zip(self.images, self.labels)


def test_iterable_counterfactuals_backbone_and_class_index(tmp_path):
    real = ImageFolderImages(real_tree(tmp_path / "real", classes=2, per_class=2),
                             class_index={"n00000000": 7, "n00000001": 3})
    assert sorted({label for _, label in real.samples}) == [3, 7]
    with pytest.raises(SkdcgnError, match="folder 'n00000001' has no class index"):
        ImageFolderImages(tmp_path / "real", class_index={"n00000000": 0})
    g = torch.Generator().manual_seed(2)
    it = OneByOne(torch.rand(5, 3, 40, 40, generator=g) * 2 - 1, torch.randint(0, 10, (5, 3), generator=g))
    torch.manual_seed(3)
    torch.save(ResNet(tiny_resnet_config()).state_dict(), tmp_path / "resnet.pth")
    cfg = tiny(n_classes=10)
    a = train_ensemble(real, StoredCounterfactuals(it, 32), cfg, tmp_path / "a", backbone=tmp_path / "resnet.pth",
                       progress=False)
    train_ensemble(real, StoredCounterfactuals(it, 32), cfg, tmp_path / "b", backbone=tmp_path / "resnet.pth",
                   progress=False, stop_after=2)
    b = train_ensemble(real, StoredCounterfactuals(it, 32), cfg, tmp_path / "b", backbone=tmp_path / "resnet.pth",
                       progress=False)  # the iterable restarts and skips what steps 1-2 used
    assert _equal(a.state_dict(), b.state_dict())
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["config"]["backbone"] is not None
    c = train_ensemble(real, StoredCounterfactuals(it, 32), cfg, None, progress=False)  # no backbone: another start
    assert not _equal(a.state_dict(), c.state_dict())
