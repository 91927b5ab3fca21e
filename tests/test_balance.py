import math

import pytest
import torch

import rl.balance
from rl.balance import (
    RewardBalancer,
    balanced_direction,
    combine_advantages,
    gradient_cosines,
    min_norm_on_simplex,
    min_norm_weights,
    project_to_simplex,
)

NAN = float("nan")
ROOT_HALF = math.sqrt(0.5)


def closed_form_two(g1: torch.Tensor, g2: torch.Tensor, floor: float = 0.0) -> torch.Tensor:
    """MGDA's K = 2 solution: a1 = clamp((g2 - g1) . g2 / ||g1 - g2||^2, floor, 1 - floor)."""
    a1 = ((g2 - g1) @ g2 / (g1 - g2).square().sum()).clamp(floor, 1 - floor)
    return torch.stack([a1, 1 - a1])


@pytest.mark.parametrize("g1, g2", [([1.0, 0.0], [0.0, 2.0]), ([3.0, 1.0], [-1.0, 2.0]), ([1.0, 0.2], [0.3, -5.0])])
def test_two_rewards_match_closed_form(g1, g2):
    g1, g2 = torch.tensor(g1), torch.tensor(g2)
    u1, u2 = g1 / g1.norm(), g2 / g2.norm()
    torch.testing.assert_close(min_norm_weights(torch.stack([g1, g2])), closed_form_two(u1, u2))
    # Normalised gradients always split 1/2 - 1/2; the solver on raw gradients exercises the clamp-free formula.
    gram = torch.stack([g1, g2]) @ torch.stack([g1, g2]).T
    torch.testing.assert_close(min_norm_on_simplex(gram).float(), closed_form_two(g1, g2), atol=1e-6, rtol=0)


def test_two_rewards_closed_form_with_clamp_and_floor():
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([2.0, 0.1])  # unclamped a1 > 1
    gram = torch.stack([g1, g2]) @ torch.stack([g1, g2]).T
    torch.testing.assert_close(min_norm_on_simplex(gram).float(), torch.tensor([1.0, 0.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(min_norm_on_simplex(gram, floor=0.1).float(), closed_form_two(g1, g2, floor=0.1), atol=1e-6, rtol=0)


def test_three_rewards_by_hand():
    # Hull of (1,0), (0,1), (1,1)/sqrt2: the closest point to 0 is (1/2, 1/2) on the first edge.
    grads = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    torch.testing.assert_close(min_norm_weights(grads), torch.tensor([0.5, 0.5, 0.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(min_norm_weights(grads, floor=0.1), torch.tensor([0.45, 0.45, 0.1]), atol=1e-6, rtol=0)
    # Origin inside the hull of (1,0), (0,1), -(1,1)/sqrt2: a1 = a2 = a3 / sqrt2, so a3 = 1 / (1 + sqrt2).
    inside = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
    a3 = 1 / (1 + math.sqrt(2))
    torch.testing.assert_close(min_norm_weights(inside), torch.tensor([a3 * ROOT_HALF, a3 * ROOT_HALF, a3]), atol=1e-6, rtol=0)


def test_collinear_gradients_give_uniform_weights_and_their_shared_direction():
    grads = torch.tensor([[1.0, 2.0], [2.0, 4.0]])
    weights = min_norm_weights(grads)
    torch.testing.assert_close(weights, torch.tensor([0.5, 0.5]))
    unit = grads[0] / grads[0].norm()
    torch.testing.assert_close(balanced_direction(grads, weights), unit * (grads.norm(dim=1).mean()))


def test_opposite_gradients_cancel():
    grads = torch.tensor([[1.0, 0.0], [-3.0, 0.0]])
    weights = min_norm_weights(grads)
    torch.testing.assert_close(weights, torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(balanced_direction(grads, weights), torch.zeros(2))


def test_zero_and_non_finite_gradients_get_weight_zero():
    grads = torch.tensor([[1.0, 0.0], [0.0, 0.0], [NAN, 1.0], [0.0, 1.0], [math.inf, 0.0]])
    torch.testing.assert_close(min_norm_weights(grads), torch.tensor([0.5, 0.0, 0.0, 0.5, 0.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(min_norm_weights(torch.zeros(3, 4)), torch.zeros(3))
    direction = balanced_direction(grads, torch.tensor([0.5, 0.0, 0.0, 0.5, 0.0]))
    torch.testing.assert_close(direction, torch.tensor([0.5, 0.5]))  # mean norm 1 over the usable pair


def test_solver_failure_falls_back_to_uniform(monkeypatch):
    monkeypatch.setattr(rl.balance, "min_norm_on_simplex", lambda gram, floor: torch.full((gram.shape[0],), NAN))
    grads = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    torch.testing.assert_close(min_norm_weights(grads), torch.tensor([1 / 3, 0.0, 1 / 3, 1 / 3]))


def test_infeasible_floor_raises():
    with pytest.raises(ValueError, match="floor"):
        min_norm_weights(torch.eye(3), floor=0.5)


def test_project_to_simplex_by_hand():
    torch.testing.assert_close(project_to_simplex(torch.tensor([2.0, 0.0])), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(project_to_simplex(torch.tensor([0.2, 0.2, 0.2])), torch.full((3,), 1 / 3))
    torch.testing.assert_close(project_to_simplex(torch.tensor([1.0, 0.5, -1.0])), torch.tensor([0.75, 0.25, 0.0]))


def test_gradient_cosines():
    grads = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0], [0.0, 0.0]])
    cosines = gradient_cosines(grads, torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(cosines[:3], torch.tensor([ROOT_HALF, ROOT_HALF, -ROOT_HALF], dtype=torch.float64))
    assert torch.isnan(cosines[3])
    assert torch.isnan(gradient_cosines(grads, torch.zeros(2))).all()


def test_combine_advantages_skips_nan_per_reward():
    adv = torch.tensor([[1.0, NAN], [NAN, NAN], [2.0, -2.0]])
    combined = combine_advantages(adv, torch.tensor([0.25, 0.75]))
    torch.testing.assert_close(combined, torch.tensor([0.25, NAN, -1.0]), equal_nan=True)


def test_balancer_first_solve_then_ema():
    balancer = RewardBalancer(3, solve_every=10, ema=0.7)
    torch.testing.assert_close(balancer.weights, torch.full((3,), 1 / 3))
    first = balancer.update(torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]]))
    torch.testing.assert_close(first, torch.tensor([0.5, 0.5, 0.0]), atol=1e-6, rtol=0)
    second = balancer.update(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]))
    a3 = 1 / (1 + math.sqrt(2))
    solved = torch.tensor([a3 * ROOT_HALF, a3 * ROOT_HALF, a3])
    torch.testing.assert_close(second, 0.7 * torch.tensor([0.5, 0.5, 0.0]) + 0.3 * solved, atol=1e-6, rtol=0)
    assert [balancer.full_gradients_due(s) for s in (0, 1, 9, 10, 20)] == [True, False, False, True, True]


def test_amortized_marble_weighs_raw_advantages_and_normalized_rescales_by_the_last_norms():
    balancer = RewardBalancer(2, solve_every=10)
    grads = torch.tensor([[3.0, 0.0], [0.0, 0.03]])  # norms 3 and 0.03: orthogonal, so the QP splits 1/2 - 1/2
    balancer.update(grads)
    torch.testing.assert_close(balancer.weights, torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(balancer.norms, torch.tensor([3.0, 0.03]))
    adv = torch.tensor([[1.0, 2.0], [NAN, -1.0], [0.5, NAN]])
    counts = torch.tensor([2.0, 2.0])
    combined, weights = balancer.amortized_advantages(adv, counts)  # MARBLE: sum_k a_k nan_to_num(A_k), the plain mean
    torch.testing.assert_close(combined, torch.tensor([1.5, -0.5, 0.25]))
    assert weights is None
    normalized = RewardBalancer(2, solve_every=10, amortized="normalized")
    normalized.update(grads)
    # b_k = a_k mean(n) / n_k = 0.5 * 1.515 / (3, 0.03); c_ik = b_k / N_k (N_k = 2) where reward k applies
    b = torch.tensor([0.5 * 1.515 / 3.0, 0.5 * 1.515 / 0.03])
    c = torch.tensor([[b[0], b[1]], [0.0, b[1]], [b[0], 0.0]]) / 2
    combined, weights = normalized.amortized_advantages(adv, counts)
    torch.testing.assert_close(weights, c.sum(1))
    torch.testing.assert_close(combined, torch.tensor([(c[0, 0] + 2 * c[0, 1]) / c[0].sum(), -1.0, 0.5]))
    # sum_i C_i L(A_c,i) = sum_k b_k mean_{i: k applies} L(A_ik), and sum_k b_k g_k is the full step's direction
    torch.testing.assert_close(b @ grads, balancer.direction(grads))


def test_conflict_fraction_counts_batches_with_a_negative_worst_cosine():
    balancer = RewardBalancer(2)
    assert balancer.conflict_fraction == 0.0
    balancer.record(torch.tensor([0.5, -0.1]))
    balancer.record(torch.tensor([0.5, 0.2]))
    balancer.record(torch.tensor([NAN, 0.3]))
    balancer.record(torch.tensor([NAN, -0.3]))
    assert balancer.conflict_fraction == pytest.approx(2 / 4)


def test_balancer_state_round_trip_and_validation():
    balancer = RewardBalancer(2)
    balancer.update(torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
    balancer.record(torch.tensor([-1.0, 1.0]))
    restored = RewardBalancer(2)
    restored.load_state_dict(balancer.state_dict())
    assert torch.equal(restored.weights, balancer.weights) and restored.conflict_fraction == 1.0 and restored.solves == 1
    assert torch.equal(restored.norms, balancer.norms) and (balancer.norms > 0).all()
    with pytest.raises(ValueError, match="marble, normalized"):
        RewardBalancer(2, amortized="pareto")
