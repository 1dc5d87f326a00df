"""Importance scores and top-K selection."""

import math

import numpy as np
import pytest
import torch

from gvae_ns.refine.score import combine_scores, select_top


def test_grad_mode_is_the_gradient_and_all_mode_is_uniform():
    g = torch.tensor([0.1, 0.4, 0.2])
    h = torch.tensor([5.0, 1.0, 9.0])
    assert torch.equal(combine_scores(g, h, mode="grad"), g)
    assert torch.equal(combine_scores(g, h, mode="all"), torch.ones(3))
    assert torch.equal(combine_scores(None, h, mode="all"), torch.ones(3))


def test_hessian_mode_is_the_normalised_geometric_mean():
    g = torch.tensor([1.0, 2.0, 3.0, 2.0])  # mean 2
    h = torch.tensor([[6.0, 0.0, 0.0], [1.0, 0.5, 0.5], [0.5, 0.25, 0.25], [0.0, 0.0, 2.0]])  # rows 6, 2, 1, 2; mean 2.75
    score = combine_scores(g, h)
    expected = [math.sqrt(gi / 2.0 * hi / 2.75) for gi, hi in zip([1, 2, 3, 2], [6, 2, 1, 2])]
    torch.testing.assert_close(score, torch.tensor(expected))
    # Scale-free: multiplying either signal by a constant changes nothing.
    torch.testing.assert_close(combine_scores(g * 1e-6, h * 1e4), score)
    # Both must be high: the largest gradient alone does not win.
    assert select_top(score).tolist() == [0, 1, 3, 2] and int(g.argmax()) == 2


def test_a_signal_without_information_leaves_the_other_to_decide():
    g = torch.tensor([0.3, 0.1, 0.2])
    score = combine_scores(g, torch.zeros(3))
    assert select_top(score).tolist() == [0, 2, 1]


@pytest.mark.parametrize(
    "grad,hess,mode,match",
    [
        (torch.ones(3), torch.ones(3), "mean", "mode must be one of"),
        (torch.ones(3), None, "hessian", "needs hessian"),
        (None, torch.ones(3), "grad", "needs grad2d"),
        (None, None, "all", "to know N"),
        (torch.ones(3), torch.ones(4), "hessian", "3 Gaussians but hessian has 4"),
        (torch.tensor([1.0, -1.0]), None, "grad", "non-negative"),
        (torch.tensor([1.0, float("nan")]), None, "grad", "NaN or infinite for 1 of 2"),
        (torch.ones(3, 2), None, "grad", r"\[N\] or \[N, 3\]"),
    ],
)
def test_combine_scores_rejects_bad_input(grad, hess, mode, match):
    with pytest.raises(ValueError, match=match):
        combine_scores(grad, hess, mode=mode)


def test_select_top_orders_best_first_with_lower_index_on_ties():
    score = torch.tensor([0.5, 2.0, 0.5, 3.0, 2.0, 0.1])
    idx = select_top(score, k=4)
    assert idx.dtype == torch.int64
    assert idx.tolist() == [3, 1, 4, 0]
    assert select_top(score).tolist() == [3, 1, 4, 0, 2, 5]
    assert select_top(torch.ones(5), k=3).tolist() == [0, 1, 2]


def test_select_top_fraction_and_bounds():
    score = torch.arange(10.0)
    assert select_top(score, fraction=0.3).tolist() == [9, 8, 7]
    assert select_top(score, fraction=0.0).numel() == 0
    assert select_top(score, fraction=1.0).numel() == 10
    assert select_top(score, k=0).numel() == 0
    assert select_top(score, k=10).numel() == 10
    assert select_top(score, k=np.int64(2)).tolist() == [9, 8]
    assert select_top(torch.zeros(0), fraction=0.5).numel() == 0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"k": 11}, r"k must be an int in \[0, N=10\]"),
        ({"k": -1}, "k must be"),
        ({"k": 2.5}, "k must be"),
        ({"k": True}, "k must be"),
        ({"fraction": 1.5}, "fraction must be in"),
        ({"fraction": -0.1}, "fraction must be in"),
        ({"k": 2, "fraction": 0.5}, "not both"),
    ],
)
def test_select_top_rejects_bad_k_and_fraction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        select_top(torch.arange(10.0), **kwargs)


def test_select_top_rejects_bad_scores():
    with pytest.raises(ValueError, match="1D"):
        select_top(torch.ones(2, 2), k=1)
    with pytest.raises(ValueError, match="NaN"):
        select_top(torch.tensor([1.0, float("nan")]), k=1)
