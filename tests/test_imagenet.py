"""ImageNet track on tiny configs: BigGAN-deep + U2-Net teachers, foreign checkpoints, students,
online and data-parallel distillation (2 gloo processes), exact resume."""
from __future__ import annotations

import io
import json
import os
import socket

import pytest
import torch

pytest.importorskip("pytorch_pretrained_biggan")

from skdcgn.distill.query import OnlineTeacher, TransferSet, query_teacher  # noqa: E402
from skdcgn.distill.trainer import preset, train_student  # noqa: E402
from skdcgn.errors import SkdcgnError  # noqa: E402
from skdcgn.models.cgn import MECHANISMS  # noqa: E402
from skdcgn.models.imagenet import (ImageNetMechanism, U2Net, load_biggan_folder, load_cgn_imagenet,  # noqa: E402
                                    random_cgn, save_biggan_folder, tiny_config, tiny_u2net_config, truncate_normal)
from skdcgn.models.pretrained import load_model  # noqa: E402
from skdcgn.models.students import imagenet_student_config, make_student  # noqa: E402

BIGGAN_DEEP_256_PARAMS = 55_880_833  # pytorch-pretrained-biggan's biggan-deep-256, counted with random weights


def tiny_teacher(seed: int = 0, image_size: int = 32):
    return random_cgn(lambda m: tiny_config(m, image_size=image_size), seed=seed)


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def teacher():
    return tiny_teacher()


def test_teacher_mechanisms_keep_the_interface(teacher):
    g = torch.Generator().manual_seed(0)
    y = torch.tensor([0, 417, 999])
    m, f, b, x = teacher.sample(y, generator=g)
    assert m.shape == (3, 1, 32, 32) and f.shape == b.shape == x.shape == (3, 3, 32, 32)
    assert 1e-4 <= m.min() and m.max() <= 0.9999 and f.abs().max() <= 1 and torch.isfinite(x).all()
    assert teacher.n_classes == 1000 and not teacher.foreground.config.shifted_texture
    m2 = teacher.sample(y, generator=torch.Generator().manual_seed(0))[0]
    assert torch.equal(m, m2)  # seeded
    # u ~ N(0, I) becomes BigGAN's truncated noise: within ±2·truncation, order kept
    u = torch.linspace(-6, 6, 101)
    z = truncate_normal(u, 0.5)
    assert z.abs().max() <= 1.0 and (z.diff() >= 0).all() and abs(float(truncate_normal(torch.zeros(1), 0.5))) < 1e-6


def test_teacher_saves_and_loads_itself(teacher, tmp_path):
    from skdcgn.models.cgn import CGN

    teacher.save_pretrained(tmp_path / "t")  # config.json + model.safetensors per mechanism
    again = CGN.from_pretrained(tmp_path / "t")
    a = teacher.sample(torch.tensor([7, 8]), generator=torch.Generator().manual_seed(4))
    b = again.sample(torch.tensor([7, 8]), generator=torch.Generator().manual_seed(4))
    assert all(torch.equal(s, t) for s, t in zip(a, b))


def test_biggan_folder_round_trip_and_refusals(tmp_path):
    torch.manual_seed(1)
    src = ImageNetMechanism(tiny_config("foreground"))
    save_biggan_folder(src.biggan, src.config, tmp_path / "biggan")
    assert {p.name for p in (tmp_path / "biggan").iterdir()} == {"config.json", "pytorch_model.bin"}
    u2 = U2Net(tiny_u2net_config())
    torch.save(u2.state_dict(), tmp_path / "u2net.pth")
    cgn = load_biggan_folder(tmp_path / "biggan", u2net=tmp_path / "u2net.pth", u2net_config=tiny_u2net_config())
    u, y = torch.randn(2, 16), torch.tensor([5, 998])
    with torch.no_grad():
        for m in MECHANISMS:  # the initialisation: one BigGAN in all three mechanisms
            assert _equal(getattr(cgn, m).biggan.state_dict(), src.biggan.state_dict())
        assert torch.equal(cgn.foreground(u, y), src(u, y))
        assert torch.equal(cgn.shape.u2net(cgn.background(u, y)).clamp(1e-4, 0.9999), cgn.shape(u, y))
    # a file without the spectral-norm v vectors: recomputed from u as the library's converter does
    # (one power-iteration step away from the saved v, hence close, not equal)
    sd = torch.load(tmp_path / "biggan" / "pytorch_model.bin", weights_only=True)
    torch.save({k: v for k, v in sd.items() if not k.endswith("weight_v")}, tmp_path / "biggan" / "pytorch_model.bin")
    again = load_biggan_folder(tmp_path / "biggan", u2net_config=tiny_u2net_config())
    with torch.no_grad():
        assert (again.foreground(u, y) - src(u, y)).abs().max() < 2e-2
    # tampered: a wrong shape, a stray key, code in the pickle, a bad config: one-line errors
    bad = dict(sd)
    bad["embeddings.weight"] = torch.zeros(3, 3)
    torch.save(bad, tmp_path / "biggan" / "pytorch_model.bin")
    with pytest.raises(SkdcgnError, match="embeddings.weight' has shape") as e:
        load_biggan_folder(tmp_path / "biggan", u2net_config=tiny_u2net_config())
    assert "\n" not in str(e.value)
    torch.save({**sd, "evil": torch.zeros(1)}, tmp_path / "biggan" / "pytorch_model.bin")
    with pytest.raises(SkdcgnError, match="unexpected key 'evil'"):
        load_biggan_folder(tmp_path / "biggan", u2net_config=tiny_u2net_config())

    class Boom:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    buf = io.BytesIO()
    torch.save({"x": Boom()}, buf)
    (tmp_path / "biggan" / "pytorch_model.bin").write_bytes(buf.getvalue())
    with pytest.raises(SkdcgnError, match="refused to load"):
        load_biggan_folder(tmp_path / "biggan", u2net_config=tiny_u2net_config())
    torch.save(sd, tmp_path / "biggan" / "pytorch_model.bin")
    cfg = json.loads((tmp_path / "biggan" / "config.json").read_text())
    (tmp_path / "biggan" / "config.json").write_text(json.dumps({**cfg, "layers": [[True, 16, 3]]}))
    with pytest.raises(SkdcgnError, match="layers"):
        load_biggan_folder(tmp_path / "biggan", u2net_config=tiny_u2net_config())


def test_cgn_imagenet_state_dict_round_trip_and_refusals(teacher, tmp_path):
    torch.manual_seed(2)
    gt = ImageNetMechanism(tiny_config("foreground"))
    sd = {f"biggan_GT.{k}": v for k, v in gt.biggan.state_dict().items()}
    for m, prefix in (("shape", "f_shape"), ("foreground", "f_text"), ("background", "f_bg")):
        sd.update({f"{prefix}.{k}": v for k, v in getattr(teacher, m).biggan.state_dict().items()})
    sd.update({f"u2net.{k}": v for k, v in teacher.shape.u2net.state_dict().items()})
    torch.save(sd, tmp_path / "cgn.pth")
    save_biggan_folder(gt.biggan, gt.config, tmp_path / "arch")  # its config.json gives the tiny architecture
    cgn, gt2 = load_cgn_imagenet(tmp_path / "cgn.pth", biggan_config=tmp_path / "arch" / "config.json",
                                 u2net_config=tiny_u2net_config(), return_gt=True)
    y = torch.tensor([1, 2, 3])
    a = teacher.sample(y, generator=torch.Generator().manual_seed(3))
    b = cgn.sample(y, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(s, t) for s, t in zip(a, b))
    assert _equal(gt2.biggan.state_dict(), gt.biggan.state_dict())
    del sd["u2net.outconv.bias"]
    torch.save(sd, tmp_path / "cgn.pth")
    with pytest.raises(SkdcgnError, match=r"\[u2net\]: missing key 'outconv.bias'"):
        load_cgn_imagenet(tmp_path / "cgn.pth", biggan_config=tmp_path / "arch" / "config.json", u2net_config=tiny_u2net_config())
    torch.save({"f_shape.x": torch.zeros(1), "discriminator.w": torch.zeros(1)}, tmp_path / "cgn.pth")
    with pytest.raises(SkdcgnError, match="unexpected key 'discriminator.w'"):
        load_cgn_imagenet(tmp_path / "cgn.pth")


def test_imagenet_students_fit_one_fifteenth_of_biggan_deep_256(tmp_path):
    from pytorch_pretrained_biggan import BigGAN, BigGANConfig

    from skdcgn.models.imagenet.biggan import DEEP_256

    full = BigGAN(BigGANConfig(output_dim=256, layers=[list(x) for x in DEEP_256]))
    assert sum(p.numel() for p in full.parameters()) == BIGGAN_DEEP_256_PARAMS
    del full
    for size in (128, 256):
        for m in MECHANISMS:
            s = make_student(imagenet_student_config(m, size)).eval()
            assert s.get_num_params() <= BIGGAN_DEEP_256_PARAMS / 15, (size, m)
    s.save_pretrained(tmp_path / "s")
    t = load_model(tmp_path / "s")
    u, y = torch.randn(2, 128), torch.tensor([0, 999])
    with torch.no_grad():
        out = t(u, y)
    assert out.shape == (2, 3, 256, 256) and torch.equal(out, s(u, y))


def _tiny(**overrides):
    return preset("imagenet-tiny", device="cpu", **overrides)


def test_distill_steps_stored_and_online_and_resume(teacher, tmp_path):
    cfg = _tiny()
    folder = query_teacher(teacher.shape, tmp_path / "transfer", cfg.n_transfer, cfg.shard_size, seed=1,
                           batch_size=cfg.query_batch_size, progress=False)
    ts = TransferSet(folder)
    assert ts.y.max() < 1000 and ts.out.shape[1:] == (1, 32, 32)
    a = train_student("shape", ts, tmp_path / "a", cfg, progress=False)
    assert train_student("shape", ts, tmp_path / "b", cfg, progress=False, stop_after=3) is None  # "killed"
    b = train_student("shape", ts, tmp_path / "b", cfg, progress=False)
    assert _equal(a.state_dict(), b.state_dict())
    # online: the same loop, the teacher queried per batch; also resumes exactly
    online = OnlineTeacher(teacher.foreground)
    c = train_student("foreground", online, tmp_path / "c", _tiny(online=True), progress=False)
    train_student("foreground", online, tmp_path / "d", _tiny(online=True), progress=False, stop_after=2)
    d = train_student("foreground", online, tmp_path / "d", _tiny(online=True), progress=False)
    assert _equal(c.state_dict(), d.state_dict())
    assert c.config.image_size == 32 and not c.config.shifted_texture


def _worker(rank: int, world: int, port: int, root: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from pathlib import Path

    import torch.distributed as dist

    from skdcgn.distill.distributed import init_distributed

    root = Path(root)
    init_distributed(torch.device("cpu"))
    teacher = tiny_teacher()
    cfg = _tiny()
    folder = query_teacher(teacher.shape, root / "transfer", cfg.n_transfer, cfg.shard_size, seed=1,
                           batch_size=cfg.query_batch_size, progress=False, rank=rank, world_size=world)
    ts = TransferSet(folder)
    full = train_student("shape", ts, root / "full", cfg, progress=False)
    assert train_student("shape", ts, root / "resumed", cfg, progress=False, stop_after=3) is None
    resumed = train_student("shape", ts, root / "resumed", cfg, progress=False)
    online = train_student("background", OnlineTeacher(teacher.background), root / "online", _tiny(online=True), progress=False)
    torch.save({"full": full.state_dict(), "resumed": resumed.state_dict(), "online": online.state_dict()},
               root / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_two_gloo_processes_agree_and_resume_exactly(tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for k in ("full", "resumed", "online"):
        assert _equal(r0[k], r1[k]), k  # every rank ends with the same student
    assert _equal(r0["full"], r0["resumed"])  # resumed from rank 0's checkpoint: exactly the same run
    # the shards written by two ranks are those one process writes
    single = query_teacher(tiny_teacher().shape, tmp_path / "single", 64, 16, seed=1, batch_size=16, progress=False)
    for i in range(4):
        assert (single / f"shard_{i:05d}.safetensors").read_bytes() == (tmp_path / "transfer" / f"shard_{i:05d}.safetensors").read_bytes()
    assert (tmp_path / "full" / "manifest.json").is_file() and (tmp_path / "full" / "model.safetensors").is_file()
