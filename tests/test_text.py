"""Text concepts. CLIP weights do not exist offline, so: plumbing with a tiny random open_clip model, and the method
on synthetic data whose answer is planted (which concepts the backbone expresses, which CLIP never sees)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO
from utils import store
from utils.text import CLIP, cos3_similarity, read_concepts, top5_mean

TINY = os.path.join(REPO, "tests", "assets", "tiny-clip.json")


def test_concept_files_dedupe_and_accept_labo_json(tmp_path):
    txt = tmp_path / "c.txt"
    txt.write_text("Red  stripes\nred stripes\n\n   \n# a comment\nwheels # trailing comment\nnaïve café 🙂\n")
    assert read_concepts(str(txt)) == ["red stripes", "wheels", "naïve café 🙂"]
    js = tmp_path / "c.json"
    js.write_text(json.dumps({"cat": ["whiskers", "fur"], "dog": ["fur", "snout"]}))
    assert read_concepts(str(js)) == ["whiskers", "fur", "snout"]
    (tmp_path / "empty.txt").write_text("\n\n")
    from utils.errors import UserError
    with pytest.raises(UserError, match="no concepts"):
        read_concepts(str(tmp_path / "empty.txt"))


def test_shipped_concept_sets_cover_their_classes():
    from torchvision.datasets import FashionMNIST
    data = json.load(open(os.path.join(REPO, "concept_library", "textual", "fashion_mnist.json")))
    assert list(data) == FashionMNIST.classes
    for name in ("cifar10", "cifar100"):
        sets = json.load(open(os.path.join(REPO, "concept_library", "textual", f"{name}.json")))
        assert len(sets) == int(name[5:]) and all(6 <= len(v) <= 8 for v in sets.values())


def test_tiny_clip_text_features_for_odd_strings():
    clip = CLIP(TINY, "none")
    odd = ["a", "x" * 1000, "naïve café 🙂", "two  words", "UPPER case"]
    f = clip.encode_text(odd)
    assert f.shape == (5, 16)
    np.testing.assert_allclose((f ** 2).sum(1), 1.0, rtol=1e-5)
    assert clip.key["clip_pretrained"] == "none" and clip.key["clip_model"] == "tiny-clip"


def test_cos3_similarity_known_values():
    a = torch.tensor([[0.0, 1.0], [1.0, 2.0], [2.0, 0.0]])
    assert cos3_similarity(a, 3 * a + 7).tolist() == pytest.approx([1.0, 1.0])      # invariant to scale and shift
    assert cos3_similarity(a, -a).tolist() == pytest.approx([-1.0, -1.0])
    assert top5_mean(np.arange(20, dtype=np.float32).reshape(10, 2)).tolist() == [14.0, 15.0]


def planted_split(n, seed, m):
    """Backbone features x = Z M + noise; CLIP sees concepts 0-5 as Z (planted), 6-7 as noise unrelated to x, 8-9
    barely at all."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 5, n)
    z = np.maximum(rng.normal(size=(n, 6)), 0) * 0.5
    z[np.arange(n), y] += 1.5
    z[np.arange(n), y + 1] += 0.75
    x = z @ m + 0.05 * rng.normal(size=(n, m.shape[1]))
    a = np.empty((n, 10), np.float32)
    a[:, :6] = 0.2 + 0.1 * z
    a[:, 6:8] = 0.2 + 0.1 * np.abs(rng.normal(size=(n, 2)))
    a[:, 8:] = 0.05 + 0.02 * rng.normal(size=(n, 2))
    return x.astype(np.float32), y.astype(np.int64), a


def write_planted(root):
    m = np.random.default_rng(7).normal(size=(6, 32))
    names = [f"planted {i}" for i in range(6)] + ["noise 0", "noise 1", "unseen 0", "unseen 1"]
    bb = {"backbone": {"name": "synthetic"}}
    info = {"classes": list("abcde"), "backbone": {"name": "synthetic", "arch": "-", "weights": "-", "layer": "-",
                                                   "pooling": "-"}}
    for split, n, seed in (("train", 3000, 0), ("val", 1000, 1)):
        x, y, a = planted_split(n, seed, m)
        idx = np.arange(n)
        store.write(str(root / "bb" / split), {"features": x, "labels": y, "indices": idx}, dict(bb, split=split), info)
        # with unit text vectors, CLIP image . text = the planted activations
        store.write(str(root / "clip" / split), {"features": a, "labels": y, "indices": idx}, {"split": split}, info)
    store.write(str(root / "clip" / "text"), {"features": np.eye(10, dtype=np.float32)}, {"t": 1}, {"concepts": names})
    return names


def run_text_training(root, *extra):
    cmd = [sys.executable, "-m", "IP_training.IP_Text_training", "--train_features", str(root / "bb" / "train"),
           "--val_features", str(root / "bb" / "val"), "--clip", str(root / "clip"), "--out", str(root / "run"),
           "--device", "cpu", *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


def test_projection_recovers_planted_concepts_and_drops_the_rest(tmp_path):
    names = write_planted(tmp_path)
    r = run_text_training(tmp_path, "--epochs", "20", "--lrs", "0.01")
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.load(open(tmp_path / "run" / "results.json"))
    meta = res["meta"]
    assert meta["concepts"] == names[:6]                                   # every planted concept, nothing else
    assert meta["dropped_clip_cutoff"] == ["unseen 0", "unseen 1"]         # CLIP never sees them
    assert meta["dropped_interpretability_cutoff"] == ["noise 0", "noise 1"]   # the backbone cannot express noise
    assert min(meta["concept_val_similarity"]) > 0.8
    heads = torch.load(tmp_path / "run" / "heads.pt", weights_only=True)
    assert heads["projection"].shape == (6, 32) and heads["concept_index"].tolist() == [0, 1, 2, 3, 4, 5]
    std = max(r["top1"] for r in res["runs"] if r["head"] == "standard")
    dense = max(r["top1"] for r in res["runs"] if r["ratio"] == 0.0)
    assert std > 95 and dense > 95
    # a second run reuses the result; a different cutoff is a different run
    assert "up to date" in run_text_training(tmp_path, "--epochs", "20", "--lrs", "0.01").stdout
    r = run_text_training(tmp_path, "--epochs", "20", "--lrs", "0.01", "--clip_cutoff", "0.9")
    assert r.returncode == 2 and "no concept passes --clip_cutoff 0.9" in r.stderr


@pytest.mark.slow
def test_clip_features_plumbing_with_a_tiny_random_clip(image_folder, tmp_path):
    concepts = tmp_path / "concepts.txt"
    concepts.write_text("red patch\ngreen patch\nblue patch\nred patch\n\nnaïve café 🙂\n" + "long " * 100 + "\n")
    clip_dir = str(tmp_path / "clip")
    cmd = [sys.executable, "-m", "concept_extractor.textual_emb_extractor", "--concepts", str(concepts),
           "--dataset", image_folder, "--clip_model", TINY, "--clip_pretrained", "none", "--out", clip_dir,
           "--workers", "0", "--device", "cpu"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    text, tmeta = store.read(os.path.join(clip_dir, "text"))
    assert text["features"].shape == (5, 16) and len(tmeta["info"]["concepts"]) == 5
    train, _ = store.read(os.path.join(clip_dir, "train"))
    assert train["features"].shape == (18, 16)
    np.testing.assert_allclose((np.asarray(train["features"]) ** 2).sum(1), 1.0, rtol=1e-4)
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.stdout.count("up to date") == 3
