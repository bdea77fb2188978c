"""The scripts as a user runs them: --help everywhere, one clear line and exit code 2 for bad input, nothing written."""
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from utils import store

SCRIPTS = ["concept_extractor.segment_extractor", "concept_extractor.patch_extractor",
           "concept_extractor.visual_element_emb_extractor", "concept_extractor.dataset_feature_extractor",
           "IP_training.IP_Prototype_training", "IP_training.IP_Text_training",
           "concept_extractor.textual_emb_extractor", "concept_extractor.concept_set_builder"]


def run(*args, cwd=REPO):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("mod", SCRIPTS)
def test_help(mod):
    r = run("-m", mod, "--help")
    assert r.returncode == 0 and "usage:" in r.stdout and "python -m" in r.stdout


def test_iis_and_explain_help():
    r = run("iis_computing.py", "--help")
    assert r.returncode == 0 and "trapezoid" in r.stdout
    r = run("explain.py", "--help")
    assert r.returncode == 0 and "python explain.py" in r.stdout


def one_line_error(r, *words):
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for w in words:
        assert w in lines[0]


def test_unknown_backbone_and_weights(tmp_path):
    out = str(tmp_path / "f")
    r = run("-m", "concept_extractor.dataset_feature_extractor", "--backbone", "resnet5O", "--out", out)
    one_line_error(r, "unknown backbone 'resnet5O'")
    r = run("-m", "concept_extractor.dataset_feature_extractor", "--model_config", "resnet50",
            "--weights", "IMAGENET9K", "--out", out)
    one_line_error(r, "unknown weights 'IMAGENET9K'", "IMAGENET1K_V2")
    assert not os.path.exists(out)


def test_missing_and_empty_dataset_folder(tmp_path):
    out = str(tmp_path / "f")
    r = run("-m", "concept_extractor.dataset_feature_extractor", "--dataset", str(tmp_path / "none"), "--out", out)
    one_line_error(r, "does not exist")
    (tmp_path / "empty" / "train" / "a").mkdir(parents=True)
    r = run("-m", "concept_extractor.segment_extractor", "--dataset", str(tmp_path / "empty"),
            "--out_dir", str(tmp_path / "lib"))
    one_line_error(r, "no images found")
    assert os.listdir(tmp_path) == ["empty"]


def test_feature_count_mismatch_is_refused_and_nothing_written(tmp_path):
    key = {"backbone": {"name": "b"}}
    info = {"classes": ["a", "b"], "backbone": {"name": "b"}}
    store.write(str(tmp_path / "train"), {"features": np.zeros((5, 4), np.float32),
                                          "labels": np.zeros(4, np.int64)}, key, info)
    store.write(str(tmp_path / "val"), {"features": np.zeros((3, 4), np.float32),
                                        "labels": np.zeros(3, np.int64)}, key, info)
    out = str(tmp_path / "run")
    r = run("-m", "IP_training.IP_Prototype_training", "--train_features", str(tmp_path / "train"),
            "--val_features", str(tmp_path / "val"), "--concepts", str(tmp_path / "val"), "--out", out)
    one_line_error(r, "5 feature rows but 4 labels")
    assert not os.path.exists(out)


def test_single_sparsity_ratio_is_refused(tmp_path):
    r = run("-m", "IP_training.IP_Prototype_training", "--train_features", "x", "--val_features", "x",
            "--concepts", "x", "--ratios", "0.9", "--out", str(tmp_path / "r"))
    one_line_error(r, "at least two sparsity ratios")
