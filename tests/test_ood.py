"""OOD loaders (skdcgn.metrics.ood): IN-9 accuracies and BG-gap, cue-conflict shape bias, refusals.

Tiny synthetic sets in tmp_path: solid-colour PNGs, a fake model that reads the red value of
its input as an ImageNet class, and a raw preprocess (pixel values 0..255, no resizing).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from skdcgn.errors import SkdcgnError
from skdcgn.metrics import ood
from skdcgn.metrics.ood import (CUE_CONFLICT_CATEGORIES, IMAGENET_MEAN, IMAGENET_PREPROCESS, IMAGENET_STD,
                                IN9_CLASSES, NO_RESIZE_PREPROCESS, Preprocess, cue_conflict_shape_bias,
                                imagenet9_accuracy, in9_variants, load_category_mapping, load_in9_mapping)

SPECIAL = 200  # red values for which the fake model spreads its logits over knife and bear
SPECIAL_2 = 210


def raw(image: Image.Image) -> torch.Tensor:
    """Pixel values as they are: the fake model reads them directly."""
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float()


class RedModel(nn.Module):
    """ImageNet class = mean red value of the image (logit 10), other logits 0; two special values:
    red 200: knife 2.0, bear[0] 3.0: mean probability picks knife (e^2 > (e^3 + 3) / 4); the argmax
        over 1000 classes and summed probabilities would pick bear;
    red 210: knife 2.0, bear[0:3] 2.5, bear[3] -30: mean probability picks bear (3 e^2.5 / 4 > e^2);
        averaged logits would pick knife.
    """

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(len(x))
        r = x[:, 0].mean((1, 2)).round().long()
        out = torch.zeros(len(x), 1000)
        plain = r < 160
        out[plain, r[plain]] = 10.0
        special = r == SPECIAL
        out[special, CAT_INDICES["knife"][0]] = 2.0
        out[special, CAT_INDICES["bear"][0]] = 3.0
        special = r == SPECIAL_2
        out[special, CAT_INDICES["knife"][0]] = 2.0
        for j, v in enumerate((2.5, 2.5, 2.5, -30.0)):
            out[special, CAT_INDICES["bear"][j]] = v
        return out


def png(path: Path, red: int, size: tuple[int, int] = (8, 8)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (red, 7, 9)).save(path)


def one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert text and "\n" not in text
    return text


# ---- IN-9 --------------------------------------------------------------------------------------

def in9_json(tmp_path: Path, **changes) -> Path:
    """ImageNet class k → IN-9 class k and 100 + k → k (k < 9); everything else -1."""
    m = {str(i): -1 for i in range(1000)}
    for k in range(9):
        m[str(k)] = k
        m[str(100 + k)] = k
    m.update(changes)
    path = tmp_path / "in_to_in9.json"
    path.write_text(json.dumps(m))
    return path


def in9_root(tmp_path: Path) -> Path:
    """Hand-made variants (red value of each image → predicted IN-9 class through in9_json):
    original:   class k: red k (correct); class 0 also red 50 (→ -1, wrong)   9/10
    mixed_same: class k: red k for k < 6, red (k + 1) % 9 for k >= 6          6/9
    mixed_rand: class k: red 100 + k for k < 3, red 50 otherwise              3/9
    only_fg:    class k: red k                                                 9/9
    fg_mask:    masks, not images (skipped)
    """
    root = tmp_path / "in9"
    for k, name in enumerate(IN9_CLASSES):
        png(root / "original" / "val" / name / "a.png", k)
        png(root / "mixed_same" / "val" / name / "a.png", k if k < 6 else (k + 1) % 9)
        png(root / "mixed_rand" / "val" / name / "a.png", 100 + k if k < 3 else 50)
        png(root / "only_fg" / "val" / name / "a.png", k)
        (root / "fg_mask" / "val" / name).mkdir(parents=True)
        (root / "fg_mask" / "val" / name / "a.npy").write_bytes(b"\x93NUMPY")
    png(root / "original" / "val" / IN9_CLASSES[0] / "b.png", 50)
    (root / "notes").mkdir()  # a folder without val/ is not a variant
    return root


def test_in9_accuracies_and_bg_gap_match_a_hand_count(tmp_path):
    root, model = in9_root(tmp_path), RedModel().train()
    assert in9_variants(root) == ["original", "mixed_same", "mixed_rand", "only_fg"]
    res = imagenet9_accuracy(model, root, in9_json(tmp_path), batch_size=4, preprocess=raw, progress=False)
    v = res["variants"]
    assert list(v) == ["original", "mixed_same", "mixed_rand", "only_fg"]
    assert (v["original"]["correct"], v["original"]["images"]) == (9, 10)
    assert v["original"]["accuracy"] == pytest.approx(0.9)
    assert v["mixed_same"]["accuracy"] == pytest.approx(6 / 9)
    assert v["mixed_rand"]["accuracy"] == pytest.approx(3 / 9)
    assert v["only_fg"]["accuracy"] == 1.0
    assert res["bg_gap"] == pytest.approx(1 / 3)
    assert model.training  # the caller's train/eval flag is restored
    assert model.seen[:3] == [4, 4, 2]  # original: 10 images in batches of 4


def test_in9_selected_variants_and_mapping_forms(tmp_path):
    root = in9_root(tmp_path)
    path = in9_json(tmp_path)
    res = imagenet9_accuracy(RedModel(), root, load_in9_mapping(path), variants=["mixed_rand"],
                             preprocess=raw, progress=False)
    assert list(res["variants"]) == ["mixed_rand"] and res["bg_gap"] is None
    assert res["variants"]["mixed_rand"]["correct"] == 3
    as_json = json.loads(path.read_text())  # the JSON object itself is accepted as well
    res = imagenet9_accuracy(RedModel(), root, as_json, variants=["original"], preprocess=raw, progress=False)
    assert res["variants"]["original"]["correct"] == 9


def test_in9_mapping_validation(tmp_path):
    assert load_in9_mapping(in9_json(tmp_path))[105] == 5
    bad = {"missing key": {"999": None}, "out of range": {"3": 9}, "string value": {"3": "3"},
           "bool": {"3": True}}
    for what, change in bad.items():
        m = json.loads(in9_json(tmp_path).read_text())
        if what == "missing key":
            del m["999"]
        else:
            m.update(change)
        path = tmp_path / f"{what}.json"
        path.write_text(json.dumps(m))
        with pytest.raises(SkdcgnError) as e:
            load_in9_mapping(path)
        assert str(path) in one_line(e), what
    with pytest.raises(SkdcgnError) as e:  # no ImageNet class maps to IN-9 class 8
        load_in9_mapping(in9_json(tmp_path, **{"8": -1, "108": -1}))
    assert "[8]" in one_line(e)
    (tmp_path / "list.json").write_text(json.dumps([0] * 1000))
    with pytest.raises(SkdcgnError) as e:
        load_in9_mapping(tmp_path / "list.json")
    one_line(e)
    with pytest.raises(SkdcgnError) as e:
        load_in9_mapping(tmp_path / "nowhere.json")
    assert "not found" in one_line(e)
    with pytest.raises(SkdcgnError) as e:  # an in-memory table is checked the same way
        imagenet9_accuracy(RedModel(), in9_root(tmp_path), [0] * 999, progress=False)
    assert "1000" in one_line(e)


def test_in9_folder_errors_are_one_line_and_name_the_place(tmp_path):
    mapping = in9_json(tmp_path)

    def run(root, **kw):
        with pytest.raises(SkdcgnError) as e:
            imagenet9_accuracy(RedModel(), root, mapping, preprocess=raw, progress=False, **kw)
        return one_line(e)

    assert "not found" in run(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    assert "no IN-9 variants" in run(tmp_path / "empty")
    root = in9_root(tmp_path)
    assert "variants here: original" in run(root, variants=["mixed_next"])
    assert "masks" in run(root, variants=["fg_mask"])
    assert "not a folder name" in run(root, variants=["../in9"])
    (root / "original" / "val" / "09_robot").mkdir()
    assert "09_robot: unknown class folder" in run(root, variants=["original"])
    (root / "original" / "val" / "09_robot").rmdir()
    for f in (root / "mixed_same" / "val" / "03_reptile").iterdir():
        f.unlink()
    (root / "mixed_same" / "val" / "03_reptile").rmdir()
    assert "03_reptile: class folder missing" in run(root)  # checked before any forward pass
    for name in IN9_CLASSES:
        for f in (root / "only_fg" / "val" / name).iterdir():
            f.unlink()
    assert "only_fg/val: no images" in run(root, variants=["only_fg"])
    (root / "original" / "val" / "01_bird" / "c.png").write_bytes(b"not a png at all")
    assert "01_bird/c.png: unreadable image" in run(root, variants=["original"])
    (root / "original" / "val" / "01_bird" / "c.png").unlink()
    (root / "original" / "val" / "01_bird" / "readme.txt").write_text("hi")
    assert "readme.txt: not an image" in run(root, variants=["original"])
    (root / "original" / "val" / "01_bird" / "readme.txt").unlink()
    png(root / "original" / "val" / "01_bird" / "big.png", 1, size=(9, 8))  # default: no resizing
    with pytest.raises(SkdcgnError) as e:
        imagenet9_accuracy(RedModel(), root, mapping, variants=["original"], progress=False)
    assert "big.png: preprocessed to [3, 8, 9]" in one_line(e)
    assert "batch_size" in run(root, batch_size=0)


def test_model_output_shape_is_checked(tmp_path):
    class Wrong(nn.Module):
        def forward(self, x):
            return torch.zeros(len(x), 9)

    with pytest.raises(SkdcgnError) as e:
        imagenet9_accuracy(Wrong(), in9_root(tmp_path), in9_json(tmp_path), preprocess=raw, progress=False)
    assert "model returned [10, 9]; expected logits [10, 1000]" in one_line(e)


# ---- cue-conflict --------------------------------------------------------------------------------

# category i → ImageNet indices 10 i, 10 i + 1 (bear: four indices, knife: one), like model-vs-human's
# uneven categories; red value 10 i predicts category i.
CAT_INDICES = {c: [10 * i + j for j in range({"bear": 4, "knife": 1}.get(c, 2))]
               for i, c in enumerate(CUE_CONFLICT_CATEGORIES)}
RED = {c: 10 * i for i, c in enumerate(CUE_CONFLICT_CATEGORIES)}


def cat_json(tmp_path: Path, mapping: dict | None = None) -> Path:
    path = tmp_path / "sixteen.json"
    path.write_text(json.dumps(CAT_INDICES if mapping is None else mapping))
    return path


def cue_root(tmp_path: Path) -> Path:
    """(file, red) → decision: shape 3 (cat1, knife1, bird1), texture 3 (cat2, dog1, knife2),
    other 1 (dog2), excluded 2 (dog3-dog4 would count as shape; bear1-bear2)."""
    root = tmp_path / "cue-conflict"
    for c in CUE_CONFLICT_CATEGORIES:
        (root / c).mkdir(parents=True)
    png(root / "cat" / "cat1-dog1.png", RED["cat"])
    png(root / "cat" / "cat2-elephant1.png", RED["elephant"])
    png(root / "dog" / "dog1-cat1.png", RED["cat"])
    png(root / "dog" / "dog2-bird1.png", RED["knife"])
    png(root / "dog" / "dog3-dog4.png", RED["dog"])
    png(root / "knife" / "knife1-bear1.png", SPECIAL)  # knife by mean probability (see RedModel)
    png(root / "knife" / "knife2-bear2.png", SPECIAL_2)  # bear by mean probability
    png(root / "bear" / "bear1-bear2.png", RED["cat"])
    png(root / "bird" / "bird1-car1.png", RED["bird"])
    return root


def test_shape_bias_matches_a_hand_count(tmp_path):
    res = cue_conflict_shape_bias(RedModel(), cue_root(tmp_path), cat_json(tmp_path), batch_size=3,
                                  preprocess=raw, progress=False)
    assert (res["images"], res["excluded"]) == (9, 2)
    assert (res["shape_decisions"], res["texture_decisions"]) == (3, 3)
    assert res["shape_bias"] == pytest.approx(3 / 6)  # 4 / 7 if dog3-dog4 were not excluded
    assert res["shape_accuracy"] == pytest.approx(3 / 9)  # over all images, as model-vs-human
    assert res["texture_accuracy"] == pytest.approx(3 / 9)
    pc = res["per_category"]
    assert (pc["cat"], pc["dog"], pc["knife"], pc["bird"]) == (0.5, 0.0, 0.5, 1.0)
    assert pc["bear"] is None and pc["truck"] is None


def test_shape_bias_is_none_without_shape_or_texture_decisions(tmp_path):
    root = tmp_path / "cc"
    for c in CUE_CONFLICT_CATEGORIES:
        (root / c).mkdir(parents=True)
    png(root / "cat" / "cat1-dog1.png", RED["truck"])
    res = cue_conflict_shape_bias(RedModel(), root, load_category_mapping(cat_json(tmp_path)),
                                  preprocess=raw, progress=False)
    assert res["shape_bias"] is None and res["shape_accuracy"] == 0.0 and res["images"] == 1


def test_category_mapping_validation(tmp_path):
    loaded = load_category_mapping(cat_json(tmp_path))
    assert list(loaded) == list(CUE_CONFLICT_CATEGORIES) and loaded["knife"] == (130,)
    cases = {
        "missing [\'oven\']": {k: v for k, v in CAT_INDICES.items() if k != "oven"},
        "unknown [\'zebra\']": {**CAT_INDICES, "zebra": [999]},
        "not an ImageNet index": {**CAT_INDICES, "oven": [1000]},
        "also in bear": {**CAT_INDICES, "oven": [10]},
        "twice": {**CAT_INDICES, "oven": [140, 140]},
        "non-empty list": {**CAT_INDICES, "oven": []},
    }
    for expected, mapping in cases.items():
        with pytest.raises(SkdcgnError) as e:
            load_category_mapping(cat_json(tmp_path, mapping))
        assert expected in one_line(e), expected


def test_cue_conflict_folder_errors(tmp_path):
    mapping = cat_json(tmp_path)

    def run(root):
        with pytest.raises(SkdcgnError) as e:
            cue_conflict_shape_bias(RedModel(), root, mapping, preprocess=raw, progress=False)
        return one_line(e)

    assert "not found" in run(tmp_path / "nowhere")
    root = tmp_path / "cc"
    for c in CUE_CONFLICT_CATEGORIES:
        (root / c).mkdir(parents=True)
    assert "no images" in run(root)
    (root / "zebra").mkdir()
    assert "zebra: unknown category folder" in run(root)
    (root / "zebra").rmdir()
    (root / "truck").rmdir()
    assert "truck: category folder missing" in run(root)
    (root / "truck").mkdir()
    png(root / "cat" / "dog1-cat1.png", 0)  # the shape in the name must be the folder's
    assert "dog1-cat1.png: expected a name" in run(root)
    (root / "cat" / "dog1-cat1.png").unlink()
    png(root / "cat" / "cat1-zebra1.png", 0)
    assert "cat1-zebra1.png" in run(root)
    (root / "cat" / "cat1-zebra1.png").unlink()
    (root / "cat" / "cat1-dog1.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    assert "cat1-dog1.png: unreadable image" in run(root)


# ---- preprocessing -------------------------------------------------------------------------------

def test_default_preprocessing_gives_normalised_224_crops():
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    colour = (200, 30, 90)
    x = IMAGENET_PREPROCESS(Image.new("RGB", (400, 300), colour))  # resized to 341 x 256, then cropped
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    expected = (torch.tensor(colour).view(3, 1, 1) / 255 - mean) / std
    assert torch.allclose(x, expected.expand(3, 224, 224), atol=1.5 / 255 / 0.224)
    # a 512 x 256 image keeps its size (short side already 256); the crop starts at column 144
    ramp = np.zeros((256, 512, 3), np.uint8)
    ramp[..., 0] = np.arange(512) % 256
    x = IMAGENET_PREPROCESS(Image.fromarray(ramp))
    red = x[0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]
    assert torch.allclose(red[0, :3], torch.tensor([144, 145, 146]) / 255, atol=1e-6)
    assert torch.allclose(red[5, -1], torch.tensor(111 / 255), atol=1e-6)
    # the IN-9 default feeds 224 x 224 images as they are, normalised the same way
    y = NO_RESIZE_PREPROCESS(Image.new("RGB", (224, 224), colour))
    assert y.shape == (3, 224, 224)
    assert torch.allclose(y, expected.expand(3, 224, 224), atol=1e-6)
    with pytest.raises(ValueError):
        Preprocess(resize=None)(Image.new("RGB", (100, 300)))
    with pytest.raises(SkdcgnError) as e:
        Preprocess(crop=0)
    assert "crop" in one_line(e)


def test_load_image_checks_what_preprocess_returns(tmp_path):
    png(tmp_path / "a.png", 3)
    with pytest.raises(SkdcgnError) as e:
        ood.load_image(tmp_path / "a.png", lambda im: np.array(im))
    assert "a.png: preprocess must return a float tensor" in one_line(e)
    with pytest.raises(SkdcgnError) as e:  # too small for the 224 crop: named, one line
        ood.load_image(tmp_path / "a.png", Preprocess(resize=None))
    assert "a.png: cannot preprocess" in one_line(e)
    assert ood.load_image(tmp_path / "a.png", raw)[0, 0, 0] == 3
