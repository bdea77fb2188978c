import numpy as np
import pytest
import torch

from utils.errors import UserError
from utils.concepts import cluster_centres, select_prototypes
from utils.heads import End2EndConceptHeads


def test_prototype_selection_modes():
    labels = np.repeat([0, 1, 2, 3], 50)                     # elements stored class by class, as on disk
    assert select_prototypes(labels, 20, "first").tolist() == list(range(20))   # the original: one class only
    bal = select_prototypes(labels, 20, "balanced", seed=1)
    assert np.bincount(labels[bal]).tolist() == [5, 5, 5, 5]
    assert select_prototypes(labels, 20, "balanced", seed=1).tolist() == bal.tolist()
    rnd = select_prototypes(labels, 20, "random", seed=1)
    assert len(set(rnd.tolist())) == 20 and rnd.tolist() == sorted(rnd.tolist())
    assert select_prototypes(labels, 0, "balanced").tolist() == list(range(200))
    uneven = np.array([0] * 3 + [1] * 30)
    assert np.bincount(uneven[select_prototypes(uneven, 10, "balanced")]).tolist() == [3, 7]
    with pytest.raises(UserError):
        select_prototypes(labels, 5, "best")


def test_kmeans_recovers_planted_element_groups():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 16)) * 5
    truth = np.repeat(np.arange(4), 30)
    x = centres[truth] + rng.normal(size=(120, 16)) * 0.3
    found, nearest = cluster_centres(x, 4, seed=0)
    match = [int(np.argmin(((centres - c) ** 2).sum(1))) for c in found]
    assert sorted(match) == [0, 1, 2, 3]                      # one centre per planted group
    np.testing.assert_allclose(found, centres[match], atol=0.2)
    assert [truth[r] for r in nearest] == match               # each centre's nearest element is in its group
    with pytest.raises(UserError):
        cluster_centres(x[:3], 4)


def test_end2end_assignment_is_exactly_one_hot_and_learns():
    torch.manual_seed(0)
    elements = torch.randn(30, 8)
    heads = End2EndConceptHeads(elements, seeds=[0, 5, 10, 15], n_classes=3, ratios=[0.0, 0.5])
    heads.train()
    a = heads.assignment()
    assert a.shape == (2, 30, 4)
    assert set(a.unique().tolist()) == {0.0, 1.0} and (a.sum(-1) == 1).all()
    out = heads(torch.randn(5, 8))
    out.sum().backward()
    assert heads.assign_logits.grad.abs().sum() > 0          # the straight-through gradient reaches the assignment
    heads.eval()
    assert torch.equal(heads.assignment(), heads.assignment())   # eval: noise-free argmax
    c = heads.concept_matrix()
    assert c.shape == (2, 4, 8)
    # each concept is the normalised sum of exactly the elements assigned to it
    ea = heads.assignment()[0]
    for k in range(4):
        if ea[:, k].any():
            expected = torch.nn.functional.normalize(elements[ea[:, k].bool()].sum(0), dim=0)
            torch.testing.assert_close(c[0, k], expected)
    assert ea[[0, 5, 10, 15]].argmax(-1).tolist() == [0, 1, 2, 3]   # each seed starts in its own concept
