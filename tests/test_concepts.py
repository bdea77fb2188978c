import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO
from utils import store
from utils.elements import FILL
from utils.errors import UserError
from utils.fileio import key_hash
from utils.concepts import cluster_centres, select_prototypes
from utils.heads import End2EndConceptHeads


def test_prototype_selection_modes():
    labels = np.repeat([0, 1, 2, 3], 50)                     # elements stored class by class, as on disk
    assert select_prototypes(labels, 20, "first").tolist() == list(range(20))   # the original: one class only
    bal = select_prototypes(labels, 20, "balanced", seed=1)
    assert np.bincount(labels[bal]).tolist() == [5, 5, 5, 5]
    assert select_prototypes(labels, 20, "balanced", seed=1).tolist() == bal.tolist()
    rnd = select_prototypes(labels, 20, "random", seed=1)
    assert len(set(rnd.tolist())) == 20 and rnd.tolist() == sorted(rnd.tolist())
    assert select_prototypes(labels, 0, "balanced").tolist() == list(range(200))
    uneven = np.array([0] * 3 + [1] * 30)
    assert np.bincount(uneven[select_prototypes(uneven, 10, "balanced")]).tolist() == [3, 7]
    with pytest.raises(UserError):
        select_prototypes(labels, 5, "best")


def test_kmeans_recovers_planted_element_groups():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 16)) * 5
    truth = np.repeat(np.arange(4), 30)
    x = centres[truth] + rng.normal(size=(120, 16)) * 0.3
    found, nearest = cluster_centres(x, 4, seed=0)
    match = [int(np.argmin(((centres - c) ** 2).sum(1))) for c in found]
    assert sorted(match) == [0, 1, 2, 3]                      # one centre per planted group
    np.testing.assert_allclose(found, centres[match], atol=0.2)
    assert [truth[r] for r in nearest] == match               # each centre's nearest element is in its group
    with pytest.raises(UserError):
        cluster_centres(x[:3], 4)


def test_end2end_assignment_is_exactly_one_hot_and_learns():
    torch.manual_seed(0)
    elements = torch.randn(30, 8)
    heads = End2EndConceptHeads(elements, seeds=[0, 5, 10, 15], n_classes=3, ratios=[0.0, 0.5])
    heads.train()
    a = heads.assignment()
    assert a.shape == (2, 30, 4)
    assert set(a.unique().tolist()) == {0.0, 1.0} and (a.sum(-1) == 1).all()
    out = heads(torch.randn(5, 8))
    out.sum().backward()
    assert heads.assign_logits.grad.abs().sum() > 0          # the straight-through gradient reaches the assignment
    heads.eval()
    assert torch.equal(heads.assignment(), heads.assignment())   # eval: noise-free argmax
    c = heads.concept_matrix()
    assert c.shape == (2, 4, 8)
    # each concept is the normalised sum of exactly the elements assigned to it
    ea = heads.assignment()[0]
    for k in range(4):
        if ea[:, k].any():
            expected = torch.nn.functional.normalize(elements[ea[:, k].bool()].sum(0), dim=0)
            torch.testing.assert_close(c[0, k], expected)
    assert ea[[0, 5, 10, 15]].argmax(-1).tolist() == [0, 1, 2, 3]   # each seed starts in its own concept


def test_exclude_background_leaves_background_elements_out_of_the_concepts(tmp_path):
    """6 library elements, rows 0, 2, 4 all padding: with --exclude_background the 3 prototypes are rows 1, 3, 5 (rows
    of the library, not of the kept subset), and the run's key records the flag."""
    rng = np.random.default_rng(0)
    lib = tmp_path / "lib"
    (lib / "c").mkdir(parents=True)
    rows = []
    for i in range(6):
        img = np.full((16, 16, 3), FILL, np.uint8) if i % 2 == 0 else rng.integers(0, 255, (16, 16, 3), np.uint8)
        Image.fromarray(img).save(lib / "c" / f"{i}.png")
        rows.append({"file": f"c/{i}.png", "label": i % 3, "class": "abc"[i % 3]})
    (lib / "index.json").write_text(json.dumps({"elements": rows}))
    spec = {"name": "m", "arch": "m", "weights": "none", "layer": "l", "pooling": "auto"}

    def entry(name, n, seed, **info):
        y = np.arange(n) % 3
        x = (rng.normal(size=(n, 4)) + 3 * np.eye(3, 4)[y]).astype(np.float32)
        store.write(str(tmp_path / name), {"features": x, "labels": y.astype(np.int64)}, {"backbone": spec, "s": seed},
                    {"classes": ["a", "b", "c"], "backbone": spec, **info})
        return str(tmp_path / name)
    feats = [entry("train", 30, 0), entry("val", 30, 1), entry("el", 6, 2, elements_index=str(lib / "index.json"))]

    def train(out, *extra):
        r = subprocess.run([sys.executable, "-m", "IP_training.IP_Prototype_training", "--train_features", feats[0],
                            "--val_features", feats[1], "--concepts", feats[2], "--n_concepts", "3", "--ratios", "0",
                            "0.5", "--lrs", "0.01", "--epochs", "1", "--device", "cpu", "--out", str(out), *extra],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        return r, torch.load(os.path.join(out, "heads.pt"), weights_only=True)["concept_rows"].tolist()
    r, kept = train(tmp_path / "nobg", "--exclude_background")
    assert sorted(kept) == [1, 3, 5] and "3 of 6 elements are mostly background, left out" in r.stdout
    key = json.load(open(tmp_path / "nobg" / "results.json"))["key"]
    # the rows kept are in the key: a background rule that keeps other rows retrains the run
    assert key["exclude_background"] is True and key["kept_rows"] == key_hash({"rows": [1, 3, 5]})
    _, every = train(tmp_path / "all")
    assert sorted(every) != [1, 3, 5] and len(every) == 3
