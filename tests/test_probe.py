"""The converged standard probe (utils/probe.py) against known answers: an independent solver's optimum, separable
classes the original's Adam probe leaves far from solved, exact scale invariance, the sweep's per-seed fits; and the
check that warns when a concept head beats the standard probe (utils/stats.py, utils/iis.py)."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO
from utils import iis, stats, store
from utils.heads import LinearProbes, Split, fit
from utils.probe import PRIORS, ConvergedProbes, fit_converged_probe, fit_standard, standardiser


def three_classes(offset, n=300, n_val=150, dim=16, seed=0):
    """Means 8 sd apart in a random 3-d subspace, every feature offset by ``offset`` sd: separable to 100 %."""
    rng = np.random.default_rng(seed)
    means = 8 / np.sqrt(2) * np.linalg.qr(rng.normal(size=(dim, dim)))[0][:3]

    def split(m):
        y = rng.integers(0, 3, m)
        return (offset + means[y] + rng.normal(size=(m, dim))).astype(np.float32), y
    return split(n) + split(n_val)


def t64(*a):
    return [torch.as_tensor(np.asarray(v, dtype=np.float64)) if np.asarray(v).dtype.kind == "f"
            else torch.as_tensor(np.asarray(v, dtype=np.int64)) for v in a]


def predict(fit_, x):
    with torch.no_grad():
        return ConvergedProbes([fit_])(torch.as_tensor(x))[0].argmax(1).numpy()


def test_the_solution_is_the_penalised_optimum_an_independent_solver_finds():
    from sklearn.linear_model import LogisticRegression
    rng = np.random.default_rng(1)
    x = rng.normal(size=(400, 6)) * [1, 2, 3, 0.5, 4, 1] + 5
    y = (x[:, 0] - 0.5 * x[:, 1] + rng.normal(size=400) > 5).astype(int) + (x[:, 2] > 6)
    p = fit_converged_probe(*t64(x[:320], y[:320], x[320:], y[320:]), 3, priors=(10.0,), tol=1e-6)
    assert p["converged"] and p["weight_decay"] == pytest.approx(10.0 / 320)
    z = (x[:320] - x[:320].mean(0)) / x[:320].std(0)
    # sklearn minimises C * sum CE + |W|^2 / 2, i.e. mean CE + |W|^2 / (2 C n): C = 1 / prior
    ref = LogisticRegression(C=1 / 10.0, tol=1e-12, max_iter=10000).fit(z, y[:320])
    w = p["weight"].numpy().T
    np.testing.assert_allclose(w - w.mean(0), ref.coef_ - ref.coef_.mean(0), atol=1e-4)
    assert (predict(p, x) == ref.predict((x - x[:320].mean(0)) / x[:320].std(0))).all()


def test_separable_classes_far_from_zero_are_solved_where_the_adam_probe_is_not():
    x, y, xv, yv = three_classes(offset=100.0)
    p = fit_converged_probe(*t64(x[:270], y[:270], x[270:], y[270:]), 3)
    assert (predict(p, xv) == yv).mean() == 1.0 and p["converged"]
    # the original's probe (Adam, lrs 1e-3 and 1e-2, 30 epochs of batch 256) on the same rows stays near chance
    split = Split(torch.arange(270), torch.arange(270, 300), 0)
    res = fit(LinearProbes(16, 3, 2, [0, 0]), [1e-3, 1e-2], torch.as_tensor(x), torch.as_tensor(y),
              torch.as_tensor(xv), torch.as_tensor(yv), epochs=30, batch_size=256, splits=[split], desc="adam")
    assert max(res["top1"]) < 60


@pytest.mark.parametrize("k", [0.1, 10.0, 1e3])
def test_scale_and_offset_leave_every_prediction_unchanged(k):
    x, y, xv, yv = three_classes(offset=3.0, n=600, n_val=300)
    x += 2.5 * np.random.default_rng(2).normal(size=x.shape)     # overlap, so that predictions can differ
    xv += 2.5 * np.random.default_rng(3).normal(size=xv.shape)
    base = fit_converged_probe(*t64(x[:540], y[:540], x[540:], y[540:]), 3)
    m = x * k - 7.0
    moved = fit_converged_probe(*t64(m[:540], y[:540], m[540:], y[540:]), 3)
    assert moved["weight_decay"] == base["weight_decay"]
    assert (predict(moved, xv * k - 7.0) == predict(base, xv)).all()
    assert 70 < 100 * (predict(base, xv) == yv).mean() < 100
    np.testing.assert_allclose(moved["weight"].numpy(), base["weight"].numpy(), atol=5e-3)


def test_standardiser_uses_the_rows_given_and_leaves_constant_features_alone():
    x = torch.tensor([[1.0, 5.0], [3.0, 5.0], [5.0, 5.0]], dtype=torch.float64)
    mean, scale = standardiser(x)
    assert mean.tolist() == [3.0, 5.0] and scale[0] == pytest.approx(np.sqrt(8 / 3)) and scale[1] == 1.0


def test_the_sweeps_probes_choose_on_their_dev_rows_and_report_val():
    x, y, xv, yv = three_classes(offset=3.0, n=600, n_val=300)
    x[:, :3] += 3 * np.random.default_rng(4).normal(size=(600, 3))
    xv[:, :3] += 3 * np.random.default_rng(5).normal(size=(300, 3))
    x, y, xv, yv = map(torch.as_tensor, (x, y, xv, yv))
    a = Split(torch.arange(500), torch.arange(500, 600), 3)
    b = Split(torch.arange(100, 600), torch.arange(100), 7)
    res, probes, extra = fit_standard(x, y, xv, yv, 3, [a, b, a], torch.device("cpu"))
    logits = probes(xv)
    assert logits.shape == (3, 300, 3) and probes.weight.shape == (3, 16, 3)
    np.testing.assert_array_equal(res["pred"], logits.argmax(-1).numpy())
    np.testing.assert_allclose(res["top1"], 100 * (logits.argmax(-1) == yv).double().mean(1).numpy())
    for h, s in enumerate([a, b, a]):        # the chosen weight decay's dev top-1, from the probe itself
        dev = probes(x[s.dev])[h].argmax(1)
        assert res["select_top1"][h] == pytest.approx(100 * (dev == y[s.dev]).double().mean().item())
        wds = [e["weight_decay"] for e in extra[h]["solves"]]
        assert wds == [p / 500 for p in sorted(PRIORS, reverse=True)] and extra[h]["weight_decay"] in wds
        best = max(e["dev_top1"] for e in extra[h]["solves"])
        assert extra[h]["weight_decay"] == max(e["weight_decay"] for e in extra[h]["solves"]
                                               if e["dev_top1"] == best)
    assert torch.equal(probes.weight[0], probes.weight[2]) and not torch.equal(probes.weight[0], probes.weight[1])
    assert set(res["epoch"]) == {0} and set(res["diverged"]) == {0}
    # without a dev split the weight decay is chosen on val, as the Adam probe then chooses its epoch
    res_v, _, _ = fit_standard(x, y, xv, yv, 3, [Split(torch.arange(600), None, 0)], torch.device("cpu"))
    assert res_v["select_top1"][0] == res_v["top1"][0]


def test_a_head_that_beats_the_probe_by_more_than_its_interval_is_flagged():
    rng = np.random.default_rng(0)
    probe = rng.random(2000) < 0.6
    better = probe | (rng.random(2000) < 0.2)          # right wherever the probe is, and on ~8 % more
    noisy = np.where(rng.random(2000) < 0.02, ~probe, probe)   # differs on 2 % of samples, both ways
    correct = np.stack([probe, better, probe.copy(), noisy])
    diff, lo, hi = stats.beats_standard(correct, np.array([[0, 1, 2, 3]]), n_boot=500)
    assert diff.shape == lo.shape == (1, 3)
    assert diff[0, 0] == pytest.approx(100 * (better.mean() - probe.mean())) and diff[0, 1] == 0
    assert (lo[0] > 0).tolist() == [True, False, False]
    assert lo[0, 1] == hi[0, 1] == 0 and lo[0, 2] < diff[0, 2] < hi[0, 2]


def scored_run(head_correct, std_correct, ratios=(0.0, 0.5)):
    """A one-seed results dict with its predictions: a converged standard probe row, one concept head per ratio."""
    n = len(std_correct)
    labels = np.zeros(n, dtype=np.int64)
    pred = np.stack([np.where(c, 0, 1) for c in [std_correct, *head_correct]])
    top1 = [100 * float(c.mean()) for c in [std_correct, *head_correct]]
    runs = [dict(head="standard", ratio=None, lr=None, seed=0, top1=top1[0], select_top1=top1[0], diverged=None,
                 pred_row=0, probe="converged")]
    runs += [dict(head="concept", ratio=r, lr=0.01, seed=0, top1=top1[i + 1], select_top1=top1[i + 1],
                  diverged=None, pred_row=i + 1) for i, r in enumerate(ratios)]
    return iis.score_with_stats({"runs": runs}, (pred, labels), n_boot=500)[0]


def test_the_score_warns_when_a_concept_head_beats_the_standard_probe():
    rng = np.random.default_rng(1)
    std = rng.random(1500) < 0.6
    s = scored_run([std | (rng.random(1500) < 0.25), std & (rng.random(1500) < 0.9)], std)
    assert [(b["seed"], b["ratio"]) for b in s["beats_standard"]] == [(0, 0.0)]
    assert s["beats_standard"][0]["interval"][0] > 0 and len(s["warnings"]) == 1
    assert s["warnings"][0].startswith("1 of 2 concept heads beat the standard probe") and "s=0," in s["warnings"][0]
    assert s["per_seed"][0]["standard_lr"] is None     # a converged probe has no lr; the score takes it as it is
    quiet = scored_run([std & (rng.random(1500) < 0.95), std & (rng.random(1500) < 0.9)], std)
    assert quiet["beats_standard"] == [] and quiet["warnings"] == []


def write_entries(root, k=1.0, n=700, n_val=300):
    """Overlapping classes scaled by ``k``; elements are noisy train rows."""
    centres = np.random.default_rng(99).normal(size=(4, 12))
    rng = np.random.default_rng(0)
    bb = {"arch": "synthetic"}
    classes = ["a", "b", "c", "d"]
    for name, m in (("train", n), ("val", n_val)):
        y = rng.integers(0, 4, m)
        x = (k * (centres[y] + 1.6 * rng.normal(size=(m, 12)) + 20)).astype(np.float32)
        store.write(str(root / name), {"features": x, "labels": y, "indices": np.arange(m)},
                    {"backbone": bb, "data": {"split": name}}, {"classes": classes, "backbone": dict(
                        name="syn", arch="syn", weights="none", layer="x", pooling="avg")})
        if name == "train":
            emb = x[:10] + 0.1 * k * rng.normal(size=(10, 12)).astype(np.float32)
            store.write(str(root / "elements"), {"features": emb, "labels": y[:10]}, {"backbone": bb, "data": "el"},
                        {"classes": classes})


def train(root, out, *extra):
    cmd = [sys.executable, "-m", "IP_training.IP_Prototype_training", "--train_features", str(root / "train"),
           "--val_features", str(root / "val"), "--concepts", str(root / "elements"), "--out", str(out),
           "--epochs", "3", "--ratios", "0", "0.5", "0.9", *extra]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(out / "results.json") as f:
        return json.load(f), r.stdout


def test_the_trainer_uses_the_converged_probe_under_iis_and_the_originals_under_reference(tmp_path):
    write_entries(tmp_path)
    res, out = train(tmp_path, tmp_path / "iis", "--seeds", "0", "1", "--floor_draws", "0")   # the probe, not the floor
    std = [r for r in res["runs"] if r["head"] == "standard"]
    assert [(r["seed"], r["lr"], r["probe"]) for r in std] == [(0, None, "converged"), (1, None, "converged")]
    assert all(r["converged"] and r["weight_decay"] in [e["weight_decay"] for e in r["solves"]] for r in std)
    assert res["key"]["standard_probe"]["probe"] == "converged" and 40 < std[0]["top1"] < 95
    heads = torch.load(tmp_path / "iis" / "heads.pt", weights_only=True)
    assert heads["standard.weight"].shape == (2, 12, 4) and heads["standard_grid"][:, 1].isnan().all()
    ref, _ = train(tmp_path, tmp_path / "ref", "--protocol", "reference")
    assert "standard_probe" not in ref["key"]
    assert [(r["lr"], "probe" in r) for r in ref["runs"] if r["head"] == "standard"] == [(0.01, False)]
    # features x 10: the converged probe's accuracy (and weight decay) do not move
    (tmp_path / "x10").mkdir()
    write_entries(tmp_path / "x10", k=10.0)
    res10, _ = train(tmp_path / "x10", tmp_path / "iis10", "--seeds", "0", "1", "--floor_draws", "0")
    std10 = [r for r in res10["runs"] if r["head"] == "standard"]
    assert [r["top1"] for r in std10] == [r["top1"] for r in std]
    assert [r["weight_decay"] for r in std10] == [r["weight_decay"] for r in std]
