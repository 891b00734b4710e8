"""Transfer sets as WebDataset-style tar shards, and streamed (windowed) reading of large sets."""
from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch

from skdcgn.distill.query import TransferSet, query_teacher
from skdcgn.distill.trainer import preset, train_student
from skdcgn.errors import SkdcgnError
from skdcgn.models.cgn_mnist import teacher_mechanisms


@pytest.fixture(scope="module")
def tiny_teacher():
    torch.manual_seed(0)
    return {k: m.eval() for k, m in teacher_mechanisms(ngf=4).items()}


@pytest.mark.parametrize("mechanism", ["shape", "foreground"])
def test_tar_shards_hold_exactly_the_safetensors_content(tiny_teacher, tmp_path, mechanism):
    mech = tiny_teacher[mechanism]
    st = query_teacher(mech, tmp_path / "st", n=50, shard_size=20, seed=4, progress=False)
    tar = query_teacher(mech, tmp_path / "tar", n=50, shard_size=20, seed=4, progress=False, shard_format="tar")
    assert sorted(p.name for p in tar.glob("shard_*")) == ["shard_00000.tar", "shard_00001.tar", "shard_00002.tar"]
    a, b = TransferSet(st), TransferSet(tar)
    assert torch.equal(a.u, b.u) and torch.equal(a.y, b.y) and torch.equal(a.out, b.out)
    # plain tar sees one PNG, one class and one noise vector per sample, keyed by the global index
    with tarfile.open(tar / "shard_00001.tar") as t:
        names = t.getnames()
        assert names[:3] == ["000000020.png", "000000020.cls", "000000020.u.npy"] and len(names) == 60
        assert int(t.extractfile("000000021.cls").read()) == int(a.y[21])
        u = np.load(io.BytesIO(t.extractfile("000000021.u.npy").read()))
        assert torch.equal(torch.from_numpy(u), a.u[21])


def test_tar_shards_are_reproducible_and_resume(tiny_teacher, tmp_path):
    mech = tiny_teacher["background"]
    full = query_teacher(mech, tmp_path / "full", n=60, shard_size=20, seed=2, progress=False, shard_format="tar")
    part = tmp_path / "part"
    query_teacher(mech, part, n=60, shard_size=20, seed=2, progress=False, shard_format="tar", max_shards=1)
    assert not (part / "manifest.json").exists()
    (part / "shard_00001.tar").write_bytes(b"not a tar")  # damaged: rewritten
    query_teacher(mech, part, n=60, shard_size=20, seed=2, progress=False, shard_format="tar")
    for i in range(3):
        assert (full / f"shard_{i:05d}.tar").read_bytes() == (part / f"shard_{i:05d}.tar").read_bytes()
    # another seed is another config: refused in one line, or (asked to) its shards replace these, none kept by mistake
    with pytest.raises(SkdcgnError, match=r"other settings \(seed: 2 there, 3 now\)"):
        query_teacher(mech, part, n=60, shard_size=20, seed=3, progress=False, shard_format="tar")
    other = query_teacher(mech, part, n=60, shard_size=20, seed=3, progress=False, shard_format="tar", overwrite=True)
    assert not torch.equal(TransferSet(other).u, TransferSet(full).u)


def _tar_with(path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("bad", ["foreign_member", "pickled_npy", "missing_part", "wrong_size_image"])
def test_malformed_tar_shards_are_refused_in_one_line(tiny_teacher, tmp_path, bad):
    folder = query_teacher(tiny_teacher["shape"], tmp_path / "t", n=20, shard_size=10, seed=0, progress=False,
                           shard_format="tar")
    with tarfile.open(folder / "shard_00000.tar") as t:
        members = {m.name: t.extractfile(m).read() for m in t.getmembers()}
    if bad == "foreign_member":
        members["../evil.sh"] = b"rm -rf /"
    elif bad == "pickled_npy":
        buf = io.BytesIO()
        np.save(buf, np.array([object()], dtype=object), allow_pickle=True)
        members["000000003.u.npy"] = buf.getvalue()
    elif bad == "missing_part":
        del members["000000004.cls"]
    else:
        from PIL import Image

        png = io.BytesIO()
        Image.new("L", (8, 8)).save(png, format="PNG")
        members["000000005.png"] = png.getvalue()
    _tar_with(folder / "shard_00000.tar", members)
    with pytest.raises(SkdcgnError) as e:
        TransferSet(folder)
    assert "shard_00000.tar" in str(e.value) and "\n" not in str(e.value)


def test_streaming_serves_every_sample_once_per_epoch_and_holds_few_shards(tiny_teacher, tmp_path):
    folder = query_teacher(tiny_teacher["foreground"], tmp_path / "t", n=100, shard_size=10, seed=5, progress=False,
                           shard_format="tar")
    mem, stream = TransferSet(folder), TransferSet(folder, stream_window=2)
    assert not hasattr(stream, "out")  # nothing loaded up front
    seen_u = []
    for step in range(10):  # one epoch of 10 batches of 10
        u, y, target = stream.batch(step, 10, seed=1)
        assert len(stream._cache) <= 4  # at most 2 windows of 2 shards decoded
        seen_u.append(u)
        # the same samples, looked up in the in-memory set, agree exactly
        idx = torch.cat([torch.nonzero((mem.u == row).all(1)).flatten() for row in u])
        mu, my, mt = mem.sample(idx)
        assert torch.equal(mu, u) and torch.equal(my, y) and torch.equal(mt, target)
    all_u = torch.cat(seen_u)
    assert len(torch.unique(all_u, dim=0)) == 100  # each sample exactly once in the epoch
    # a batch is a pure function of the step (a resumed run reads the same), and epochs differ
    again = TransferSet(folder, stream_window=2)
    assert torch.equal(again.batch(7, 10, seed=1)[0], stream.batch(7, 10, seed=1)[0])
    assert not torch.equal(stream.batch(0, 10, seed=1)[0], stream.batch(10, 10, seed=1)[0])


def test_streamed_training_from_tar_resumes_bitwise(tiny_teacher, tmp_path):
    cfg = preset("tiny", device="cpu", shard_format="tar", stream_window=1)
    folder = query_teacher(tiny_teacher["shape"], tmp_path / "transfer", cfg.n_transfer, cfg.shard_size, seed=1,
                           progress=False, shard_format="tar")

    def train(name, stop_after=None):
        return train_student("shape", TransferSet(folder, stream_window=1), tmp_path / name, cfg, progress=False,
                             stop_after=stop_after)

    a = train("a")
    assert train("b", stop_after=3) is None
    b = train("b")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_tar_shards_written_by_two_ranks_equal_one_process(tiny_teacher, tmp_path):
    mech = tiny_teacher["foreground"]
    single = query_teacher(mech, tmp_path / "single", n=50, shard_size=10, seed=6, progress=False, shard_format="tar")
    split = tmp_path / "split"
    query_teacher(mech, split, n=50, shard_size=10, seed=6, progress=False, shard_format="tar", rank=1, world_size=2)
    assert sorted(p.name for p in split.glob("shard_*")) == ["shard_00001.tar", "shard_00003.tar"]
    assert not (split / "manifest.json").exists()  # rank 1 never writes the manifest
    query_teacher(mech, split, n=50, shard_size=10, seed=6, progress=False, shard_format="tar", rank=0, world_size=2)
    assert (split / "manifest.json").is_file()
    for i in range(5):
        assert (single / f"shard_{i:05d}.tar").read_bytes() == (split / f"shard_{i:05d}.tar").read_bytes()
