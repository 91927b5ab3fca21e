import math

import pytest
import torch

from rl.advantages import group_advantages, weighted_reward, zero_variance_groups

NAN = float("nan")
EPS = 1e-4


def test_global_std_uses_whole_batch_population_std():
    adv = group_advantages(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0, 0, 1, 1]))
    std = math.sqrt(1.25)  # np.std([1, 2, 3, 4])
    expected = torch.tensor([-0.5, 0.5, -0.5, 0.5]) / (std + EPS)
    torch.testing.assert_close(adv, expected)


def test_group_std_uses_each_prompts_own_std():
    adv = group_advantages(torch.tensor([1.0, 2.0, 10.0, 14.0]), torch.tensor([0, 0, 1, 1]), global_std=False)
    expected = torch.tensor([-0.5 / (0.5 + EPS), 0.5 / (0.5 + EPS), -2 / (2 + EPS), 2 / (2 + EPS)])
    torch.testing.assert_close(adv, expected)


def test_eps_is_added_to_the_std():
    adv = group_advantages(torch.tensor([0.0, 2.0]), torch.tensor([0, 0]), eps=1.0)
    torch.testing.assert_close(adv, torch.tensor([-0.5, 0.5]))  # std 1, +eps 1


def test_group_ids_need_not_be_contiguous_or_sorted():
    adv = group_advantages(torch.tensor([1.0, 5.0, 3.0, 9.0]), torch.tensor([7, 3, 7, 3]), global_std=False)
    torch.testing.assert_close(adv, torch.tensor([-1.0, -2.0, 1.0, 2.0]) / (torch.tensor([1.0, 2.0, 1.0, 2.0]) + EPS))


def test_nan_rewards_stay_nan_and_are_left_out_of_the_statistics():
    adv = group_advantages(torch.tensor([1.0, NAN, 3.0, 5.0, 6.0]), torch.tensor([0, 0, 0, 1, 1]))
    std = torch.tensor([1.0, 3.0, 5.0, 6.0]).std(correction=0).item()  # NaN excluded from the global std
    expected = torch.tensor([-1.0, NAN, 1.0, -0.5, 0.5]) / (std + EPS)  # group 0 mean is 2, not NaN
    torch.testing.assert_close(adv, expected, equal_nan=True)


def test_all_nan_group_gives_nan_and_does_not_count_as_zero_variance():
    rewards, groups = torch.tensor([NAN, NAN, 1.0, 2.0]), torch.tensor([0, 0, 1, 1])
    adv = group_advantages(rewards, groups)
    assert torch.isnan(adv[:2]).all() and torch.isfinite(adv[2:]).all()
    assert int(zero_variance_groups(rewards, groups)) == 0


def test_all_equal_rewards_give_exactly_zero():
    # 0.1 * 3 / 3 != 0.1 in floating point: the zero must not depend on the mean's rounding.
    rewards, groups = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7, 0.2]), torch.tensor([0, 0, 0, 1, 1, 2])
    for global_std in (True, False):
        adv = group_advantages(rewards, groups, global_std=global_std)
        assert torch.equal(adv, torch.zeros(6))
    assert int(zero_variance_groups(rewards, groups)) == 3  # a lone sample (group 2) is zero-variance too


def test_drop_zero_variance_flags_those_groups_with_nan():
    rewards, groups = torch.tensor([0.3, 0.3, 1.0, 3.0]), torch.tensor([0, 0, 1, 1])
    adv = group_advantages(rewards, groups, drop_zero_variance=True)
    assert torch.isnan(adv[:2]).all()
    std = rewards.std(correction=0).item()
    torch.testing.assert_close(adv[2:], torch.tensor([-1.0, 1.0]) / (std + EPS))


def test_zero_variance_with_a_nan_member_still_counts():
    rewards, groups = torch.tensor([2.0, NAN, 2.0, 1.0, 3.0]), torch.tensor([0, 0, 0, 1, 1])
    assert int(zero_variance_groups(rewards, groups)) == 1
    adv = group_advantages(rewards, groups)
    assert adv[0] == 0 and adv[2] == 0 and torch.isnan(adv[1])


def test_multi_reward_columns_are_normalised_independently():
    rewards = torch.tensor([[1.0, 10.0], [2.0, NAN], [3.0, 30.0], [4.0, 30.0]])
    groups = torch.tensor([0, 0, 1, 1])
    adv = group_advantages(rewards, groups)
    assert adv.shape == (4, 2)
    for k in range(2):
        torch.testing.assert_close(adv[:, k], group_advantages(rewards[:, k], groups), equal_nan=True)
    # Column 1 by hand: group 0 has one finite reward (zero-variance), group 1 two equal ones.
    assert adv[0, 1] == 0 and torch.isnan(adv[1, 1]) and (adv[2:, 1] == 0).all()
    assert zero_variance_groups(rewards, groups).tolist() == [0, 2]


def test_integer_rewards_are_accepted():
    adv = group_advantages(torch.tensor([0, 1]), torch.tensor([0, 0]))
    torch.testing.assert_close(adv, torch.tensor([-0.5, 0.5]) / (0.5 + EPS))


def test_shape_errors():
    with pytest.raises(ValueError, match="group_ids"):
        group_advantages(torch.zeros(4), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="rewards"):
        group_advantages(torch.zeros(2, 2, 2), torch.zeros(2, dtype=torch.long))


def test_weighted_reward_is_diffusionnfts_raw_weighted_sum():
    # DiffusionNFT (flow_grpo/rewards.py, multi_score): avg = sum_k w_k R_k on the raw scores, and the
    # multi-reward baseline is the group advantage of that sum (not a mean of per-reward advantages).
    rewards = torch.tensor([[0.2, 10.0], [0.6, 30.0], [0.4, 20.0], [0.9, 5.0]])
    weights = torch.tensor([1.0, 0.5])
    combined = weighted_reward(rewards, weights)
    torch.testing.assert_close(combined, torch.tensor([5.2, 15.6, 10.4, 3.4]))
    groups = torch.tensor([0, 0, 1, 1])
    adv = group_advantages(combined, groups)
    std = combined.std(correction=0)
    torch.testing.assert_close(adv, torch.tensor([-5.2, 5.2, 3.5, -3.5]) / (std + EPS))
    # the reward with the larger scale dominates, as in the reference: sample 1 beats 0 on both, 3 beats 2 only on the first
    assert adv[3] < adv[2]


def test_weighted_reward_rescales_the_applicable_rewards_and_is_nan_when_none_applies():
    rewards = torch.tensor([[0.5, NAN], [NAN, NAN], [1.0, 2.0], [NAN, 4.0]])
    weights = torch.tensor([1.0, 3.0])
    # a missing reward: the weighted mean of the others, times sum w = 4
    torch.testing.assert_close(weighted_reward(rewards, weights), torch.tensor([2.0, NAN, 7.0, 16.0]), equal_nan=True)
    assert torch.isnan(weighted_reward(torch.tensor([[NAN, 1.0]]), torch.tensor([1.0, 0.0])))  # only a zero-weight reward applies
    with pytest.raises(ValueError, match="weights"):
        weighted_reward(rewards, torch.ones(3))
