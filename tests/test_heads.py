import math

import numpy as np
import pytest
import torch

from utils.heads import SPARSITY_GRID, LinearProbes, SparseConceptHeads, evaluate, fit
from utils.masks import n_keep, topk_mask
from utils.iis import iis


def test_n_keep_rounds_instead_of_truncating():
    assert n_keep(0.9, 200) == 20          # int((1 - 0.9) * 200) would give 19
    assert n_keep(0.98, 200) == 4
    assert n_keep(0.0, 7) == 7
    assert n_keep(0.98, 10) == 1           # never zero concepts
    with pytest.raises(ValueError):
        n_keep(1.0, 10)


def test_topk_mask_by_absolute_value_per_row_and_per_head():
    a = torch.tensor([[3.0, -5.0, 1.0, 0.5], [0.0, -1.0, 2.0, -3.0]])
    assert topk_mask(a, 2).tolist() == [[True, True, False, False], [False, False, True, True]]
    both = torch.stack([a, a])                            # two heads keeping 1 and 3
    m = topk_mask(both, [1, 3])
    assert m[0].tolist() == [[False, True, False, False], [False, False, False, True]]
    assert m[1].sum(-1).tolist() == [3, 3]


def test_concept_head_forward_by_hand():
    # x = [1, 2, 4], concepts = identity: activations are x itself, LayerNorm-ed, then the smallest |a| is zeroed
    heads = SparseConceptHeads(torch.eye(3) * 7.0, n_classes=1, ratios=[0.5])   # keep round(1.5) = 2
    with torch.no_grad():
        heads.weight.copy_(torch.tensor([[[1.0], [10.0], [100.0]]]))
        heads.bias.zero_()
    mean, var = 7 / 3, ((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 3
    sd = math.sqrt(var + 1e-5)
    expected = (1 - mean) / sd * 1 + 0 * 10 + (4 - mean) / sd * 100   # the middle one (|a| smallest) is masked
    out = heads(torch.tensor([[1.0, 2.0, 4.0]]))
    assert out.shape == (1, 1, 1)
    assert out.item() == pytest.approx(expected, rel=1e-5)


def planted(n_per_class=60, n_classes=5, n_concepts=20, dim=32, noise=0.3, seed=0):
    """Each class is the sum of its own two planted concept directions plus noise."""
    concepts = torch.linalg.qr(torch.randn(dim, dim, generator=torch.Generator().manual_seed(99)))[0][:n_concepts]
    g = torch.Generator().manual_seed(seed)   # the sample noise; the concept directions are the same for every seed
    y = torch.arange(n_classes).repeat_interleave(n_per_class)
    x = concepts[2 * y] + concepts[2 * y + 1] + noise * torch.randn(len(y), dim, generator=g)
    return x, y, concepts


def test_planted_concepts_survive_extreme_sparsity_and_random_ones_do_not():
    x, y, concepts = planted()
    xv, yv, _ = planted(n_per_class=30, seed=1)
    ratios = [0.0, 0.9]                                 # 20 concepts, keep 20 / keep 2
    good = SparseConceptHeads(concepts, 5, ratios)
    res = fit(good, [0.05, 0.05], x, y, xv, yv, epochs=40, batch_size=50)
    assert res["top1"][1] >= 95.0                       # two planted concepts per sample are enough
    g = torch.Generator().manual_seed(5)
    random_dirs = torch.randn(20, 32, generator=g)
    bad = SparseConceptHeads(random_dirs, 5, ratios)
    res_bad = fit(bad, [0.05, 0.05], x, y, xv, yv, epochs=40, batch_size=50)
    assert res_bad["top1"][1] < res["top1"][1] - 10


def test_sweep_trains_each_head_as_if_alone():
    x, y, concepts = planted(noise=1.0)
    xv, yv, _ = planted(n_per_class=30, noise=1.0, seed=1)
    ratios, lrs = [0.0, 0.5, 0.9], [0.01, 0.01, 0.003]
    together = fit(SparseConceptHeads(concepts, 5, ratios, seed=3), lrs, x, y, xv, yv, epochs=6, batch_size=32)
    for h in range(3):
        alone = fit(SparseConceptHeads(concepts, 5, [ratios[h]], seed=3), [lrs[h]], x, y, xv, yv, epochs=6,
                    batch_size=32)
        assert alone["top1"][0] == pytest.approx(together["top1"][h])
        assert alone["epoch"][0] == together["epoch"][h]
        assert alone["val_loss"][0] == pytest.approx(together["val_loss"][h], rel=1e-4)


def test_fit_keeps_the_best_epoch_parameters():
    x, y, concepts = planted(noise=1.5)
    xv, yv, _ = planted(n_per_class=30, noise=1.5, seed=1)
    probes = LinearProbes(32, 5, 2)
    res = fit(probes, [0.01, 0.5], x, y, xv, yv, epochs=8, batch_size=16)
    top1 = evaluate(probes, xv, yv)[0]
    np.testing.assert_allclose(top1, res["top1"])       # the module ends at the reported epoch's weights
    assert all(1 <= e <= 8 for e in res["epoch"])


def test_planted_representation_has_high_iis():
    x, y, concepts = planted(n_concepts=30, dim=40)
    xv, yv, _ = planted(n_per_class=30, n_concepts=30, dim=40, seed=1)
    heads = SparseConceptHeads(concepts, 5, SPARSITY_GRID)
    res = fit(heads, [0.05] * len(SPARSITY_GRID), x, y, xv, yv, epochs=30, batch_size=50)
    std = fit(LinearProbes(40, 5, 1), [0.05], x, y, xv, yv, epochs=30, batch_size=50)["top1"].max()
    assert iis(SPARSITY_GRID, res["top1"], std) > 0.9


def test_mask_paths_agree_and_precomputed_ranks_give_the_same_heads():
    torch.manual_seed(0)
    a = torch.randn(3, 40, 30)
    keep = [30, 16, 2]
    per_head = topk_mask(a, keep)                                   # partial top-k per head
    by_rank = torch.stack([topk_mask(a[h:h + 1], keep[h:h + 1])[0] for h in range(3)])   # one sort
    assert torch.equal(per_head, by_rank)
    assert per_head.sum(-1).tolist() == [[30] * 40, [16] * 40, [2] * 40]
    from utils.heads import MaskedLinearHeads
    from utils.masks import with_ranks
    x = torch.randn(50, 30)
    plain = MaskedLinearHeads(30, 4, [0.0, 0.5, 0.9], seed=1)
    ranked = MaskedLinearHeads(30, 4, [0.0, 0.5, 0.9], seed=1, ranked=True)
    torch.testing.assert_close(plain(x), ranked(with_ranks(x)))


def _stable_topk(a, keep):
    """The definition: per row, the ``keep`` largest |a| by a stable descending sort (ties: lower index)."""
    order = a.abs().argsort(dim=-1, descending=True, stable=True)
    return torch.stack([torch.zeros_like(a[h], dtype=torch.bool).scatter_(-1, order[h, :, :k], True)
                        for h, k in enumerate(keep)])


@pytest.mark.parametrize("ties", [False, True])
def test_cpu_and_device_mask_paths_give_the_definition(ties):
    from utils.masks import keep_weights, n_keep_reference, torch_masks
    g = torch.Generator().manual_seed(2)
    a = torch.randint(-3, 4, (4, 300, 30), generator=g).float() if ties else torch.randn(4, 300, 30, generator=g)
    keep = [30, 17, 3, 1]
    truth = _stable_topk(a, keep)
    assert torch.equal(topk_mask(a, keep), truth)                      # NumPy's sort on the CPU
    assert torch.equal(torch_masks(a.abs(), keep, "round"), truth)     # what runs on a GPU, here on the CPU
    assert torch.equal(keep_weights(a, keep), truth.float())           # the heads' 0/1 factor
    # reference rule: strictly above the (K - k - 1)-th smallest |a|, so ties at the threshold all go
    ref_keep = [n_keep_reference(r, 30) for r in (0.0, 0.5, 0.9, 0.99)]     # 29, 14, 2, 0
    srt = a.abs().sort(-1).values
    expected = torch.stack([a[h].abs() > srt[h, :, 29 - k:30 - k] if k else torch.zeros_like(a[h], dtype=torch.bool)
                            for h, k in enumerate(ref_keep)])
    assert torch.equal(topk_mask(a, ref_keep, "reference"), expected)
    assert torch.equal(torch_masks(a.abs(), ref_keep, "reference"), expected)
    if not ties:
        assert expected.sum(-1)[:, 0].tolist() == ref_keep


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
@pytest.mark.parametrize("rule", ["round", "reference"])
def test_heads_compute_what_autograd_of_the_plain_expression_computes(precision, rule):
    """The heads' own forward/backward (one autograd Function) against autograd of affine -> mask -> linear (under
    'reference' with the original's gradient at the threshold, utils.masks.masked): the same logits and the same
    gradients, bit for bit, in float32 and under bf16 autocast."""
    from utils.heads import matmul_precision
    from utils.masks import masked
    g = torch.Generator().manual_seed(4)
    heads = SparseConceptHeads(torch.randn(2, 30, 12, generator=g), 6, [0.0, 0.5, 0.9] * 2, seed=[0, 0, 0, 1, 1, 1],
                               keep_rule=rule, groups=[0, 0, 0, 1, 1, 1])
    with torch.no_grad():
        heads.ln_weight.add_(0.3 * torch.randn(heads.ln_weight.shape, generator=g))
        heads.ln_bias.add_(0.3 * torch.randn(heads.ln_bias.shape, generator=g))
    z = heads.scores(torch.relu(torch.randn(200, 12, generator=g)))
    y = torch.randint(0, 6, (6, 200), generator=g)
    params = [heads.ln_weight, heads.ln_bias, heads.weight, heads.bias]

    def plain():
        a = torch.addcmul(heads.ln_bias.unsqueeze(1), heads.per_head(z), heads.ln_weight.unsqueeze(1))
        return torch.baddbmm(heads.bias.unsqueeze(1), masked(a, topk_mask(a, heads.keep_list, rule), rule),
                             heads.weight)

    def plain_mask():   # no gradient at the threshold: what 'reference' must differ from
        a = torch.addcmul(heads.ln_bias.unsqueeze(1), heads.per_head(z), heads.ln_weight.unsqueeze(1))
        return torch.baddbmm(heads.bias.unsqueeze(1), a * topk_mask(a, heads.keep_list, rule), heads.weight)

    out = []
    for forward in (plain, lambda: heads.on_scores()(z), plain_mask):
        with matmul_precision("cpu", precision):
            logits = forward()
        loss = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), y)
        out.append((logits, torch.autograd.grad(loss, params)))
    assert out[0][0].dtype == out[1][0].dtype and torch.equal(out[0][0], out[1][0])
    for a, b in zip(out[0][1], out[1][1]):
        assert torch.equal(a, b)
    # the LayerNorm gain's gradient: the threshold's share is there under 'reference' only
    assert torch.equal(out[1][1][0], out[2][1][0]) == (rule == "round")


def test_held_out_selection_reports_val_of_the_kept_parameters():
    """Under holdout selection val is evaluated once, after training: every val figure is that of the kept heads."""
    from utils.heads import Split
    x, y, concepts = planted(noise=1.5)
    xv, yv, _ = planted(n_per_class=30, noise=1.5, seed=1)
    dev = torch.arange(0, len(y), 5)
    splits = [Split(torch.as_tensor(np.setdiff1d(np.arange(len(y)), dev.numpy())), dev, 0)]
    heads = SparseConceptHeads(concepts, 5, [0.0, 0.9])
    res = fit(heads, [0.05, 0.05], x, y, xv, yv, epochs=6, batch_size=32, splits=splits)
    top1, top5, loss, pred = evaluate(heads, xv, yv)
    assert np.array_equal(res["top1"], top1) and np.array_equal(res["top5"], top5)
    assert np.array_equal(res["val_loss"], loss) and np.array_equal(res["pred"], pred)
    assert np.array_equal(res["select_top1"], evaluate(heads, x, y, row_groups=[dev])[0])
