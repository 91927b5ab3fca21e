import numpy as np

from rollout import load_policy
from rollout.tiny.pretrain import learning_rate, pretrain_tiny


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
