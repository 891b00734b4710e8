"""The fixed-batch sampler (skdcgn.models.sampling): same draws and composites as `CGN.sample`,
padding, its refusals, the compiled forward, and its use by the counterfactual sets and streams."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from skdcgn.errors import SkdcgnError
from skdcgn.models.cgn import CGN, MECHANISMS
from skdcgn.models.cgn_mnist import teacher_mechanisms
from skdcgn.models.pretrained import PretrainedModel
from skdcgn.models.sampling import CGNSampler, resolve_sampler_mode
from skdcgn.models.students import StudentConfig, make_student


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


def test_graph_needs_cuda_and_bad_settings_are_one_line(cgns):
    cgn = cgns["teacher"]
    if not torch.cuda.is_available():
        with pytest.raises(SkdcgnError, match="needs a CUDA device") as err:
            CGNSampler(cgn, 4, "graph")
        assert "\n" not in str(err.value)
    assert resolve_sampler_mode("auto", "cpu") == "eager"
    for bad in (dict(mode="fast"), dict(batch_size=0), dict(batch_size=6, per_shape=4)):
        with pytest.raises(SkdcgnError, match="sampler:"):
            CGNSampler(cgn, **{"batch_size": 4, **bad})
    with pytest.raises(SkdcgnError, match="per_shape"):
        CGNSampler(cgn, 4, "eager", per_shape=2).sample(torch.zeros(2, dtype=torch.long))


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
