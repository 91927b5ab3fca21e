import numpy as np
import torch

from rollout import load_policy
from rollout.tiny.pretrain import learning_rate, model_guidance_target, pretrain_tiny


def test_a_few_pretraining_steps_reduce_the_loss_and_save_a_loadable_policy(tmp_path):
    losses = pretrain_tiny(tmp_path / "tiny", steps=30, batch_size=16, seed=1, progress=False)
    assert len(losses) == 30
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:5])
    policy = load_policy(str(tmp_path / "tiny"))
    assert policy.family == "tiny"


def test_learning_rate_schedule():
    assert learning_rate(0, 100, 1.0, warmup=10) == 0.1
    assert learning_rate(9, 100, 1.0, warmup=10) == 1.0
    assert learning_rate(10, 100, 1.0, warmup=10) == 1.0
    assert abs(learning_rate(100, 100, 1.0, warmup=10) - 0.1) < 1e-12


def test_model_guidance_target_converges_to_classifier_free_guidance():
    flow_target, v_empty = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 0.0])
    v = torch.zeros(2)
    for _ in range(200):  # the model regressing onto its own target, step by step
        v = model_guidance_target(flow_target, v, v_empty, guidance=3.0)
    torch.testing.assert_close(v, v_empty + 3.0 * (flow_target - v_empty))
    torch.testing.assert_close(model_guidance_target(flow_target, v, v_empty, guidance=1.0), flow_target)


def test_pretraining_with_model_guidance_reduces_the_loss(tmp_path):
    losses = pretrain_tiny(tmp_path / "tiny", steps=20, batch_size=16, seed=1, guidance=3.0, progress=False)
    assert np.isfinite(losses).all() and np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
