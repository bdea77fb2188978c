"""Report pieces with known answers: correlation intervals, chance-level runs left out of the correlations, the table's
empty cells for runs without intervals, and figures that render with bands and error bars."""
import csv
import math

import numpy as np
import pytest

from utils import stats
from utils.report import (common_label, correlation_summary, correlations, corr_line, plot_curves, plot_scatter,
                          table_rows, write_table)


def test_fisher_z_interval_by_hand():
    # r = 0.5, n = 28: z = atanh(.5) = 0.5493, se = 1/5 = 0.2, z -/+ 1.96 * 0.2 -> tanh(0.1573), tanh(0.9413)
    lo, hi = stats.correlation_interval(0.5, 28)
    assert (lo, hi) == pytest.approx((math.tanh(0.5493061 - 0.3919928), math.tanh(0.5493061 + 0.3919928)), abs=1e-6)
    assert (lo, hi) == pytest.approx((0.1560, 0.7358), abs=1e-4)
    slo, shi = stats.correlation_interval(0.5, 28, spearman=True)   # Spearman: se * sqrt(1.06), a little wider
    assert slo < lo and shi > hi
    assert all(math.isnan(v) for v in stats.correlation_interval(0.9, 3))
    assert all(math.isnan(v) for v in stats.correlation_interval(float("nan"), 10))
    assert stats.correlation_interval(1.0, 10)[1] == pytest.approx(1.0)


def row(name, top1, iis, flag="no", lo=None, hi=None, ct="prototype"):
    return {"backbone": name, "weights": "w", "layer": "l", "dataset": "d", "concept_type": ct, "seeds": 1,
            "standard_top1": top1, "standard_lo": None if lo is None else top1 - 1,
            "standard_hi": None if hi is None else top1 + 1, "chance": 10.0, "chance_level": flag, "iis": iis,
            "iis_std": None, "iis_lo": lo, "iis_hi": hi, "iis_cc": None, "iis_cc_lo": None, "iis_cc_hi": None}


def test_chance_level_runs_are_left_out_of_the_correlations():
    good = [row(f"b{i}", 60 + 5 * i, 0.80 + 0.02 * i, lo=0.79 + 0.02 * i, hi=0.81 + 0.02 * i) for i in range(5)]
    noise = [row("rand", 11.0, 0.985, flag="yes", lo=0.9, hi=1.05)]
    c = correlation_summary(good + noise)
    expected = correlations([r["standard_top1"] for r in good], [r["iis"] for r in good])
    assert (c["pearson"], c["spearman"]) == pytest.approx(expected) and c["n"] == 5 and c["left_out"] == 1
    assert correlations([r["standard_top1"] for r in good + noise], [r["iis"] for r in good + noise])[0] < 0
    assert c["pearson_interval"] == pytest.approx(stats.correlation_interval(c["pearson"], 5))


def test_figures_render_with_bands_error_bars_and_hollow_points(tmp_path):
    rows = [row(f"b{i}", 60 + 5 * i, 0.80 + 0.02 * i, lo=0.79 + 0.02 * i, hi=0.81 + 0.02 * i) for i in range(4)]
    rows += [row("rand", 11.0, 0.985, flag="yes", lo=0.9, hi=1.05, ct="cluster"), row("old", 70.0, 0.9)]
    corr = correlation_summary(rows)
    assert corr["n"] == 5 and corr["left_out"] == 1 and corr["reason"] is None
    assert plot_scatter(rows, str(tmp_path / "scatter.png"), corr).endswith("scatter.png")
    ratios = [0.0, 0.5, 0.9]
    s = {"iis": 0.7, "ratios": ratios, "normalised": [1.0, 0.8, 0.5], "chance_level": False,
         "interval": {"normalised": [[0.95, 0.75, 0.4], [1.02, 0.85, 0.6]], "iis": [0.65, 0.75], "level": 0.95}}
    plot_curves([("a", s), ("old", {"iis": 0.6, "ratios": ratios, "normalised": [0.9, 0.7, 0.3]})],
                str(tmp_path / "curves.png"))
    from PIL import Image
    for name in ("scatter.png", "curves.png"):
        img = np.asarray(Image.open(tmp_path / name).convert("RGB"))
        assert img.shape[0] > 400 and len(np.unique(img.reshape(-1, 3), axis=0)) > 50   # drawn, not blank


def test_table_leaves_missing_values_empty(tmp_path):
    scored = [("a", {"meta": {"backbone": "x", "layer": "l", "concept_type": "prototype"}, "seeds": [0],
                     "standard_accuracy": 70.0, "iis": 0.9, "iis_std": None, "ratios": [0.0, 0.5],
                     "accuracies": [70.0, 60.0], "interval": None, "chance": None, "chance_level": None,
                     "iis_chance_corrected": None})]
    rows = table_rows(scored)
    write_table(rows, str(tmp_path / "r.md"), str(tmp_path / "r.csv"))
    out = list(csv.DictReader(open(tmp_path / "r.csv")))[0]
    assert out["iis"] == "0.9" and out["iis_lo"] == "" and out["chance_level"] == "" and out["top1@0.5"] == "60.0"
    md = open(tmp_path / "r.md").read().splitlines()
    assert md[0].startswith("| # | backbone | weights | layer | dataset | n_train | n_val | concept_type | chosen on")
    assert "| 0.9 | – |" in md[2]


def test_a_correlation_needs_three_distinct_accuracies_and_one_val_set(tmp_path):
    three = [row(f"b{i}", 60 + 5 * i, 0.80 + 0.02 * i) for i in range(3)]
    assert correlation_summary(three)["pearson"] == pytest.approx(1.0)
    two = [row("a", 60, 0.8), row("b", 60, 0.9), row("c", 70, 0.85)]           # 2 distinct top-1 values
    c = correlation_summary(two)
    assert c["pearson"] is None and "2 distinct standard top-1 values" in c["reason"] and c["no_scatter"] is None
    assert corr_line(c).startswith("no correlation: 2 distinct")
    same = [row("a", 60, 0.8), row("b", 60, 0.9)]                               # one x: no scatter at all
    c = correlation_summary(same)
    assert c["no_scatter"] and plot_scatter(same, str(tmp_path / "s.png"), c) is None
    assert not (tmp_path / "s.png").exists()
    # runs on 2000/1000 and on 500/300 images: never one correlation, even with many distinct accuracies
    mixed = [dict(row(f"b{i}", 60 + 5 * i, 0.9 - 0.02 * i), n_val=1000 if i < 3 else 300) for i in range(6)]
    c = correlation_summary(mixed)
    assert c["pearson"] is None and "2 different val sets" in c["reason"] and "n_val 300" in c["reason"]


def test_common_label_goes_to_the_title():
    assert common_label(["e@p prototype", "e@p cluster", "e@p end2end"]) == ("e@p", ["prototype", "cluster", "end2end"])
    assert common_label(["only one"]) == ("", ["only one"])


def test_what_a_concept_responds_to_and_how_a_contribution_arises():
    from utils.explanations import evidence, responds_to
    acts = np.array([0.1, 0.9, 0.8, 0.5, -2.0])
    assert responds_to(acts, [0, 1, 1, 2, 0], ["T-shirt", "Trouser", "Bag"], top=3) == "Trouser 2/3, Bag 1/3"
    assert evidence(-0.14, -2.98).startswith("absence evidence for the class: the image does NOT look like")
    assert evidence(0.5, 1.0).startswith("presence evidence for the class")
    assert evidence(0.5, -1.0).startswith("presence evidence against the class")
    assert evidence(-0.5, 1.0).startswith("absence evidence against the class")
    assert evidence(0.0, 1.0).startswith("masked out")


def test_correlation_over_val_resamples_by_hand():
    assert stats.ranks([3.0, 1.0, 2.0, 2.0]).tolist() == [3.0, 0.0, 1.5, 1.5]          # ties share their mean rank
    x = np.array([[1.0, 2.0, 3.0, 4.0]] * 4)
    y = np.array([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 5.0], [2.0, 1.0, 3.0, 4.0]])
    r, rho = stats.correlations(x, y)
    np.testing.assert_allclose(r, [1.0, -1.0, np.corrcoef(x[2], y[2])[0, 1], 0.8])   # row by row
    np.testing.assert_allclose(rho, [1.0, -1.0, 1.0, 0.8])
    b = stats.correlation_bootstrap(x, y)
    assert b["resamples"] == 4 and b["pearson"][0] == pytest.approx(np.percentile(r, 2.5))
    assert b["spearman"] == pytest.approx([np.percentile(rho, 2.5), np.percentile(rho, 97.5)])
    flat = stats.correlation_bootstrap(np.ones((3, 4)), y[:3])                          # no spread: undefined
    assert flat["resamples"] == 0 and all(math.isnan(v) for v in flat["pearson"])


def test_summary_takes_the_val_resample_interval_over_the_rows_kept():
    good = [row(f"b{i}", 60 + 5 * i, 0.80 + 0.02 * i) for i in range(4)]
    noise = row("rand", 11.0, 0.985, flag="yes")
    rng = np.random.default_rng(0)
    samples = [{"standard": r["standard_top1"] + rng.normal(0, 1, 200), "iis": r["iis"] + rng.normal(0, 0.005, 200)}
               for r in good]
    c = correlation_summary(good + [noise], samples + [{"standard": np.zeros(200), "iis": np.ones(200)}])
    expected = stats.correlation_bootstrap(np.stack([s["standard"] for s in samples], 1),
                                           np.stack([s["iis"] for s in samples], 1))
    assert c["bootstrap"] == expected and 0.5 < c["bootstrap"]["pearson"][0] < c["bootstrap"]["pearson"][1] <= 1.0
    line = corr_line(c)
    assert "Fisher-z intervals over runs" in line and "over val samples: Pearson [" in line and "200 paired" in line
    assert correlation_summary(good)["bootstrap"] is None and "over val samples" not in corr_line(
        correlation_summary(good))
    assert correlation_summary(good, samples[:3] + [None])["bootstrap"] is None   # one run without resamples: none
