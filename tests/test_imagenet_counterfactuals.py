"""Counterfactual ImageNet tar sets on tiny configs: a 32-px BigGAN-deep with random weights,
a few dozen images. Written and read back, reproducible to the byte, written by 2 gloo processes
(torchrun's environment) equal to one process, killed and resumed; bad input is one line."""
from __future__ import annotations

import io
import json
import os
import socket
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("pytorch_pretrained_biggan")

from skdcgn.cli import main  # noqa: E402
from skdcgn.data.shards import iter_shard_samples, read_shard, shard_paths  # noqa: E402
from skdcgn.errors import SkdcgnError  # noqa: E402
from skdcgn.imagenet_counterfactuals import _shard_batches, _truncation, parse_classes, write_counterfactual_tars  # noqa: E402
from skdcgn.models.imagenet import random_cgn, tiny_config  # noqa: E402



@pytest.fixture(scope="module")
def cgn():
    return random_cgn(lambda m: tiny_config(m, image_size=32), seed=0)


def _files(folder: Path) -> dict[str, bytes]:
    """Every file's bytes; the manifest without the one field that may differ (the seconds it took)."""
    out = {}
    for p in sorted(folder.iterdir()):
        if p.name == "manifest.json":
            record = json.loads(p.read_text())
            record.pop("seconds")
            out[p.name] = json.dumps(record, sort_keys=True).encode()
        elif p.is_file():
            out[p.name] = p.read_bytes()
    return out


def test_write_read_back_labels_and_bytes(cgn, tmp_path):
    kw = dict(n=22, per_shape=4, seed=3, classes="3,7 11-12", truncation=0.8, image_format="png", shard_size=9,
              batch_size=5, progress=False)
    out = write_counterfactual_tars(cgn, tmp_path / "a", **kw)
    assert [p.name for p in shard_paths(out)] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["count"] for s in manifest["shards"]] == [8, 8, 6]  # shard size rounded down to whole masks
    assert manifest["config"]["truncation"] == {"shape": 0.8, "foreground": 0.8, "background": 0.8}
    assert all(m.config.truncation == 0.5 for m in cgn.mechanisms().values())  # the CGN is left as it was

    samples = list(iter_shard_samples(out))
    images = torch.stack([x for x, _ in samples])
    labels = torch.stack([y for _, y in samples])
    assert images.shape == (22, 3, 32, 32) and images.dtype == torch.uint8 and labels.dtype == torch.int64
    assert set(labels.flatten().tolist()) <= {3, 7, 11, 12}
    groups = labels[:20, 0].reshape(5, 4)
    assert (groups == groups[:, :1]).all()  # one shape class per mask and its 4 counterfactuals
    assert (labels[:, 1] != labels[:, 0]).any() and (labels[:, 2] != labels[:, 1]).any()  # independent classes
    # PNG is lossless: shard 0 holds exactly the composites the recipe computes, in key order
    classes = torch.tensor([3, 7, 11, 12])
    with torch.no_grad(), _truncation(cgn, 0.8):
        expected = list(_shard_batches(cgn, 3, 0, 8, 4, classes, True, 5))
    assert torch.equal(images[:8], torch.cat([x for x, _ in expected]))
    assert torch.equal(labels[:8], torch.cat([y for _, y in expected]))
    keys = [key for p in shard_paths(out) for key, _, _ in read_shard(p)]
    assert keys == [f"{i:09d}" for i in range(22)]  # globally unique, zero-padded, none lost

    # same settings, another folder: the same bytes; a rerun in place finds the set complete
    again = write_counterfactual_tars(cgn, tmp_path / "b", **kw)
    assert _files(again) == _files(out)
    stamp = (out / "shard-000001.tar").stat().st_mtime_ns
    write_counterfactual_tars(cgn, out, **kw)
    assert (out / "shard-000001.tar").stat().st_mtime_ns == stamp
    # another truncation gives other images; other settings in the same folder are refused, then replaced
    other = write_counterfactual_tars(cgn, tmp_path / "c", **{**kw, "truncation": 0.3, "n": 8})
    assert not torch.equal(torch.stack([x for x, _ in iter_shard_samples(other)]), images[:8])
    with pytest.raises(SkdcgnError, match=r"other settings \(n: 22 there, 8 now\)"):
        write_counterfactual_tars(cgn, out, **{**kw, "truncation": 0.3, "n": 8})
    write_counterfactual_tars(cgn, out, **{**kw, "truncation": 0.3, "n": 8}, overwrite=True)
    assert _files(out) == _files(other)


def test_damaged_shard_is_refused_by_the_reader_and_rewritten(cgn, tmp_path):
    out = write_counterfactual_tars(cgn, tmp_path / "s", n=12, per_shape=3, seed=1, shard_size=6, progress=False)
    reference = _files(out)
    shard = out / "shard-000001.tar"
    with tarfile.open(shard) as tar:
        at = tar.getmembers()[0].offset_data + 400  # inside the first JPEG's compressed data
    data = bytearray(shard.read_bytes())
    data[at] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(SkdcgnError, match="shard-000001.tar: sha256"):
        list(iter_shard_samples(out))
    with pytest.raises(SkdcgnError, match="sample '000000006': unreadable image"):  # unverified: the decoder finds it
        list(iter_shard_samples(out, verify=False))
    write_counterfactual_tars(cgn, out, n=12, per_shape=3, seed=1, shard_size=6, progress=False)
    assert _files(out) == reference


# ---- plain WebDataset tars, and what the reader refuses ------------------------------------------

def _jpeg(value: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (value, 0, 255 - value)).save(buf, format="JPEG")
    return buf.getvalue()


def _tar(path: Path, members: list[tuple[str, bytes]], link: str | None = None) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if link is not None:
            info = tarfile.TarInfo(link)
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
    return path


def test_plain_webdataset_tars_read_split_and_shuffled(tmp_path):
    for s in range(4):  # class = 10·shard + sample; an unknown extension (.txt) is ignored
        _tar(tmp_path / f"part-{s}.tar", [m for j in range(3) for m in
                                          ((f"img/{s}_{j}.jpg", _jpeg(40 * j)), (f"img/{s}_{j}.cls", b"%d" % (10 * s + j)),
                                           (f"img/{s}_{j}.txt", b"a caption"))])
    everything = list(iter_shard_samples(tmp_path))
    assert [int(y[0]) for _, y in everything] == [10 * s + j for s in range(4) for j in range(3)]
    assert all(torch.equal(y, y[:1].repeat(3)) and x.shape == (3, 6, 8) for x, y in everything)
    parts = [[int(y[0]) for _, y in iter_shard_samples(tmp_path, rank=r, world_size=2, seed=5)] for r in (0, 1)]
    assert sorted(parts[0] + parts[1]) == sorted(int(y[0]) for _, y in everything)  # disjoint, complete
    assert {v // 10 for v in parts[0]}.isdisjoint({v // 10 for v in parts[1]})  # whole shards per rank
    assert parts == [[int(y[0]) for _, y in iter_shard_samples(tmp_path, rank=r, world_size=2, seed=5)] for r in (0, 1)]
    shuffled = [int(y[0]) for _, y in iter_shard_samples(tmp_path, seed=6)]
    assert shuffled != [int(y[0]) for _, y in everything] and sorted(shuffled) == sorted(int(y[0]) for _, y in everything)


LABELS = json.dumps({"shape": 1, "texture": 2, "background": 3}).encode()


@pytest.mark.parametrize("members, link, message", [
    ([("a.jpg", b"not a jpeg"), ("a.cls", b"1")], None, "sample 'a': unreadable image"),
    ([("a.jpg", _jpeg(1))], None, "sample 'a': no labels"),
    ([("a.cls", b"1")], None, "sample 'a' has 0 images"),
    ([("a.jpg", _jpeg(1)), ("a.cls", b"2"), ("a.json", LABELS)], None, "contradicts the shape class 1"),
    ([("a.jpg", _jpeg(1)), ("a.json", b'{"shape": 1, "texture": -2, "background": 3}')], None, "texture -2"),
    ([("a.jpg", _jpeg(1)), ("a.cls", b"1"), ("b.jpg", _jpeg(1)), ("b.cls", b"1"), ("a.png", b"")], None, "'a' appears twice"),
    ([("../a.jpg", _jpeg(1)), ("../a.cls", b"1")], None, "'..' path"),
    ([("a.jpg", _jpeg(1)), ("a.cls", b"1")], "b.jpg", "not a regular file"),
    ([("README", b"hello")], None, "has no extension"),
])
def test_reader_refuses_malformed_samples_in_one_line(tmp_path, members, link, message):
    path = _tar(tmp_path / "bad.tar", members, link)
    with pytest.raises(SkdcgnError, match=message) as e:
        list(iter_shard_samples(path))
    assert "\n" not in str(e.value) and "bad.tar" in str(e.value)


def test_not_a_tar_and_bad_arguments_are_one_line_errors(cgn, tmp_path):
    (tmp_path / "x.tar").write_bytes(b"garbage" * 100)
    with pytest.raises(SkdcgnError, match="not a readable tar shard"):
        list(iter_shard_samples(tmp_path / "x.tar"))
    with pytest.raises(SkdcgnError, match="rank"):
        list(iter_shard_samples(tmp_path / "x.tar", rank=2, world_size=2))
    assert parse_classes(" 5,1-3\n# comment\n9 ", 10) == [1, 2, 3, 5, 9]
    (tmp_path / "classes.txt").write_text("0-2 # three\n7\n")
    assert parse_classes(str(tmp_path / "classes.txt"), 10) == [0, 1, 2, 7]
    for bad, message in (("10", r"outside \[0, 10\)"), ("3-1", "empty"), ("a", "not a class index"), ("", "no classes")):
        with pytest.raises(SkdcgnError, match=message):
            parse_classes(bad, 10)
    for kw, message in ((dict(truncation=1.5), r"truncation: expected a number in \(0, 1\]"),
                        (dict(image_format="gif"), "image_format"), (dict(jpeg_quality=0), "jpeg_quality"),
                        (dict(n=0), "n: expected")):
        with pytest.raises(SkdcgnError, match=message):
            write_counterfactual_tars(cgn, tmp_path / "never", **{"n": 6, "progress": False, **kw})
    assert not (tmp_path / "never").exists()
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "shard-000000.tar").write_bytes(b"someone else's")
    with pytest.raises(SkdcgnError, match=r"shard-\*.tar files without a progress.json"):
        write_counterfactual_tars(cgn, tmp_path / "foreign", n=3, per_shape=3, progress=False)
    assert (tmp_path / "foreign" / "shard-000000.tar").read_bytes() == b"someone else's"
    write_counterfactual_tars(cgn, tmp_path / "foreign", n=3, per_shape=3, progress=False, overwrite=True)
    assert len(list(iter_shard_samples(tmp_path / "foreign"))) == 3


def test_cli_bad_input_is_one_line_and_students_have_no_truncation(tmp_path, capsys):
    from skdcgn.models.cgn import CGN
    from skdcgn.models.students import StudentConfig, make_student

    students = CGN(*(make_student(StudentConfig(mechanism=m, n_classes=10, latent_dim=8, embed_dim=4, widths=(8, 8, 8),
                                                shifted_texture=False))
                     for m in ("shape", "foreground", "background")))
    students.save_pretrained(tmp_path / "students")
    base = ["counterfactuals", "--cgn", str(tmp_path / "students"), "--format", "tar", "--n", "6", "--device", "cpu",
            "--out", str(tmp_path / "out"), "--no-progress"]
    for extra, message in ((["--truncation", "0.4"], "shape mechanism (ShapeStudent) has none to set"),
                           (["--classes", "10"], "class 10 is outside [0, 10)"),
                           (["--composer", "rotate"], "standard composition only")):
        capsys.readouterr()
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("skdcgn: error:") and message in err[0], err
    assert main(["counterfactuals", "--cgn", "colored", "--n", "6", "--truncation", "0.4", "--out", str(tmp_path / "o")]) == 2
    assert "--truncation applies to --format tar only" in capsys.readouterr().err
    assert main(["counterfactuals", "--cgn", "colored", "--format", "tar", "--n", "6", "--out", str(tmp_path / "o")]) == 2
    assert "shifts its texture" in capsys.readouterr().err
    with pytest.MonkeyPatch.context() as mp:  # one safetensors set is written by one process
        mp.setenv("WORLD_SIZE", "2")
        mp.setenv("RANK", "1")
        assert main(["counterfactuals", "--cgn", "colored", "--n", "6", "--out", str(tmp_path / "o")]) == 2
    assert "write --format tar only" in capsys.readouterr().err
    assert main(base + ["--classes", "2-4"]) == 0  # students write a set
    assert {int(c) for _, y in iter_shard_samples(tmp_path / "out") for c in y} <= {2, 3, 4}


# ---- two processes with torchrun's environment, killed and resumed -------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(argv: list[str], env: dict[str, str]) -> None:
    os.environ.update(env)
    sys.exit(main(argv))


def _launch(argv: list[str], world_size: int = 2) -> list:
    """What `torchrun --nproc-per-node 2 -m skdcgn ...` starts: one process per rank, its
    RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set (gloo on the CPU), running the
    CLI's `main`. Forked from this process, which has imported everything already (a fresh
    interpreter takes 10 s or more to import torch and BigGAN on a busy 2-core machine)."""
    import multiprocessing

    port, fork = _free_port(), multiprocessing.get_context("fork")
    procs = [fork.Process(target=_rank, args=(argv, {"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world_size),
                                                     "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}))
             for r in range(world_size)]
    for p in procs:
        p.start()
    return procs


def test_two_gloo_processes_killed_and_resumed_write_the_one_process_set(cgn, tmp_path, capfd):
    cgn.save_pretrained(tmp_path / "cgn")
    argv = lambda out: ["counterfactuals", "--cgn", str(tmp_path / "cgn"), "--format", "tar", "--n-images", "40",  # noqa: E731
                        "--per-shape", "2", "--shard-size", "4", "--seed", "9", "--classes", "0-99",
                        "--truncation", "0.6", "--batch-size", "2", "--device", "cpu", "--out", str(out), "--no-progress"]
    assert main(argv(tmp_path / "single")) == 0  # the reference: one process, uninterrupted
    out = tmp_path / "two"
    procs = _launch(argv(out))
    end = time.monotonic() + 120
    while len(list(out.glob("shard-*.tar"))) < 2 and all(p.is_alive() for p in procs) and time.monotonic() < end:
        time.sleep(0.005)
    for p in procs:  # SIGKILL both ranks mid-way, as a scheduler would
        p.kill()
    for p in procs:
        p.join(60)
    written = sorted(p.name for p in out.glob("shard-*.tar"))
    assert 2 <= len(written) < 10 and not (out / "manifest.json").exists(), written
    reference = _files(tmp_path / "single")
    for name in written:  # what a killed run left is whole, or absent
        assert (out / name).read_bytes() == reference[name]

    capfd.readouterr()
    procs = _launch(argv(out))  # the same command again resumes
    for p in procs:
        p.join(300)
    assert [p.exitcode for p in procs] == [0, 0]
    assert capfd.readouterr().out.count("wrote ") == 1  # rank 0 reports
    assert _files(out) == reference  # every shard, the preview and the manifest: the one-process set
    assert not list(out.glob(".*.tmp"))
    keys = [key for p in shard_paths(out) for key, _, _ in read_shard(p)]
    assert keys == [f"{i:09d}" for i in range(40)]  # no sample lost, none duplicated


def test_a_tar_set_trains_the_ensemble_epoch_after_epoch(cgn, tmp_path):
    """`ShardEpochs` reads every sample once per epoch, each epoch in its own seeded order, and
    `skdcgn imagenet train-classifier --counterfactuals shards:<folder>` trains on it."""
    import itertools

    from skdcgn.data.shards import ShardEpochs
    from test_imagenet_classifier import real_tree

    out = write_counterfactual_tars(cgn, tmp_path / "cf", n=8, per_shape=2, seed=1, shard_size=4, batch_size=4,
                                    image_format="png", progress=False)
    epochs = ShardEpochs(out, seed=5)
    first = list(itertools.islice(epochs, 20))
    key = lambda item: (item[0].numpy().tobytes(), tuple(item[1].tolist()))  # noqa: E731
    assert sorted(map(key, first[:8])) == sorted(map(key, first[8:16])) == sorted(map(key, iter_shard_samples(out)))
    assert list(map(key, first[:8])) != list(map(key, first[8:16]))  # another order each epoch
    assert list(map(key, itertools.islice(ShardEpochs(out, seed=5), 20))) == list(map(key, first))  # repeatable
    assert epochs.identity() == ShardEpochs(out, seed=5).identity() != ShardEpochs(out, seed=6).identity()
    # a damaged shard is named before training starts, not when an epoch reaches it
    import shutil
    shutil.copytree(out, tmp_path / "bad")
    with open(tmp_path / "bad" / "shard-000001.tar", "r+b") as f:
        f.seek(700)
        f.write(b"oops")
    with pytest.raises(SkdcgnError, match="shard-000001.tar: sha256"):
        ShardEpochs(tmp_path / "bad")
    real = real_tree(tmp_path / "real")
    assert main(["imagenet", "train-classifier", "--real", str(real), "--counterfactuals", f"shards:{out}",
                 "--out", str(tmp_path / "clf"), "--arch", "tiny", "--image-size", "32", "--steps", "3",
                 "--batch-size", "2", "--device", "cpu", "--quiet"]) == 0
    assert (tmp_path / "clf" / "manifest.json").is_file()
