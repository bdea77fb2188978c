"""What a newcomer types: the original README's commands (its flags, from inside the stage folders), the stage scripts
as files from any folder, and the runners in a shell where .venv is not activated."""
import importlib
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from concept_extractor import dataset_feature_extractor as dfe
from conftest import REPO, make_image_folder
from utils import compat, fileio, layout, store
from utils.errors import UserError

SCRIPTS = {"segment_extractor": "concept_extractor", "patch_extractor": "concept_extractor",
           "visual_element_emb_extractor": "concept_extractor", "dataset_feature_extractor": "concept_extractor",
           "textual_emb_extractor": "concept_extractor", "concept_set_builder": "concept_extractor",
           "IP_Prototype_training": "IP_training", "IP_Text_training": "IP_training",
           "iis_computing": None, "explain": None}
# flags each parser requires, so that one alias can be parsed alone (an alias's tokens come later and win)
REQUIRED = {"visual_element_emb_extractor": ["--out", "o"], "dataset_feature_extractor": ["--out", "o"],
            "textual_emb_extractor": ["--concepts", "c.txt", "--out", "o"],
            "IP_Prototype_training": ["--train_features", "t", "--val_features", "v", "--concepts", "c", "--out", "o"],
            "IP_Text_training": ["--train_features", "t", "--val_features", "v", "--clip", "c", "--out", "o"]}


def script_path(name):
    return os.path.join(REPO, *(d for d in (SCRIPTS[name],) if d), f"{name}.py")


def parse(name, argv):
    """Our parsed flags for the original ``argv`` given to script ``name``, its checks run; the commands of ours it
    stands for first (the original textual_emb_extractor's backbone features) are parsed too, as ``args.first``:
    {split: dataset_feature_extractor's parsed flags}."""
    module = importlib.import_module(f"{SCRIPTS[name]}.{name}" if SCRIPTS[name] else name)
    ours, ctx = compat.translate(script_path(name), REQUIRED.get(name, []) + argv)
    args = module.get_args_parser().parse_args(ours)
    for check in ctx.checks:
        check(args)
    args.first = {}
    for cmd in ctx.before:
        assert cmd[:2] == ["-m", "concept_extractor.dataset_feature_extractor"]
        step = dfe.get_args_parser().parse_args(cmd[2:])
        args.first[step.split] = step
    return args


def lookup(args, key):
    """``args.<key>``, or for "train:<key>" / "val:<key>" that attribute of the backbone run of that split."""
    split, _, name = key.rpartition(":")
    return getattr(args.first[split] if split else args, name)


def fake_entry(path, n=12, dim=4, classes=("a", "b"), name="resnet18", seed=0):
    """A store entry of features as the extractors write it (separable classes)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % len(classes)
    x = (rng.normal(size=(n, dim)) + 3 * np.eye(len(classes), dim)[y]).astype(np.float32)
    spec = {"name": name, "arch": name, "weights": "none", "layer": "layer4", "pooling": "auto"}
    store.write(str(path), {"features": x, "labels": y.astype(np.int64)}, {"backbone": spec},
                {"classes": list(classes), "backbone": spec})
    return str(path)


@pytest.fixture
def place(tmp_path, monkeypatch):
    """A working folder with a class-folder dataset under datasets/ and a features entry."""
    monkeypatch.chdir(tmp_path)
    make_image_folder(str(tmp_path / "datasets" / "imagenet"), n_train=1, n_val=1, size=16)
    fake_entry(tmp_path / "e")
    return tmp_path


def case(flag, name, tmp):
    """(original argv, {attribute: expected value}) for the alias row whose first flag is ``flag``, given to script
    ``name``; UserError where the flag is refused."""
    method = "patches" if name == "patch_extractor" else "segments"
    activation = ["--dataset", "imagenet", "--backbone", "resnet18", "--feature_layer", "layer4",
                  "--activation_dir", "a"]
    return {
        "--data_root": (["--data_root", "datasets/imagenet/val"], {"images": "datasets/imagenet/val",
                                                                   "data_root": "data"}),
        "--save_root": (["--save_root", f"lib/{method}"], {"out_dir": "lib"}),
        "--image_per_class": (["--image_per_class", "3"], {"images_per_class": 3}),
        "--dataset": (["--dataset", "imagenet"], {"dataset": os.path.join(".", "datasets", "imagenet")}),
        "--model_config": (["--model_config", "resnet50_IMAGENET1K_V1"], {   # the dataset extractor takes several
            "model_config": ["resnet50"] if name == "dataset_feature_extractor" else "resnet50",
            "weights": "IMAGENET1K_V1"}) if name != "textual_emb_extractor" else (   # for its backbone runs
            ["--dataset", "imagenet", "--activation_dir", "a", "--model_config", "resnet50_IMAGENET1K_V1"],
            {"train:model_config": ["resnet50"], "train:weights": "IMAGENET1K_V1", "val:model_config": ["resnet50"],
             "val:weights": "IMAGENET1K_V1"}),
        "--config_yaml": (["--config_yaml", "../model_configs/resnet50_IMAGENET1K_V1.yaml"],
                          {"model_config": "resnet50", "weights": "IMAGENET1K_V1"}),
        "--model": (["--model", "resnet18"], {"model_config": "resnet18", "backbone": None}),
        "--target_layer_name": (["--target_layer_name", "layer4"], {"layer": "layer4"}),
        "--data-path": (["--data-path", "lib/segments"], {"elements": "lib/segments"}),
        "--batch-size": (["--batch-size", "8"], {"batch_size": 8}),
        "-j": (["-j", "0"], {"workers": 0}),
        "--resume": (["--resume", "ckpt.pth"], {"weights": "ckpt.pth"}),
        "--val-resize-size": (["--val-resize-size", "256"], UserError),
        "--lam": (["--lam", "0.0007"], UserError),
        "--proj_steps": (["--proj_steps", "1000"], UserError),
        "--print": (["--print"], {"out": "o"}),
        "--concept_set": (["--concept_set", "c/mine.txt"], {"concepts": "c/mine.txt"})
        if name == "textual_emb_extractor" else (activation + ["--concept_set", "c/mine.txt"],
                                                 {"clip": "a/imagenet_clip_mine"}),
        "--clip_name": (["--clip_name", "ViT-B/16"], {"clip_model": "ViT-B-16"}),
        "--backbone": (["--dataset", "imagenet", "--activation_dir", "a", "--backbone", "resnet50"],
                       {"train:model_config": ["resnet50"], "train:backbone": None}),
        "--feature_layer": (["--dataset", "imagenet", "--backbone", "resnet18", "--activation_dir", "a",
                             "--feature_layer", "layer3"], {"train:layer": ["layer3"], "val:layer": ["layer3"]}),
        "--activation_dir": (activation + ["--concept_set", "c/imagenet_filtered.txt"], {
            "train:out": "a/imagenet_train_resnet18_layer4", "val:out": "a/imagenet_val_resnet18_layer4",
            "out": "a/imagenet_clip_imagenet_filtered", "train:layer": ["layer4"],
            "train:model_config": ["resnet18"]}) if name == "textual_emb_extractor" else (activation, {
                "train_features": "a/imagenet_train_resnet18_layer4", "val_features": "a/imagenet_val_resnet18_layer4",
                "clip": "a/imagenet_clip_imagenet_filtered"}),
        "--train_pt": (["--train_pt", str(tmp / "e.pt")], {"train_features": str(tmp / "e")}),
        "--val_pt": (["--val_pt", str(tmp / "e.pt")], {"val_features": str(tmp / "e")}),
        "--concept_path": (["--concept_path", str(tmp / "e.pkl")], {"concepts": str(tmp / "e")}),
        "--num_concepts": (["--num_concepts", "7"], {"n_concepts": 7}),
        "--n_epoch": (["--n_epoch", "3"], {"epochs": 3}),
        "--save_dir": (["--save_dir", "d"], {"out": "d"}),
        "--in_channels": (["--train_pt", "e.pt", "--in_channels", "4"], {"train_features": "e"}),
        "--num_classes": (["--train_pt", "e.pt", "--num_classes", "2"], {"train_features": "e"}),
        "--model_name": (["--train_pt", "e.pt", "--model_name", "resnet18"], {"train_features": "e"}),
        "--sparsity_ratio": (["--sparsity_ratio"], {"ratios": [0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 0.95, 0.98]}),
        "--sparsity_ratio_value": (["--sparsity_ratio_value", "0.5"], UserError),
        "--model_root": (["--model_root", "d"], {"results": ["d"]}),
        "--seed": (["--seeds", "1", "2", "--seed", "3"], {"seeds": [3]}),
    }[flag]


@pytest.mark.parametrize("alias,flag,name", [(a, f, s) for a in compat.ALIASES for f in a.flags for s in a.scripts],
                         ids=lambda v: "" if isinstance(v, compat.Alias) else v)
def test_each_alias_becomes_our_flag(place, alias, flag, name):
    argv, expected = case(alias.flags[0], name, place)
    if alias.apply is not None:                          # each spelling of one flag (a composed row uses them all)
        argv = [flag if a == alias.flags[0] else a for a in argv]
    if expected is UserError:
        with pytest.raises(UserError):
            parse(name, argv)
        return
    args = parse(name, argv)
    assert {k: lookup(args, k) for k in expected} == expected


def test_data_root_keeps_its_meaning_when_it_is_not_a_folder_of_class_folders(place):
    args = parse("segment_extractor", ["--data_root", "datasets/imagenet"])   # holds train/ and val/
    assert (args.data_root, args.images) == ("datasets/imagenet", None)


def test_original_yaml_format_and_unexpanded_shell_variables(tmp_path):
    cfg = tmp_path / "resnet18_IMAGENET1K_V1.yaml"
    cfg.write_text("model: resnet18\nweights: IMAGENET1K_V1\ndevice: cuda\nbatch_size: 256\n")
    args = parse("visual_element_emb_extractor", ["--config_yaml", str(cfg), "--weights", "none"])
    assert (args.model_config, args.weights) == ("resnet18", "none")   # the command line wins over the file
    argv = ["--dataset", "cub", "--backbone", "resnet18", "--activation_dir", "../embs/${model_name}",
            "--concept_set", "../textual/${target_dataset}_filtered.txt"]
    assert parse("IP_Text_training", argv).clip == "../embs/resnet18/cub_clip_cub_filtered"
    with pytest.raises(UserError, match="single quotes"):
        parse("IP_Text_training", ["--backbone", "m", "--activation_dir", "${nowhere}"])


def test_original_textual_command_runs_the_backbone_features_first(place):
    """The original's textual_emb_extractor wrote the backbone's train/val features too: here two runs of
    dataset_feature_extractor (its backbone, data, subsets and compute flags), then the CLIP features."""
    argv = ["--dataset", "imagenet", "--concept_set", "c/mine.txt", "--backbone", "resnet18", "--activation_dir", "a",
            "--weights", "none", "--max_train", "5", "--seed", "2", "--workers", "0", "--no-amp", "--clip_name", "RN50"]
    args = parse("textual_emb_extractor", argv)
    assert (args.out, args.concepts, args.clip_model, args.seed, args.max_train) == (
        "a/imagenet_clip_mine", "c/mine.txt", "RN50", 2, 5)
    for split, n in (("train", 5), ("val", None)):
        step = args.first[split]
        assert (step.model_config, step.weights, step.layer, step.out, step.max_images, step.seed, step.workers,
                step.amp, step.dataset) == (["resnet18"], "none", ["layer4"], f"a/imagenet_{split}_resnet18_layer4",
                                            n, 2, 0, False, os.path.join(".", "datasets", "imagenet"))
    with pytest.raises(UserError, match="--activation_dir"):          # where would the backbone's features go?
        parse("textual_emb_extractor", ["--backbone", "resnet18"])
    assert not parse("textual_emb_extractor", ["--dataset", "imagenet"]).first     # CLIP features only


def test_this_projects_runners_never_pass_through_the_dialect(tmp_path):
    """run_pipeline.sh and the other runners of this project export IIS_COMPAT=off: the stage scripts they call then
    read their command lines as this project's flags only (an original flag is an unknown one); the original-named
    runners keep the dialect."""
    ours = ["run_pipeline.sh", "compare_backbones.sh", "finetune_compare.sh", "train_heads.sh", "demo.sh",
            "classifiability_series.sh"]
    for runner in sorted(os.listdir(os.path.join(REPO, "scripts"))):
        if not runner.endswith(".sh") or runner.startswith("_") or runner == "test.sh":
            continue
        text = open(os.path.join(REPO, "scripts", runner)).read()
        exported = re.search(r"^export IIS_COMPAT=off\b", text, re.M) is not None
        assert exported == (runner in ours), runner
    assert compat.dialect(script_path("segment_extractor")) is not None
    env = dict(os.environ, IIS_COMPAT="off")
    r = run_file(script_path("segment_extractor"), "--image_per_class", "2", "--out_dir", str(tmp_path / "lib"),
                 cwd=tmp_path, env=env)
    assert r.returncode == 2 and "unrecognized arguments: --image_per_class" in r.stderr, r.stderr
    r = run_file(script_path("segment_extractor"), "--help", cwd=tmp_path, env=env)
    assert r.returncode == 0 and "original code's flags" not in r.stdout
    r = run_file(script_path("segment_extractor"), "--help", cwd=tmp_path)
    assert r.returncode == 0 and "original code's flags" in r.stdout


def test_readme_renders_the_alias_table():
    readme = open(os.path.join(REPO, "docs", "original.md"), encoding="utf-8").read()
    assert compat.markdown_table() in readme


def run_file(script, *args, cwd, env=None):
    return subprocess.run([sys.executable, script, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env=env)


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_stage_scripts_run_as_files_from_any_folder(tmp_path, name):
    r = run_file(script_path(name), "--help", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("usage:"), r.stderr[-2000:]


def test_contradicting_in_channels_is_one_error_line(tmp_path):
    fake_entry(tmp_path / "embs" / "imagenet_train_resnet18_layer4")
    train = os.path.join("embs", "imagenet_train_resnet18_layer4")
    out = tmp_path / "IP_Prototype"
    r = run_file(script_path("IP_Prototype_training"), "--model_name", "resnet18", "--in_channels", "2048",
                 "--concept_path", "embs/visual_element_emb.pkl", "--train_pt", f"{train}.pt", "--val_pt",
                 f"{train}.pt", "--save_dir", str(out), cwd=tmp_path)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0] == (f"error: --in_channels 2048 contradicts {train}: it holds 4-d features (no need to give it: "
                        f"it is read from the features)")
    assert not out.exists()


def no_warning(stderr):
    """No warning in a run's output (the trainers' non-writable NumPy warning is fixed by the lead in sweep.py)."""
    lines = [ln for ln in stderr.splitlines() if "The given NumPy array is not writable" not in ln
             and "return torch.as_tensor(np.asarray(a)" not in ln]
    return not any("warning" in ln.lower() for ln in lines)


def plain_shell_env():
    """The environment of a new shell: no venv activated, no PYTHON, no venv directory on PATH."""
    path = [d for d in os.environ.get("PATH", "").split(os.pathsep)
            if d and ".venv" not in d and d != os.path.dirname(sys.executable)]
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHON", "PYTHONPATH")}
    return dict(env, PATH=os.pathsep.join(path or ["/usr/bin", "/bin"]))


def test_runners_use_the_venv_without_activation(tmp_path):
    if not os.path.exists(os.path.join(REPO, ".venv", "bin", "python")):
        pytest.skip("no .venv in this checkout (scripts/test.sh makes it)")
    feats = tmp_path / "features"
    for split, seed in (("train", 0), ("val", 1), ("elements_segments", 2)):
        fake_entry(feats / split, n=24, dim=6, classes=("a", "b", "c"), seed=seed)
    cmd = ["bash", "scripts/train_heads.sh", "--features", str(feats), "--out", str(tmp_path / "runs"), "--epochs", "2",
           "--n_concepts", "6", "--device", "cpu"]
    cmd[1] = os.path.join(REPO, cmd[1])                  # from another folder, too
    env = plain_shell_env()
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(r"^row 1 = .*: IIS = \d\.\d{4}\b", r.stdout, re.M) and (tmp_path / "runs" / layout.run_name(
        "prototype", "segments", epochs=2, n_concepts=6) / "iis.json").is_file()
    assert no_warning(r.stderr)
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=60,
                       env=dict(env, PYTHON=str(tmp_path / "no-python")))            # PYTHON still overrides
    assert r.returncode == 127


# ---------------------------------------------------------------------------------------------------------------------
# the original README's command sequence, as written, on a copy of this checkout
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """A copy of the checkout (the original's commands write inside it), with the synthetic data where the original
    puts data and the venv linked in."""
    root = tmp_path_factory.mktemp("orig") / "IIS"
    shutil.copytree(REPO, root, ignore=shutil.ignore_patterns(
        ".git", ".venv", "outputs", "data", "datasets", "embs", "IP_Prototype", "output", "__pycache__", "prototype",
        "*.egg-info", ".pytest_cache"))
    os.symlink(os.path.dirname(os.path.dirname(sys.executable)), root / ".venv")
    make_image_folder(str(root / "datasets" / "shapes"))
    (root / "concept_library" / "textual" / "shapes_filtered.txt").write_text(
        "red square\ngreen square\nblue square\ngrey noise\n")
    return root


def original_sequence():
    """The original README's commands with its variables set for the synthetic data: resnet18 at layer4 with random
    weights (nothing is downloaded), a tiny CLIP, 12 concepts, 3 epochs."""
    tiny = ["--clip_model", "../tests/assets/tiny-clip.json", "--clip_pretrained", "none"]
    model, layer, data = "resnet18", "layer4", "shapes"
    embs = f"../concept_extractor/embs/{model}"
    return [
        ("concept_extractor", ["segment_extractor.py", "--data_root", "../datasets/shapes/val", "--save_root",
                               "../concept_library/prototype/segments", "--image_per_class", "2"]),
        ("concept_extractor", ["visual_element_emb_extractor.py", "--config_yaml",
                               f"../model_configs/{model}_IMAGENET1K_V1.yaml", "--model", model,
                               "--target_layer_name", layer, "--weights", "none", "--data-path",
                               "../concept_library/prototype/segments", "-j", "0"]),
        ("concept_extractor", ["textual_emb_extractor.py", "--dataset", data, "--concept_set",
                               f"../concept_library/textual/{data}_filtered.txt", "--backbone", model,
                               "--activation_dir", f"./embs/{model}/", "--feature_layer", layer, "--weights", "none",
                               "--workers", "0"] + tiny),
        ("IP_training", ["IP_Prototype_training.py", "--model_name", model, "--in_channels", "512", "--concept_path",
                         f"{embs}/visual_element_emb.pkl", "--num_concepts", "12", "--num_classes", "3",
                         "--n_epoch", "3", "--train_pt", f"{embs}/{data}_train_{model}_{layer}.pt",
                         "--val_pt", f"{embs}/{data}_val_{model}_{layer}.pt", "--save_dir", f"./IP_Prototype/{model}"]),
        ("IP_training", ["IP_Text_training.py", "--dataset", data, "--backbone", model, "--concept_set",
                         "../concept_library/textual/${target_dataset}_filtered.txt", "--feature_layer", layer,
                         "--sparsity_ratio", "--save_dir", "./output", "--activation_dir",
                         "../concept_extractor/embs/${model_name}", "--clip_cutoff", "-1",
                         "--interpretability_cutoff", "-1", "--epochs", "3"]),
        (".", ["iis_computing.py"]),
    ]


@pytest.mark.slow
def test_original_readme_sequence_gets_an_iis(checkout):
    py = os.path.join(checkout, ".venv", "bin", "python")
    for folder, argv in original_sequence():
        r = subprocess.run([py, *argv], cwd=checkout / folder, capture_output=True, text=True, timeout=900,
                           env=plain_shell_env())
        assert r.returncode == 0, f"{argv[0]}: {r.stderr[-3000:]}"
        assert no_warning(r.stderr), r.stderr[-3000:]
    assert re.search(r"1\s+resnet18@layer4 prototype .*\n2\s+resnet18@layer4 text .*\n(.*\n)*row 2 = resnet18@layer4 text "
                     r".*: IIS = \d\.\d{4}", r.stdout), r.stdout
    for run in ("IP_training/IP_Prototype/resnet18", "IP_training/output"):
        scored = fileio.read_json(str(checkout / run / "iis.json"))
        assert scored["meta"]["n_train"] == 18 and scored["meta"]["n_val"] == 9 and scored["meta"]["layer"] == "layer4"
        assert 0 <= scored["iis"] <= 2


@pytest.mark.slow
def test_original_runner_names_do_the_same_job(checkout):
    """The three runners of the original, after its commands: same files, so every stage is up to date."""
    if not (checkout / "IP_training" / "IP_Prototype" / "resnet18" / "results.json").exists():
        pytest.skip("needs test_original_readme_sequence_gets_an_iis first")
    env = plain_shell_env()
    steps = [["concept_extract.sh", "--data_root", "datasets/shapes/val", "--image_per_class", "2"],
             ["emb_extractor.sh", "--model", "resnet18", "--weights", "none", "--target_dataset", "shapes",
              "--workers", "0", "--clip_model", "tests/assets/tiny-clip.json", "--clip_pretrained", "none"],
             ["ip_train.sh", "--model_name", "resnet18", "--target_dataset", "shapes", "--n_epoch", "3",
              "--num_concepts", "12", "--clip_cutoff", "-1", "--interpretability_cutoff", "-1"]]
    out = ""
    for argv in steps:
        r = subprocess.run(["bash", f"scripts/{argv[0]}", *argv[1:]], cwd=checkout, capture_output=True, text=True,
                           timeout=900, env=env)
        assert r.returncode == 0, f"{argv[0]}: {r.stderr[-3000:]}"
        out += r.stdout
    # elements, element embeddings, train and val features, CLIP text/train/val, two trainings
    assert out.count("up to date") == 1 + 1 + 2 + 3 + 2, out
    assert re.search(r"^row 1 = .*: IIS = \d\.\d{4} ", out, re.M)
