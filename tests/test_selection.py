import pytest
import torch

from rl.selection import MODES, select_contrastive

NAN = float("nan")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_best_worst_takes_top_half_then_bottom_half():
    scores = torch.tensor([0.5, 0.9, 0.1, 0.7, 0.3])
    assert select_contrastive(scores, 4).tolist() == [1, 3, 2, 4]  # best 0.9, 0.7; worst 0.1, 0.3


def test_best_worst_odd_k_gives_the_extra_slot_to_the_worst():
    scores = torch.tensor([0.5, 0.9, 0.1, 0.7, 0.3])
    assert select_contrastive(scores, 3).tolist() == [1, 2, 4]
    assert select_contrastive(scores, 1).tolist() == [2]  # k // 2 = 0 best, 1 worst


def test_best_worst_ties_go_to_the_lower_index_and_halves_never_overlap():
    assert select_contrastive(torch.tensor([1.0, 1.0, 1.0, 1.0]), 2).tolist() == [0, 1]
    assert select_contrastive(torch.tensor([1.0, 1.0, 1.0, 1.0]), 4).tolist() == [0, 1, 2, 3]
    assert select_contrastive(torch.tensor([0.0, 1.0, 1.0, 0.0]), 2).tolist() == [1, 0]


def test_nan_scores_are_chosen_only_to_fill_missing_slots():
    scores = torch.tensor([NAN, 0.2, 0.8, NAN, 0.5])
    assert select_contrastive(scores, 2).tolist() == [2, 1]
    assert select_contrastive(scores, 4).tolist() == [2, 1, 4, 0]  # 3 finite: best 1, worst 2, then NaN by index
    picked = select_contrastive(scores, 3, "random", gen())
    assert sorted(picked.tolist()) == [1, 2, 4]


def test_random_is_a_reproducible_subset():
    scores = torch.arange(10.0)
    first = select_contrastive(scores, 4, "random", gen(3))
    assert torch.equal(first, select_contrastive(scores, 4, "random", gen(3)))
    assert len(set(first.tolist())) == 4 and all(0 <= i < 10 for i in first.tolist())
    draws = {tuple(select_contrastive(scores, 4, "random", gen(s)).tolist()) for s in range(5)}
    assert len(draws) > 1  # the generator, not a fixed rule, decides


def test_extremes_random_keeps_best_and_worst():
    scores = torch.tensor([0.3, 0.9, 0.5, 0.1, 0.6, 0.4])
    picked = select_contrastive(scores, 4, "extremes_random", gen(1))
    assert picked[:2].tolist() == [1, 3]
    assert len(set(picked.tolist())) == 4
    assert torch.equal(picked, select_contrastive(scores, 4, "extremes_random", gen(1)))
    assert select_contrastive(scores, 1, "extremes_random", gen(1)).tolist() == [3]


def test_mean_deviation_takes_farthest_from_the_mean():
    scores = torch.tensor([0.0, 10.0, 4.0, 6.0, 5.0])  # mean 5: deviations 5, 5, 1, 1, 0
    assert select_contrastive(scores, 3, "mean_deviation").tolist() == [0, 1, 2]


def test_every_mode_returns_k_distinct_indices():
    scores = torch.tensor([0.2, 0.2, 0.9, 0.1, NAN, 0.4, 0.4])
    for mode in MODES:
        for k in range(len(scores) + 1):
            picked = select_contrastive(scores, k, mode, gen())
            assert picked.dtype == torch.long and len(picked) == k and len(set(picked.tolist())) == k


def test_errors_name_the_problem():
    scores = torch.zeros(3)
    with pytest.raises(ValueError, match="k=4 of N=3"):
        select_contrastive(scores, 4)
    with pytest.raises(ValueError, match="best_worst, random, extremes_random, mean_deviation"):
        select_contrastive(scores, 2, "top")
    with pytest.raises(ValueError, match="Generator"):
        select_contrastive(scores, 2, "random")
    with pytest.raises(ValueError, match="1-D"):
        select_contrastive(torch.zeros(2, 2), 1)
