"""Fine-tuning with interpretability maximisation (IP_training/IP_finetune.py, utils/finetune/), on timm's tiny
random-init test_efficientnet and the planted-colour ImageFolder: lambda = 0 is plain fine-tuning, the concept term's
gradient reaches exactly the trained parameters, the cached partial forward is the full forward, the checkpoint is
what the pipeline's --weights loads, a killed run resumes to the same weights, bad flags are refused."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import REPO, make_image_folder
from IP_training.IP_finetune import get_args_parser
from utils import cli, store
from utils.backbones import FeatureExtractor, build_model
from utils.finetune import augment, objective, surgery
from utils.finetune import trainer as ft
from utils.finetune.compare import write_comparison
from utils.specs import load_spec

TINY = ["--backbone", "timm:test_efficientnet", "--weights", "none"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ft")
    folder = make_image_folder(str(tmp / "shapes"))
    r = subprocess.run([sys.executable, "-m", "concept_extractor.patch_extractor", "--dataset", folder,
                        "--images_per_class", "2", "--out_dir", str(tmp / "lib")], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return dict(tmp=tmp, folder=folder, elements=str(tmp / "lib" / "patches"), cache=str(tmp / "cache"))


def argv_for(world, out, *extra):
    return [*TINY, "--dataset", world["folder"], "--elements", world["elements"], "--n_concepts", "12",
            "--train_layers", "2", "--epochs", "2", "--batch_size", "8", "--workers", "0", "--lr", "1e-3",
            "--head_lr", "1e-2", "--refresh", "epoch", "--cache_dir", world["cache"], "--out", str(world["tmp"] / out),
            *extra]


def config_for(world, out, *extra):
    return cli.config(ft.FinetuneConfig, get_args_parser().parse_args(argv_for(world, out, *extra)))


def checkpoint(world, out):
    from safetensors.torch import load_file
    return load_file(str(world["tmp"] / out / ft.CHECKPOINT))


def same_tensors(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def runs(world):
    """Three finished runs: plain (lambda 0), plain with other concept settings, interpretability (lambda 1)."""
    out = {}
    out["plain"] = ft.run(config_for(world, "plain", "--lambda_interp", "0"))
    out["plain_other"] = ft.run(config_for(world, "plain_other", "--lambda_interp", "0", "--concept_type", "cluster",
                                         "--n_concepts", "5", "--ratio", "0.6", "--refresh", "step"))
    out["interp"] = ft.run(config_for(world, "interp", "--lambda_interp", "1"))
    return out


# ---------------------------------------------------------------------------------------------------------------------
def test_block_names_and_last_blocks():
    import timm
    import torchvision
    m = timm.create_model("test_efficientnet", pretrained=False).eval()
    blocks = surgery.block_names(m)
    assert blocks == [f"blocks.{i}.{j}" for i, n in enumerate(len(s) for s in m.blocks) for j in range(n)]
    r = torchvision.models.resnet18(weights=None).eval()
    assert surgery.block_names(r) == [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    ext = FeatureExtractor(r, "pre_logits")
    got = surgery.resolve_trained(r, ext, ["2"], torch.zeros(2, 3, 64, 64))
    assert got["cut"] == "layer4.0" and got["modules"] == ["layer4.0", "layer4.1"]
    assert set(got["params"]) == {n for n, _ in r.named_parameters() if n.startswith("layer4.")}
    every = surgery.resolve_trained(r, ext, ["all"], torch.zeros(2, 3, 64, 64))
    assert set(every["params"]) == {n for n, _ in r.named_parameters() if not n.startswith("fc.")}   # fc: after
    e = surgery.resolve_trained(m, FeatureExtractor(m, "pre_logits"), ["1"], torch.zeros(2, 3, 64, 64))
    assert e["modules"] == [blocks[-1], "conv_head", "bn2"]


def _loss_and_grads(fn, params):
    loss = fn()
    return [None if g is None else g.clone() for g in torch.autograd.grad(loss, params, allow_unused=True)]


@pytest.mark.parametrize("arch,layers", [("test_efficientnet", "2"), ("test_vit", "1")])
def test_cached_partial_forward_gives_the_full_forward_gradients(arch, layers):
    import timm
    torch.manual_seed(0)
    m = timm.create_model(arch, pretrained=False).eval()
    ext = FeatureExtractor(m, "pre_logits")
    x = torch.randn(4, 3, 160, 160)
    tr = surgery.resolve_trained(m, ext, [layers], x[:2])
    for n, p in m.named_parameters():
        p.requires_grad_(n in set(tr["params"]))
    top = surgery.TopForward(m, ext, tr["cut"], tr["calls"], tr["outputs"], x.shape)
    assert top.matches(x)
    params = [p for p in m.parameters() if p.requires_grad]
    w = torch.randn(ext(x).shape[1], 3)
    y = torch.tensor([0, 1, 2, 1])
    full = _loss_and_grads(lambda: F.cross_entropy(ext(x) @ w, y), params)
    with torch.no_grad():
        cached = top.trunk(x)
    part = _loss_and_grads(lambda: F.cross_entropy(top(cached) @ w, y), params)
    assert all(g is not None for g in full)
    for a, b in zip(full, part):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_cached_path_is_refused_where_it_would_change_the_network():
    class Skip(nn.Module):            # the output adds the stem's output back: resuming at block2 would drop it
        def __init__(self):
            super().__init__()
            self.stem, self.block1, self.block2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            s = self.stem(x)
            return self.fc((self.block2(self.block1(s)) + s).mean((2, 3)))
    torch.manual_seed(0)
    m = Skip().eval()
    ext = FeatureExtractor(m, "pre_logits")
    x = torch.randn(2, 3, 8, 8)
    tr = surgery.resolve_trained(m, ext, ["block2"], x)
    assert tr["cut"] == "block2" and tr["params"] == ["block2.weight", "block2.bias"]
    assert not surgery.TopForward(m, ext, tr["cut"], tr["calls"], tr["outputs"], x.shape).matches(x)


def test_interp_gradient_reaches_every_trained_parameter_and_no_frozen_one(world):
    plan = ft.plan(config_for(world, "grad", "--refresh", "step", "--lambda_interp", "1"))
    tuner = ft.FineTuner(plan)
    x, y, cached = next(tuner.train_stream(0))
    assert cached
    trained = dict((n, p) for n, p in tuner.model.named_parameters() if p.requires_grad)
    frozen = [p for p in tuner.model.parameters() if not p.requires_grad]
    assert trained and frozen and set(trained) == set(plan.trained["params"])

    def concept_grads(lam):
        for p in tuner.model.parameters():
            p.grad = None
        f = tuner.features_of(x, True)
        tuner.head.set_concepts(objective.grad_scale(tuner.concept_vectors(grad=True), lam))
        F.cross_entropy(tuner.head(objective.grad_scale(f, lam))[0], y).backward()
        return {n: None if p.grad is None else p.grad.clone() for n, p in trained.items()}
    g1 = concept_grads(1.0)
    assert all(g is not None and g.abs().sum() > 0 for g in g1.values()), [n for n, g in g1.items() if g is None]
    assert all(p.grad is None for p in frozen)
    half = concept_grads(0.5)                       # lambda scales what reaches the backbone, exactly
    for n in g1:
        torch.testing.assert_close(half[n], 0.5 * g1[n], rtol=1e-5, atol=1e-8)
    assert all(g is None for g in concept_grads(0.0).values())


@pytest.mark.slow
def test_lambda_zero_is_plain_finetuning(world, runs):
    plain, other, interp = (checkpoint(world, k) for k in ("plain", "plain_other", "interp"))
    # the concept settings (type, K, ratio, refresh policy) cannot touch the backbone when lambda = 0
    assert same_tensors(plain, other)
    a, b = runs["plain"].info["epochs"], runs["plain_other"].info["epochs"]
    assert [r["train_loss_linear"] for r in a] == [r["train_loss_linear"] for r in b]
    assert [r["val_top1_linear"] for r in a] == [r["val_top1_linear"] for r in b]
    # ... and they do when lambda > 0, only in the trained part
    trained = set(runs["plain"].info["key"]["train_params"])
    changed = {k for k in plain if not torch.equal(plain[k], interp[k])}
    assert changed and changed <= trained
    # the pretrained (here: random-init, seed-independent) frozen part is untouched by either arm
    fresh = build_model(load_spec("efficientnet_lite0", "timm:test_efficientnet", "none")).state_dict()
    assert {k for k in plain if not torch.equal(plain[k], fresh[k])} <= trained


@pytest.mark.slow
def test_lambda_zero_pays_for_no_concept_pass(world, runs, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the concept pass ran at lambda 0")
    monkeypatch.setattr(ft.FineTuner, "_element_embeddings", refuse)
    monkeypatch.setattr(objective.LiveConceptHead, "forward", refuse)
    skipped = ft.run(config_for(world, "plain_skip", "--lambda_interp", "0", "--concept_type", "cluster",
                                "--n_concepts", "5", "--refresh", "frozen", "--cache_dir", str(world["tmp"] / "c0")))
    assert same_tensors(checkpoint(world, "plain_skip"), checkpoint(world, "plain"))       # the same plain run
    assert [r["train_loss_concept"] for r in skipped.info["epochs"]] == [None, None]
    assert [r["val_top1_concept"] for r in skipped.info["epochs"]] == [None, None]
    assert not [f for f in os.listdir(world["tmp"] / "c0") if f.startswith("elements")]  # no element cached


@pytest.mark.slow
def test_checkpoint_reloads_through_weights_with_the_same_features(world, runs):
    from utils.extraction import extract
    from utils.data import TransformedImages, get_source, subset_indices
    ckpt = str(world["tmp"] / "interp" / ft.CHECKPOINT)
    out = str(world["tmp"] / "val_features")
    r = subprocess.run([sys.executable, "-m", "concept_extractor.dataset_feature_extractor", *TINY[:2], "--weights",
                        ckpt, "--dataset", world["folder"], "--split", "val", "--workers", "0", "--out", out],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    arrays, meta = store.read(out)
    tuner = runs["interp"]
    src = get_source(world["folder"], "val")
    mine, labels = extract(tuner.extractor, TransformedImages(src, subset_indices(len(src), None),
                                                              tuner.preprocess.image_transform()), workers=0)
    assert np.array_equal(labels, arrays["labels"])
    np.testing.assert_allclose(arrays["features"], mine, rtol=0, atol=1e-5)
    assert np.abs(mine).max() > 1e-3                                  # not trivially equal
    assert tuner.info["reload_check"]["max_abs_diff"] <= 1e-5
    info = json.load(open(world["tmp"] / "interp" / "finetune.json"))
    assert info["finished"] and len(info["epochs"]) == 2
    assert {"train_loss_linear", "train_loss_concept", "val_top1_linear", "val_top1_concept"} <= set(info["epochs"][0])
    assert not os.path.exists(world["tmp"] / "interp" / ft.STATE)


@pytest.mark.slow
def test_resume_after_a_kill_gives_the_uninterrupted_weights(world, runs):
    # SIGKILL (no clean-up of any kind) in the middle of the second epoch, from inside the training loop
    kill = ("import os, sys; from IP_training.IP_finetune import get_args_parser; from utils import cli; "
            "from utils.finetune import trainer as ft; "
            "ft.run(cli.config(ft.FinetuneConfig, get_args_parser().parse_args(sys.argv[1:])), "
            "on_step=lambda e, s: os.kill(os.getpid(), 9) if (e, s) == (1, 1) else None)")
    argv = argv_for(world, "resumed", "--lambda_interp", "1")
    r = subprocess.run([sys.executable, "-c", kill, *argv], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == -9, r.stderr[-2000:]
    out = world["tmp"] / "resumed"
    assert (out / ft.STATE).exists() and not (out / ft.CHECKPOINT).exists()
    log = json.load(open(out / "finetune.json"))
    assert not log["finished"] and [e["epoch"] for e in log["epochs"]] == [1]
    assert not [f for f in os.listdir(out) if ".tmp-" in f]
    steps = []
    resumed = ft.run(cli.config(ft.FinetuneConfig, get_args_parser().parse_args(argv)),
                     on_step=lambda e, s: steps.append((e, s)))
    assert steps and {e for e, _ in steps} == {1}                       # only the unfinished epoch ran again
    assert resumed.info["epochs"][0] == log["epochs"][0]                 # epoch 1 (its timing too) came from state.pt
    assert [r["epoch"] for r in resumed.info["epochs"]] == [1, 2]
    assert same_tensors(checkpoint(world, "resumed"), checkpoint(world, "interp"))

    def no_times(rows):
        return [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]
    assert no_times(resumed.info["epochs"]) == no_times(runs["interp"].info["epochs"])
    again = ft.run(cli.config(ft.FinetuneConfig, get_args_parser().parse_args(argv)))    # finished: nothing to do
    assert again.info["key_hash"] == resumed.info["key_hash"] and not (out / ft.STATE).exists()


@pytest.mark.slow
def test_uncached_partial_run_matches_the_cached_one_and_all_layers_train(world, runs):
    off = ft.run(config_for(world, "interp_nocache", "--lambda_interp", "1", "--cache", "off"))
    assert off.info["trained"]["cache"].startswith("off")
    assert runs["interp"].info["trained"]["cache"].startswith("inputs")
    for a, b in zip(off.info["epochs"], runs["interp"].info["epochs"]):      # caching changes the time, not the run
        for k in ("train_loss_linear", "train_loss_concept"):
            assert a[k] == pytest.approx(b[k], rel=1e-3)
    every = ft.run(config_for(world, "all_layers", "--lambda_interp", "1", "--train_layers", "all", "--epochs", "1"))
    assert every.info["trained"]["cut"] is None and every.info["reload_check"]["max_abs_diff"] <= 1e-5
    ckpt, fresh = checkpoint(world, "all_layers"), build_model(
        load_spec("efficientnet_lite0", "timm:test_efficientnet", "none")).state_dict()
    assert not torch.equal(ckpt["conv_stem.weight"], fresh["conv_stem.weight"])       # the stem trained too
    assert torch.equal(ckpt["classifier.weight"], fresh["classifier.weight"])          # past the feature: untouched


@pytest.mark.slow
def test_save_epochs_writes_each_listed_epoch_and_the_last_is_the_final_checkpoint(world):
    from utils.data import get_source, subset_indices
    run = ft.run(config_for(world, "epochs", "--lambda_interp", "0", "--save_epochs", "2", "1"))
    out = world["tmp"] / "epochs"
    final = (out / ft.CHECKPOINT).read_bytes()
    assert (out / ft.epoch_checkpoint(2)).read_bytes() == final             # after the last epoch: the final weights
    first = out / ft.epoch_checkpoint(1)
    assert first.read_bytes() != final                                      # epoch 1 is its own checkpoint ...
    assert run.info["epoch_checkpoints"] == {"1": "backbone_epoch1.safetensors", "2": "backbone_epoch2.safetensors"}
    assert not [f for f in os.listdir(out) if ".tmp-" in f]
    # ... and it loads through --weights: the reload check against a model holding those weights
    spec = load_spec("efficientnet_lite0", "timm:test_efficientnet", "none")
    model = build_model(spec).eval()
    from safetensors.torch import load_file
    model.load_state_dict(load_file(str(first)))
    src = get_source(world["folder"], "val")
    images = torch.stack([augment.eval_images(src, subset_indices(len(src), None), run.preprocess)[i][0]
                          for i in range(4)])
    ext = FeatureExtractor(model, spec.layer, spec.pooling, spec.layout)
    assert ft.reload_check(spec, str(first), ext, images, torch.device("cpu")) == 0.0
    assert ft.reload_check(spec, str(out / ft.CHECKPOINT), ext, images, torch.device("cpu")) > 1e-6


@pytest.mark.parametrize("damage,words", [
    (lambda f, d: f.write_text(f.read_text()[:40]), ["is damaged (not valid JSON"]),
    (lambda f, d: f.write_text(json.dumps(dict(d, schema="iis.finetune/9"))), ["schema 'iis.finetune/9'"]),
    (lambda f, d: f.write_text(json.dumps(dict(d, finished=False))), ["unfinished fine-tuning run"]),
    (lambda f, d: f.write_text(json.dumps(dict(d, epochs={}))), ["malformed: 'epochs' is an object, expected a list"]),
    (lambda f, d: f.write_text(json.dumps(dict(d, files={}))), ["does not cover backbone.safetensors"]),
    (lambda f, d: f.write_text(json.dumps({k: v for k, v in d.items() if k != "files"})), ["records no digests"]),
    (lambda f, d: (f.parent / ft.CHECKPOINT).write_bytes(b"x" + (f.parent / ft.CHECKPOINT).read_bytes()[1:]),
     ["unfinished fine-tuning run", "backbone.safetensors is not the one its manifest records"]),
])
def test_finetune_json_is_the_commit_point_and_a_damaged_one_is_one_line_then_retrained(world, runs, damage, words,
                                                                                        tmp_path, capsys):
    import shutil
    from utils.errors import UserError
    from utils.finetune import record
    src = world["tmp"] / "plain"
    info = record.read(str(src))                          # the finished run reads, and names its checkpoint's digest
    assert info["files"] == {ft.CHECKPOINT: "sha256:" + ft.file_digest(str(src / ft.CHECKPOINT))}
    assert record.finished(str(src), info["key_hash"]) and not record.finished(str(src), "another key")
    copy = tmp_path / "run"
    shutil.copytree(src, copy)
    damage(copy / "finetune.json", info)
    with pytest.raises(UserError) as e:
        record.read(str(copy))
    msg = str(e.value)
    assert "\n" not in msg and str(copy) in msg and "rerun the IP_finetune command" in msg, msg
    for w in words:
        assert w in msg, msg
    capsys.readouterr()
    assert not record.finished(str(copy), info["key_hash"])
    assert "fine-tuning it again" in capsys.readouterr().out


@pytest.mark.slow
def test_a_run_whose_checkpoint_was_replaced_is_fine_tuned_again_to_the_same_bytes(world, runs, tmp_path):
    import shutil
    src = world["tmp"] / "plain"
    shutil.copytree(src, world["tmp"] / "plain_again")
    ck = world["tmp"] / "plain_again" / ft.CHECKPOINT
    ck.write_bytes(b"y" + ck.read_bytes()[1:])
    again = ft.run(config_for(world, "plain_again", "--lambda_interp", "0"))
    assert ck.read_bytes() == (src / ft.CHECKPOINT).read_bytes() and again.info["finished"]


def one_line_error(r, *words):
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for w in words:
        assert w in lines[0], lines[0]


@pytest.mark.parametrize("flags,words", [
    (["--train_layers", "blocks.9", "conv_head"], ["unknown module 'blocks.9'", "--train_layers"]),
    (["--train_layers", "99"], ["--train_layers 99"]),
    (["--lambda_interp", "-0.5"], ["--lambda_interp", "-0.5"]),
    (["--ratio", "1"], ["--ratio must be in [0, 1)"]),
    (["--ratio", "-0.1"], ["--ratio must be in [0, 1)"]),
    (["--save_epochs", "2", "5"], ["--save_epochs", "(4)", "got 5"]),
])
def test_bad_flags_one_error_line_and_nothing_written(world, flags, words):
    out = world["tmp"] / "bad"
    r = subprocess.run([sys.executable, "-m", "IP_training.IP_finetune", *TINY, "--dataset", world["folder"],
                        "--elements", world["elements"], "--cache_dir", str(world["tmp"] / "bad_cache"),
                        "--out", str(out), *flags], cwd=REPO, capture_output=True, text=True, timeout=300)
    one_line_error(r, *words)
    assert not out.exists() and not (world["tmp"] / "bad_cache").exists()


def test_help():
    r = subprocess.run([sys.executable, "-m", "IP_training.IP_finetune", "--help"], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "python -m IP_training.IP_finetune" in r.stdout and "--lambda_interp" in r.stdout
    r = subprocess.run(["bash", "scripts/finetune_compare.sh", "--help"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0 and "--lambdas" in r.stdout and "bash scripts/finetune_compare.sh" in r.stdout
    r = subprocess.run(["bash", "scripts/finetune_compare.sh", "--nope", "1"], cwd=REPO, capture_output=True,
                       text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: ")


def test_augmented_views_are_deterministic_and_differ_by_view(tmp_path):
    from utils.data import get_source
    from utils.backbones import Preprocess
    folder = make_image_folder(str(tmp_path / "s"), n_train=2, n_val=1)
    src = get_source(folder, "train")
    pre = Preprocess(40, 32, "bilinear", (0.5,) * 3, (0.5,) * 3)
    a = augment.AugmentedImages(src, [0, 3], pre, [0, 1], aug_seed=7)
    b = augment.AugmentedImages(src, [0, 3], pre, [1], aug_seed=7)
    assert len(a) == 4 and a[0][0].shape == (3, 32, 32)
    assert torch.equal(a[2][0], b[0][0]) and torch.equal(a[3][0], b[1][0])     # view 1 is view 1 wherever drawn
    assert not torch.equal(a[0][0], a[2][0])
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = augment.crop_params(40, 30, rng)
        assert 0 <= top and top + h <= 30 and 0 <= left and left + w <= 40
        assert 0.5 * 1200 * 0.9 <= h * w <= 1200 and 0.7 <= w / h <= 1.4


def test_comparison_table_known_answer(tmp_path):
    rows = []
    vals = {("pretrained", "", 0): (80.0, 0.70), ("plain", "0", 0): (85.0, 0.80), ("plain", "0", 1): (87.0, 0.84),
            ("interp", "1", 0): (86.0, 0.83), ("interp", "1", 1): (86.0, 0.86)}
    for (arm, lam, seed), (top1, iis) in vals.items():
        d = tmp_path / f"{arm}{lam}_{seed}"
        d.mkdir()
        (d / "iis.json").write_text(json.dumps({"schema": "iis.scored/1", "iis": iis, "standard_accuracy": top1,
                                                "ratios": [0.0, 0.1, 0.9], "accuracies": [top1, top1 - 1, top1 - 10],
                                                "metric": "top1", "meta": {}, "results": str(d / "results.json")}))
        rows.append("\t".join([arm, lam, str(seed), str(d)]))
    (tmp_path / "m.tsv").write_text("\n".join(rows) + "\n")
    table = write_comparison(str(tmp_path / "m.tsv"), str(tmp_path / "report"))["train"]
    by = {r["arm"]: r for r in table}
    assert [r["arm"] for r in table] == ["pretrained", "plain", "interp"]
    assert by["plain"]["top1"] == pytest.approx((86.0, np.sqrt(2.0)))
    assert by["interp"]["iis"] == pytest.approx((0.845, np.std([0.83, 0.86], ddof=1)))
    assert by["interp"]["d_top1"] == pytest.approx((0.0, np.sqrt(2.0)))          # +1 and -1
    assert by["interp"]["d_iis"] == pytest.approx((0.025, np.std([0.03, 0.02], ddof=1)))
    assert by["interp"]["s09"][0] == pytest.approx(76.0) and by["interp"]["wins"] == "1/2, 2/2"
    md = (tmp_path / "report" / "finetune_compare.md").read_text()
    assert "| interp | 1 | 2 | 86.00 ± 0.00 | 0.8450 ± 0.0212 |" in md
    csv = (tmp_path / "report" / "finetune_compare.csv").read_text().splitlines()
    assert csv[0].startswith("concepts,arm,lambda,n_seeds,top1_mean") and len(csv) == 4
    # the script scripts/finetune_compare.sh calls writes the same table; a malformed manifest is one error line
    r = subprocess.run([sys.executable, "-m", "IP_training.IP_finetune_compare", str(tmp_path / "m.tsv"), "--out",
                        str(tmp_path / "again")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "again" / "finetune_compare.md").read_text() == md
    (tmp_path / "bad.tsv").write_text("plain\t0\n")
    r = subprocess.run([sys.executable, "-m", "IP_training.IP_finetune_compare", str(tmp_path / "bad.tsv"), "--out",
                        str(tmp_path / "bad")], cwd=REPO, capture_output=True, text=True, timeout=120)
    one_line_error(r, "bad.tsv: line 1 has 2 tab-separated fields, expected 4 or 5")
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_runner_scores_every_arm_on_training_and_unseen_concepts_from_disjoint_images(tmp_path):
    """scripts/finetune_compare.sh end to end, tiny: the unseen library shares no image with the training library nor
    with the fine-tuning subset, and the table has both concept sets with paired interp - plain rows."""
    from utils.data import get_source, subset_indices
    from utils.finetune.unseen import shared_sources
    folder = make_image_folder(str(tmp_path / "shapes"), n_train=12, n_val=4)
    cmd = ["bash", "scripts/finetune_compare.sh", *TINY, "--dataset", folder, "--elements", "patches",
           "--images_per_class", "1", "--train_size", "9", "--seeds", "0", "--lambdas", "1", "--train_layers", "2",
           "--epochs", "1", "--batch_size", "8", "--n_concepts", "5", "--score_epochs", "1", "--score_lrs", "0.01",
           "--unseen_types", "prototype", "--floor_draws", "0", "--workers", "0", "--library", str(tmp_path / "lib"),
           "--out", str(tmp_path / "out")]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=3000)
    assert r.returncode == 0, r.stderr[-3000:]
    seed = int(r.stdout.split("(unseen concepts: elements of seed ")[1].split(")")[0])
    libs = sorted(str(p) for p in (tmp_path / "lib").glob("*/ipc1_seed*/patches"))
    assert [os.path.basename(os.path.dirname(p)) for p in libs] == sorted(["ipc1_seed0", f"ipc1_seed{seed}"])
    assert shared_sources(*libs) == []
    src = get_source(folder, "train")
    unseen = {e["source"] for e in json.load(open(os.path.join(libs[1 if seed else 0], "index.json")))["elements"]}
    assert unseen and not unseen & {src.ident(int(i)) for i in subset_indices(len(src), 9, 0)}
    manifest = next((tmp_path / "out").glob("finetune/*/*/*/ft_*/manifest.tsv")).read_text().splitlines()
    assert len(manifest) == 6 and {ln.split("\t")[3] for ln in manifest} == {"train:prototype", "unseen:prototype"}
    md = next((tmp_path / "out").glob("reports/*/*/finetune_*/finetune_compare.md")).read_text()
    for needle in ("### Concepts: train:prototype", "### Concepts: unseen:prototype",
                   "**Headline (unseen:prototype concepts), interp λ = 1 − plain over 1 seeds:**", "| interp | 1 | 0 | "):
        assert needle in md, md
    assert md.count("| interp | 1 | 0 | ") == 4      # a paired row and a per-run row in each concept set


def test_unseen_seed_is_the_first_whose_images_avoid_the_training_library_and_the_subset(tmp_path):
    from utils.data import get_source, subset_indices
    from utils.finetune.unseen import disjoint_seed, library_images
    folder = make_image_folder(str(tmp_path / "s"), n_train=12, n_val=1)
    targets = get_source(folder, "train").targets
    used = library_images(targets, 1, 0) | set(subset_indices(36, 9, 0).tolist())
    assert len(library_images(targets, 1, 0)) == 3 and len(used) > 9              # one image per class; some apart
    seed, partial = disjoint_seed(folder, "data", 1, 0, 9, 0)
    assert partial and not library_images(targets, 1, seed) & used
    assert all(library_images(targets, 1, s) & used for s in range(1, seed))      # the first such seed
    other, _ = disjoint_seed(folder, "data", 1, 0, 9, 3)                           # another subset: checked against it
    assert not library_images(targets, 1, other) & (library_images(targets, 1, 0) | set(subset_indices(36, 9, 3)))
    whole, partial = disjoint_seed(folder, "data", 1, 0, 0, 0)                    # the whole split: the library only
    assert not partial and whole == next(s for s in range(1, 99) if not library_images(targets, 1, s)
                                         & library_images(targets, 1, 0))
