import re

import numpy as np
import pytest
import torch

from rollout import load_policy
from rollout.tiny.pretrain import learning_rate, model_guidance_target, pretrain_tiny, task_pool, training_batch
from rollout.tiny.world import ALL_PROMPTS
from solray.cli import build_parser


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


def test_task_weights_set_how_often_each_task_is_drawn():
    tasks = task_pool({"two_object": 3, "single_object": 0})
    assert tasks == ("colors", "counting", "two_object", "two_object", "two_object", "position")
    prompts, images = training_batch(np.random.default_rng(0), 600, tasks)
    drawn = [ALL_PROMPTS[p].task for p in prompts]
    assert drawn.count("single_object") == 0
    assert 0.4 < drawn.count("two_object") / 600 < 0.6  # 3/6 expected
    assert images.shape[0] == 600


def test_uniform_task_weights_draw_the_same_batches_as_before():
    first = training_batch(np.random.default_rng(3), 8)
    second = training_batch(np.random.default_rng(3), 8, task_pool({"colors": 1}))
    assert first[0] == second[0] and np.array_equal(first[1], second[1])


@pytest.mark.parametrize(
    "weights, message",
    [
        ({"colour": 2}, "unknown task(s) ['colour']"),
        ({"colors": -1}, "non-negative integers"),
        ({t: 0 for t in ("single_object", "colors", "counting", "two_object", "position")}, "not all zero"),
    ],
)
def test_bad_task_weights_are_refused_by_name(weights, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        task_pool(weights)


def test_cli_parses_task_weights_and_refuses_bad_ones(capsys):
    args = build_parser().parse_args(["pretrain-tiny", "--out", "x", "--task-weight", "two_object=3", "--task-weight", "position=2"])
    assert dict(args.task_weight) == {"two_object": 3, "position": 2}
    with pytest.raises(SystemExit):
        build_parser().parse_args(["pretrain-tiny", "--out", "x", "--task-weight", "two_object=1.5"])
    assert "use task=integer" in capsys.readouterr().err
