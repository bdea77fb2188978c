"""The one naming rule (utils/layout.py): what determines an output is in its path, the runners ask the rule instead of
repeating it, and a second experiment leaves every file of the first byte-identical."""
import hashlib
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, make_image_folder
from utils import layout


def test_paths_hold_what_determines_them(tmp_path):
    assert layout.data_tag("fashion_mnist") == "fashion_mnist"
    a, b = tmp_path / "a" / "val", tmp_path / "b" / "val"          # two folders of one name are two datasets
    assert layout.data_tag(str(a)).startswith("val-") and layout.data_tag(str(a)) != layout.data_tag(str(b))
    assert layout.data_tag(str(a)) == layout.data_tag(str(a) + "/")
    assert layout.subset_tag(2000, 1000) == "n2000-1000" and layout.subset_tag(0, None) == "nall-all"
    assert layout.subset_tag("500", "300") == "n500-300"
    assert layout.library_tag("segments", 4, 0) == "segments_ipc4_seed0"
    assert layout.library_dir("lib", "fashion_mnist", 4, 1) == os.path.join("lib", "fashion_mnist", "ipc4_seed1")
    # weights: the config's own -> nothing; a name -> the name; a file -> its bytes' digest (not its path)
    assert layout.model_folder("efficientnet_lite0") == "efficientnet_lite0"
    assert layout.model_folder("resnet50", "layer3", "IMAGENET1K_V2") == "resnet50@layer3+IMAGENET1K_V2"
    ckpt = tmp_path / "backbone.safetensors"
    ckpt.write_bytes(b"one")
    first = layout.model_folder("efficientnet_lite0", None, str(ckpt))
    assert first == "efficientnet_lite0+ft-" + hashlib.sha256(b"one").hexdigest()[:16]
    ckpt.write_bytes(b"two")
    assert layout.model_folder("efficientnet_lite0", None, str(ckpt)) != first
    assert layout.model_label(first) == "efficientnet_lite0 ft:" + hashlib.sha256(b"one").hexdigest()[:8]
    assert layout.model_label("resnet50@layer3") == "resnet50@layer3"
    # training settings: the defaults add nothing, any other value a tag of its own
    assert layout.run_name("prototype", "segments_ipc4_seed0") == "prototype_segments_ipc4_seed0"
    assert layout.run_name("text", "segments_ipc4_seed0", epochs="30", lrs="") == "text"
    tags = {layout.training_tag(epochs=e) for e in ("5", "6")} | {layout.training_tag(lrs="0.1", epochs="5")}
    assert len(tags) == 3 and all(t.startswith("_t") and len(t) == 10 for t in tags)
    assert layout.training_tag(epochs=5) == layout.training_tag(epochs="5")


def test_the_runners_ask_the_rule(tmp_path):
    """scripts/layout.py prints what the Python functions return; no runner builds a path from a dataset name."""
    folder = str(tmp_path / "mine")
    r = subprocess.run([sys.executable, "scripts/layout.py", "--dataset", folder, "--train_size", "500",
                        "--val_size", "300", "--images_per_class", "4", "--concept_types", "prototype text",
                        "--epochs", "5", "--report", "compare"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    got = dict(line.split("=", 1) for line in r.stdout.splitlines())
    runs = layout.runs_dir("outputs", folder, "efficientnet_lite0", 500, 300)
    assert got["runs"] == runs and got["library_dir"] == layout.library_dir("concept_library/prototype", folder, 4, 0)
    assert got["run_prototype"] == os.path.join(runs, layout.run_name("prototype", "segments_ipc4_seed0", epochs=5))
    assert got["run_text"] == os.path.join(runs, "text" + layout.training_tag(epochs=5))
    assert got["report"] == layout.report_dir("outputs", folder, 500, 300, "compare")
    assert got["elements_features"] == os.path.join(got["features"], "elements_segments_ipc4_seed0")
    for name in ("run_pipeline.sh", "compare_backbones.sh", "finetune_compare.sh", "train_heads.sh",
                 "classifiability_series.sh"):
        text = open(os.path.join(REPO, "scripts", name)).read()
        assert "scripts/layout.py" in text and "basename \"$dataset\")\n" not in text and "model_tag.py" not in text


def test_compare_backbones_names_runs_by_every_training_setting():
    """compare_backbones.sh hands the flags it was given to scripts/layout.py to find the run folders run_pipeline.sh
    trained: every training setting of the rule must be among them, or a run with it (--floor_draws 0) is looked for
    in the untagged folder (seen in the Done-when sequence: 'no results.json at ...prototype_segments_ipc4_seed0')."""
    text = open(os.path.join(REPO, "scripts", "compare_backbones.sh")).read()
    handed = re.search(r"ask_layout\(\) \{.*?for f in (.*?); do", text, re.S).group(1).replace("\\\n", " ").split()
    assert set(layout.TRAINING_DEFAULTS) <= set(handed), set(layout.TRAINING_DEFAULTS) - set(handed)


def tree_digests(*roots):
    out = {}
    for root in roots:
        for d, _, files in os.walk(root):
            for f in files:
                p = os.path.join(d, f)
                out[p] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


@pytest.mark.slow
def test_a_second_experiment_never_changes_the_first(tmp_path):
    """demo-like run -> own 3-class folder -> the first data at other subset sizes, all into one --out and --library:
    every file of the first run is byte-identical afterwards, and the first command again finds every stage done."""
    first_data = make_image_folder(str(tmp_path / "shapes"), n_train=4, n_val=3)
    own = make_image_folder(str(tmp_path / "own" / "shapes"), n_train=3, n_val=2, seed=1)   # same folder name
    out, lib = str(tmp_path / "out"), str(tmp_path / "lib")
    env = dict(os.environ, PYTHON=os.environ.get("PYTHON", sys.executable))

    def pipeline(data, *extra):
        cmd = ["bash", "scripts/run_pipeline.sh", "--dataset", data, "--elements", "patches", "--images_per_class",
               "1", "--concept_types", "prototype", "--n_concepts", "6", "--epochs", "2", "--workers", "0",
               "--batch_size", "16", "--device", "cpu", "--library", lib, "--out", out, *extra]
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return r

    pipeline(first_data)
    before = tree_digests(out, lib)
    pipeline(own)
    pipeline(first_data, "--train_size", "6", "--val_size", "6")
    after = tree_digests(out, lib)
    assert {p: after.get(p) for p in before} == before
    assert len(after) > len(before)
    libs = sorted(os.listdir(lib))
    assert len(libs) == 2 and libs[0] != libs[1] and all(x.startswith("shapes-") for x in libs)
    runs = os.path.join(out, "runs", layout.data_tag(first_data))
    assert sorted(os.listdir(runs)) == ["n6-6", "nall-all"]
    again = pipeline(first_data)
    assert again.stdout.count("up to date") == 5, again.stdout     # elements, embeddings, train, val, training
    assert tree_digests(out, lib) == after


def test_runners_never_guess_data(tmp_path):
    """The original's runner without its default dataset, or with a --data_root that does not exist: one error line,
    exit 2, and no dataset folder created (it used to download Fashion-MNIST into datasets/imagenet/val)."""
    if os.path.exists(os.path.join(REPO, "datasets", "imagenet", "val")):
        pytest.skip("this checkout has datasets/imagenet/val")
    missing = str(tmp_path / "nowhere" / "val")
    for extra, said in (([], "error: no datasets/imagenet/val (a folder of class folders"),
                        (["--data_root", missing], f"error: --data_root {missing}: no such folder")):
        r = subprocess.run(["bash", "scripts/concept_extract.sh", *extra, "--save_root", str(tmp_path / "lib")],
                           cwd=REPO, capture_output=True, text=True, timeout=120)
        assert (r.returncode, r.stdout) == (2, ""), r.stderr
        assert r.stderr.startswith(said) and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not os.path.exists(os.path.join(REPO, "datasets")) and not os.path.exists(tmp_path / "nowhere")
    assert not os.path.exists(tmp_path / "lib")


def test_docs_show_the_rule_as_the_code_has_it():
    rule = [ln for ln in layout.__doc__.splitlines() if ln.startswith("    <")]
    page = open(os.path.join(REPO, "docs", "files.md")).read()
    assert len(rule) >= 6 and "\n".join(rule) in page
