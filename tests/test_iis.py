import pytest

from utils.errors import UserError
from utils.heads import SPARSITY_GRID
from utils.iis import iis, score


def test_iis_three_points_by_hand():
    # two trapezoids: 0.5 * (1 + 0.75) / 2 + 0.5 * (0.75 + 0.5) / 2
    assert iis([0.0, 0.5, 1.0], [80, 60, 40], 80) == pytest.approx(0.75)


def test_iis_on_the_paper_grid_by_hand():
    y = [1.0, 1.0, 0.9, 0.8, 0.6, 0.4, 0.2, 0.1]
    # 0.1*1 + 0.2*0.95 + 0.2*0.85 + 0.2*0.7 + 0.2*0.5 + 0.05*0.3 + 0.03*0.15
    expected = 0.1 + 0.19 + 0.17 + 0.14 + 0.10 + 0.015 + 0.0045
    assert iis(SPARSITY_GRID, [50 * v for v in y], 50) == pytest.approx(expected)
    assert iis(list(reversed(SPARSITY_GRID)), [50 * v for v in reversed(y)], 50) == pytest.approx(expected)


def test_perfectly_interpretable_representation_scores_the_grid_width():
    assert iis(SPARSITY_GRID, [70.0] * 8, 70.0) == pytest.approx(0.98)


def test_single_ratio_is_refused_not_zero():
    with pytest.raises(UserError, match="at least two"):
        iis([0.9], [50], 60)


def test_score_takes_best_lr_per_ratio_and_best_standard_probe():
    runs = [{"head": "standard", "ratio": None, "lr": 0.01, "top1": 60.0},
            {"head": "standard", "ratio": None, "lr": 0.001, "top1": 80.0},
            {"head": "concept", "ratio": 0.0, "lr": 0.01, "top1": 40.0},
            {"head": "concept", "ratio": 0.0, "lr": 0.001, "top1": 80.0},
            {"head": "concept", "ratio": 0.5, "lr": 0.01, "top1": 40.0},
            {"head": "concept", "ratio": 0.5, "lr": 0.001, "top1": 20.0}]
    s = score({"runs": runs})
    assert s["standard_accuracy"] == 80.0
    assert s["accuracies"] == [80.0, 40.0]
    assert s["iis"] == pytest.approx(0.5 * (1.0 + 0.5) / 2)


def test_correlations_by_hand():
    from utils.report import correlations
    pearson, spearman = correlations([1, 2, 3, 4], [2, 4, 6, 9])
    assert spearman == pytest.approx(1.0)                       # monotone
    assert pearson == pytest.approx(11.5 / (5 * 26.75) ** 0.5)  # sum dx.dy / sqrt(sum dx^2 . sum dy^2)
    assert correlations([1, 2, 3], [3, 2, 1])[1] == pytest.approx(-1.0)
    import math
    assert all(math.isnan(v) for v in correlations([1, 2], [1, 2]))
