"""The fixed-batch sampler (skdcgn.models.sampling): same draws and composites as `CGN.sample`,
padding, its refusals, the compiled forward, and its use by the counterfactual sets and streams."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from skdcgn.cli import main
from skdcgn.counterfactuals import CounterfactualStream, sample_counterfactuals
from skdcgn.errors import SkdcgnError
from skdcgn.models.cgn import CGN, MECHANISMS
from skdcgn.models.cgn_mnist import teacher_mechanisms
from skdcgn.models.pretrained import PretrainedModel
from skdcgn.models.sampling import CGNSampler, resolve_sampler_mode
from skdcgn.models.students import StudentConfig, make_student

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cgns() -> dict[str, CGN]:
    """A tiny teacher (shared embedding, instance norm) and tiny students (conditional BN): both kinds of mechanism."""
    torch.manual_seed(0)
    teacher = CGN(**teacher_mechanisms(ngf=4)).eval()
    students = CGN(*(make_student(StudentConfig(mechanism=m, widths=(8, 8, 8), extra_blocks=0,
                                                shifted_texture=m != "shape")) for m in MECHANISMS)).eval()
    for p in students.parameters():  # conditional BN starts as plain BN: give the class a say
        p.data.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return {"teacher": teacher, "students": students}


def _classes(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randint(10, (n,), generator=g) for _ in range(3))  # type: ignore[return-value]


@pytest.mark.parametrize("who", ["teacher", "students"])
def test_eager_sampler_is_cgn_sample_bitwise(cgns, who):
    cgn = cgns[who]
    ys = _classes(7)
    g_ref = torch.Generator().manual_seed(5)
    ref = cgn.sample(*ys, generator=g_ref)
    sampler = CGNSampler(cgn, 4, "auto")  # auto on a CPU: eager, at the call's own size
    assert sampler.mode == "eager" and not sampler.fixed_batch
    g = torch.Generator().manual_seed(5)
    out = sampler.sample(*ys, generator=g)
    for name, a, b in zip(ref._fields, ref, out):
        assert torch.equal(a, b), name
    assert torch.equal(g.get_state(), g_ref.get_state())  # the generator is left where CGN.sample leaves it
    assert not torch.equal(out.composite, sampler.sample(*ys, generator=torch.Generator().manual_seed(6)).composite)


@pytest.mark.parametrize("n", [3, 8, 13])
def test_fixed_batch_pads_and_chunks(cgns, n):
    """A fixed batch of 8: 3 rows are padded to 8 and sliced, 13 are 8 + 5 (padded); same composites."""
    cgn = cgns["students"]
    ys = _classes(n, seed=n)
    ref = cgn.sample(*ys, generator=torch.Generator().manual_seed(2))
    sampler = CGNSampler(cgn, 8, "eager", fixed_batch=True)
    out = sampler.sample(*ys, generator=torch.Generator().manual_seed(2))
    for name, a, b in zip(ref._fields, ref, out):
        assert a.shape == b.shape, name
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=name)
    assert len(sampler.sample(torch.zeros(0, dtype=torch.long)).composite) == 0


def test_graph_needs_cuda_and_bad_settings_are_one_line(cgns, capsys, tmp_path):
    cgn = cgns["teacher"]
    if not torch.cuda.is_available():
        with pytest.raises(SkdcgnError, match="needs a CUDA device") as err:
            CGNSampler(cgn, 4, "graph")
        assert "\n" not in str(err.value)
        with pytest.raises(SkdcgnError, match="CUDA"):  # the stream refuses it at its first batch on the CPU
            CounterfactualStream(cgn, per_shape=2, sampler="graph").batch(0, 4)
        assert main(["counterfactuals", "--cgn", "colored", "--out", str(tmp_path / "cf"), "--n", "10",
                     "--device", "cpu", "--sampler", "graph", "--no-progress"]) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1 and not (tmp_path / "cf").exists()
        assert main(["run", "--preset", "tiny", "--variant", "colored", "--run-dir", str(tmp_path / "run"),
                     "--device", "cpu", "--sampler", "graph", "--quiet"]) == 2  # before any stage runs
        assert len(capsys.readouterr().err.strip().splitlines()) == 1 and not (tmp_path / "run").exists()
    assert resolve_sampler_mode("auto", "cpu") == "eager"
    for bad in (dict(mode="fast"), dict(batch_size=0), dict(batch_size=6, per_shape=4)):
        with pytest.raises(SkdcgnError, match="sampler:"):
            CGNSampler(cgn, **{"batch_size": 4, **bad})
    with pytest.raises(SkdcgnError, match="sampler:"):
        CounterfactualStream(cgn, sampler="fast")
    with pytest.raises(SkdcgnError, match="per_shape"):
        CGNSampler(cgn, 4, "eager", per_shape=2).sample(torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("composer,counterfactual", [("standard", True), ("rotate", True), ("standard", False)])
def test_counterfactual_recipe_through_a_sampler_is_bitwise(cgns, composer, counterfactual):
    """The stored sets' and streams' recipe (masks × per_shape texture pairs, then the study variant)
    through an eager sampler: the same draws in the same order, the same bytes."""
    cgn = cgns["teacher"]
    ref = sample_counterfactuals(cgn, 5, 3, composer, counterfactual, torch.Generator().manual_seed(9))
    sampler = CGNSampler(cgn, 12, "eager", per_shape=3)
    out = sample_counterfactuals(cgn, 5, 3, composer, counterfactual, torch.Generator().manual_seed(9), sampler)
    assert out.keys() == ref.keys()
    for k in ref:
        assert torch.equal(out[k], ref[k]), k
    padded = sample_counterfactuals(cgn, 5, 3, composer, counterfactual, torch.Generator().manual_seed(9),
                                    CGNSampler(cgn, 12, "eager", per_shape=3, fixed_batch=True))  # 4 masks + 1 padded
    torch.testing.assert_close(padded["images"], ref["images"], rtol=0, atol=1e-6)


def test_stored_sets_and_streams_build_and_use_their_sampler(cgns, tmp_path, monkeypatch):
    """The plumbing of a non-eager sampler (here: eager at a fixed batch, which pads and chunks as
    "compile" and "graph" do): one per stored set, one per stream batch size; same images (to the
    uint8 level)."""
    import skdcgn.counterfactuals as cf

    made = []

    def fixed(cgn, mode, batch_shapes, per_shape):
        made.append((batch_shapes, per_shape))
        return CGNSampler(cgn, batch_shapes * per_shape, "eager", per_shape=per_shape, fixed_batch=True)

    cgn = cgns["teacher"]
    plain_dir = cf.generate_counterfactuals(cgn, tmp_path / "plain", 30, 3, shard_size=15, batch_shapes=4,
                                            progress=False)
    plain_stream = CounterfactualStream(cgn, per_shape=3, seed=1)
    plain = (plain_stream.batch(2, 10), plain_stream.sample(25, batch_size=10))
    monkeypatch.setattr(cf, "make_sampler", fixed)
    fast_dir = cf.generate_counterfactuals(cgn, tmp_path / "fast", 30, 3, shard_size=15, batch_shapes=4,
                                           progress=False)  # shards of 5 masks: calls of 4 and 1 (padded)
    assert made == [(4, 3)]
    fast_stream = CounterfactualStream(cgn, per_shape=3, seed=1)
    fast = (fast_stream.batch(2, 10), fast_stream.sample(25, batch_size=10))
    assert made == [(4, 3), (4, 3)]  # batch and sample (chunks of 10, 10, 5 composites) share one of ceil(10 / 3) masks
    x, y = cf.load_image_dataset(plain_dir, dtype=torch.uint8)
    x2, y2 = cf.load_image_dataset(fast_dir, dtype=torch.uint8)
    assert torch.equal(y, y2) and (x.int() - x2.int()).abs().max() <= 1
    torch.testing.assert_close(fast[0][0], plain[0][0], rtol=0, atol=1 / 127.5 + 1e-6)
    assert torch.equal(fast[0][1], plain[0][1]) and torch.equal(fast[1][1], plain[1][1])
    assert (fast[1][0].int() - plain[1][0].int()).abs().max() <= 1


@dataclasses.dataclass
class _LinearConfig:
    mechanism: str
    n_classes: int = 10
    latent_dim: int = 6
    shifted_texture: bool = False


class _Linear(PretrainedModel):
    """A one-layer mechanism (8 × 8 px): the smallest forward torch.compile has to build."""
    Config = _LinearConfig

    def __init__(self, config: _LinearConfig) -> None:
        super().__init__(config)
        self.channels = 1 if config.mechanism == "shape" else 3
        self.embed = nn.Embedding(config.n_classes, 4)
        self.fc = nn.Linear(config.latent_dim + 4, self.channels * 64)

    def forward(self, u: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = self.fc(torch.cat([self.as_input(u), self.embed(y)], 1)).view(len(u), self.channels, 8, 8)
        return torch.sigmoid(x) if self.channels == 1 else torch.tanh(x)


def test_compiled_sampler_matches_eager_within_tolerance():
    """torch.compile (Inductor, C++ on the CPU) of a tiny CGN: ~15 s, one compilation for batch 4,
    used at 4, padded at 3, chunked at 7."""
    torch.manual_seed(0)
    cgn = CGN(*(_Linear(_LinearConfig(m, shifted_texture=m != "shape")) for m in MECHANISMS)).eval()
    sampler = CGNSampler(cgn, 4, "compile")
    if sampler.mode != "compile":
        pytest.skip("torch.compile is unavailable here (the sampler fell back to eager)")
    for n in (4, 3, 7):
        ys = _classes(n, seed=n)
        ref = cgn.sample(*ys, generator=torch.Generator().manual_seed(n))
        out = sampler.sample(*ys, generator=torch.Generator().manual_seed(n))
        for name, a, b in zip(ref._fields, ref, out):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=name)


def test_the_benchmark_runs(tmp_path, cgns, capsys):
    spec = importlib.util.spec_from_file_location("sampling_speed", ROOT / "benchmarks" / "sampling_speed.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)  # type: ignore[union-attr]
    with pytest.raises(SystemExit) as done:
        bench.main(["--help"])
    assert done.value.code == 0 and "--batch-sizes" in capsys.readouterr().out
    cgns["students"].save_pretrained(tmp_path / "students")
    record = bench.main(["--device", "cpu", "--batch-sizes", "1", "3", "--modes", "eager", "graph", "--students",
                         str(tmp_path / "students"), "--warmup", "0", "--repeats", "1", "--min-seconds", "0",
                         "--json", str(tmp_path / "s.json"), "--md", str(tmp_path / "s.md")])
    assert [(r["mode"], r["batch"]) for r in record["rows"]] == [("eager", 1), ("eager", 3)]
    assert all(r["composites_per_s"]["teacher"] > 0 and r["composites_per_s"]["students"] > 0 for r in record["rows"])
    assert record["skipped"] and "graph" in record["skipped"][0]  # no CUDA graph on a CPU: a note, not a row
    assert json.loads((tmp_path / "s.json").read_text())["rows"] == record["rows"]
    assert "| eager | 3 |" in (tmp_path / "s.md").read_text()
