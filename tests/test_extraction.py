"""Extraction: several backbones and layers in one pass write the same bytes as separate runs; a non-finite feature
stops the run naming its image; the decoded-copy fast path is exact for its own preprocessing and close for others."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from torchvision import transforms as T

from conftest import REPO
from concept_extractor import dataset_feature_extractor as dfe
from utils import store
from utils.backbones import LayerTaps, Preprocess
from utils.errors import UserError
from utils.data import ImageSource, TransformedImages, get_source
from utils.extraction import ExtractConfig, extract_to_store
from utils.feeds import CachePlan, CacheTransform, DecodeImages, plan_cache
from utils.specs import model_tag

LOADER = ["--workers", "0", "--device", "cpu", "--batch_size", "3", "--chunk_size", "4"]


def extract(*argv):
    dfe.main(dfe.get_args_parser().parse_args(list(argv)))


def entry_bytes(path):
    """Every file's bytes; meta.json's without ``info.command`` (the command that built the entry, which differs
    between a pass over several backbones and a run of one)."""
    out = {f: open(os.path.join(path, f), "rb").read() for f in sorted(os.listdir(path))}
    if "meta.json" in out:
        meta = json.loads(out["meta.json"])
        meta["info"].pop("command", None)
        out["meta.json"] = json.dumps(meta, sort_keys=True).encode()
    return out


@pytest.fixture
def counters(monkeypatch):
    """Counts images decoded, Normalize calls (one per preprocessing group per image) and forwards per model."""
    seen = {"decoded": 0, "normalised": 0, "forwards": {}}
    image, normalise, forward = ImageSource.image, T.Normalize.forward, LayerTaps.forward

    def counted_image(self, i):
        seen["decoded"] += 1
        return image(self, i)

    def counted_normalise(self, x):
        seen["normalised"] += 1
        return normalise(self, x)

    def counted_forward(self, x):
        name = type(self.model).__name__
        seen["forwards"][name] = seen["forwards"].get(name, 0) + 1
        return forward(self, x)
    monkeypatch.setattr(ImageSource, "image", counted_image)
    monkeypatch.setattr(T.Normalize, "forward", counted_normalise)
    monkeypatch.setattr(LayerTaps, "forward", counted_forward)
    return seen


def test_one_pass_writes_the_entries_of_separate_runs_byte_for_byte(image_folder, tmp_path, counters):
    mnv3 = tmp_path / "mnv3.yaml"               # same preprocessing as resnet18 without weights: one shared group
    mnv3.write_text("name: mnv3\nsource: torchvision\narch: mobilenet_v3_small\nweights: none\n")
    models = [("resnet18:layer3", "resnet18@layer3"), ("resnet18:layer4", "resnet18@layer4"),
              ("efficientnet_lite0", "efficientnet_lite0"), (str(mnv3), "mnv3")]
    common = ["--dataset", image_folder, "--split", "val", "--weights", "none",
              "--data_root", str(tmp_path / "data"), *LOADER]
    extract("--model_config", *[m for m, _ in models], "--out", str(tmp_path / "multi"), *common)
    # 9 images, batches of 3 + 1 per chunk of 4: 5 batches; resnet18 ran once per batch for both layers
    assert counters["decoded"] == 9 and counters["normalised"] == 2 * 9
    assert counters["forwards"] == {"ResNet": 5, "EfficientNet": 5, "MobileNetV3": 5}
    for config, tag in models:
        name, _, layer = config.partition(":")
        extract("--model_config", name, *(["--layer", layer] if layer else []),
                "--out", str(tmp_path / "single" / f"{tag}+none" / "val"), *common)
        multi = entry_bytes(tmp_path / "multi" / f"{tag}+none" / "val")   # +none: --weights overrides the configs
        assert set(multi) == {"features.npy", "labels.npy", "indices.npy", "meta.json"}
        assert multi == entry_bytes(tmp_path / "single" / f"{tag}+none" / "val"), tag
    a, _ = store.read(str(tmp_path / "multi" / "resnet18@layer3+none" / "val"))
    b, _ = store.read(str(tmp_path / "multi" / "resnet18@layer4+none" / "val"))
    assert a["features"].shape == (9, 256) and b["features"].shape == (9, 512)
    # the separate runs' entries are found up to date by a pass over the same layout: nothing is decoded or run
    counters["decoded"], counters["forwards"] = 0, {}
    extract("--model_config", *[m for m, _ in models], "--out", str(tmp_path / "single" / "{model}" / "{split}"),
            *common)
    assert counters["decoded"] == 0 and counters["forwards"] == {}


def test_out_names_and_refused_target_lists():
    assert dfe.out_paths("o", ["a@x"], "val", "d") == ["o"]
    assert dfe.out_paths("o", ["a", "a@x"], "val", "d") == [os.path.join("o", "a", "val"),
                                                            os.path.join("o", "a@x", "val")]
    assert dfe.out_paths("f/{dataset}/{model}/{split}", ["a", "b"], "train", "d") == ["f/d/a/train", "f/d/b/train"]
    with pytest.raises(UserError, match="put {model} in it"):
        dfe.out_paths("f/{split}", ["a", "b"], "train", "d")
    with pytest.raises(UserError, match="{model}, {split} and {dataset} only"):
        dfe.out_paths("f/{modle}", ["a"], "train", "d")
    assert model_tag("model_configs/resnet50.yaml", None) == "resnet50"
    assert model_tag("timm:resnet18", "layer2") == "timm_resnet18@layer2"
    # the runners' folder names come from the same rule (scripts/layout.py, utils/layout.py), not a copy in bash
    for argv, tag in ((["model_configs/resnet50.yaml"], "resnet50"), (["timm:resnet18", "--layer", "layer2"],
                                                                      "timm_resnet18@layer2"),
                      (["timm:hf-hub:org/vit_x.a", "--layer", ""], "vit_x.a")):
        r = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "layout.py"), "--model", *argv],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and f"\nmodel_tag={tag}\n" in r.stdout, r.stderr
    parse = dfe.get_args_parser().parse_args
    tags = [t for t, _ in dfe.targets(parse(["--model_config", "resnet18", "swin_t:features.3", "--layer", "layer2",
                                             "layer3", "--out", "o"]))]
    assert tags == ["resnet18@layer2", "resnet18@layer3", "swin_t@features.3"]
    with pytest.raises(UserError, match="asked for twice"):
        dfe.targets(parse(["--model_config", "resnet18:layer2", "resnet18", "--layer", "layer2", "--out", "o"]))
    with pytest.raises(UserError, match="--backbone replaces"):
        dfe.targets(parse(["--model_config", "resnet18", "swin_t", "--backbone", "resnet50", "--out", "o"]))


class Planted(nn.Module):
    """Features = the image's mean colour; the image equal to ``marked`` gets ``value`` instead."""

    def __init__(self, marked, value):
        super().__init__()
        self.register_buffer("marked", marked)
        self.value = value

    def forward(self, x):
        f = x.mean(dim=(2, 3))
        hit = (x == self.marked).flatten(1).all(dim=1)
        f[hit, 1] = self.value
        return f


@pytest.mark.parametrize("value, word", [(float("inf"), "Inf"), (float("nan"), "NaN")])
def test_non_finite_feature_stops_the_run_naming_its_image(image_folder, tmp_path, value, word):
    source = get_source(image_folder, "val")
    data = TransformedImages(source, np.arange(len(source)), T.Compose([T.Resize((8, 8)), T.ToTensor()]))
    assert source.ident(5) == os.path.join("green", "002.png")
    planted = Planted(data[5][0], value)
    args = ExtractConfig(batch_size=2, chunk_size=4, workers=0, device="cpu", amp=False, dtype="float32")
    out = str(tmp_path / "feats")
    with pytest.raises(UserError) as e:
        extract_to_store(lambda: planted, {"planted": 1}, data, {"d": 1}, out, {}, args, "planted")
    msg = str(e.value)
    assert f"non-finite feature ({word})" in msg and "image 5 of" in msg and "green/002.png" in msg, msg
    assert "\n" not in msg
    assert not os.path.exists(out) and store.read_meta(out) is None          # no finished entry
    partial = [d for d in os.listdir(tmp_path) if d.startswith("feats.partial-")]
    assert len(partial) == 1 and os.listdir(tmp_path / partial[0]) == ["chunk_000000.npz"]   # rows 0-3 were good
    ok = Planted(data[5][0], 0.5)                                            # the same key: resumes at chunk 1
    extract_to_store(lambda: ok, {"planted": 1}, data, {"d": 1}, out, {}, args, "planted")
    f = store.read(out)[0]["features"]
    assert f.shape == (9, 3) and f[5, 1] == 0.5 and np.isfinite(f).all()


def test_float16_overflow_is_one_error_line_and_nothing_written(image_folder, tmp_path):
    import torchvision
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    with torch.no_grad():
        model.conv1.weight.mul_(1e6)              # BN in eval mode is affine: every feature grows a million-fold
    ckpt = str(tmp_path / "loud.pth")
    torch.save(model.state_dict(), ckpt)
    out = str(tmp_path / "f")
    r = subprocess.run([sys.executable, "-m", "concept_extractor.dataset_feature_extractor", "--model_config",
                        "resnet18", "--weights", ckpt, "--dataset", image_folder, "--split", "val", "--dtype",
                        "float16", "--out", out, *LOADER], cwd=REPO, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error")]
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
    assert "overflow to Inf in float16" in lines[0] and "image 0 of" in lines[0] and "blue/000.png" in lines[0]
    assert "--dtype float32" in lines[0]
    assert not os.path.exists(out)


def photo(w, h, seed=0):
    """A photo-like image: smooth colour gradients with a few sharp-edged discs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    img = np.stack([200 * xx + 30, 180 * yy + 40, 120 * (1 - xx) * yy + 60], axis=-1)
    for _ in range(6):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(5, 40)
        img[(np.mgrid[0:h, 0:w][0] - cy) ** 2 + (np.mgrid[0:h, 0:w][1] - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


class Photos:
    name, split, classes = "photos", "val", ["a"]

    def __init__(self, sizes):
        self.images = [photo(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
        self.targets = np.zeros(len(sizes), np.int64)

    def image(self, i):
        return self.images[i]


def test_decoded_copy_plan_and_device_transforms_against_pil():
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    a = Preprocess(256, 224, "bilinear", mean, std)          # resnet18 / vit_b_16 (IMAGENET1K_V1)
    b = Preprocess(232, 224, "bilinear", mean, std)          # resnet50 (IMAGENET1K_V2)
    c = Preprocess(256, 224, "bicubic", (0.5,) * 3, (0.5,) * 3)   # efficientnet_lite0
    assert plan_cache([a]) == CachePlan(256, 224, "bilinear")
    assert plan_cache([a, a, b, c]) == CachePlan(256, 248, "bilinear")   # ceil(256 * 224 / 232) = 248
    assert plan_cache([b, c, c]) == CachePlan(256, 248, "bicubic")
    plan = plan_cache([a, b, c])
    sizes = [(500, 375), (375, 500), (333, 301), (301, 333), (640, 427), (97, 131)]
    src = Photos(sizes)
    u8 = torch.stack([DecodeImages(src, np.arange(len(sizes)), plan)[i][0] for i in range(len(sizes))])
    assert u8.shape == (len(sizes), 248, 248, 3) and u8.dtype == torch.uint8
    for p, exact in ((a, True), (b, False), (c, False)):
        ours = CacheTransform(plan, p, torch.device("cpu"))(u8)
        pil = torch.stack([p.image_transform()(img) for img in src.images])
        assert ours.shape == pil.shape == (len(sizes), 3, 224, 224)
        assert ours.is_contiguous(memory_format=torch.channels_last)
        if exact:                                  # the pixels the PIL path gives, whatever the image's parity
            assert torch.equal(ours, pil)
        else:                                      # twice resampled: measured 0.48 and 0.14 grey levels on average
            grey = ((ours - pil) * torch.tensor(p.std).view(1, 3, 1, 1) * 255).abs()
            assert grey.mean() < 1.5 and grey.quantile(0.99) < 20, (p, grey.mean(), grey.max())


def test_decoded_copy_path_gives_the_pil_features_for_its_own_preprocessing(image_folder, tmp_path, counters, capsys):
    common = ["--model_config", "resnet18", "--layer", "layer3", "layer4", "--weights", "none", "--dataset",
              image_folder, "--split", "val", *LOADER]
    extract(*common, "--out", str(tmp_path / "pil"))
    counters["decoded"] = 0
    extract(*common, "--out", str(tmp_path / "cache"), "--decode", "cache", "--decode_cache", str(tmp_path / "dec"))
    assert counters["decoded"] == 9                            # once, into the decoded copy
    (copy,) = os.listdir(tmp_path / "dec" / "shapes")
    images, meta = store.read(str(tmp_path / "dec" / "shapes" / copy))
    assert images["images"].shape == (9, 224, 224, 3) and meta["key"]["plan"] == {"resize": 256, "crop": 224,
                                                                                  "interpolation": "bilinear"}
    for layer in ("layer3", "layer4"):
        a, ma = store.read(str(tmp_path / "pil" / f"resnet18@{layer}+none" / "val"))
        b, mb = store.read(str(tmp_path / "cache" / f"resnet18@{layer}+none" / "val"))
        np.testing.assert_array_equal(a["features"], b["features"])            # bit-identical on CPU
        np.testing.assert_array_equal(a["labels"], b["labels"])
        assert ma["key_hash"] != mb["key_hash"] and mb["key"]["decode"]["crop"] == 224   # keyed apart
    # a new entry from the same split and size reuses the copy: nothing is decoded again
    counters["decoded"] = 0
    capsys.readouterr()
    extract(*common[:3], "layer2", *common[5:], "--out", str(tmp_path / "cache2" / "{model}" / "{split}"),
            "--decode", "cache", "--decode_cache", str(tmp_path / "dec"))
    assert counters["decoded"] == 0 and f"{copy} is up to date" in capsys.readouterr().out
    assert store.read(str(tmp_path / "cache2" / "resnet18@layer2+none" / "val"))[0]["features"].shape == (9, 128)
