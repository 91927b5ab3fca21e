import copy
import zlib

import numpy as np
import pytest
import torch
from diffusers import SD3Transformer2DModel

from rl.algorithm import Batch
from rl.balance import RewardBalancer, balanced_direction, combine_advantages, min_norm_weights
from rl.config import AlgorithmConfig, OptimConfig
from rl.grpo import GRPO, GRPOConfig, grpo_kl, grpo_loss
from rl.nft import NFT, NFTConfig, nft_loss, nft_objective, optimality, velocity_kl
from rl.trainer import NonFiniteTrainingError, Trainer
from rollout.policy import OLD_ADAPTER, TRAINABLE_ADAPTER, Conditioning, Policy
from rollout.schedules import flow_match_sigmas
from rollout.sde import Trajectory, sample_trajectory, step_log_prob

PROMPTS = ["a red circle", "two blue squares", "a green triangle", "a red circle"]
TIMESTEPS = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Matmuls this small lose more to thread hand-off than they gain (about 10x on a busy 2-core machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class MiniPolicy(Policy):
    """A random one-block SD3 transformer on [4, 8, 8] latents with hashed prompt embeddings."""

    family = "mini"
    latent_shape = (4, 8, 8)
    lora_target_modules = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")
    shift = 1.0
    precision = "fp32"

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.transformer = SD3Transformer2DModel(
                sample_size=8,
                patch_size=2,
                in_channels=4,
                out_channels=4,
                num_layers=1,
                attention_head_dim=8,
                num_attention_heads=2,
                joint_attention_dim=8,
                caption_projection_dim=16,
                pooled_projection_dim=8,
                pos_embed_max_size=4,
            )
        self.transformer.requires_grad_(False)

    def _encode(self, prompts: list[str]) -> Conditioning:
        embeds = torch.stack([torch.randn(3, 8, generator=torch.Generator().manual_seed(zlib.crc32(p.encode()))) for p in prompts])
        return Conditioning({"prompt_embeds": embeds, "pooled_prompt_embeds": embeds.mean(1)})

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return self.transformer(
            hidden_states=x_t,
            encoder_hidden_states=cond.tensors["prompt_embeds"],
            pooled_projections=cond.tensors["pooled_prompt_embeds"],
            timestep=t * 1000,
            return_dict=False,
        )[0]

    def sigmas(self, steps: int, shift: float | None = None) -> torch.Tensor:
        return flow_match_sigmas(steps, self.shift if shift is None else shift)

    def decode(self, x0: torch.Tensor) -> np.ndarray:
        return ((x0[:, :3].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def make_policy(policy_differs_from_old: bool = True) -> MiniPolicy:
    """LoRA with non-zero B so that every adapter weight gets a gradient; optionally policy != old."""
    policy = MiniPolicy()
    policy.add_lora(rank=2, alpha=4)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in policy.adapter_parameters(TRAINABLE_ADAPTER).values():
            param.add_(0.3 * torch.randn(param.shape, generator=g))
        policy.copy_adapter(TRAINABLE_ADAPTER, OLD_ADAPTER)
        if policy_differs_from_old:
            for param in policy.adapter_parameters(TRAINABLE_ADAPTER).values():
                param.add_(0.1 * torch.randn(param.shape, generator=g))
    return policy


def x0_batch(size: int = 4, seed: int = 2) -> torch.Tensor:
    return torch.randn(size, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def snapshot(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in params.items()}


def assert_params_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], **tol) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], **tol)


def flow_matching_error(policy: Policy, x0: torch.Tensor) -> float:
    """mean (v_policy(x_t) - (eps - x0))^2 at fixed (t, eps): how well the policy reproduces these samples."""
    g = torch.Generator().manual_seed(9)
    eps = torch.randn(x0.shape, generator=g)
    t = torch.full((len(x0),), 0.5)
    with torch.no_grad(), policy.adapter(TRAINABLE_ADAPTER):
        v = policy.velocity(0.5 * x0 + 0.5 * eps, t, policy.encode_prompts(PROMPTS[: len(x0)]))
    return float(((v - (eps - x0)) ** 2).mean())


def test_trainer_requires_a_lora_adapter():
    with pytest.raises(ValueError, match="add_lora"):
        Trainer(MiniPolicy())


def test_nft_plan_draws_each_sample_its_own_fraction_of_the_nonzero_timesteps():
    # DiffusionNFT (scripts/train_nft_sd3.py) and Sol-RL: each sample permutes the N sampler timesteps
    # (t = 0 is not among them) and trains the first int(N * timestep_fraction) of its permutation.
    sigmas = torch.linspace(1, 0, 11)
    trainer, nft = Trainer(make_policy()), NFT(AlgorithmConfig(nft=NFTConfig(timestep_fraction=0.6)), sigmas)
    t_values, noise = nft.plan(trainer, range(8), (4, 8, 8))
    assert t_values.shape == (8, 6) and noise.shape == (6, 8, 4, 8, 8)
    for row in t_values.tolist():
        assert len(set(row)) == 6 and set(row) <= set(sigmas[:-1].tolist())
    assert len({tuple(row) for row in t_values.tolist()}) > 1  # not one subset for the whole batch
    # a sample's plan depends on (seed, step, its index) only: a learner holding rows 3-4 draws exactly theirs
    rows = nft.plan(trainer, range(3, 5), (4, 8, 8))
    assert torch.equal(rows[0], t_values[3:5]) and torch.equal(rows[1], noise[:, 3:5])
    trainer.step = 1
    assert not torch.equal(nft.plan(trainer, range(8), (4, 8, 8))[1], noise)
    # DiffusionNFT's configs: 0.99 of 10 steps trains 9 per sample; Sol-RL's FLUX config: 0.4 trains 4
    for fraction, trained in ((0.99, 9), (0.4, 4)):
        plan = NFT(AlgorithmConfig(nft=NFTConfig(timestep_fraction=fraction)), sigmas).plan(Trainer(make_policy()), range(3), (4, 8, 8))[0]
        assert plan.shape == (3, trained)


def test_nft_step_updates_policy_then_soft_updates_old():
    # DiffusionNFT computes eta = min(0.001 step, 0.5) after the step counter's increment: 0.001 after step 1.
    policy = make_policy()
    trainer, nft = Trainer(policy, optim=OptimConfig(lr=1e-2)), NFT(AlgorithmConfig(), TIMESTEPS)
    policy_params, old_params = trainer.params, trainer.old_params
    before, old_before = snapshot(policy_params), snapshot(old_params)
    metrics = nft.train_step(trainer, Batch(x0_batch(), PROMPTS, torch.tensor([1.0, -1.0, 0.5, -0.5])))
    assert all(not torch.equal(before[n], p) for n, p in policy_params.items())
    assert metrics["train/old_decay"] == pytest.approx(0.001) and metrics["train/step"] == 1.0
    assert {"loss/nft", "loss/kl", "train/grad_norm", "train/samples"} <= metrics.keys()
    assert_params_close(snapshot(old_params), {n: 0.001 * old_before[n] + 0.999 * policy_params[n].detach() for n in old_before})

    old_before = snapshot(old_params)
    metrics = nft.train_step(trainer, Batch(x0_batch(seed=3), PROMPTS, torch.tensor([-1.0, 1.0, 0.5, -0.5])))
    assert metrics["train/old_decay"] == pytest.approx(0.002)
    assert_params_close(snapshot(old_params), {n: 0.002 * old_before[n] + 0.998 * policy_params[n].detach() for n in old_before})


@pytest.mark.parametrize("nonfinite", ["stop", "skip_step"])
def test_an_overflowing_step_stops_the_run_or_is_skipped_and_the_adapter_stays_finite(nonfinite):
    # lr 1e30 passes the schema: the first step moves the LoRA by about 1e30 (still finite), so the
    # next forward overflows and its gradient is NaN.
    trainer, nft = Trainer(make_policy(), optim=OptimConfig(lr=1e30, nonfinite=nonfinite)), NFT(AlgorithmConfig(), TIMESTEPS)
    batch = Batch(x0_batch(), PROMPTS, torch.tensor([1.0, -1.0, 0.5, -0.5]))
    assert nft.train_step(trainer, batch)["train/skipped_nonfinite"] == 0.0
    after_first = snapshot(trainer.params)
    assert all(bool(p.isfinite().all()) for p in after_first.values()) and max(float(p.abs().max()) for p in after_first.values()) > 1e29
    if nonfinite == "stop":
        with pytest.raises(NonFiniteTrainingError, match=r"optimizer step 2: the gradient is inf or NaN .* optim.nonfinite: skip_step"):
            nft.train_step(trainer, batch)
    else:
        metrics = nft.train_step(trainer, batch)
        assert metrics["train/skipped_nonfinite"] == 1.0 and "train/grad_norm" not in metrics
        assert trainer.step == 1 and trainer.state_dict()["skipped_nonfinite"] == 1
    assert all(torch.equal(after_first[name], p) for name, p in trainer.params.items())


@pytest.mark.parametrize("sign, moves", [(1.0, "closer"), (-1.0, "away")])
def test_nft_positive_samples_are_pulled_closer_and_negative_pushed_away(sign, moves):
    # r = 1 makes the NFT loss a flow-matching loss on the batch; r = 0 trains v_theta towards 2 v_old - target.
    policy = make_policy(policy_differs_from_old=False)
    trainer, nft = Trainer(policy, optim=OptimConfig(lr=3e-3)), NFT(AlgorithmConfig(nft=NFTConfig(kl_weight=0.0)), TIMESTEPS)
    x0 = x0_batch()
    start = flow_matching_error(policy, x0)
    for _ in range(4):
        nft.train_step(trainer, Batch(x0, PROMPTS, torch.full((4,), 5 * sign)))
    end = flow_matching_error(policy, x0)
    assert (end < start) if moves == "closer" else (end > start)


def test_nft_gradient_is_the_gradient_of_the_batch_loss():
    # DESIGN.md: mean over samples and their trained timesteps of loss_scale * L + kl_weight * KL,
    # x_t = (1 - t_i) x0 + t_i eps with each sample's own t_i.
    settings = NFTConfig(kl_weight=1e-2, beta=0.5)
    trainer, nft = Trainer(make_policy()), NFT(AlgorithmConfig(micro_batch=3, nft=settings), TIMESTEPS)
    policy, x0 = trainer.policy, x0_batch()
    adv = torch.tensor([1.0, -1.0, 0.5, -7.0])
    cond = policy.encode_prompts(PROMPTS)
    t_values, noise = nft.plan(trainer, range(4), x0.shape[1:])
    assert not (t_values == t_values[:1]).all()  # samples train other timesteps
    grads, kl_grad, metrics = nft.gradients(trainer, x0, cond, adv[:, None], t_values, noise)
    assert kl_grad is None and grads.shape[0] == 1
    total = torch.zeros(())
    for j in range(t_values.shape[1]):
        t = t_values[:, j]
        x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise[j]
        with torch.no_grad(), policy.adapter(OLD_ADAPTER):
            v_old = policy.velocity(x_t, t, cond)
        with torch.no_grad(), policy.adapter(None):
            v_ref = policy.velocity(x_t, t, cond)
        with policy.adapter(TRAINABLE_ADAPTER):
            v_theta = policy.velocity(x_t, t, cond)
        loss = nft_loss(v_theta, v_old, x_t, x0, t, optimality(adv), 0.5)
        total = total + nft_objective(loss, velocity_kl(v_theta, v_ref), settings.loss_scale, settings.kl_weight) / t_values.shape[1]
    expected = torch.cat([g.reshape(-1) for g in torch.autograd.grad(total, list(trainer.params.values()))])
    torch.testing.assert_close(grads[0], expected, rtol=1e-4, atol=1e-7)
    assert metrics["loss/nft"] + metrics["loss/kl"] == pytest.approx(total.item(), rel=1e-5)


def test_nan_advantages_leave_the_batch():
    x0 = x0_batch()
    nft = NFT(AlgorithmConfig(), TIMESTEPS)
    with_nan = Trainer(make_policy(), seed=5)
    nft.train_step(with_nan, Batch(x0, PROMPTS, torch.tensor([1.0, float("nan"), -1.0, 0.5])))
    kept = Trainer(make_policy(), seed=5)
    nft.train_step(kept, Batch(x0[[0, 2, 3]], [PROMPTS[i] for i in (0, 2, 3)], torch.tensor([1.0, -1.0, 0.5])))
    assert_params_close(snapshot(with_nan.params), snapshot(kept.params))
    skipped = Trainer(make_policy())
    assert nft.train_step(skipped, Batch(x0, PROMPTS, torch.full((4,), float("nan")))) == {"train/skipped": 1.0}
    assert skipped.step == 0


def test_microbatch_size_does_not_change_the_step():
    results = []
    for microbatch in (1, 4):
        trainer = Trainer(make_policy())
        NFT(AlgorithmConfig(micro_batch=microbatch), TIMESTEPS).train_step(
            trainer, Batch(x0_batch(), PROMPTS, torch.tensor([1.0, -1.0, 0.5, -0.5]))
        )
        results.append(snapshot(trainer.params))
    assert_params_close(*results, rtol=1e-4, atol=1e-6)


def _per_reward_and_amortised(adv: torch.Tensor, weights: torch.Tensor):
    trainer, nft = Trainer(make_policy()), NFT(AlgorithmConfig(micro_batch=2, nft=NFTConfig(kl_weight=1e-2)), TIMESTEPS)
    x0 = x0_batch()
    cond = trainer.policy.encode_prompts(PROMPTS)
    t_values, noise = nft.plan(trainer, range(4), x0.shape[1:])
    per_reward, kl_grad, _ = nft.gradients(trainer, x0, cond, torch.nan_to_num(adv), t_values, noise)
    amortised, no_separate_kl, _ = nft.gradients(trainer, x0, cond, combine_advantages(adv, weights)[:, None], t_values, noise)
    assert per_reward.shape[0] == 3 and no_separate_kl is None
    return weights @ per_reward + kl_grad, amortised[0]


def test_amortised_multi_reward_gradient_equals_weighted_per_reward_gradients():
    adv = torch.tensor([[1.0, -0.5, 2.0], [-1.5, float("nan"), 0.3], [0.2, 1.2, -2.0], [0.4, -0.8, 0.0]])
    weights = torch.tensor([0.2, 0.5, 0.3])
    full, amortised = _per_reward_and_amortised(adv, weights)
    assert full.abs().max() > 0
    torch.testing.assert_close(amortised, full, rtol=1e-4, atol=1e-7)


def test_amortised_gradient_differs_once_the_advantage_clip_is_active():
    # Control for the test above: outside [-5, 5] r is no longer affine in A.
    adv = 4 * torch.tensor([[1.0, -0.5, 2.0], [-1.5, 1.0, 0.3], [0.2, 1.2, -2.0], [0.4, -0.8, 0.0]])
    full, amortised = _per_reward_and_amortised(adv, torch.tensor([0.2, 0.5, 0.3]))
    assert not torch.allclose(amortised, full, rtol=1e-3, atol=1e-6)


def test_marble_amortised_step_is_a_single_reward_step_on_combined_advantages():
    # MARBLE train.py (1bf9543), amortised steps: the NFT loss of sum_k a_k nan_to_num(A_k) with the cached
    # weights, averaged over every sample (no loss mask), with the KL term in the same loss.
    adv = torch.tensor([[1.0, -0.5, 2.0], [-1.5, float("nan"), 0.3], [0.2, 1.2, -2.0], [0.4, -0.8, 0.0]])
    balancer = RewardBalancer(3, solve_every=10)
    balancer.weights = torch.tensor([0.2, 0.5, 0.3])
    nft = NFT(AlgorithmConfig(), TIMESTEPS)
    multi = Trainer(make_policy(), balancer=balancer, seed=7)
    single = Trainer(make_policy(), seed=7)
    multi.step = single.step = 1  # past the full solve of step 0
    metrics = nft.train_step(multi, Batch(x0_batch(), PROMPTS, adv))
    nft.train_step(single, Batch(x0_batch(), PROMPTS, combine_advantages(adv, balancer.weights)))
    assert metrics["balance/full_step"] == 0.0
    assert_params_close(snapshot(multi.params), snapshot(single.params), rtol=1e-6, atol=1e-8)


def test_multi_reward_full_steps_solve_and_amortised_steps_reuse_weights():
    balancer = RewardBalancer(3, solve_every=2)
    trainer, nft = Trainer(make_policy(), balancer=balancer), NFT(AlgorithmConfig(nft=NFTConfig(beta=0.1)), TIMESTEPS)
    adv = torch.tensor([[1.0, -0.5, 2.0], [-1.5, float("nan"), 0.3], [0.2, 1.2, -2.0], [0.4, -0.8, 0.0]])
    first = nft.train_step(trainer, Batch(x0_batch(), PROMPTS, adv))
    assert first["balance/full_step"] == 1.0 and balancer.solves == 1 and balancer.measured == 1
    assert {"balance/cos_0", "balance/cos_1", "balance/cos_2", "balance/conflict_fraction", "loss/nft_0"} <= first.keys()
    solved = balancer.weights.clone()
    assert torch.isclose(solved.sum(), torch.tensor(1.0)) and not torch.allclose(solved, torch.full((3,), 1 / 3))
    second = nft.train_step(trainer, Batch(x0_batch(seed=4), PROMPTS, adv))
    assert second["balance/full_step"] == 0.0 and "balance/cos_0" not in second and "loss/nft" in second
    assert torch.equal(balancer.weights, solved) and balancer.solves == 1
    nft.train_step(trainer, Batch(x0_batch(seed=5), PROMPTS, adv))
    assert balancer.solves == 2 and balancer.measured == 2


def test_full_step_applies_the_balanced_direction_plus_kl(monkeypatch):
    balancer = RewardBalancer(3, solve_every=10)
    trainer = Trainer(make_policy(), optim=OptimConfig(grad_clip=1e9), balancer=balancer, seed=2)
    nft = NFT(AlgorithmConfig(nft=NFTConfig(kl_weight=1e-2, beta=0.1)), TIMESTEPS)
    x0, adv = x0_batch(), torch.tensor([[1.0, -0.5, 2.0], [-1.5, float("nan"), 0.3], [0.2, 1.2, -2.0], [0.4, -0.8, 0.0]])
    t_values, noise = nft.plan(trainer, range(4), x0.shape[1:])  # what the step draws
    cond = trainer.policy.encode_prompts(PROMPTS)
    grads, kl_grad, _ = nft.gradients(trainer, x0, cond, adv, t_values, noise, reward_counts=torch.tensor([4.0, 3.0, 4.0]))
    params = list(trainer.params.values())
    applied = []
    monkeypatch.setattr(trainer.optimizer, "step", lambda: applied.append(torch.cat([p.grad.reshape(-1) for p in params])))
    nft.train_step(trainer, Batch(x0, PROMPTS, adv))
    expected = balanced_direction(grads, min_norm_weights(grads)) + kl_grad  # the first solve is taken as is
    torch.testing.assert_close(applied[0], expected, rtol=1e-4, atol=1e-8)


def test_full_step_leaves_samples_out_of_the_rewards_that_do_not_apply_to_them():
    # MARBLE train.py (1bf9543): reward_valid_mask = ~isnan(A_k); that reward's policy loss is
    # sum(mask * L) / mask.sum(). Setting A = 0 instead would still train those samples with r = 0.5.
    trainer, nft = Trainer(make_policy()), NFT(AlgorithmConfig(micro_batch=3, nft=NFTConfig(kl_weight=0.0)), TIMESTEPS)
    x0, cond = x0_batch(), trainer.policy.encode_prompts(PROMPTS)
    adv = torch.tensor([[1.0, -0.5], [-1.5, float("nan")], [0.2, 1.2], [0.4, float("nan")]])
    t_values, noise = nft.plan(trainer, range(4), x0.shape[1:])
    grads, _, metrics = nft.gradients(trainer, x0, cond, adv, t_values, noise, reward_counts=torch.tensor([4.0, 2.0]))
    valid = torch.tensor([0, 2])
    only_valid, _, alone = nft.gradients(trainer, x0[valid], cond.index(valid), adv[valid, 1:], t_values[valid], noise[:, valid])
    torch.testing.assert_close(grads[1], only_valid[0], rtol=1e-4, atol=1e-8)
    assert metrics["loss/nft_1"] == pytest.approx(alone["loss/nft"], rel=1e-5)
    zeroed, _, _ = nft.gradients(trainer, x0, cond, torch.nan_to_num(adv), t_values, noise)
    assert not torch.allclose(zeroed[1], grads[1], rtol=1e-2)


def _full_and_amortised_directions(amortized: str, adv: torch.Tensor, monkeypatch) -> tuple[torch.Tensor, torch.Tensor, RewardBalancer]:
    """The gradient a full step applies at step 0, and the one an amortised step applies on the same
    batch, parameters and plan with the weights and norms that solve left."""
    applied = []
    nft = NFT(AlgorithmConfig(nft=NFTConfig(kl_weight=0.0)), TIMESTEPS)

    def trainer_with(balancer: RewardBalancer) -> Trainer:
        trainer = Trainer(make_policy(policy_differs_from_old=False), optim=OptimConfig(grad_clip=1e9), balancer=balancer, seed=2)
        params = list(trainer.params.values())
        monkeypatch.setattr(trainer.optimizer, "step", lambda: applied.append(torch.cat([p.grad.reshape(-1) for p in params])))
        return trainer

    solved = RewardBalancer(2, solve_every=10, amortized=amortized)
    nft.train_step(trainer_with(solved), Batch(x0_batch(), PROMPTS, adv))
    reused = RewardBalancer(2, solve_every=10, amortized=amortized)
    reused.load_state_dict(solved.state_dict())
    reused.full_gradients_due = lambda step: False  # an amortised step at step 0: the same plan as the solve's
    amortised = trainer_with(reused)
    assert nft.train_step(amortised, Batch(x0_batch(), PROMPTS, adv))["balance/full_step"] == 0.0
    return applied[0], applied[1], solved


def test_normalized_amortised_step_keeps_the_full_steps_direction_when_gradient_norms_differ_100x(monkeypatch):
    # At policy == old the NFT gradient is linear in A: advantages 100x smaller give a ~100x smaller gradient.
    adv = torch.stack([torch.tensor([1.0, -1.0, 0.5, -0.5]), 0.01 * torch.tensor([-0.5, 1.0, -1.0, 0.5])], dim=1)
    full, normalized, balancer = _full_and_amortised_directions("normalized", adv, monkeypatch)
    assert 30 < balancer.norms[0] / balancer.norms[1] < 300
    assert torch.nn.functional.cosine_similarity(full, normalized, dim=0) >= 0.99
    # MARBLE's amortised step applies the same weights to raw gradients: the large reward takes over
    full, marble, _ = _full_and_amortised_directions("marble", adv, monkeypatch)
    assert torch.nn.functional.cosine_similarity(full, marble, dim=0) < 0.95
    # with rewards that skip samples, the per-sample weights keep each reward's mean over its own samples
    adv[1, 0], adv[2, 1] = float("nan"), float("nan")
    full, normalized, _ = _full_and_amortised_directions("normalized", adv, monkeypatch)
    assert torch.nn.functional.cosine_similarity(full, normalized, dim=0) >= 0.99


def test_multi_reward_needs_a_balancer():
    trainer = Trainer(make_policy())
    with pytest.raises(ValueError, match="RewardBalancer"):
        NFT(AlgorithmConfig(), TIMESTEPS).train_step(trainer, Batch(x0_batch(), PROMPTS, torch.zeros(4, 2)))


def _grpo_batch(policy: Policy, method: str, adv: torch.Tensor) -> Batch:
    cond = policy.encode_prompts(PROMPTS)
    g = torch.Generator().manual_seed(6)
    x1 = torch.randn(4, 4, 8, 8, generator=g)
    noise = torch.randn(len(TIMESTEPS) - 1, 4, 4, 8, 8, generator=g)
    with torch.no_grad(), policy.adapter(OLD_ADAPTER):
        trajectory = sample_trajectory(lambda x, t: policy.velocity(x, t, cond), x1, TIMESTEPS, noise, 0.7, method)
    return Batch(trajectory, PROMPTS, adv)


@pytest.mark.parametrize("method", ["sde", "cps"])
def test_grpo_step_starts_at_ratio_one_and_old_follows_policy(method):
    policy = make_policy(policy_differs_from_old=False)
    trainer, grpo = Trainer(policy, optim=OptimConfig(lr=1e-3)), GRPO(AlgorithmConfig(grpo=GRPOConfig(timestep_fraction=1.0)))
    before = snapshot(trainer.params)
    metrics = grpo.train_step(trainer, _grpo_batch(policy, method, torch.tensor([1.0, -1.0, 0.5, -0.5])))
    assert metrics["grpo/approx_kl"] < 1e-10 and metrics["grpo/clipfrac"] == 0.0
    assert all(not torch.equal(before[n], p) for n, p in trainer.params.items())
    assert_params_close(snapshot(trainer.old_params), snapshot(trainer.params), rtol=0, atol=0)


def test_grpo_step_raises_the_advantage_weighted_log_prob():
    # To first order an optimizer step along the policy gradient increases sum_i A_i log pi(x_i).
    policy = make_policy(policy_differs_from_old=False)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    batch = _grpo_batch(policy, "sde", adv)
    trainer = Trainer(policy, optim=OptimConfig(lr=1e-4))
    GRPO(AlgorithmConfig(grpo=GRPOConfig(timestep_fraction=1.0, beta_kl=0.0))).train_step(trainer, batch)
    traj, cond = batch.samples, policy.encode_prompts(PROMPTS)
    gain = 0.0
    with torch.no_grad(), policy.adapter(TRAINABLE_ADAPTER):
        for i in range(traj.num_steps):
            v = policy.velocity(traj.latents[i], traj.timesteps[i].expand(4), cond)
            logp, _, _ = step_log_prob("sde", traj.latents[i], v, traj.latents[i + 1], traj.timesteps[i], traj.timesteps[i + 1], 0.7)
            gain += float(adv @ (logp - traj.log_probs[i]))
    assert gain > 0


def test_grpo_gradient_is_the_gradient_of_the_batch_loss(monkeypatch):
    # Mean over samples and trained steps of the per-sample PPO-clip + KL loss.
    policy = make_policy(policy_differs_from_old=False)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    batch = _grpo_batch(policy, "sde", adv)
    settings = GRPOConfig(timestep_fraction=1.0, beta_kl=0.5)
    trainer, grpo = Trainer(policy, optim=OptimConfig(grad_clip=1e9)), GRPO(AlgorithmConfig(micro_batch=3, grpo=settings))
    params = list(trainer.params.values())
    traj, cond = batch.samples, policy.encode_prompts(PROMPTS)
    total = torch.zeros(())
    for i in range(traj.num_steps):
        x, x_next, t, t_next = traj.latents[i], traj.latents[i + 1], traj.timesteps[i], traj.timesteps[i + 1]
        with policy.adapter(TRAINABLE_ADAPTER):
            v = policy.velocity(x, t.expand(4), cond)
        with torch.no_grad(), policy.adapter(None):
            v_ref = policy.velocity(x, t.expand(4), cond)
        logp, mean, std = step_log_prob("sde", x, v, x_next, t, t_next, 0.7)
        _, mean_ref, _ = step_log_prob("sde", x, v_ref, x_next, t, t_next, 0.7)
        kl = grpo_kl("sde", mean, mean_ref, std, t, t_next)
        total = total + grpo_loss(logp, traj.log_probs[i], adv, kl, settings.clip_range, settings.adv_clip, 0.5).mean() / traj.num_steps
    expected = torch.autograd.grad(total, params)
    applied = []
    monkeypatch.setattr(trainer.optimizer, "step", lambda: applied.extend(p.grad.clone() for p in params))
    metrics = grpo.train_step(trainer, batch)
    for got, want in zip(applied, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-8)
    assert metrics["loss/grpo"] == pytest.approx(total.item(), rel=1e-5)


def _chain(method: str, window: tuple[int, int] | None = None, steps: int = 10) -> Trajectory:
    return Trajectory(
        torch.zeros(steps + 1, 1, 1), torch.linspace(1, 0, steps + 1), torch.zeros(steps, 1), torch.zeros(steps, 1, 1), 0.7, method, window
    )


@pytest.mark.parametrize("method", ["sde", "cps"])
def test_grpo_trains_the_first_fraction_of_the_steps_in_order_or_the_whole_window(method):
    # Flow-GRPO scripts/train_sd3.py: train_timesteps = range(int(num_steps * timestep_fraction)), in order:
    # 9 of 10 steps at its 0.99, never the last step into t = 0. train_sd3_fast.py: exactly the window's steps.
    grpo = GRPO(AlgorithmConfig(grpo=GRPOConfig(timestep_fraction=0.99)))
    assert grpo.plan(_chain(method)).tolist() == list(range(9))
    assert GRPO(AlgorithmConfig(grpo=GRPOConfig(timestep_fraction=0.6))).plan(_chain(method)).tolist() == list(range(6))
    assert grpo.plan(_chain(method, window=(2, 5))).tolist() == [2, 3, 4]


def test_grpo_trains_one_reward():
    policy = make_policy()
    with pytest.raises(ValueError, match="one reward"):
        GRPO(AlgorithmConfig()).train_step(Trainer(policy), _grpo_batch(policy, "sde", torch.zeros(4, 2)))


def test_state_dict_resumes_identically():
    balancer = RewardBalancer(2, solve_every=2)
    trainer, nft = Trainer(make_policy(), balancer=balancer, seed=3), NFT(AlgorithmConfig(), TIMESTEPS)
    adv = torch.tensor([[1.0, -0.5], [-1.5, 0.4], [0.2, 1.2], [0.4, -0.8]])
    nft.train_step(trainer, Batch(x0_batch(), PROMPTS, adv))
    state = copy.deepcopy(trainer.state_dict())
    adapters = snapshot(trainer.params), snapshot(trainer.old_params)
    nft.train_step(trainer, Batch(x0_batch(seed=4), PROMPTS, adv))

    resumed = Trainer(make_policy(), balancer=RewardBalancer(2, solve_every=2), seed=0)
    with torch.no_grad():
        for params, saved in zip((resumed.params, resumed.old_params), adapters):
            for name, param in params.items():
                param.copy_(saved[name])
    resumed.load_state_dict(state)
    nft.train_step(resumed, Batch(x0_batch(seed=4), PROMPTS, adv))
    assert_params_close(snapshot(resumed.params), snapshot(trainer.params), rtol=0, atol=0)
    assert torch.equal(resumed.balancer.weights, trainer.balancer.weights)
    assert_params_close(resumed.ema.weights, trainer.ema.weights, rtol=0, atol=0)
    assert not torch.equal(next(iter(trainer.ema.weights.values())), next(iter(trainer.params.values())).detach())  # the EMA lags
