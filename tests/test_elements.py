import json
import os

import numpy as np
import pytest
from PIL import Image

from utils.data import get_source
from utils.elements import crop_masked, grid_boxes, patches, segments, select_masks
from utils.errors import UserError
from utils.library import build_library


def halves(n=10, swap=False):
    m = np.zeros((n, n), int)
    m[:, n // 2:] = 1
    return 1 - m if swap else m


def quadrants(n=10):
    m = np.zeros((n, n), int)
    m[:n // 2, n // 2:], m[n // 2:, :n // 2], m[n // 2:, n // 2:] = 1, 2, 3
    return m


def test_dedup_counts_on_planted_label_maps():
    # scale 1: two halves (kept); scale 2: the same halves relabelled (Jaccard 1 > 0.5: dropped);
    # scale 3: quadrants (Jaccard with a half = 25/50 = 0.5, not > 0.5: all four kept)
    kept = select_masks([halves(), halves(swap=True), quadrants()])
    assert [s for s, _ in kept] == [0, 0, 2, 2, 2, 2]
    assert sum(m.sum() for _, m in kept) == 100 + 100      # the halves, then the quadrants, each tile the image


def test_every_label_is_considered_and_at_most_five_per_scale():
    strips = np.repeat(np.arange(8), 2)[None, :].repeat(4, 0)      # 8 vertical strips, labels 0..7
    kept = select_masks([strips])
    assert len(kept) == 5
    last_only = np.zeros((4, 16), int)
    last_only[:, -2:] = 7                                          # the highest label, easy to skip by range()
    kept = select_masks([last_only])
    assert len(kept) == 2 and any(m[:, -2:].all() and m.sum() == 8 for _, m in kept)


def test_tiny_masks_are_dropped():
    m = np.zeros((100, 100), int)
    m[0, 0] = 1                                                    # 1 pixel of 10 000 < 0.001
    assert len(select_masks([m])) == 1


def test_crop_includes_last_row_and_column_and_fills_grey():
    img = np.zeros((6, 6, 3), np.uint8)
    img[5, 5] = (10, 20, 30)
    mask = np.zeros((6, 6), bool)
    mask[5, 5] = True
    crop, box = crop_masked(img, mask)
    assert box == (5, 5, 5, 5) and crop.shape == (1, 1, 3) and crop[0, 0].tolist() == [10, 20, 30]
    mask[3, 4] = True
    crop, box = crop_masked(img, mask)
    assert box == (3, 4, 5, 5) and crop.shape == (3, 2, 3)
    assert crop[0, 1].tolist() == [117, 117, 117] and crop[2, 1].tolist() == [10, 20, 30]


def test_slic_segments_stay_inside_planted_regions():
    img = np.zeros((120, 120, 3), np.uint8)
    img[:, :60] = (200, 30, 30)
    img[:, 60:] = (30, 30, 200)
    img[80:, 20:50] = (30, 200, 30)
    planted = np.zeros((120, 120), int)
    planted[:, 60:] = 1
    planted[80:, 20:50] = 2
    from utils.elements import slic_label_maps
    kept = select_masks(slic_label_maps(img))
    purity = [np.bincount(planted[m], minlength=3).max() / m.sum() for _, m in kept]
    assert min(purity) > 0.85                      # SLIC's connectivity pass can lend a sliver across an edge
    assert np.mean(np.array(purity) > 0.98) >= 0.75
    green = planted == 2                           # the small planted region comes out as one element
    assert max((g & m).sum() / (g | m).sum() for g in [green] for _, m in kept) > 0.95
    els = segments(img, out_size=32)
    assert 1 <= len(els) <= 15
    assert all(e.image.size == (32, 32) and e.method == "segment" and e.scale in (10, 20, 30) for e in els)


def test_grid_cells_cover_every_pixel_once():
    cover = np.zeros((7, 5), int)
    for t, l, b, r in grid_boxes(7, 5, 3):
        cover[t:b + 1, l:r + 1] += 1
    assert (cover == 1).all()
    assert len(patches(np.zeros((30, 30, 3), np.uint8), grids=(2, 3), out_size=16)) == 4 + 9


def test_library_index_provenance_resume_and_rekey(image_folder, tmp_path, capsys):
    src = get_source(image_folder, "train")
    out = str(tmp_path / "lib")
    cut = lambda a: patches(a, grids=(2,), out_size=16)         # noqa: E731
    index = build_library(src, "patches", cut, {"grids": [2]}, out, images_per_class=2, image_size=32)
    rows = json.load(open(index))["elements"]
    assert len(rows) == 3 * 2 * 4
    for r in rows:
        assert os.path.isfile(os.path.join(out, "patches", r["file"]))
        assert r["source"].startswith(r["class"] + os.sep) and r["method"] == "patch" and len(r["box"]) == 4
    build_library(src, "patches", cut, {"grids": [2]}, out, images_per_class=2, image_size=32)
    assert "up to date" in capsys.readouterr().out
    # a killed run: one class folder missing and no final index -> only that class is redone
    import shutil
    shutil.rmtree(os.path.join(out, "patches", "green"))
    os.remove(index)
    build_library(src, "patches", cut, {"grids": [2]}, out, images_per_class=2, image_size=32)
    assert json.load(open(index))["summary"]["classes_resumed"] == 2
    assert json.load(open(index))["elements"] == rows
    # other settings on a finished library: refused in one line (runs may point at it), the library untouched
    before = open(index, "rb").read()
    with pytest.raises(UserError, match="finished library cut from other images or with other settings"):
        build_library(src, "patches", cut, {"grids": [2]}, out, images_per_class=1, image_size=32)
    assert open(index, "rb").read() == before
    # an unfinished one (no index yet) with other settings is started again, not mixed with the old one
    os.remove(index)
    build_library(src, "patches", cut, {"grids": [2]}, out, images_per_class=1, image_size=32)
    assert "unfinished library with other settings" in capsys.readouterr().out
    assert len(json.load(open(index))["elements"]) == 3 * 1 * 4


def test_unreadable_images_are_skipped_and_counted(image_folder, tmp_path):
    open(os.path.join(image_folder, "train", "red", "000_empty.jpg"), "wb").close()
    with open(os.path.join(image_folder, "train", "blue", "000_trunc.jpg"), "wb") as f:
        import io
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, "JPEG")
        f.write(buf.getvalue()[:200])
    src = get_source(image_folder, "train")
    index = build_library(src, "patches", lambda a: patches(a, grids=(1,), out_size=8), {}, str(tmp_path / "lib"),
                          images_per_class=100, image_size=16)
    summary = json.load(open(index))["summary"]
    assert summary["skipped"] == 2 and summary["images"] == 3 * 6 + 2
    assert summary["elements"] == 3 * 6


def test_every_image_mode_and_tiny_images_in_a_library(tmp_path):
    root = tmp_path / "modes"
    base = Image.new("RGB", (40, 30), (200, 100, 50))
    variants = {"L": base.convert("L"), "LA": base.convert("LA"), "P": base.convert("P"),
                "RGBA": base.convert("RGBA"), "CMYK": base.convert("CMYK"),
                "I16": Image.fromarray((np.arange(1200).reshape(30, 40) * 50).astype(np.uint16))}
    for split in ("train",):
        for name, img in variants.items():
            d = root / split / name
            d.mkdir(parents=True)
            img.save(d / ("0.tif" if name in ("CMYK", "I16") else "0.png"))
        (root / split / "tiny").mkdir()
        Image.new("RGB", (1, 1), (9, 9, 9)).save(root / split / "tiny" / "0.png")
    src = get_source(str(root), "train")
    index = build_library(src, "patches", lambda a: patches(a, grids=(1,), out_size=8), {}, str(tmp_path / "lib"),
                          images_per_class=1, image_size=16)
    data = json.load(open(index))
    assert sorted(r["class"] for r in data["elements"]) == sorted(variants)      # one element per mode
    assert data["summary"]["skipped_too_small"] == 1 and data["summary"]["skipped_unreadable"] == 0
    for r in data["elements"]:
        assert Image.open(os.path.join(tmp_path, "lib", "patches", r["file"])).mode == "RGB"
        assert r["source_size"] == [40, 30]


def test_parallel_extraction_gives_the_same_library(image_folder, tmp_path):
    from functools import partial
    src = get_source(image_folder, "train")
    cut = partial(segments, scales=[10, 20], out_size=24)
    one = build_library(src, "segments", cut, {}, str(tmp_path / "w1"), images_per_class=4, image_size=40, workers=1)
    two = build_library(src, "segments", cut, {}, str(tmp_path / "w2"), images_per_class=4, image_size=40, workers=2)
    rows1, rows2 = json.load(open(one))["elements"], json.load(open(two))["elements"]
    assert rows1 == rows2 and len(rows1) > 12
    for r in rows1:
        a = open(os.path.join(tmp_path, "w1", "segments", r["file"]), "rb").read()
        assert a == open(os.path.join(tmp_path, "w2", "segments", r["file"]), "rb").read()
    assert not [p for p in os.listdir(tmp_path / "w2" / "segments") if ".tmp-" in p]


def test_mostly_background_elements_are_detected():
    from utils.elements import FILL, background_measure, is_background
    rng = np.random.default_rng(0)
    padded = np.full((40, 40, 3), FILL, np.uint8)
    padded[:3, :3] = rng.integers(0, 255, (3, 3, 3))                   # 99.4 % fill
    black = np.full((40, 40, 3), FILL, np.uint8)
    black[5:35, 5:35] = 2                                               # Fashion-MNIST's surround: one flat region
    black[10:12, 10:12] = 200                                           # a few garment pixels: 4 of 900
    texture = rng.integers(0, 255, (40, 40, 3)).astype(np.uint8)        # a real part of an object
    assert background_measure(padded)[0] == pytest.approx(1 - 9 / 1600)
    assert background_measure(black) == pytest.approx((700 / 1600, 896 / 900, 896 / 900))
    assert is_background(padded) and is_background(black) and not is_background(texture)
    half = texture.copy()
    half[:, :20] = FILL                                                 # half fill, half texture: kept
    assert not is_background(half) and not is_background(Image.fromarray(texture).convert("L"))


def test_mostly_dark_elements_with_a_little_foreground_are_detected():
    """A black surround cut with a bit of garment is one flat level for less than 80 % of its pixels, so only the
    near-black share (at least half of its own pixels at or below grey 30) tells it is background."""
    from utils.elements import FILL, background_measure, is_background
    # by hand: 1000 fill pixels, 540 dark ones spread over grey 0..29 (18 each), a 60-pixel bright blob
    el = np.full((40 * 40,), FILL, np.uint8)
    el[:540] = np.repeat(np.arange(30), 18)
    el[540:600] = 200
    el = el.reshape(40, 40)
    assert background_measure(el) == pytest.approx((1000 / 1600, 60 / 600, 540 / 600))   # commonest level: the blob
    assert is_background(el)
    dark_fabric = el.copy().ravel()                                     # a dark, textured garment: 30 % near-black
    dark_fabric[:600] = np.r_[np.repeat(np.arange(30), 6), np.resize(np.arange(121, 250, 3), 420)]
    assert background_measure(dark_fabric.reshape(40, 40))[2] == pytest.approx(180 / 600)
    assert not is_background(dark_fabric.reshape(40, 40))
    # through the library's own cut (mask on a fill, cropped, resized bicubic to 224): a Fashion-MNIST-like image,
    # black around a textured garment; a mask 70 % on the surround and 30 % on the garment is background, one 30 % on
    # the surround or all inside the garment is not
    from utils.elements import crop_masked
    rng = np.random.default_rng(0)
    img = np.zeros((224, 224, 3), np.uint8)
    img[:, 100:] = rng.integers(100, 230, (224, 124, 1))                # the garment: columns 100..223
    def cut(left, right):
        mask = np.zeros((224, 224), bool)
        mask[50:150, left:right] = True
        return Image.fromarray(crop_masked(img, mask)[0]).resize((224, 224), Image.BICUBIC)
    surround, rim, garment = cut(30, 130), cut(70, 170), cut(120, 220)     # 70 %, 30 %, 0 % on the surround
    fill, constant, dark = background_measure(surround)
    assert fill < 0.9 and constant < 0.8 and 0.6 < dark < 0.8           # only the dark share flags it
    assert is_background(surround)
    assert 0.2 < background_measure(rim)[2] < 0.4 and not is_background(rim)
    assert background_measure(garment)[2] == 0 and not is_background(garment)
