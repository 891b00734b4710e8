"""The data package: validated MNIST, and the three variants' defining properties."""
from __future__ import annotations

import gzip
import hashlib
import shutil
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from skdcgn import cli
from skdcgn.data import SPLITS, VARIANTS, build_variant, load_mnist, load_variant, load_variant_uint8
from skdcgn.data import mnist as mnist_mod
from skdcgn.data import variants as var_mod
from skdcgn.errors import SkdcgnError

N_SPLIT = {"train": 50_000, "test": 10_000, "test_iid": 10_000}


def nearest(colors: torch.Tensor, palette: np.ndarray) -> torch.Tensor:
    """Index of the nearest palette colour for each row of `colors` (both in [0, 1])."""
    return torch.cdist(colors.double(), torch.from_numpy(palette).double()).argmin(1)


# ---- MNIST --------------------------------------------------------------------------------------

def test_shipped_mnist_has_official_md5():
    for name, md5 in mnist_mod.OFFICIAL_MD5.items():
        data = gzip.decompress((mnist_mod.ASSET_DIR / f"{name}.gz").read_bytes())
        assert hashlib.md5(data).hexdigest() == md5, name


def test_load_mnist_shapes_and_types():
    for split, n in (("train", 60_000), ("test", 10_000)):
        images, labels = load_mnist(split)
        assert images.shape == (n, 28, 28) and images.dtype == np.uint8
        assert labels.shape == (n,) and labels.dtype == np.int64
        assert set(np.unique(labels)) == set(range(10))
        assert images.max() == 255 and images.min() == 0
    with pytest.raises(SkdcgnError, match="train, test"):
        load_mnist("valid")


def _idx_images(count: int, magic: int = 2051, rows: int = 28, payload: int | None = None) -> bytes:
    header = struct.pack(">4I", magic, count, rows, 28)
    return header + bytes(count * rows * 28 if payload is None else payload)


def _one_line_error(mnist_dir, needle: str, filename: str) -> str:
    with pytest.raises(SkdcgnError) as info:
        load_mnist("train", mnist_dir)
    msg = str(info.value)
    assert "\n" not in msg and filename in msg and needle in msg, msg
    return msg


CORRUPT = {  # case → (content of a plain IDX images file, or None for missing; expected words)
    "missing": (lambda: None, "not found"),
    "truncated": (lambda: _idx_images(60_000, payload=1000), "truncated"),
    "magic": (lambda: _idx_images(60_000, magic=2049), "magic"),
    "count": (lambda: _idx_images(59_999), "shape"),
    "rows": (lambda: _idx_images(60_000, rows=27), "shape"),
    "short": (lambda: b"\x00\x00", "too short"),
    "md5": (lambda: _idx_images(60_000), "md5"),  # well-formed header, wrong content
}


@pytest.mark.parametrize("case", CORRUPT)
def test_corrupt_image_file_gives_one_line_error(tmp_path, case):
    make, needle = CORRUPT[case]
    shutil.copy(mnist_mod.ASSET_DIR / "train-labels-idx1-ubyte.gz", tmp_path)
    content = make()
    if content is not None:
        (tmp_path / "train-images-idx3-ubyte").write_bytes(content)  # plain IDX is accepted too
    _one_line_error(tmp_path, needle, "train-images-idx3-ubyte")


def test_corrupt_gzip_and_labels(tmp_path, monkeypatch):
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"this is not gzip")
    shutil.copy(mnist_mod.ASSET_DIR / "train-labels-idx1-ubyte.gz", tmp_path)
    _one_line_error(tmp_path, "gzip", "train-images-idx3-ubyte.gz")
    # A truncated gzip stream is caught too.
    good = (mnist_mod.ASSET_DIR / "train-images-idx3-ubyte.gz").read_bytes()
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(good[: len(good) // 2])
    _one_line_error(tmp_path, "gzip", "train-images-idx3-ubyte.gz")
    # Bad labels file; the directory also comes from the environment variable.
    shutil.copy(mnist_mod.ASSET_DIR / "train-images-idx3-ubyte.gz", tmp_path)
    (tmp_path / "train-labels-idx1-ubyte.gz").unlink()
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(struct.pack(">2I", 2051, 60_000) + bytes(60_000))
    monkeypatch.setenv("SKDCGN_MNIST_DIR", str(tmp_path))
    _one_line_error(None, "magic", "train-labels-idx1-ubyte")


# ---- variants: API ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", VARIANTS)
def test_shapes_ranges_dtypes_and_labels(name):
    mnist_labels = torch.from_numpy(load_mnist("train")[1])
    for split in SPLITS:
        x, y = load_variant(name, split)
        n = N_SPLIT[split]
        assert x.shape == (n, 3, 32, 32) and x.dtype == torch.float32
        assert y.shape == (n,) and y.dtype == torch.int64
        lo_v, hi_v = x.aminmax()
        assert lo_v >= -1 and hi_v <= 1 and lo_v < -0.5 and hi_v > 0.5
        lo = 0 if split == "train" else 50_000
        assert torch.equal(y, mnist_labels[lo:lo + n])
        # Quantised consistently: every value is k / 127.5 - 1 for an integer k.
        k = (x[:500] + 1) * 127.5
        assert torch.allclose(k, k.round(), atol=1e-3)
        del x


def test_bad_names_list_valid_ones():
    with pytest.raises(SkdcgnError, match="colored, double_colored, wildlife"):
        load_variant("rainbow", "train")
    with pytest.raises(SkdcgnError, match="train, test, test_iid"):
        load_variant("colored", "validation")
    with pytest.raises(SkdcgnError, match="seed"):
        load_variant("colored", "test", seed=-1)


def test_deterministic_and_seed_dependent_without_global_rng():
    torch_state, np_state = torch.random.get_rng_state(), np.random.get_state()
    a, ya = build_variant("double_colored", "test", seed=3)
    b, yb = build_variant("double_colored", "test", seed=3)
    c, _ = build_variant("double_colored", "test", seed=4)
    assert a.dtype == torch.uint8 and torch.equal(a, b) and torch.equal(ya, yb)
    assert not torch.equal(a, c)
    assert torch.equal(torch.random.get_rng_state(), torch_state)
    assert np.random.get_state()[1].tolist() == np_state[1].tolist()
    # Fresh and loaded (cached) sets are bitwise identical.
    x, _ = load_variant("double_colored", "test", seed=3)
    assert torch.equal(x, var_mod.to_float(a))


def test_cache_hit_is_identical_and_skips_the_build(monkeypatch):
    x1, y1 = load_variant("wildlife", "test_iid", seed=1)
    path = var_mod.variant_cache_path("wildlife", "test_iid", seed=1)
    assert path.is_file() and path.parent.name == "variants"

    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt despite a cache file")

    monkeypatch.setattr(var_mod, "build_variant", no_build)
    x2, y2 = load_variant("wildlife", "test_iid", seed=1)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    monkeypatch.undo()
    # A damaged cache file is rebuilt to the same content.
    path.write_bytes(b"garbage")
    x3, _ = load_variant("wildlife", "test_iid", seed=1)
    assert torch.equal(x1, x3)


# ---- variants: defining properties --------------------------------------------------------------

def _two_colours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Background (corner) colour, digit colour in [0, 1], and whether the digit is visible,
    of uint8 images; checks that each image has exactly these two colours."""
    bg = x[:, :, 0, 0]
    corners = torch.stack([x[:, :, 0, -1], x[:, :, -1, 0], x[:, :, -1, -1]])
    assert torch.equal(corners, bg.expand_as(corners)), "background is not one flat colour"
    digit = (x != bg[:, :, None, None]).any(1).flatten(1)  # [N, 1024]
    visible = digit.any(1)
    first = digit.to(torch.uint8).argmax(1)  # one digit pixel per image
    fg = x.flatten(2)[torch.arange(len(x)), :, first]
    fg = torch.where(visible[:, None], fg, bg)
    # Binarised and untextured: every pixel is the background or the digit colour.
    assert ((x == bg[:, :, None, None]).all(1) | (x == fg[:, :, None, None]).all(1)).all()
    return bg.double() / 255, fg.double() / 255, visible


def test_double_colored_train_colours_follow_the_label():
    x, y = load_variant_uint8("double_colored", "train")
    bg, fg, visible = _two_colours(x)
    assert visible.all()
    tol = 6 * var_mod.DOUBLE_JITTER_STD + 1 / 255  # 6 sigma over 150k draws, plus quantisation
    assert (bg - torch.from_numpy(var_mod.DOUBLE_BG_RGB).double()[y]).abs().max() < tol
    assert (fg - torch.from_numpy(var_mod.DOUBLE_FG_RGB).double()[y]).abs().max() < tol
    # Jittered, not constant, per image.
    for c in (bg, fg):
        assert 0.005 < c[y == 5].std(0).max() < 0.02
    # The digit colour of class k is the background colour of class (k - 6) mod 10.
    assert torch.equal(torch.from_numpy(var_mod.DOUBLE_FG_RGB),
                       torch.from_numpy(var_mod.DOUBLE_BG_RGB)[(torch.arange(10) - 6) % 10])


def test_digits_are_resized_as_the_authors_loaders_do():
    # double_colored (and wildlife): F.interpolate's default, nearest; colored: PIL's NEAREST.
    images = load_mnist("train")[0][:300]
    x, _ = load_variant_uint8("double_colored", "train")
    bg, fg, _ = _two_colours(x[:300])
    is_digit = (x[:300] == (fg * 255).round().to(torch.uint8)[:, :, None, None]).all(1)
    digits = torch.from_numpy(images.astype(np.float32) / 255)[:, None]
    assert torch.equal(is_digit, (F.interpolate(digits, size=32) > 0.1)[:, 0])
    xc, _ = load_variant_uint8("colored", "train")
    pil = np.stack([np.asarray(Image.fromarray(im).resize((32, 32), Image.NEAREST)) for im in images])
    assert torch.equal(xc[:300].amax(1) > 0, torch.from_numpy(pil) > 0)


def test_double_colored_test_colours_are_random():
    x, y = load_variant_uint8("double_colored", "test")
    bg, fg, visible = _two_colours(x)
    bg_cls = nearest(bg, var_mod.DOUBLE_BG_RGB)
    fg_cls = nearest(fg[visible], var_mod.DOUBLE_FG_RGB)
    assert 0.07 < (bg_cls == y).float().mean() < 0.13
    assert 0.07 < (fg_cls == y[visible]).float().mean() < 0.13
    assert 0.07 < (fg_cls == bg_cls[visible]).float().mean() < 0.13  # drawn independently
    assert torch.bincount(bg_cls, minlength=10).min() > 800
    # The in-distribution test set ties both colours to the label again.
    bg, fg, _ = _two_colours(load_variant_uint8("double_colored", "test_iid")[0])
    assert torch.equal(nearest(bg, var_mod.DOUBLE_BG_RGB), y)
    assert torch.equal(nearest(fg, var_mod.DOUBLE_FG_RGB), y)


def _colored_estimate(x: torch.Tensor) -> torch.Tensor:
    """The colour in [0, 1] of each uint8 image's brightest pixel (a stroke centre, grey ~1)."""
    flat = x.flatten(2)
    i = flat.sum(1, dtype=torch.int16).argmax(1)
    return flat[torch.arange(len(x)), :, i].double() / 255


def test_colored_train_and_test():
    x, y = load_variant_uint8("colored", "train")
    assert (x[:, :, 0, 0] == 0).all() and (x[:, :, -1, -1] == 0).all()  # black background
    col = _colored_estimate(x)
    assert (nearest(col, var_mod.COLORED_RGB) == y).float().mean() > 0.9
    # Jitter variance 0.02, measured on channels at 0.5 (which clipping at 0 or 1 rarely reaches).
    resid = col - torch.from_numpy(var_mod.COLORED_RGB).double()[y]
    for k, ch in ((7, 1), (8, 0), (9, 0), (9, 2)):
        assert 0.015 < resid[y == k, ch].var() < 0.025
    xt, yt = load_variant_uint8("colored", "test")
    agree = (nearest(_colored_estimate(xt), var_mod.COLORED_RGB) == yt).float().mean()
    assert 0.05 < agree < 0.16
    xi, yi = load_variant_uint8("colored", "test_iid")
    assert (nearest(_colored_estimate(xi), var_mod.COLORED_RGB) == yi).float().mean() > 0.9


def _patch_found(textures: torch.Tensor, patches: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Whether each uint8 4x4 patch [n, 3, 4, 4] occurs exactly in the padded textures[classes[i]]."""
    windows = [F.unfold(t[None].float(), 4)[0] for t in textures]  # 10 x [48, L]
    return torch.tensor([bool((windows[k] == p.float().flatten()[:, None]).all(0).any())
                         for p, k in zip(patches, classes.tolist())])


def test_wildlife_textures_follow_the_label_in_train_only():
    bg_tex, fg_tex = var_mod._textures("background"), var_mod._textures("object")
    assert bg_tex.shape == (10, 3, 156, 156) and bg_tex.dtype == torch.uint8
    n = 200
    for split, lo, tied in (("train", 0, True), ("test", 50_000, False)):
        x, y = load_variant_uint8("wildlife", split)
        x, y = x[:n], y[:n]
        # Background: the top-left 4x4 corner is an exact crop of the label's background texture.
        hit = _patch_found(bg_tex, x[:, :, :4, :4], y)
        # Digit: a 4x4 patch inside the stroke is an exact crop of the label's object texture.
        digits = torch.from_numpy(load_mnist("train")[0][lo:lo + n].astype(np.float32) / 255)
        mask = F.interpolate(digits[:, None], size=32, mode="nearest") > 0.1
        inside = (F.conv2d(mask.float(), torch.ones(1, 1, 4, 4)) == 16).flatten(1)  # 29 x 29 positions
        keep = inside.any(1)
        pos = inside.to(torch.uint8).argmax(1)
        patches = torch.stack([x[i, :, r:r + 4, c:c + 4] for i, (r, c) in enumerate(zip(pos // 29, pos % 29))])
        fg_hit = _patch_found(fg_tex, patches[keep], y[keep])
        if tied:
            assert hit.all() and fg_hit.all() and keep.sum() > 150
        else:
            assert hit.float().mean() < 0.25 and fg_hit.float().mean() < 0.25


# ---- CLI ----------------------------------------------------------------------------------------

def test_cli_preview_writes_png(tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert cli.main(["data", "preview", "--variant", "colored", "--split", "test", "--out", str(out), "--n", "20"]) == 0
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > 64 and im.height > 10 * 64
    assert cli.main(["data", "build", "--variant", "colored", "--split", "test"]) == 0
    assert "cached" in capsys.readouterr().out


def test_cli_bad_variant_is_one_line_exit_2(tmp_path, capsys):
    code = cli.main(["data", "preview", "--variant", "rainbow", "--out", str(tmp_path / "g.png")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "colored, double_colored, wildlife" in err
    assert not (tmp_path / "g.png").exists()


def test_palette_replaces_the_class_colours_and_nothing_else():
    # The nominal palette gives the same images; another palette, the same draws in its colours.
    x, y = load_variant_uint8("double_colored", "test")
    same = build_variant("double_colored", "test", palette=(var_mod.DOUBLE_FG_RGB, var_mod.DOUBLE_BG_RGB))
    assert torch.equal(same[0], x) and torch.equal(same[1], y)
    fg_rgb, bg_rgb = var_mod.DOUBLE_FG_RGB[::-1].copy(), var_mod.DOUBLE_BG_RGB[::-1].copy()
    xr, yr = build_variant("double_colored", "test", palette=(fg_rgb, bg_rgb))
    assert torch.equal(yr, y)
    bg, fg, visible = _two_colours(x)
    bgr, fgr, _ = _two_colours(xr)
    assert torch.equal(nearest(bgr, bg_rgb), nearest(bg, var_mod.DOUBLE_BG_RGB))
    assert torch.equal(nearest(fgr[visible], fg_rgb), nearest(fg[visible], var_mod.DOUBLE_FG_RGB))
    # colored takes the foreground colours only; its black background stays.
    xc, _ = build_variant("colored", "test_iid", palette=(var_mod.COLORED_RGB[::-1].copy(), np.zeros((10, 3))))
    assert (xc[:, :, 0, 0] == 0).all()
    assert (nearest(_colored_estimate(xc), var_mod.COLORED_RGB[::-1].copy()) == y).float().mean() > 0.9


@pytest.mark.parametrize("name, palette, match", [
    ("wildlife", (np.zeros((10, 3)), np.zeros((10, 3))), "textures, not colours"),
    ("double_colored", (np.zeros((9, 3)), np.zeros((10, 3))), "foreground palette: expected 10 RGB"),
    ("double_colored", (np.zeros((10, 3)), np.full((10, 3), 1.5)), "background palette: expected 10 RGB"),
    ("colored", (np.full((10, 3), np.nan), np.zeros((10, 3))), "foreground palette"),
    ("colored", (np.zeros((10, 3)),), "expected \\(foreground, background\\)"),
])
def test_bad_palette_is_one_error(name, palette, match):
    with pytest.raises(SkdcgnError, match=match):
        build_variant(name, "test", palette=palette)


def test_t10k_digits_keep_the_draws_and_change_only_the_digits():
    x, y = load_variant_uint8("double_colored", "test")
    xt, yt = build_variant("double_colored", "test", digits="t10k")
    assert torch.equal(yt, torch.from_numpy(load_mnist("test")[1]))
    assert not torch.equal(xt, x)
    # the same random class draws and jitter: the corner (background) pixel matches image by image
    assert (xt[:, :, 0, 0] == x[:, :, 0, 0]).all(1).float().mean() > 0.99
    with pytest.raises(SkdcgnError, match="for the test splits"):
        build_variant("colored", "train", digits="t10k")
    with pytest.raises(SkdcgnError, match="unknown digits 'emnist'"):
        build_variant("colored", "test", digits="emnist")
