"""The sweep's protocols, seeds, held-out selection, per-sample predictions and diverged heads, through the trainer as
a user runs it, with known answers: the original's keep counts, agreement with a faithful re-implementation of the
original loop, stacked seeds equal separate runs, predictions that recompute every reported accuracy."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from bench import original_loop
from bench.bench_heads import same_start
from conftest import REPO
from utils import store
from utils.heads import SPARSITY_GRID, LinearProbes, SparseConceptHeads, evaluate, fit
from utils.masks import masked, n_keep_reference, topk_mask
from utils.iis import iis
from utils.sweep import PROTOCOLS, make_splits


def test_reference_keep_rule_gives_the_originals_counts():
    assert [n_keep_reference(r, 200) for r in SPARSITY_GRID] == [199, 179, 139, 99, 59, 19, 9, 3]
    # the original truncates the floating-point product: 90 * 0.7 = 62.99999999999999 -> 62, so 90 - 62 - 1 kept
    assert n_keep_reference(0.7, 90) == 27 and n_keep_reference(0.7, 100) == 29
    a = torch.randn(2, 50, 200, generator=torch.Generator().manual_seed(0))
    m = topk_mask(a[:1].expand(8, -1, -1), [n_keep_reference(r, 200) for r in SPARSITY_GRID], "reference")
    assert m.sum(-1)[:, 0].tolist() == [199, 179, 139, 99, 59, 19, 9, 3]
    # the kept ones are the largest |a|: everything kept beats everything dropped
    mags = a[0].abs()
    for h in range(8):
        kept, dropped = mags[m[h]].view(50, -1), mags[~m[h]].view(50, -1)
        assert (kept.min(1).values > dropped.max(1).values).all()


def test_reference_rule_drops_ties_at_the_threshold_like_the_original():
    a = torch.tensor([[1.0, 2.0, 2.0, 3.0]])           # floor(4 * 0.25) = 1: threshold is the 2nd smallest, 2.0
    assert topk_mask(a, 2, "reference").tolist() == [[False, False, False, True]]   # strict >: both 2s go
    assert topk_mask(a, 2, "round").tolist() == [[False, True, False, True]]        # exactly 2, lower index wins


def test_round_rule_is_exact_with_ties_on_the_cpu_fast_path():
    g = torch.Generator().manual_seed(1)
    a = torch.randint(-3, 4, (3, 64, 30), generator=g).float()   # many ties
    keep = [30, 11, 2]
    m = topk_mask(a, keep)
    assert m.sum(-1).tolist() == [[k] * 64 for k in keep]
    order = a.abs().argsort(dim=-1, descending=True, stable=True)    # the stable sort's choice
    for h, k in enumerate(keep):
        expected = torch.zeros(64, 30, dtype=torch.bool).scatter_(1, order[h, :, :k], True)
        assert torch.equal(m[h], expected)


def planted(n, dim=24, n_classes=5, seed=0, noise=2.2):
    """Overlapping classes (top-1 well below 100 %), non-negative like post-ReLU features."""
    centres = np.random.default_rng(99).normal(size=(n_classes, dim)).astype(np.float32)
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    x = np.maximum(centres[y] + noise * rng.normal(size=(n, dim)), 0).astype(np.float32)
    return x, y.astype(np.int64)


def write_entries(root, n_train=3072, n_val=600, n_concepts=24):
    bb = {"arch": "synthetic"}
    classes = [f"c{i}" for i in range(5)]
    x, y = planted(n_train)
    xv, yv = planted(n_val, seed=1)
    for name, (f, lab) in (("train", (x, y)), ("val", (xv, yv))):
        store.write(str(root / name), {"features": f, "labels": lab, "indices": np.arange(len(lab))},
                    {"backbone": bb, "data": {"split": name}}, {"classes": classes, "backbone": dict(
                        name="syn", arch="syn", weights="none", layer="x", pooling="avg")})
    rng = np.random.default_rng(5)
    rows = rng.choice(n_train, n_concepts, replace=False)
    emb = np.maximum(x[rows] + 0.3 * rng.normal(size=(n_concepts, x.shape[1])), 0).astype(np.float32)
    store.write(str(root / "elements"), {"features": emb, "labels": y[rows]}, {"backbone": bb, "data": "el"},
                {"classes": classes})
    return x, y, xv, yv, emb


def train(root, out, *extra):
    cmd = [sys.executable, "-m", "IP_training.IP_Prototype_training", "--train_features", str(root / "train"),
           "--val_features", str(root / "val"), "--concepts", str(root / "elements"), "--out", str(out), *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


def results(out):
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


def test_reference_protocol_agrees_with_the_original_loop(tmp_path):
    """Same features, concepts, initial weights and batch order: the two loops differ only in how they compute
    (stacked heads on precomputed scores vs one module per ratio over a per-sample DataLoader, softmax + argsort)."""
    x, y, xv, yv, emb = write_entries(tmp_path)
    epochs = 8
    r = train(tmp_path, tmp_path / "ours", "--protocol", "reference", "--n_concepts", "0", "--epochs", str(epochs))
    assert r.returncode == 0, r.stderr[-3000:]
    res = results(tmp_path / "ours")
    assert res["meta"]["protocol"] == "reference" and res["lr_grid"] == [0.01]
    assert res["key"]["init"] == "trunc_normal_0.02"
    assert [row["n_active"] for row in res["runs"] if row["head"] == "concept"] == [23, 21, 16, 11, 7, 2, 1, 0]
    ours_std = max(row["top1"] for row in res["runs"] if row["head"] == "standard")
    ours = [row["top1"] for row in res["runs"] if row["head"] == "concept"]
    assert 55 < ours_std < 95                          # overlapping classes: heads can differ

    orders, init = same_start(len(y), x.shape[1], 5, torch.as_tensor(emb), epochs, seed=0)
    std, accs = original_loop.run(x, y, xv, yv, emb, 5, SPARSITY_GRID, epochs=epochs, workers=0, orders=orders,
                                  init=init)
    assert abs(iis(SPARSITY_GRID, ours, ours_std) - iis(SPARSITY_GRID, accs, std)) <= 0.003
    tol = max(0.5, 100 / len(yv)) + 1e-9              # 0.5 points or one val sample
    assert abs(ours_std - std) <= tol
    assert np.abs(np.array(ours) - np.array(accs)).max() <= tol


def test_reference_mask_passes_the_originals_gradient_at_the_threshold():
    """The original zeroes through max(d, d - d), d = |a| - threshold: the dropped element at the threshold (d = 0)
    passes half of d's gradient, i.e. 0.5 |a| times its upstream one. By hand for a = (1, -3, 2, 0.5), K = 4,
    s = 0.5: threshold = 2 (the int(4 * 0.5) = 2nd smallest |a|, from 0), only -3 is kept."""
    a = torch.tensor([[1.0, -3.0, 2.0, 0.5]], requires_grad=True)
    upstream = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mask = topk_mask(a, n_keep_reference(0.5, 4), "reference")
    out = masked(a, mask, "reference")
    assert out.tolist() == [[0.0, -3.0, 0.0, 0.0]]
    (grad,) = torch.autograd.grad((out * upstream).sum(), a)
    assert grad.tolist() == [[0.0, 2.0, 0.5 * 2.0 * 3.0, 0.0]]     # kept: its upstream 2; threshold: 0.5 * |2| * 3
    (grad,) = torch.autograd.grad((masked(a, mask, "round") * upstream).sum(), a)
    assert grad.tolist() == [[0.0, 2.0, 0.0, 0.0]]   # the project's rule: a plain mask
    a2 = a.detach().clone().requires_grad_(True)      # the faithful loop's zeroing gives the same value and gradient
    out2 = original_loop.zero_to_threshold(a2, torch.tensor([[2.0]]))
    (grad2,) = torch.autograd.grad((out2 * upstream).sum(), a2)
    assert out2.tolist() == out.tolist() and grad2.tolist() == [[0.0, 2.0, 3.0, 0.0]]


def test_reference_protocol_starts_from_the_originals_init():
    """trunc_normal(0.02) weights and zero bias (the original's init_weights) under reference; nn.Linear's uniform
    default, U(+-1/sqrt(fan_in)) for weight and bias, under iis."""
    assert PROTOCOLS["reference"]["init"] == "trunc_normal_0.02" and PROTOCOLS["iis"]["init"] == "uniform"
    ref = LinearProbes(2048, 100, 2, seed=[0, 1], init="trunc_normal_0.02")
    assert ref.weight.shape == (2, 2048, 100) and torch.equal(ref.bias, torch.zeros(2, 100))
    assert abs(ref.weight[0].std().item() - 0.02) < 0.0005 and abs(ref.weight[0].mean().item()) < 0.0005
    assert not torch.equal(ref.weight[0], ref.weight[1])                     # each seed its own draw
    heads = SparseConceptHeads(torch.rand(200, 16), 100, [0.0, 0.5], seed=3, init="trunc_normal_0.02")
    assert torch.equal(heads.bias, torch.zeros(2, 100)) and abs(heads.weight.std().item() - 0.02) < 0.001
    default = LinearProbes(2048, 100, 1, seed=0)
    bound = 1 / math.sqrt(2048)
    assert default.weight.abs().max() <= bound and default.bias.abs().max() <= bound
    assert abs(default.weight.std().item() - bound / math.sqrt(3)) < 0.0005 and default.bias.abs().min() > 0


def test_stacked_seeds_equal_separate_runs_and_predictions_recompute_accuracies(tmp_path):
    write_entries(tmp_path, n_train=800, n_val=300)
    # no floor: a floor draw pairs with seeds[draw % len(seeds)], so its rows differ between a stacked and a lone
    # seed by design (tests/test_floor.py covers them)
    common = ["--n_concepts", "12", "--epochs", "4", "--ratios", "0", "0.5", "0.9", "--lrs", "0.01", "0.05",
              "--floor_draws", "0"]
    assert train(tmp_path, tmp_path / "both", *common, "--seeds", "3", "7").returncode == 0
    both = results(tmp_path / "both")
    for s in (3, 7):
        r = train(tmp_path, tmp_path / f"s{s}", *common, "--seeds", str(s))
        assert r.returncode == 0, r.stderr[-2000:]
        alone = [(row["head"], row["ratio"], row["lr"], row["top1"], row["epoch"])
                 for row in results(tmp_path / f"s{s}")["runs"]]
        stacked = [(row["head"], row["ratio"], row["lr"], row["top1"], row["epoch"]) for row in both["runs"]
                   if row["seed"] == s]
        assert alone == stacked
    # the seeds really differ (their own concepts, init and order)
    a = [row["top1"] for row in both["runs"] if row["seed"] == 3]
    b = [row["top1"] for row in both["runs"] if row["seed"] == 7]
    assert a != b
    pred = np.load(tmp_path / "both" / both["predictions"], allow_pickle=False)
    assert pred["pred"].shape == (len(both["runs"]), 300)
    for row in both["runs"]:
        assert row["top1"] == pytest.approx(100 * np.mean(pred["pred"][row["pred_row"]] == pred["labels"]))
    heads = torch.load(tmp_path / "both" / "heads.pt", weights_only=True)
    assert heads["concepts"].shape == (2, 12, 24) and heads["concept_rows"].shape == (2, 12)


def test_held_out_selection_chooses_on_dev_and_reports_val():
    x, y = planted(900)
    xv, yv = planted(400, seed=1)
    splits = make_splits(y, [0, 1], "holdout", 0.2)
    for s in splits:
        assert len(np.intersect1d(s.train.numpy(), s.dev.numpy())) == 0 and len(s.train) + len(s.dev) == 900
        counts = [int(np.sum(y == c)) for c in range(5)]
        assert [int(np.sum(y[s.dev.numpy()] == c)) for c in range(5)] == [round(0.2 * n) for n in counts]
    assert not torch.equal(splits[0].dev, splits[1].dev)                     # seeded per group
    x, y, xv, yv = map(torch.as_tensor, (x, y, xv, yv))
    probes = LinearProbes(24, 5, 4, seed=[0, 0, 1, 1], groups=[0, 0, 1, 1])
    res = fit(probes, [0.003, 0.03, 0.003, 0.03], x, y, xv, yv, epochs=6, batch_size=64, splits=splits)
    dev_top1 = evaluate(probes, x, y, row_groups=[s.dev for s in splits])[0]
    np.testing.assert_allclose(dev_top1, res["select_top1"])           # the module ends at the dev-chosen epoch
    np.testing.assert_allclose(evaluate(probes, xv, yv)[0], res["top1"])  # and reports its val accuracy
    assert not np.allclose(res["select_top1"], res["top1"])


def test_dev_split_sizes_by_hand():
    labels = np.repeat([0, 1, 2], [10, 5, 1])          # 20 % of 10, of 5 (at least one), of a lone sample
    (split,) = make_splits(labels, [0], "holdout", 0.2)
    assert np.bincount(labels[split.dev.numpy()], minlength=3).tolist() == [2, 1, 0]
    assert len(split.train) == 13


def test_a_diverging_head_is_stopped_and_marked_while_the_others_train():
    x, y = map(torch.as_tensor, planted(600))
    xv, yv = map(torch.as_tensor, planted(200, seed=1))
    probes = LinearProbes(24, 5, 2)
    res = fit(probes, [0.01, 1e38], x, y, xv, yv, epochs=3, batch_size=64)
    assert res["diverged"].tolist() == [0, 1] and res["epoch"].tolist()[1] == 0
    assert math.isnan(res["top1"][1]) and res["top1"][0] > 40
    assert torch.isfinite(probes.weight).all()       # the stopped head kept finite parameters
    assert res["pred"][1].tolist() == [-1] * 200


def test_trainer_refuses_when_every_head_diverges_and_marks_a_lone_one(tmp_path):
    write_entries(tmp_path, n_train=400, n_val=100)
    common = ["--n_concepts", "8", "--epochs", "2", "--ratios", "0", "0.5", "--floor_draws", "0"]
    r = train(tmp_path, tmp_path / "bad", *common, "--lrs", "1e38")
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error")]
    assert r.returncode == 2 and len(lines) == 1 and "diverged" in lines[0] and "lr=1e+38" in lines[0]
    assert not os.path.exists(tmp_path / "bad")
    r = train(tmp_path, tmp_path / "mixed", *common, "--lrs", "0.01", "1e38")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = results(tmp_path / "mixed")["runs"]
    assert {row["lr"] for row in rows if row["diverged"]} == {1e38}
    assert all(row["top1"] is not None for row in rows if not row["diverged"])

