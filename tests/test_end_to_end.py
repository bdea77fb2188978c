"""The whole chain through scripts/run_pipeline.sh, as a user runs it, on a tiny planted ImageFolder."""
import json
import os
import subprocess

import numpy as np
import pytest

from conftest import REPO
from utils.iis import iis


@pytest.mark.slow
def test_pipeline_end_to_end_and_resume(image_folder, tmp_path):
    out, lib = str(tmp_path / "out"), str(tmp_path / "lib")
    concepts = str(tmp_path / "concepts.txt")
    with open(concepts, "w") as f:
        f.write("red square\ngreen square\nblue square\ngrey noise\n")
    cmd = ["bash", "scripts/run_pipeline.sh", "--dataset", image_folder, "--images_per_class", "2",
           "--elements", "patches", "--n_concepts", "12",
           "--concept_types", "prototype cluster end2end text",
           "--clip_model", os.path.join(REPO, "tests", "assets", "tiny-clip.json"), "--clip_pretrained", "none",
           "--clip_cutoff", "-1", "--interpretability_cutoff", "-1", "--text_concepts", concepts,
           "--epochs", "15", "--lrs", "0.01 0.1", "--workers", "0",
           "--batch_size", "16", "--library", lib, "--out", out]
    env = dict(os.environ, PYTHON=os.environ.get("PYTHON", "python"))
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run_dir = os.path.join(out, "runs", "shapes", "efficientnet_lite0", "prototype_patches")
    res = json.load(open(os.path.join(run_dir, "results.json")))
    scored = json.load(open(os.path.join(run_dir, "iis.json")))
    assert os.path.getsize(os.path.join(run_dir, "iis_curve.png")) > 10_000
    assert res["meta"]["n_train"] == 18 and res["meta"]["n_val"] == 9 and res["meta"]["n_concepts"] == 12
    assert len(res["runs"]) == 2 + 8 * 2
    text = json.load(open(os.path.join(out, "runs", "shapes", "efficientnet_lite0", "text", "results.json")))
    assert text["meta"]["concepts"] == ["red square", "green square", "blue square", "grey noise"]
    # iis.json is the paper's formula applied to results.json
    std = max(r["top1"] for r in res["runs"] if r["head"] == "standard")
    accs = [max(r["top1"] for r in res["runs"] if r["ratio"] == s) for s in res["sparsity_grid"]]
    assert scored["iis"] == pytest.approx(iis(res["sparsity_grid"], accs, std))
    assert scored["iis"] > 0.3
    assert std > 60                                    # the planted colour squares are easy for ImageNet features
    assert f"IIS = {scored['iis']:.4f}" in r.stdout
    # the three concept types, scored side by side in one table and one plot
    table = [ln for ln in r.stdout.splitlines() if ln.startswith("efficientnet_lite0@pre_logits ")]
    assert [ln.split()[1] for ln in table] == ["prototype", "cluster", "end2end", "text"]
    for ln, ct in zip(table, ["prototype", "cluster", "end2end"]):
        other = json.load(open(os.path.join(out, "runs", "shapes", "efficientnet_lite0", f"{ct}_patches", "iis.json")))
        assert f"{other['iis']:.4f}" in ln and other["meta"]["concept_type"] == ct
    assert os.path.getsize(os.path.join(out, "runs", "shapes", "efficientnet_lite0", "iis_patches.png")) > 10_000
    # second run: every stage reuses its output
    r2 = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    # elements, element embeddings, CLIP text/train/val, train and val features, 4 trainings
    assert r2.returncode == 0 and r2.stdout.count("up to date") == 2 + 3 + 2 + 4, r2.stdout
    heads = __import__("torch").load(os.path.join(run_dir, "heads.pt"), weights_only=True)
    assert heads["concepts"].shape == (12, 1280)
    assert np.allclose(heads["concepts"].norm(dim=1).numpy(), 1.0, atol=1e-5)
