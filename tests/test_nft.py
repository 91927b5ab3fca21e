import pytest
import torch

from rl.nft import adaptive_weight, nft_loss, nft_objective, old_policy_decay, optimality, soft_update_, velocity_kl

NAN = float("nan")


def test_optimality_maps_clipped_advantage_to_unit_interval():
    adv = torch.tensor([-10.0, -5.0, 0.0, 2.5, 5.0, 10.0, NAN])
    torch.testing.assert_close(optimality(adv), torch.tensor([0.0, 0.0, 0.5, 0.75, 1.0, 1.0, NAN]), equal_nan=True)
    torch.testing.assert_close(optimality(torch.tensor([1.0]), clip=2.0), torch.tensor([0.75]))


def _two_samples():
    """Two samples of 2 values; hand-computed losses in the tests below."""
    x_t = torch.tensor([[1.0, 1.0], [0.0, 4.0]])
    x0 = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    v_theta = torch.tensor([[2.0, 2.0], [0.0, 0.0]])
    v_old = torch.tensor([[1.0, 1.0], [-1.0, 1.0]])
    t = torch.tensor([0.5, 1.0])
    r = torch.tensor([0.75, 0.2])
    return v_theta, v_old, x_t, x0, t, r


def test_nft_loss_beta_one_by_hand():
    # Sample 0: v+ = v_theta -> x0+ = 1 - 0.5*2 = 0 = x0: error 0, weight clipped to 1e-5, term 0.
    #           v- = 2 v_old - v_theta = 0 -> x0- = 1: mean sq 1, weight 1 -> L = 0.25 * 1.
    # Sample 1: x0+ = [0, 4]: err [-1, 3], mean sq 5, weight 2 -> 2.5;
    #           v- = [-2, 2] -> x0- = [2, 2]: err [1, 1] -> 1;  L = 0.2 * 2.5 + 0.8 * 1 = 1.3.
    loss = nft_loss(*_two_samples(), beta=1.0)
    torch.testing.assert_close(loss, torch.tensor([0.25, 1.3]))


def test_nft_loss_beta_half_by_hand():
    # Sample 0: v+ = 0.5*2 + 0.5*1 = 1.5 -> x0+ = 0.25: 0.0625 / 0.25 = 0.25;
    #           v- = 1.5*1 - 0.5*2 = 0.5 -> x0- = 0.75: 0.5625 / 0.75 = 0.75;
    #           L = (0.75 * 0.25 + 0.25 * 0.75) / 0.5 = 0.75.
    loss = nft_loss(*_two_samples(), beta=0.5)
    torch.testing.assert_close(loss[0], torch.tensor(0.75))


def test_adaptive_weights_are_detached():
    v_theta, v_old, x_t, x0, t, r = _two_samples()
    v_theta = v_theta.clone().requires_grad_(True)
    v_old = v_old.clone().requires_grad_(True)
    beta = 0.5
    nft_loss(v_theta, v_old, x_t, x0, t, r, beta).sum().backward()
    # With w held constant: dL/dv_theta = [r 2 e+ (-t beta) / w+ + (1 - r) 2 e- (t beta) / w-] / (n beta).
    tb = t[:, None]
    e_pos = x_t - tb * (beta * v_theta.detach() + (1 - beta) * v_old.detach()) - x0
    e_neg = x_t - tb * ((1 + beta) * v_old.detach() - beta * v_theta.detach()) - x0
    w_pos, w_neg = adaptive_weight(e_pos)[:, None], adaptive_weight(e_neg)[:, None]
    n = x_t.shape[1]
    expected = (r[:, None] * 2 * e_pos * (-tb * beta) / w_pos + (1 - r[:, None]) * 2 * e_neg * (tb * beta) / w_neg) / (n * beta)
    torch.testing.assert_close(v_theta.grad, expected)
    assert v_old.grad is None  # the sampling policy is a constant of the loss


def test_adaptive_weight_clip():
    assert torch.equal(adaptive_weight(torch.zeros(2, 3)), torch.full((2,), 1e-5))
    torch.testing.assert_close(adaptive_weight(torch.tensor([[1.0, -3.0]])), torch.tensor([2.0]))


def test_nft_loss_is_affine_in_r():
    # The identity behind the amortised multi-reward step: sum_k a_k L(r_k) = L(sum_k a_k r_k) when sum a = 1.
    g = torch.Generator().manual_seed(0)
    v_theta, v_old, x_t, x0 = (torch.randn(3, 2, 4, generator=g) for _ in range(4))
    t = torch.rand(3, generator=g)
    rs = torch.rand(2, 3, generator=g)
    a = torch.tensor([0.3, 0.7])
    per_reward = sum(a[k] * nft_loss(v_theta, v_old, x_t, x0, t, rs[k], 0.1) for k in range(2))
    torch.testing.assert_close(nft_loss(v_theta, v_old, x_t, x0, t, a @ rs, 0.1), per_reward)


def test_velocity_kl_and_objective():
    kl = velocity_kl(torch.tensor([[1.0, 3.0], [0.0, 0.0]]), torch.tensor([[0.0, 1.0], [2.0, 0.0]]))
    torch.testing.assert_close(kl, torch.tensor([2.5, 2.0]))
    total = nft_objective(torch.tensor([1.0, 3.0]), kl, loss_scale=5.0, kl_weight=0.1)
    torch.testing.assert_close(total, torch.tensor(5.0 * 2.0 + 0.1 * 2.25))


def test_old_policy_decay_schedules():
    assert [old_policy_decay(s) for s in (0, 1, 100, 500, 10_000)] == [0.0, 0.001, 0.1, 0.5, 0.5]
    slow = dict(flat=75, rate=0.0075, cap=0.999)
    assert old_policy_decay(50, **slow) == 0.0
    assert old_policy_decay(175, **slow) == pytest.approx(0.75)
    assert old_policy_decay(10_000, **slow) == 0.999


def test_soft_update_in_place():
    old = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0])}
    new = {"a": torch.tensor([3.0, 4.0]), "b": torch.tensor([8.0])}
    soft_update_(old, new, decay=0.25)
    torch.testing.assert_close(old["a"], torch.tensor([2.5, 3.5]))  # 0.25 old + 0.75 new
    torch.testing.assert_close(old["b"], torch.tensor([6.0]))
    soft_update_(old, new, decay=0.0)
    torch.testing.assert_close(old["a"], new["a"])
    with pytest.raises(KeyError):
        soft_update_(old, {"a": new["a"]}, 0.5)
