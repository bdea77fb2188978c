"""The whole chain as a user runs it, on a tiny planted ImageFolder: scripts/compare_backbones.sh over two layers of
the default backbone and all four concept types, then the report, the explanations and a resumed second run."""
import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, make_image_folder
from utils import fileio, layout, store
from utils.explanations import Run
from utils.iis import iis

TYPES = ["prototype", "cluster", "end2end", "text"]
LAYERS = ["efficientnet_lite0", "efficientnet_lite0@blocks.5"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    folder = make_image_folder(str(tmp / "shapes"))
    concepts = tmp / "concepts.txt"
    concepts.write_text("red square\ngreen square\nblue square\ngrey noise\n")
    cmd = ["bash", "scripts/compare_backbones.sh", "--models", "efficientnet_lite0 efficientnet_lite0:blocks.5",
           "--dataset", folder, "--images_per_class", "2", "--elements", "patches", "--n_concepts", "12",
           "--concept_types", " ".join(TYPES),
           "--clip_model", os.path.join(REPO, "tests", "assets", "tiny-clip.json"), "--clip_pretrained", "none",
           "--clip_cutoff", "-1", "--interpretability_cutoff", "-1", "--text_concepts", str(concepts),
           "--epochs", "15", "--lrs", "0.01 0.1", "--workers", "0", "--batch_size", "16",
           "--library", str(tmp / "lib"), "--out", str(tmp / "out"), "--report", str(tmp / "report")]
    env = dict(os.environ, PYTHON=os.environ.get("PYTHON", sys.executable))
    first = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200, env=env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    second = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200, env=env)
    return dict(tmp=tmp, folder=folder, cmd=cmd, env=env, first=first, second=second,
                runs={(layer, ct): Path(layout.runs_dir(str(tmp / "out"), folder, layer, 0, 0)) / layout.run_name(
                          ct, "patches_ipc2_seed0", n_concepts=12, epochs=15, lrs="0.01 0.1", clip_cutoff=-1,
                          interpretability_cutoff=-1) for layer in LAYERS for ct in TYPES})


@pytest.mark.slow
def test_every_run_scores_by_the_formula(pipeline):
    for (layer, ct), run in pipeline["runs"].items():
        res = json.load(open(run / "results.json"))
        scored = json.load(open(run / "iis.json"))
        def chosen(rows):   # the head with the best selection accuracy (held-out dev top-1), ties: lower lr
            return max(rows, key=lambda r: (r["select_top1"], -(r["lr"] or 0.0)))["top1"]
        std = chosen([r for r in res["runs"] if r["head"] == "standard"])
        accs = [chosen([r for r in res["runs"] if r["head"] == "concept" and r["ratio"] == s])
                for s in res["sparsity_grid"]]
        assert scored["iis"] == pytest.approx(iis(res["sparsity_grid"], accs, std))
        assert res["meta"]["concept_type"] == ct and res["meta"]["n_train"] == 18 and res["meta"]["n_val"] == 9
        floor_rows = [r for r in res["runs"] if r["head"] == "floor"]     # the iis protocol's 3 draws, not for text
        # one converged standard probe (the seed's), 8 ratios x 2 lrs
        assert len(res["runs"]) - len(floor_rows) == 1 + 8 * 2 and len(floor_rows) == (0 if ct == "text" else 3 * 8 * 2)
        assert [(r["probe"], r["lr"]) for r in res["runs"] if r["head"] == "standard"] == [("converged", None)]
        assert (scored.get("floor") is None) == (ct == "text")
    top = json.load(open(pipeline["runs"][(LAYERS[0], "prototype")] / "results.json"))
    assert max(r["top1"] for r in top["runs"] if r["head"] == "standard") > 60   # colour squares are easy
    text = json.load(open(pipeline["runs"][(LAYERS[0], "text")] / "results.json"))
    assert text["meta"]["concepts"] == ["red square", "green square", "blue square", "grey noise"]


@pytest.mark.slow
def test_report_table_matches_the_results(pipeline):
    report = pipeline["tmp"] / "report"
    rows = list(csv.DictReader(open(report / "report.csv")))
    assert len(rows) == len(LAYERS) * len(TYPES)
    for row in rows:
        layer = LAYERS[0] if row["layer"] == "pre_logits" else LAYERS[1]
        scored = json.load(open(pipeline["runs"][(layer, row["concept_type"])] / "iis.json"))
        assert float(row["iis"]) == pytest.approx(scored["iis"], abs=1e-4)
        assert float(row["standard_top1"]) == pytest.approx(scored["standard_accuracy"], abs=0.01)
        for r, a in zip(scored["ratios"], scored["accuracies"]):
            assert float(row[f"top1@{r:g}"]) == pytest.approx(a, abs=0.01)
    md = open(report / "report.md").read().split("\n\n")[0].splitlines()   # the table; paired verdicts follow
    assert len(md) == 2 + len(rows) and md[0].startswith("| # | backbone | weights | layer | dataset | n_train")
    assert os.path.getsize(report / "curves.png") > 10_000
    # a scatter only where top-1 varies; a correlation only over >= 3 distinct top-1 values of non-chance runs
    assert os.path.exists(report / "scatter.png") == (len({r["standard_top1"] for r in rows}) > 1)
    from utils.report import correlations
    kept = [r for r in rows if r["chance_level"] != "yes"]     # chance-level runs are left out of the correlations
    if len({r["standard_top1"] for r in kept}) >= 3:
        expected = correlations([float(r["standard_top1"]) for r in kept], [float(r["iis"]) for r in kept])
        printed = re.search(r"Pearson (-?[\d.]+|nan).*Spearman (-?[\d.]+|nan)", pipeline["first"].stdout).groups()
        np.testing.assert_allclose([float(v) for v in printed], expected, atol=1e-3)
    else:
        assert "IIS vs standard top-1: no correlation: " in pipeline["first"].stdout


@pytest.mark.slow
def test_second_run_reuses_every_stage(pipeline):
    out = pipeline["second"]
    assert out.returncode == 0
    # per layer: elements, element embeddings, CLIP text/train/val, train and val features (by the one-pass
    # extraction and again by the per-model pipeline), four trainings
    assert out.stdout.count("up to date") == len(LAYERS) * (2 + 3 + 2 * 2 + 4), out.stdout


@pytest.mark.slow
def test_one_pass_extraction_feeds_every_pipeline(pipeline):
    first = pipeline["first"].stdout
    assert first.count("features of every model in one pass") == 2
    for layer in LAYERS:
        for split in ("train", "val"):
            feat = layout.features_dir(str(pipeline["tmp"] / "out"), pipeline["folder"], layer, 0, 0)
            assert f"{os.path.join(feat, split)} is up to date" in first


@pytest.mark.slow
def test_heads_recomputed_from_heads_pt_reproduce_the_reported_accuracy(pipeline):
    for ct in TYPES:
        run = Run(str(pipeline["runs"][(LAYERS[0], ct)]))
        arrays, _ = store.read(run.meta["inputs"]["val"])
        x, y = np.asarray(arrays["features"]), torch.tensor(np.asarray(arrays["labels"]))
        for ratio in (0.0, 0.9):
            h = run.head(ratio)
            _, _, logits = run.activations(h, x)
            rows = [r for r in run.results["runs"] if r["head"] == "concept" and r["ratio"] == ratio]
            scored = max(rows, key=lambda r: (r["select_top1"], -r["lr"]))     # the head the IIS took (ties: lower lr)
            assert 100.0 * (logits.argmax(1) == y).sum().item() / len(y) == pytest.approx(scored["top1"], abs=1e-6)


@pytest.mark.slow
def test_a_rebuilt_element_library_is_not_shown_as_the_runs_concepts(pipeline, tmp_path):
    """Concepts name rows of the library they were trained from; once it is rebuilt (other settings or dataset, same
    folder) those rows are other images: the explanation says so and shows none, instead of the wrong ones."""
    run_dir, lib = tmp_path / "run", tmp_path / "lib"
    shutil.copytree(pipeline["runs"][(LAYERS[0], "prototype")], run_dir)
    res = json.load(open(run_dir / "results.json"))
    shutil.copytree(os.path.dirname(res["meta"]["elements"]), lib)
    res["meta"]["elements"] = str(lib / "index.json")
    fileio.atomic_write_json(str(run_dir / "results.json"), res)
    assert Run(str(run_dir)).elements is not None                    # the same library, moved: its images are shown
    index = json.load(open(lib / "index.json"))
    index["elements"] = index["elements"][::-1]                      # rebuilt: other images under the same rows
    fileio.atomic_write_json(str(lib / "index.json"), index)
    assert "was rebuilt since this run" in Run(str(run_dir)).elements_missing
    r = subprocess.run([pipeline["env"]["PYTHON"], "explain.py", str(run_dir), "--index", "3", "--top", "4"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stderr.startswith("note: concepts are shown without their element images"), r.stderr
    assert "_concept" not in open(run_dir / "explanations" / "explain_val3.html").read()


@pytest.mark.slow
def test_explanations_and_gallery_reference_existing_images(pipeline):
    for ct in ("prototype", "end2end", "text"):
        run = str(pipeline["runs"][(LAYERS[0], ct)])
        for extra in (["--index", "3"], ["--gallery", "--concepts", "4", "--per_concept", "3"]):
            r = subprocess.run([pipeline["env"]["PYTHON"], "explain.py", run, *extra, "--top", "4"], cwd=REPO,
                               capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, r.stderr[-2000:]
        out = os.path.join(run, "explanations")
        for page in ("explain_val3.html", "gallery.html"):
            srcs = re.findall(r"src='([^']+)'", open(os.path.join(out, page)).read())
            assert srcs and all(os.path.isfile(os.path.join(out, s)) for s in srcs)
        assert os.path.getsize(os.path.join(out, "explain_val3.png")) > 5_000
        html = open(os.path.join(out, "explain_val3.html")).read()
        if ct == "text":
            assert any(w in html for w in ("red square", "green square", "blue square", "grey noise"))
        else:
            assert html.count("_concept") >= 4                             # each shown concept has its element image
