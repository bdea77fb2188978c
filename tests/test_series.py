"""scripts/classifiability_series.sh on a tiny planted ImageFolder with a random-weight timm test_efficientnet read at
three layers: one pipeline per point, one report with one row per point, and the correlation line printed from the
report's own rows (over runs and over the paired val resamples)."""
import csv
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, make_image_folder
from utils import layout, stats

LAYERS = ["blocks.1", "blocks.3", "pre_logits"]
TRAINING = dict(n_concepts=8, epochs=8, lrs="0.1", floor_draws=1)


def series(tmp, *extra):
    cmd = ["bash", "scripts/classifiability_series.sh", *extra]
    env = dict(os.environ, PYTHON=os.environ.get("PYTHON", sys.executable))
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)


@pytest.fixture(scope="module")
def layers_series(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("series")
    folder = make_image_folder(str(tmp / "shapes"), n_train=8, n_val=10)
    config = tmp / "tiny.yaml"
    config.write_text("name: tiny\nsource: timm\narch: test_efficientnet\nweights: none\nlayer: pre_logits\n")
    r = series(tmp, "--series", "layers", "--model_config", str(config), "--values", " ".join(LAYERS),
               "--dataset", folder, "--images_per_class", "2", "--elements", "patches",
               "--n_concepts", "8", "--epochs", "8", "--lrs", "0.1", "--floor_draws", "1", "--workers", "0",
               "--batch_size", "16", "--library", str(tmp / "lib"), "--out", str(tmp / "out"),
               "--report", str(tmp / "report"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return dict(tmp=tmp, folder=folder, config=str(config), out=r.stdout)


@pytest.mark.slow
def test_one_row_per_point_from_its_own_layer(layers_series):
    tmp = layers_series["tmp"]
    rows = list(csv.DictReader(open(tmp / "report" / "prototype" / "report.csv")))
    assert [r["layer"] for r in rows] == LAYERS
    for lay, r in zip(LAYERS, rows):
        run = os.path.join(layout.runs_dir(str(tmp / "out"), layers_series["folder"], f"tiny@{lay}", 0, 0),
                           layout.run_name("prototype", "patches_ipc2_seed0", **TRAINING))
        assert os.path.isfile(os.path.join(run, "iis.json")), run
        # the element embeddings of each point come from that point's layer: their width is the layer's
        feat = layout.features_dir(str(tmp / "out"), layers_series["folder"], f"tiny@{lay}", 0, 0)
        assert os.path.isdir(os.path.join(feat, "elements_patches_ipc2_seed0"))
        assert r["floor"] != "" and r["lift"] != ""                     # the floor and lift of every point
    assert layers_series["out"].count("features of every point in one pass") == 2


@pytest.mark.slow
def test_the_correlation_line_is_that_of_the_rows(layers_series):
    rows = list(csv.DictReader(open(layers_series["tmp"] / "report" / "prototype" / "report.csv")))
    line = re.search(r"IIS vs standard top-1: (.*)", layers_series["out"]).group(1)
    kept = [r for r in rows if r["chance_level"] != "yes"]
    if len({r["standard_top1"] for r in kept}) < 3:
        assert line.startswith("no correlation: "), line
        return
    expected = stats.correlations([float(r["standard_top1"]) for r in kept], [float(r["iis"]) for r in kept])
    printed = re.search(r"Pearson (-?[\d.]+).*Spearman (-?[\d.]+)", line).groups()
    np.testing.assert_allclose([float(v) for v in printed], expected, atol=1e-3)
    assert "over val samples: Pearson [" in line and "paired bootstrap resamples" in line


@pytest.mark.parametrize("args,message", [
    (["--series", "epochs"], "error: --series must be layers, checkpoints or models, got 'epochs'"),
    (["--series", "checkpoints"], "error: --series checkpoints needs --values"),
    (["--series", "checkpoints", "--values", "/nonexistent/ep1.pth /nonexistent/ep2.pth"],
     "error: checkpoint /nonexistent/ep1.pth does not exist"),
    (["--values", "blocks.2"], "error: --values: a series needs at least 2 points"),
    (["--concept_types", "text"], "error: --concept_types: text is not a visual concept type"),
    (["--layer", "blocks.2"], "error: unknown flag --layer"),
])
def test_bad_flags_exit_2_with_one_error_line(tmp_path, args, message):
    r = series(tmp_path, *args)
    assert r.returncode == 2 and r.stderr.strip().startswith(message) and len(r.stderr.strip().splitlines()) == 1, \
        r.stderr
