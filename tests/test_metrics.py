"""The metrics are right: FID, KID, MACs, params, the shipped domain network, mask health, bench."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from torch import nn

from skdcgn.errors import SkdcgnError
from skdcgn.metrics import fid as fidlib
from skdcgn.metrics.cost import cost_table, count_macs, count_params
from skdcgn.metrics.fid import feature_stats, fid, frechet_distance, intra_fid, kid, mmd2_unbiased



def _spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


# ---- FID ----------------------------------------------------------------------------------------

def test_fid_of_a_set_against_itself_is_zero():
    x = np.random.default_rng(0).normal(size=(500, 32)).astype(np.float32)
    assert fid(x, x) == pytest.approx(0.0, abs=1e-6)


def test_fid_grows_monotonically_with_noise():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2000, 16))
    noise = rng.normal(size=x.shape)
    values = [fid(x, x + s * noise) for s in (0.0, 0.1, 0.3, 1.0, 3.0)]
    assert values[0] == pytest.approx(0.0, abs=1e-6)
    assert all(a < b for a, b in zip(values, values[1:])), values


def test_frechet_distance_matches_closed_forms():
    rng = np.random.default_rng(2)
    # diagonal covariances: ‖Δμ‖² + Σ (√s1 − √s2)²
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    s1, s2 = rng.uniform(0.1, 3, 5), rng.uniform(0.1, 3, 5)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(s1) - np.sqrt(s2)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)
    # general (non-commuting) covariances against scipy's sqrtm
    linalg = pytest.importorskip("scipy.linalg")
    a, b = _spd(rng, 12), _spd(rng, 12)
    ref = np.trace(a + b - 2 * linalg.sqrtm(a @ b).real)
    assert frechet_distance(np.zeros(12), a, np.zeros(12), b) == pytest.approx(ref, rel=1e-8)
    # identical Gaussians
    assert frechet_distance(mu1, np.diag(s1), mu1, np.diag(s1)) == pytest.approx(0.0, abs=1e-10)


def test_fid_of_samples_approaches_the_gaussian_closed_form():
    rng = np.random.default_rng(3)
    mu = np.array([1.0, -0.5, 0.0, 2.0])
    scale = np.array([1.0, 2.0, 0.5, 1.5])
    x = rng.normal(size=(40_000, 4))
    y = mu + scale * rng.normal(size=(40_000, 4))
    expected = (mu ** 2).sum() + ((1 - scale) ** 2).sum()
    assert fid(x, y) == pytest.approx(expected, rel=0.03)


def test_feature_stats_are_float64_and_round_trip(tmp_path):
    x = np.random.default_rng(4).normal(size=(100, 6)).astype(np.float32)
    st = feature_stats(x)
    assert st.mu.dtype == np.float64 and st.sigma.shape == (6, 6) and st.n == 100
    np.testing.assert_allclose(st.sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-10)
    st.save(tmp_path / "stats.safetensors")
    back = fidlib.FeatureStats.load(tmp_path / "stats.safetensors")
    assert back.n == 100 and fid(st, back) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(SkdcgnError):
        feature_stats(np.ones((1, 3)))
    with pytest.raises(SkdcgnError):
        fid(np.full((5, 3), np.nan), x[:, :3])


def test_intra_fid_per_class():
    rng = np.random.default_rng(5)
    a, la = rng.normal(size=(600, 4)), np.arange(600) % 3
    b = a + np.where((np.arange(600) % 3 == 2)[:, None], 2.0, 0.0)  # only class 2 shifted
    r = intra_fid(a, la, b, la)
    assert r["per_class"][0] == pytest.approx(0.0, abs=1e-6) and r["per_class"][1] == pytest.approx(0.0, abs=1e-6)
    assert r["per_class"][2] == pytest.approx(16.0, rel=1e-6)  # ‖(2, 2, 2, 2)‖²
    assert r["mean"] == pytest.approx(16.0 / 3, rel=1e-6)
    r = intra_fid(a[:601], la, b[:4], la[:4], classes=[0, 1, 2, 9])
    assert r["per_class"][9] is None


# ---- KID ----------------------------------------------------------------------------------------

def test_mmd2_estimator_is_unbiased_on_a_known_case():
    """Same distribution: E[MMD²_u] = 0, while the biased V-statistic is clearly positive."""
    rng = np.random.default_rng(6)
    unbiased, biased = [], []
    for _ in range(400):
        x, y = rng.normal(size=(20, 4)), rng.normal(size=(20, 4))
        unbiased.append(mmd2_unbiased(x, y))
        k = lambda a, b: (a @ b.T / 4 + 1) ** 3  # noqa: E731
        biased.append(k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean())
    se = np.std(unbiased) / np.sqrt(len(unbiased))
    assert abs(np.mean(unbiased)) < 4 * se
    assert np.mean(biased) > 10 * se


def test_kid_near_zero_for_same_distribution_and_positive_for_a_shift():
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(1000, 8)), rng.normal(size=(1000, 8))
    same, same_std = kid(x, y, subsets=50, subset_size=200)
    shifted, shifted_std = kid(x, y + 0.5, subsets=50, subset_size=200)
    assert abs(same) < 2 * same_std + 1e-3
    assert shifted > 5 * shifted_std and shifted > 10 * abs(same)
    assert kid(x, y, subsets=5, subset_size=100, seed=3) == kid(x, y, subsets=5, subset_size=100, seed=3)


# ---- cost ---------------------------------------------------------------------------------------

def test_macs_of_a_conv_layer_match_the_closed_form():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    x = torch.randn(2, 3, 16, 16)
    assert count_macs(lambda: conv(x)) == 2 * 8 * 3 * 3 * 3 * 16 * 16  # N·Cout·Cin·k²·H·W
    strided = nn.Conv2d(4, 6, 5, stride=2, padding=2, bias=False)
    assert count_macs(lambda: strided(torch.randn(1, 4, 20, 20))) == 6 * 4 * 25 * 10 * 10
    lin = nn.Linear(42, 4096)
    assert count_macs(lambda: lin(torch.randn(3, 42))) == 3 * 42 * 4096


def test_params_counting():
    conv = nn.Conv2d(3, 8, 3)
    assert count_params(conv) == 8 * 3 * 9 + 8
    shared = nn.Linear(5, 5)
    assert count_params(nn.Sequential(shared, shared)) == 30  # a shared layer counts once


def _random_teacher():
    from skdcgn.models.cgn import CGN
    from skdcgn.models.cgn_mnist import teacher_mechanisms

    torch.manual_seed(0)
    return CGN(**teacher_mechanisms()).eval()


def test_cost_table_side_by_side():
    t, s = _random_teacher(), _random_teacher()
    table = cost_table({"teacher": t, "student": s}, "cpu", batch_sizes=(1, 4), warmup=1, repeats=1, min_seconds=0.0)
    rows = {(r["unit"], r["model"]): r for r in table["rows"]}
    assert rows[("composite", "teacher")]["params"] == 659_992  # the released CGN-MNIST's count
    # Linear 42 → 4096, conv 64 → 32 at 16², conv 32 → 1 at 32² (the shape mechanism)
    assert rows[("shape", "teacher")]["macs_per_image"] == 42 * 4096 + 64 * 32 * 9 * 16 ** 2 + 32 * 1 * 9 * 32 ** 2
    assert rows[("composite", "teacher")]["macs_per_image"] == sum(
        rows[(u, "teacher")]["macs_per_image"] for u in ("shape", "foreground", "background"))
    for q in table["ratios"]:
        assert q["params"] == 1.0 and q["macs"] == 1.0 and all(v > 0 for v in q["speed"].values())
    assert all(v is None for r in table["rows"] for v in r["peak_memory_bytes"].values())  # CPU: n/a


# ---- the shipped domain network -----------------------------------------------------------------

def test_shipped_domain_net_checksum_and_tamper_refusal(tmp_path):
    from skdcgn.metrics.domain import ASSET_DIR, load_domain_extractor, load_domain_net, verify_domain_net

    verify_domain_net()  # the shipped files match the recorded sha256
    ext = load_domain_extractor()
    feats = ext(torch.zeros(2, 3, 32, 32))
    assert feats.shape == (2, ext.dim) and torch.isfinite(feats).all()

    copy = tmp_path / "domain_net"
    shutil.copytree(ASSET_DIR, copy)
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-1] ^= 0x01  # flip one bit of the last weight
    (copy / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(SkdcgnError) as e:
        load_domain_net(copy)
    assert "sha256" in str(e.value) and "\n" not in str(e.value)


def test_inception_extra_missing_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(fidlib.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SkdcgnError) as e:
        fidlib.load_inception_extractor()
    assert "skdcgn[fid]" in str(e.value) and "\n" not in str(e.value)


# ---- mask health and the report -----------------------------------------------------------------

def test_mask_health_flags_broken_classes():
    from skdcgn.metrics.masks import mask_health_from_masks

    n = 10
    labels = torch.arange(3).repeat_interleave(n)
    good = torch.zeros(n, 1, 32, 32)
    good[:, :, 8:24, 12:20] = 1.0
    masks = torch.cat([good, torch.zeros(n, 1, 32, 32), torch.full((n, 1, 32, 32), 0.5)])
    predict = lambda x: torch.where(x.mean((1, 2, 3)) > -0.9, labels, torch.full_like(labels, 7))  # noqa: E731
    h = mask_health_from_masks(masks, labels, predict, n_classes=3)
    rows = {r["class"]: r for r in h["per_class"]}
    assert rows[0]["flags"] == [] and rows[0]["binariness"] == pytest.approx(1.0)
    assert rows[0]["area"] == pytest.approx(16 * 8 / 1024)
    assert set(h["flagged"][1]) == {"empty", "wrong_digit"}
    assert rows[2]["binariness"] == pytest.approx(0.0) and "blurry" in h["flagged"][2]


def test_bench_results_merge_runs_and_render(tmp_path):
    from skdcgn.results.records import hardware_info
    from skdcgn.results.render import write_results

    t = _random_teacher()
    cost = cost_table({"teacher": t}, "cpu", batch_sizes=(1, 2), units=("shape", "composite"),
                      warmup=0, repeats=1, min_seconds=0.0)
    for key in ("quick-cpu", "full-cuda"):
        rec = {"key": key, "preset": key.split("-")[0], "command": f"skdcgn bench {key}", "date": "today",
               "hardware": hardware_info(torch.device("cpu")), "teacher": "double_colored", "students": None,
               "cost": cost, "sections": {"extra": {"title": "Hooked", "markdown": "| a |\n|---|", "data": {}}}}
        write_results(tmp_path / "results.md", rec)
    md = (tmp_path / "results.md").read_text()
    assert "## Run `full-cuda`" in md and "## Run `quick-cpu`" in md and "### Hooked" in md
    assert "659,992" in md and "skdcgn bench quick-cpu" in md
    assert "](images/" not in md  # no figure recorded, no link
    write_results(tmp_path / "results.md", {**rec, "figure": "images/bench-full-cuda.png"})
    assert "![cost against quality, full-cuda](images/bench-full-cuda.png)" in (tmp_path / "results.md").read_text()
    import json
    assert set(json.loads((tmp_path / "results.json").read_text())["runs"]) == {"quick-cpu", "full-cuda"}


def test_imagenet_bench_table_renders_a_record_read_back_from_json(tmp_path):
    from skdcgn.results.render import render_imagenet
    from skdcgn.io import read_json, write_json

    rows = [{"unit": "composite", "model": m, "params": p, "macs_per_image": 1e9 * p, "images_per_s": {1: s}}
            for m, p, s in (("teacher", 10, 0.5), ("student", 1, 20.0))]
    record = {"cost": {"batch_sizes": [1], "rows": rows,
                       "ratios": [{"unit": "composite", "params": 10.0, "macs": 10.0, "speed": {1: 40.0}}]}}
    write_json(tmp_path / "r.json", record)
    text = render_imagenet(read_json(tmp_path / "r.json"))  # keys are strings now
    assert text == render_imagenet(record) and "| composite | 10.0× | 10× | 40.0× |" in text
