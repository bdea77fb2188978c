import os

import numpy as np
import pytest
from PIL import Image

from utils import fileio, store
from utils.errors import UserError
from utils.data import get_source, per_class_indices, subset_indices, to_rgb


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "RGB"])
def test_every_mode_becomes_rgb(mode):
    img = Image.new("RGB", (4, 3), (200, 100, 50)).convert(mode)
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == (4, 3)


def test_sixteen_bit_is_rescaled_and_transparency_goes_white():
    a = np.array([[0, 65535]], np.uint16)
    assert np.asarray(to_rgb(Image.fromarray(a)))[0, :, 0].tolist() == [0, 255]
    rgba = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    assert np.asarray(to_rgb(rgba))[0, 0].tolist() == [255, 255, 255]


def test_image_folder_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        get_source(str(tmp_path / "nope"), "train")
    (tmp_path / "ds" / "train" / "cat").mkdir(parents=True)
    with pytest.raises(UserError, match="no images"):
        get_source(str(tmp_path / "ds"), "train")
    with pytest.raises(UserError, match="no 'val/' folder"):
        get_source(str(tmp_path / "ds"), "val")
    with pytest.raises(UserError, match="unknown dataset"):
        get_source("imagenet_typo", "train")


def test_image_folder_reads_classes_and_labels(image_folder):
    src = get_source(image_folder, "val")
    assert src.classes == ["blue", "green", "red"] and len(src) == 9
    assert src.targets.tolist() == [0] * 3 + [1] * 3 + [2] * 3
    assert src.image(0).mode == "RGB" and src.ident(0) == os.path.join("blue", "000.png")


def test_subsets_are_seeded_and_sorted():
    a, b = subset_indices(100, 10, seed=3), subset_indices(100, 10, seed=3)
    assert a.tolist() == b.tolist() == sorted(set(a.tolist())) and len(a) == 10
    assert subset_indices(100, 10, seed=4).tolist() != a.tolist()
    assert subset_indices(5, None).tolist() == [0, 1, 2, 3, 4]
    per = per_class_indices(np.array([0, 0, 0, 1, 1]), 2, seed=0)
    assert len(per[0]) == 2 and set(per[0]) <= {0, 1, 2} and per[1].tolist() == [3, 4]


def test_store_roundtrip_key_and_atomicity(tmp_path):
    path = str(tmp_path / "entry")
    key = {"backbone": "x", "layer": "y"}
    store.write(path, {"features": np.arange(6, dtype=np.float32).reshape(3, 2)}, key)
    arrays, meta = store.read(path)
    assert isinstance(arrays["features"], np.memmap) and arrays["features"][2, 1] == 5
    assert store.is_current(path, key) and not store.is_current(path, dict(key, layer="z"))
    with pytest.raises(RuntimeError):
        with fileio.TempDir(path) as tmp:
            np.save(os.path.join(tmp, "features.npy"), np.zeros(1))
            raise RuntimeError("killed")
    assert store.is_current(path, key)                     # the old entry is untouched
    assert os.listdir(tmp_path) == ["entry"]               # and no temp directory is left
    with pytest.raises(UserError, match="not a finished store entry"):
        store.read(str(tmp_path / "missing"))


def test_field_problem_names_the_first_wrong_field_in_json_words():
    fields = {"iis": (float, int), "ratios": list, "meta.backbone": dict, "done": bool}
    good = {"iis": 0.9, "ratios": [0.1], "meta": {"backbone": {}}, "done": False}
    assert fileio.field_problem(good, fields) is None
    assert fileio.field_problem(dict(good, iis=1), fields) is None            # an int is a number
    assert fileio.field_problem(dict(good, iis=True), fields) == "'iis' is a boolean, expected a number"
    assert fileio.field_problem(dict(good, ratios="0.1"), fields) == "'ratios' is a string, expected a list"
    assert fileio.field_problem(dict(good, ratios=None), fields) == "'ratios' is null, expected a list"
    assert fileio.field_problem(dict(good, meta={}), fields) == "'meta.backbone' is missing, expected an object"
    assert fileio.field_problem(dict(good, meta=[]), fields) == "'meta.backbone' is missing, expected an object"
    assert fileio.field_problem(dict(good, done=0), fields) == "'done' is a number, expected a boolean"
    # the first wrong field in the order given, not every one
    assert fileio.field_problem({}, fields) == "'iis' is missing, expected a number"
