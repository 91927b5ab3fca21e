"""Fidelity metrics on hand-made rankings with hand-computed values (rows are prompts, columns seeds)."""

import math

import pytest
import torch
from scipy import stats

from rl.fidelity import average_ranks, best_worst_agreement, fidelity_summary, kendall, spearman, topk_overlap


def rows(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_average_ranks_share_ties():
    assert torch.equal(average_ranks(rows([10, 30, 20, 30])), rows([1, 3.5, 2, 3.5]))


def test_spearman_hand_computed():
    # row 0: d = (-1, 1, -1, 1, 0), 1 - 6 * 4 / (5 * 24) = 0.8; row 1: reversed, -1
    explore = rows([1, 2, 3, 4, 5], [1, 2, 3, 4, 5])
    reference = rows([2, 1, 4, 3, 5], [50, 40, 30, 20, 10])
    torch.testing.assert_close(spearman(explore, reference), rows(0.8, -1.0))


def test_spearman_with_ties_hand_computed():
    # ranks (1.5, 1.5, 3, 4) vs (1, 2, 3, 4): centered dot 4.5, norms^2 4.5 and 5 -> sqrt(0.9)
    torch.testing.assert_close(spearman(rows([1, 1, 2, 3]), rows([1, 2, 3, 4])), rows(math.sqrt(0.9)))


def test_kendall_hand_computed():
    # row 0: 10 pairs, discordant (0, 1) and (2, 3): (8 - 2) / 10
    # row 1: the explore tie (0, 1) is one of 10 pairs, the other 9 concordant: 9 / sqrt((10 - 1) * 10)
    explore = rows([1, 2, 3, 4, 5], [1, 1, 2, 3, 9])
    reference = rows([2, 1, 4, 3, 5], [1, 2, 3, 4, 9])
    torch.testing.assert_close(kendall(explore, reference), rows(0.6, 9 / math.sqrt(90)))


def test_correlations_agree_with_scipy_on_tied_data():
    g = torch.Generator().manual_seed(0)
    explore = torch.randint(0, 5, (6, 24), generator=g).double()  # many ties, like partial-credit rewards
    reference = (explore + torch.randint(-2, 3, (6, 24), generator=g)).clamp(0, 4)
    ours_rho, ours_tau = spearman(explore, reference), kendall(explore, reference)
    for p in range(6):
        assert ours_rho[p].item() == pytest.approx(stats.spearmanr(explore[p], reference[p]).statistic, abs=1e-12)
        assert ours_tau[p].item() == pytest.approx(stats.kendalltau(explore[p], reference[p]).statistic, abs=1e-12)


def test_constant_prompt_has_no_correlation():
    result = spearman(rows([1, 1, 1], [1, 2, 3]), rows([1, 2, 3], [1, 2, 3]))
    assert result[0].isnan() and result[1] == 1
    assert kendall(rows([1, 2, 3]), rows([4, 4, 4]))[0].isnan()


def test_topk_overlap_hand_computed_with_ties_to_lower_index():
    explore = rows([5, 4, 3, 2, 1, 0], [1, 1, 1, 0, 0, 0])
    reference = rows([0, 4, 5, 3, 2, 1], [0, 1, 1, 1, 0, 0])
    # row 0: {0, 1} vs {2, 1}; row 1: ties -> {0, 1} vs {1, 2}
    torch.testing.assert_close(topk_overlap(explore, reference, 2), rows(0.5, 0.5))
    torch.testing.assert_close(topk_overlap(explore, reference, 6), rows(1.0, 1.0))


def test_best_worst_agreement_counts_only_same_half():
    # row 0 (k = 4): best {0, 1} vs {0, 3}, worst {5, 4} vs {5, 1} -> (1 + 1) / 4
    # row 1 (k = 4): reversed ranking -> best and worst swap: no slot agrees although the sets are equal
    explore = rows([6, 5, 4, 3, 2, 1], [6, 5, 4, 3, 2, 1])
    reference = rows([6, 2, 4, 5, 3, 1], [1, 2, 3, 4, 5, 6])
    torch.testing.assert_close(best_worst_agreement(explore, reference, 4), rows(0.5, 0.0))


def test_best_worst_agreement_odd_k_and_ties():
    # k = 3: best 1, worst 2. explore ties all -> best {0}, worst {1, 2}; reference best {0}, worst {3, 1}
    explore = rows([1, 1, 1, 1])
    reference = rows([9, 1, 5, 0])
    torch.testing.assert_close(best_worst_agreement(explore, reference, 3), rows(2 / 3))


def test_summary_averages_over_prompts_and_skips_undefined_ones():
    explore = rows([1, 2, 3, 4], [4, 3, 2, 1], [7, 7, 7, 7])
    reference = rows([1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4])
    summary = fidelity_summary(explore, reference, k=2)
    assert summary == {
        "prompts": 3,
        "seeds": 4,
        "k": 2,
        "undefined_prompts": 1,
        "spearman": pytest.approx(0.0, abs=1e-12),  # mean of 1 and -1
        "kendall": pytest.approx(0.0, abs=1e-12),
        "topk": 1,
        # top-1: prompt 0 agrees; prompt 1 picks seed 0 vs 3; prompt 2 ties -> seed 0 vs 3
        "topk_overlap": pytest.approx(1 / 3),
        # best/worst of 2: prompt 0 both halves; prompt 1 swapped; prompt 2 best {0} vs {3}, worst {1} vs {0}
        "best_worst_agreement": pytest.approx(1 / 3),
    }


def test_inputs_are_checked():
    with pytest.raises(ValueError, match="prompts, seeds"):
        spearman(torch.zeros(4), torch.zeros(4))
    with pytest.raises(ValueError, match="finite"):
        kendall(rows([1, float("nan")]), rows([1, 2]))
    with pytest.raises(ValueError, match="k must be"):
        topk_overlap(rows([1, 2]), rows([1, 2]), 3)
