"""Known answers for the statistics behind an IIS: bootstrap intervals, paired comparisons, chance level and the
chance-corrected score, the per-seed scoring rule (selection, diverged heads) and what iis_computing.py writes."""
import csv
import hashlib
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from fixtures_results import GRID, balanced_labels, flip_concept_hits, planted_heads, random_heads, write_run
from utils import layout, stats
from utils.errors import UserError
from utils.iis import iis, load_predictions, score, score_with_stats
from utils.results import read_score

CURVE = (80, 80, 78, 75, 70, 60, 50, 40)   # a plausible informative run: top-1 (%) at each ratio of GRID


def selection(heads):
    """Correctness matrix and (S, 1 + R) selection of planted heads: per seed and ratio, the most accurate head
    (ties: lower lr), as the scoring rule picks them under select_on=val."""
    correct = np.stack([h["correct"] for h in heads])
    rows = []
    for seed in sorted({h["seed"] for h in heads}):
        def best(kind, ratio):
            cand = [i for i, h in enumerate(heads) if (h["seed"], h["head"], h["ratio"]) == (seed, kind, ratio)]
            return max(cand, key=lambda i: (correct[i].sum(), -heads[i]["lr"]))
        rows.append([best("standard", None)] + [best("concept", r) for r in GRID])
    return correct, np.array(rows)


def cli(*args):
    return subprocess.run([sys.executable, "iis_computing.py", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


# ---------------------------------------------------------------------------------------------------------------------
# bootstrap
# ---------------------------------------------------------------------------------------------------------------------
def test_every_resample_identical_gives_a_zero_width_interval():
    labels = balanced_labels(500, 2)
    correct = np.ones((9, 500), bool)                         # every head right on every sample
    rows = np.arange(9)[None, :]
    st, samples = stats.run_statistics(correct, rows, GRID, labels, n_boot=300, seed=1)
    assert st["iis"] == pytest.approx(0.98) and st["iis_interval"] == pytest.approx([0.98, 0.98])
    assert st["standard_accuracy_interval"] == pytest.approx([100.0, 100.0])
    assert np.allclose(st["normalised_interval"], 1.0)
    # the chance level moves with the resample, but (100 - c) / (100 - c) does not
    assert np.ptp(samples["chance"]) > 0 and st["iis_chance_corrected_interval"] == pytest.approx([0.98, 0.98])
    assert st["chance_level"] is False


def test_bootstrap_accuracies_are_those_of_the_drawn_samples():
    rng = np.random.default_rng(3)
    correct = rng.random((4, 50)) < 0.6
    labels = rng.integers(0, 3, 50)
    acc, chance = stats.bootstrap_accuracies(correct, labels, n_boot=7, seed=11)
    idx = np.random.default_rng(11).integers(0, 50, size=(7, 50))   # one chunk: the whole draw
    assert np.allclose(acc, 100 * correct[:, idx].mean(2).T)
    majority = np.bincount(labels).argmax()        # the whole val set's majority answer, held fixed like a head
    assert np.allclose(chance, [100 * (labels[i] == majority).mean() for i in idx])


def test_chance_corrected_point_lies_inside_its_interval_on_30_samples():
    """The reported bug: 30 val samples, a standard probe just above chance (11/30 against 10/30) and concept heads
    at or above it: the point chance-corrected IIS is 0.98 (every ratio clipped at 1). Each resample's chance level
    used to be that resample's majority rate, whose mean is ~43 % here, not 33 %: most resamples then had their
    standard probe 'below chance' (curve 0) and the interval came out [0, 0.82], the point outside it."""
    labels = np.repeat([0, 1, 2], 10)
    right = [[1, 4, 6, 9, 10, 20, 21, 22, 23, 25, 26],                     # the standard probe: 11 right
             [0, 2, 4, 8, 11, 14, 17, 18, 19, 20, 22, 23, 24, 28, 29],     # concept heads at the 3 ratios: 15,
             [0, 3, 5, 7, 8, 9, 10, 12, 13, 21, 22, 25, 28],               # 13
             [1, 4, 5, 6, 7, 8, 12, 18, 21, 23, 24]]                       # and 11 right
    correct = np.stack([np.isin(np.arange(30), r) for r in right])
    st, samples = stats.run_statistics(correct, np.array([[0, 1, 2, 3]]), [0.0, 0.5, 0.98], labels, n_boot=2000)
    assert st["chance"] == pytest.approx(100 / 3) and st["iis_chance_corrected"] == pytest.approx(0.98)
    lo, hi = st["iis_chance_corrected_interval"]
    assert lo <= st["iis_chance_corrected"] <= hi and hi == pytest.approx(0.98)
    assert abs(samples["chance"].mean() - 100 / 3) < 1.0        # unbiased: the majority answer's mean accuracy
    assert st["chance_level"] is True                            # 11 vs 10 of 30 right: not shown to beat chance


def test_interval_width_matches_the_binomial_standard_error():
    # one head right with probability 0.8 on 4 000 samples: se = sqrt(.8 * .2 / 4000) = 0.632 points
    correct = np.random.default_rng(0).random((1, 4000)) < 0.8
    acc, _ = stats.bootstrap_accuracies(correct, n_boot=2000, seed=0)
    p = correct.mean()
    assert acc.std() == pytest.approx(100 * np.sqrt(p * (1 - p) / 4000), rel=0.08)
    lo, hi = stats.interval(acc[:, 0])
    assert hi - lo == pytest.approx(2 * 1.96 * 100 * np.sqrt(p * (1 - p) / 4000), rel=0.1)


def test_bootstrap_is_seeded():
    correct = np.random.default_rng(0).random((3, 300)) < 0.5
    a, _ = stats.bootstrap_accuracies(correct, n_boot=50, seed=5)
    b, _ = stats.bootstrap_accuracies(correct, n_boot=50, seed=5)
    c, _ = stats.bootstrap_accuracies(correct, n_boot=50, seed=6)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_point_estimates_are_the_formula_and_the_seed_spread():
    labels = balanced_labels(1000)
    heads = planted_heads(labels, 85, CURVE, seeds=(0, 1, 2), rng=np.random.default_rng(1))
    correct, rows = selection(heads)
    st, _ = stats.run_statistics(correct, rows, GRID, labels, n_boot=0)
    acc = 100 * correct.mean(1)
    per_seed = [iis(GRID, acc[r[1:]], acc[r[0]]) for r in rows]
    assert st["iis"] == pytest.approx(np.mean(per_seed)) and st["iis_std"] == pytest.approx(np.std(per_seed, ddof=1))
    assert stats.trapezoid(GRID, st["normalised"]) == pytest.approx(st["iis"])   # the plotted curve's area


# ---------------------------------------------------------------------------------------------------------------------
# paired comparison
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def planted_pair():
    labels = balanced_labels(3000)
    rng = np.random.default_rng(7)
    a = planted_heads(labels, 85, CURVE, rng=rng)
    b = flip_concept_hits(a, 0.10, rng)                      # B: A with 10 % of its concept hits flipped
    return labels, a, b


def test_paired_test_finds_a_planted_drop(planted_pair):
    labels, a, b = planted_pair
    (ca, ra), (cb, rb) = selection(a), selection(b)
    c = stats.paired_bootstrap(ca, ra, GRID, cb, rb, GRID, labels, n_boot=1000, seed=0)
    assert c["verdict"] == ">" and c["p"] == pytest.approx(2 / 1001)      # no resample reverses the order
    assert "two-sided p <= 0.002, 1000 resamples" in stats.verdict_line(c)
    assert 0 < c["interval"][0] < c["difference"] < c["interval"][1]
    assert c["difference"] == pytest.approx(0.1 * stats.run_statistics(ca, ra, GRID, labels, 0)[0]["iis"], rel=0.02)
    assert stats.verdict_line(c, "A", "B").startswith("A > B (IIS difference +")
    rev = stats.paired_bootstrap(cb, rb, GRID, ca, ra, GRID, labels, n_boot=1000, seed=0)
    assert rev["verdict"] == "<" and rev["difference"] == pytest.approx(-c["difference"])


def test_two_identical_runs_show_no_difference(planted_pair):
    labels, a, _ = planted_pair
    ca, ra = selection(a)
    c = stats.paired_bootstrap(ca, ra, GRID, ca.copy(), ra, GRID, labels, n_boot=500, seed=0)
    assert c["verdict"] == "=" and c["p"] == 1.0 and c["difference"] == 0 and c["interval"] == [0.0, 0.0]
    assert stats.verdict_line(c, "A", "B", seeds="1 + 1").startswith(
        "no detectable difference between A and B at n = 3000 val samples, 1 + 1 seeds")


def test_runs_with_equal_rates_are_rarely_called_different():
    # 40 independent pairs, both runs drawn from the same rates: a 5 % test should reject about twice
    labels = balanced_labels(800)
    rng = np.random.default_rng(12)
    rejected = 0
    for _ in range(40):
        (ca, ra), (cb, rb) = (selection(planted_heads(labels, 85, CURVE, lrs=(0.01,), rng=rng)) for _ in range(2))
        rejected += stats.paired_bootstrap(ca, ra, GRID, cb, rb, GRID, labels, n_boot=300, seed=1)["verdict"] != "="
    assert rejected <= 6


def test_pairing_by_shared_seed_is_the_stacked_paired_bootstrap(planted_pair):
    labels, a, b = planted_pair
    (ca, ra), (cb, rb) = selection(a), selection(b)
    sa = stats.run_statistics(ca, ra, GRID, labels, n_boot=400, seed=3)
    sb = stats.run_statistics(cb, rb, GRID, labels, n_boot=400, seed=3)
    separate = stats.compare(sa[1]["iis"], sb[1]["iis"], sa[0]["iis"] - sb[0]["iis"], len(labels))
    stacked = stats.paired_bootstrap(ca, ra, GRID, cb, rb, GRID, labels, n_boot=400, seed=3)
    assert separate["interval"] == pytest.approx(stacked["interval"]) and separate["p"] == stacked["p"]


# ---------------------------------------------------------------------------------------------------------------------
# chance
# ---------------------------------------------------------------------------------------------------------------------
def test_chance_level_and_correction_by_hand():
    assert stats.chance_level([0, 0, 0, 1]) == 75.0
    # chance 10 %, standard 60 %: 60 -> 1, 35 -> 0.5; area over [0, 1] = 0.75
    y = stats.chance_corrected([60.0, 35.0], 60.0, 10.0)
    assert y == pytest.approx([1.0, 0.5]) and stats.trapezoid([0, 1], y) == pytest.approx(0.75)
    assert np.all(stats.chance_corrected([12.0, 9.0], 10.0, 10.0) == 0)      # standard at chance: nothing to keep
    assert np.all(stats.chance_corrected([12.0, 9.0], 8.0, 10.0) == 0)       # below chance: the same
    # clipped to [0, 1]: above the standard probe keeps all of it, below chance keeps nothing
    assert stats.chance_corrected([70.0, 5.0], 60.0, 10.0) == pytest.approx([1.0, 0.0])
    # a standard probe 0.01 points above chance no longer turns noise into a ratio of hundreds
    assert stats.chance_corrected([11.0, 9.0], 10.01, 10.0) == pytest.approx([1.0, 0.0])


def test_chance_level_run_is_flagged_and_not_rewarded():
    labels = balanced_labels(2000)
    rnd = random_heads(labels, 10, rng=np.random.default_rng(4))
    inf = planted_heads(labels, 85, CURVE, rng=np.random.default_rng(5))
    (cr, rr), (ci, ri) = selection(rnd), selection(inf)
    sr, _ = stats.run_statistics(cr, rr, GRID, labels, n_boot=500)
    si, _ = stats.run_statistics(ci, ri, GRID, labels, n_boot=500)
    assert sr["chance_level"] is True and si["chance_level"] is False
    assert sr["margin_interval"][0] <= 0 < si["margin_interval"][0]
    assert sr["iis"] > si["iis"]                                         # the paper's score rewards chance ...
    assert sr["iis_chance_corrected"] <= si["iis_chance_corrected"]      # ... the corrected one does not
    assert si["iis_chance_corrected"] < si["iis"]


# ---------------------------------------------------------------------------------------------------------------------
# scoring rule
# ---------------------------------------------------------------------------------------------------------------------
def rows_of(heads, labels):
    """Results rows of planted heads (no predictions), as the trainers would write them."""
    return [{"head": h["head"], "ratio": h["ratio"], "lr": h["lr"], "seed": h["seed"], "diverged": h["diverged"],
             "top1": 100.0 * h["correct"].mean(), "top5": 100.0,
             "select_top1": h["select_top1"] if h["select_top1"] is not None else 100.0 * h["correct"].mean()}
            for h in heads]


def two_ratio_runs(std=(80.0, 70.0), a=(60.0, 50.0), b=(40.0, 45.0), **over):
    """Standard probes at lrs .01/.1 and concept heads at ratios 0 and .5 (lrs .01/.1), with given top-1."""
    runs = [{"head": "standard", "ratio": None, "lr": lr, "top1": t} for lr, t in zip((0.01, 0.1), std)]
    runs += [{"head": "concept", "ratio": r, "lr": lr, "top1": t} for r, ts in ((0.0, a), (0.5, b))
             for lr, t in zip((0.01, 0.1), ts)]
    for i, fields in over.items():
        runs[int(i[1:])].update(fields)
    return runs


def test_selection_uses_select_top1_and_breaks_ties_by_the_lower_lr():
    # holdout picked lr .1 at ratio 0 (its select_top1 is higher) although lr .01 has the higher val top-1
    runs = two_ratio_runs(r2={"select_top1": 50.0}, r3={"select_top1": 55.0},
                          r4={"select_top1": 30.0}, r5={"select_top1": 30.0})
    s = score({"runs": runs})
    assert s["accuracies"] == [50.0, 40.0] and s["per_seed"][0]["lrs"] == [0.1, 0.01]   # tie at .5: lr .01


def test_diverged_heads_never_count():
    runs = two_ratio_runs(r0={"diverged": 4}, r2={"diverged": 2})
    s = score({"runs": runs})
    assert s["standard_accuracy"] == 70.0 and s["accuracies"] == [50.0, 45.0]
    assert s["iis"] == pytest.approx(iis([0, 0.5], [50, 45], 70)) and s["diverged_heads"] == 2


def test_a_ratio_whose_every_head_diverged_is_refused():
    with pytest.raises(UserError, match=r"every head of sparsity 0.5 \(seed 0\) diverged \(lr 0.01 at epoch 3, "
                                        r"lr 0.1 at epoch 5\)"):
        score({"runs": two_ratio_runs(r4={"diverged": 3}, r5={"diverged": 5})})
    with pytest.raises(UserError, match="every head of the standard probe"):
        score({"runs": two_ratio_runs(r0={"diverged": 1}, r1={"diverged": 1})})


def test_mean_over_seeds_is_the_mean_of_separately_scored_seeds():
    labels = balanced_labels(600)
    heads = planted_heads(labels, 85, CURVE, seeds=(0, 1, 2), rng=np.random.default_rng(9))
    together = score({"runs": rows_of(heads, labels)})
    alone = [score({"runs": rows_of([h for h in heads if h["seed"] == k], labels)})["iis"] for k in (0, 1, 2)]
    assert together["iis"] == pytest.approx(np.mean(alone)) and together["iis_std"] == pytest.approx(
        np.std(alone, ddof=1))
    assert together["seeds"] == [0, 1, 2] and [p["iis"] for p in together["per_seed"]] == pytest.approx(alone)


def test_schema_1_results_score_with_a_note_and_no_interval(tmp_path):
    labels = balanced_labels(300)
    heads = planted_heads(labels, 85, CURVE, rng=np.random.default_rng(2))
    folder = write_run(str(tmp_path / "old"), heads, labels, schema=1)
    res = json.load(open(os.path.join(folder, "results.json")))
    assert "predictions" not in res and load_predictions(res, folder) is None
    s, paired = score_with_stats(res, None)
    best = [max(r["top1"] for r in res["runs"] if r["ratio"] == q) for q in GRID]
    assert s["iis"] == pytest.approx(iis(GRID, best, max(r["top1"] for r in res["runs"] if r["head"] == "standard")))
    assert s["interval"] is None and s["chance_level"] is None and paired is None
    assert "no per-sample predictions" in s["note"]
    r = cli(folder, "--bootstrap", 50)
    assert r.returncode == 0, r.stderr
    assert "note: planted@old prototype: no per-sample predictions" in r.stdout
    assert "bootstrap interval" not in r.stdout and "IIS = %.4f (1 seed: no spread)" % s["iis"] in r.stdout


def test_without_a_bootstrap_the_chance_level_is_still_known(tmp_path):
    labels = balanced_labels(400)
    folder = write_run(str(tmp_path / "r"), random_heads(labels, 10, rng=np.random.default_rng(8)), labels)
    res = json.load(open(os.path.join(folder, "results.json")))
    s, paired = score_with_stats(res, load_predictions(res, folder), n_boot=0)
    assert s["interval"] is None and "bootstrap is off" in s["note"] and paired["samples"] is None
    assert s["chance"] == 10.0 and s["iis_chance_corrected"] is not None
    assert s["chance_level"] is (True if s["standard_accuracy"] <= 10.0 else None)


def test_predictions_that_disagree_with_the_results_are_refused(tmp_path):
    labels = balanced_labels(200)
    folder = write_run(str(tmp_path / "r"), planted_heads(labels, 85, CURVE), labels)
    res = json.load(open(os.path.join(folder, "results.json")))
    res["runs"][3]["top1"] += 0.5                           # one sample's worth is 0.5 points
    with pytest.raises(UserError, match="row 3 gives top-1"):
        load_predictions(res, folder)
    with open(os.path.join(folder, "predictions.npz"), "wb") as f:
        f.write(b"not a zip")
    with pytest.raises(UserError, match="not a readable predictions file"):
        load_predictions(json.load(open(os.path.join(folder, "results.json"))), folder)


# ---------------------------------------------------------------------------------------------------------------------
# iis_computing.py: what it prints and writes equals what stats computes
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scored_runs(tmp_path_factory, planted_pair):
    tmp = tmp_path_factory.mktemp("runs")
    labels, a, b = planted_pair
    a3 = planted_heads(labels, 85, CURVE, seeds=(0, 1, 2), rng=np.random.default_rng(21))
    rnd = random_heads(labels, 10, rng=np.random.default_rng(22))
    paths = [write_run(str(tmp / n), h, labels) for n, h in (("A", a), ("B", b), ("A3", a3), ("rand", rnd))]
    r = cli(*paths, "--bootstrap", 400, "--bootstrap_seed", 2, "--report", tmp / "report")
    assert r.returncode == 0, r.stderr
    return dict(tmp=tmp, labels=labels, heads=[a, b, a3, rnd], paths=paths, out=r)


def test_iis_json_and_report_carry_what_stats_computes(scored_runs):
    rows = list(csv.DictReader(open(scored_runs["tmp"] / "report" / "report.csv")))
    md = open(scored_runs["tmp"] / "report" / "report.md").read()
    for path, heads, row in zip(scored_runs["paths"], scored_runs["heads"], rows):
        correct, sel = selection(heads)
        st, _ = stats.run_statistics(correct, sel, GRID, scored_runs["labels"], n_boot=400, seed=2)
        s = read_score(path, bootstrap=400, bootstrap_seed=2)          # the file these settings name
        assert s["iis"] == pytest.approx(st["iis"]) and s["interval"]["iis"] == pytest.approx(st["iis_interval"])
        assert s["iis_chance_corrected"] == pytest.approx(st["iis_chance_corrected"])
        np.testing.assert_allclose(s["interval"]["normalised"], st["normalised_interval"])
        assert s["chance_level"] == st["chance_level"] and s["chance"] == pytest.approx(st["chance"])
        assert (s["iis_std"] is None) == (st["iis_std"] is None)
        for col, val, nd in (("iis", st["iis"], 4), ("iis_lo", st["iis_interval"][0], 4),
                             ("iis_hi", st["iis_interval"][1], 4), ("iis_cc", st["iis_chance_corrected"], 4),
                             ("standard_lo", st["standard_accuracy_interval"][0], 2), ("chance", st["chance"], 2)):
            assert float(row[col]) == pytest.approx(round(val, nd), abs=10 ** -nd)
        assert row["chance_level"] == ("yes" if st["chance_level"] else "no")
        assert f"{round(st['iis'], 4)}" in md
    assert rows[2]["seeds"] == "3" and float(rows[2]["iis_std"]) > 0 and rows[0]["iis_std"] == ""
    assert [r["chance_level"] for r in rows] == ["no", "no", "no", "yes"] and "(chance-level)" in md
    out = scored_runs["out"].stdout
    assert "chance-level: planted@rand prototype: standard top-1" in out
    # A and B share their standard probe: 2 distinct top-1 values, too few for a correlation
    assert "IIS vs standard top-1: no correlation: 2 distinct standard top-1 values among the 3 runs" in out


def test_report_gives_paired_verdicts_between_neighbouring_rows(scored_runs):
    rows = list(csv.DictReader(open(scored_runs["tmp"] / "report" / "report.csv")))
    labels, (a, b, _, _) = scored_runs["labels"], scored_runs["heads"]
    assert rows[0]["vs_next"] == "> next"
    (ca, ra), (cb, rb) = selection(a), selection(b)
    c = stats.paired_bootstrap(ca, ra, GRID, cb, rb, GRID, labels, n_boot=400, seed=2)
    assert float(rows[0]["vs_next_diff"]) == pytest.approx(c["difference"], abs=1e-4)
    assert [float(rows[0]["vs_next_lo"]), float(rows[0]["vs_next_hi"])] == pytest.approx(c["interval"], abs=1e-4)
    assert float(rows[0]["vs_next_p"]) == pytest.approx(c["p"], abs=1e-4)
    assert rows[3]["vs_next"] == ""                                     # the last row has no next
    assert "row 1 vs row 2: row 1 > row 2" in scored_runs["out"].stdout
    assert "* row 1 (planted@A prototype) vs row 2 (planted@B prototype): row 1 > row 2" in open(
        scored_runs["tmp"] / "report" / "report.md").read()


def test_compare_flag_gives_one_verdict(scored_runs):
    a, b = scored_runs["paths"][:2]
    r = cli(a, b, "--compare", "--bootstrap", 300)
    assert r.returncode == 0, r.stderr
    assert "\nA > B (IIS difference +" in r.stdout
    r = cli(a, a, "--compare", "--bootstrap", 300)
    assert "no detectable difference between A and B at n = 3000 val samples, 1 + 1 seeds" in r.stdout


def one_error_line(r, *words):
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_compare_refuses_runs_on_different_val_samples(tmp_path):
    labels = balanced_labels(300)
    heads = planted_heads(labels, 85, CURVE)
    a = write_run(str(tmp_path / "a"), heads, labels, val_samples="aaaaaaaaaaaaaaaa")
    b = write_run(str(tmp_path / "b"), heads, labels, val_samples="bbbbbbbbbbbbbbbb")
    r = cli(a, b, "--compare", "--bootstrap", 50)
    one_error_line(r, "cannot compare", "different val samples")
    assert not [f for f in os.listdir(a) if f.startswith("iis")]        # refused before anything was written
    old = write_run(str(tmp_path / "old"), heads, labels, schema=1)
    one_error_line(cli(a, old, "--compare"), "B has no per-sample")
    one_error_line(cli(a, "--compare"), "exactly two runs")


def test_cli_refuses_a_ratio_whose_every_head_diverged(tmp_path):
    labels = balanced_labels(200)
    heads = [dict(h, diverged=2) if h["ratio"] == 0.9 else h for h in planted_heads(labels, 85, CURVE)]
    one_error_line(cli(write_run(str(tmp_path / "d"), heads, labels)), "every head of sparsity 0.9", "diverged")


# ---------------------------------------------------------------------------------------------------------------------
# degenerate data and mixed val sets
# ---------------------------------------------------------------------------------------------------------------------
def test_three_classes_of_ten_images_are_flagged(tmp_path):
    """The issue's 3-class run: 30 train images (epochs and lrs chosen on 1 held-out image per class), 30 val images,
    standard top-1 16.7 % at chance 33 %: every flag is printed, stored in iis.json and shown in the report."""
    labels = balanced_labels(30, 3)
    heads = random_heads(labels, 3, rng=np.random.default_rng(4))
    folder = write_run(str(tmp_path / "tiny"), heads, labels, n_classes=3,
                       meta={"n_train": 30, "select_on": "holdout", "classes": ["a", "b", "c"]})
    big = write_run(str(tmp_path / "big"), planted_heads(balanced_labels(3000), 85, CURVE,
                                                         rng=np.random.default_rng(5)), balanced_labels(3000),
                    val_samples="fedcba9876543210", meta={"n_train": 2000})
    r = cli(folder, big, "--bootstrap", 200, "--report", tmp_path / "report")
    assert r.returncode == 0, r.stderr
    codes = [f["code"] for f in read_score(folder, bootstrap=200)["flags"]]
    assert codes[:2] == ["few-dev", "few-val"] and read_score(big, bootstrap=200)["flags"] == []
    assert "flag (few-dev): planted@tiny prototype: epochs and lrs chosen on about 1 held-out train samples per " \
           "class" in r.stdout
    assert "flag (few-val): planted@tiny prototype: 30 val samples, 10 per class" in r.stdout
    # two val sets: said, and no correlation across them
    assert "note: these runs were scored on 2 different val sets" in r.stdout
    assert "no correlation: the runs were scored on 2 different val sets" in r.stdout
    md = open(tmp_path / "report" / "report.md").read()
    assert "| few-dev few-val" in md and "* row 1 flag few-val: 30 val samples" in md
    assert "| 30 | 30 | prototype | holdout |" in md and "| 2000 | 3000 | prototype | val |" in md
    rows = list(csv.DictReader(open(tmp_path / "report" / "report.csv")))
    assert [(r["n_train"], r["n_val"], r["select_on"]) for r in rows] == [("30", "30", "holdout"),
                                                                           ("2000", "3000", "val")]


def test_several_runs_write_nothing_outside_their_folders(tmp_path):
    labels = balanced_labels(300)
    runs = [write_run(str(tmp_path / "runs" / n), planted_heads(labels, 85, CURVE, rng=np.random.default_rng(k)),
                      labels) for k, n in enumerate("ab")]
    before = set(os.listdir(tmp_path)) | set(os.listdir(tmp_path / "runs"))
    r = cli(*runs, "--bootstrap", 0)
    assert r.returncode == 0, r.stderr
    assert set(os.listdir(tmp_path)) | set(os.listdir(tmp_path / "runs")) == before     # no iis_compare.png
    assert "give --plot PNG or --report DIR for one plot of all" in r.stdout
    curve = layout.score_names(bootstrap=0)[1]                         # iis_curve_<hash of bootstrap=0>.png
    assert all(os.path.isfile(os.path.join(d, curve)) for d in runs)
    bad = cli(os.path.join(runs[0], curve))                  # a glob that caught a plot: one line
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "is not a results file (not JSON)" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    assert re.search(r"^row 2 = planted@b prototype on synthetic \(n_train 100, n_val 300, chosen on val\): IIS = ",
                     r.stdout, re.M)


def test_a_checkpoint_is_labelled_apart_from_the_pretrained_weights(tmp_path):
    ckpt = tmp_path / "ft" / "interp1_seed0" / "backbone.safetensors"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"weights")
    labels = balanced_labels(300)
    run = write_run(str(tmp_path / "r"), planted_heads(labels, 85, CURVE, rng=np.random.default_rng(1)), labels,
                    meta={"weights": str(ckpt)})
    r = cli(run, "--bootstrap", 0)
    digest = hashlib.sha256(b"weights").hexdigest()[:8]
    assert r.returncode == 0 and f"planted@r ft:{digest} prototype" in r.stdout, r.stdout
    ckpt.unlink()                                                   # moved away: the folder's name instead
    assert "planted@r ft:interp1_seed0 prototype" in cli(run, "--bootstrap", 0).stdout


# ---------------------------------------------------------------------------------------------------------------------
# a score is keyed by its settings
# ---------------------------------------------------------------------------------------------------------------------
def test_a_score_with_other_settings_never_overwrites_another(tmp_path):
    """Default settings, then others, then the defaults again: the default score (iis.json, iis_curve.png) is
    byte-identical throughout and the other one lies beside it under the name its settings give, recording them."""
    labels = balanced_labels(300)
    run = write_run(str(tmp_path / "r"), planted_heads(labels, 85, CURVE, rng=np.random.default_rng(3)), labels)

    def digests():
        return {f: hashlib.sha256(open(os.path.join(run, f), "rb").read()).hexdigest()
                for f in sorted(os.listdir(run)) if f.startswith("iis")}

    assert cli(run).returncode == 0
    first = digests()
    assert sorted(first) == ["iis.json", "iis_curve.png"]
    assert "score_settings" not in read_score(run)                    # the default score's content is as it was
    other = dict(bootstrap=200, bootstrap_seed=3)
    name, curve = layout.score_names(**other)
    assert re.fullmatch(r"iis_[0-9a-f]{8}\.json", name) and curve == f"iis_curve_{name[4:12]}.png"
    r = cli(run, "--bootstrap", 200, "--bootstrap_seed", 3)
    assert r.returncode == 0, r.stderr
    second = digests()
    assert sorted(second) == sorted(["iis.json", "iis_curve.png", name, curve])
    assert {f: second[f] for f in first} == first
    s = read_score(run, **other)
    assert s["score_settings"] == {"metric": "top1", "bootstrap": 200, "bootstrap_seed": 3}
    assert s["interval"]["resamples"] == 200 and read_score(run)["interval"]["resamples"] == 1000
    assert cli(run).returncode == 0
    assert digests() == second                                        # the defaults again: nothing changed
    # the defaults given explicitly are the default score; each other setting has its own name
    assert layout.score_names(metric="top1", bootstrap=1000, bootstrap_seed=0) == ("iis.json", "iis_curve.png")
    kinds = ({}, {"bootstrap": 200}, {"bootstrap_seed": 3}, {"metric": "top5"}, other)
    assert len({layout.score_names(**k)[0] for k in kinds}) == len(kinds)
    with pytest.raises(ValueError, match="not a score setting"):
        layout.score_names(select_on="val")                           # a training setting names the run instead
    # the reader: a score never written, and a file whose recorded settings are not those its name stands for
    with pytest.raises(UserError, match=r"no score iis_[0-9a-f]{8}\.json in .*: score it with python "
                                        r"iis_computing.py .* --bootstrap 50$"):
        read_score(run, bootstrap=50)
    with open(os.path.join(run, layout.score_names(bootstrap=50)[0]), "w") as f:
        f.write(open(os.path.join(run, name)).read())
    with pytest.raises(UserError, match="holds a score with other settings"):
        read_score(run, bootstrap=50)


def test_seed_interval_is_the_t_interval_over_seeds():
    m, sd, (lo, hi) = stats.seed_interval([1.0, 2.0, 3.0])
    assert (m, sd) == (2.0, 1.0)
    assert (lo, hi) == pytest.approx((2.0 - 4.303 / np.sqrt(3), 2.0 + 4.303 / np.sqrt(3)))
    assert stats.seed_interval([0.5]) == (0.5, None, None) and stats.seed_interval([]) == (None, None, None)
    t = pytest.importorskip("scipy.stats").t
    assert stats.T975 == pytest.approx([t.ppf(0.975, df) for df in range(1, 31)], abs=6e-4)
