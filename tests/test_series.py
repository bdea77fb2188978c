"""scripts/classifiability_series.sh on a tiny planted ImageFolder with a random-weight timm test_efficientnet read at
two layers: one pipeline per point (each with its own layer's element embeddings), one report with one row per point
and the correlation line, which with two points says why there is none (the correlation's arithmetic and its
intervals: tests/test_report.py). Bad flags: one error line, exit 2, before anything runs."""
import csv
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, make_image_folder
from utils import layout

LAYERS = ["blocks.3", "pre_logits"]
TRAINING = dict(n_concepts=8, epochs=5, lrs="0.1", floor_draws=1)    # the runner's flags, and the run names they give


def series(tmp, *extra):
    cmd = ["bash", "scripts/classifiability_series.sh", *extra]
    env = dict(os.environ, PYTHON=os.environ.get("PYTHON", sys.executable))
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200, env=env)


@pytest.fixture(scope="module")
def layers_series(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("series")
    folder = make_image_folder(str(tmp / "shapes"))
    config = tmp / "tiny.yaml"
    config.write_text("name: tiny\nsource: timm\narch: test_efficientnet\nweights: none\nlayer: pre_logits\n")
    r = series(tmp, "--series", "layers", "--model_config", str(config), "--values", " ".join(LAYERS),
               "--dataset", folder, "--images_per_class", "2", "--elements", "patches",
               *[a for k, v in TRAINING.items() for a in (f"--{k}", str(v))], "--workers", "0",
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
def test_the_correlation_line_says_why_there_is_none_over_two_points(layers_series):
    rows = list(csv.DictReader(open(layers_series["tmp"] / "report" / "prototype" / "report.csv")))
    line = re.search(r"IIS vs standard top-1: (.*)", layers_series["out"]).group(1)
    assert len(rows) == 2
    distinct = len({r["standard_top1"] for r in rows if r["chance_level"] != "yes"})
    assert line.startswith(f"no correlation: {distinct} distinct standard top-1 value"), line
    assert "a correlation needs at least 3" in line


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
