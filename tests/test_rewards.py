import sys
import textwrap

import numpy as np
import pytest

from rewards import Reward, RewardError, build_reward, register_reward, registered_rewards
from rollout.tiny import render


def _images(n=2):
    return np.stack([render("a red circle", s) for s in range(n)])


def test_builtins_are_registered():
    assert {"tiny_verifier", "jpeg_compressibility", "brightness"} <= set(registered_rewards())


def test_tiny_verifier_scores_ground_truth_one_and_other_prompts_nan():
    images = np.stack([render("a red circle", 0), render("two squares", 0), render("a red circle", 1)])
    scores = build_reward("tiny_verifier").score(images, ["a red circle", "two squares", "a photo of a cat"])
    assert scores[0] == 1.0 and scores[1] == 1.0 and np.isnan(scores[2])
    assert build_reward("tiny_verifier").score(images[:1], ["a blue circle"])[0] == pytest.approx(1 / 2)


def test_jpeg_compressibility_prefers_simple_images():
    flat = np.full((2, 32, 32, 3), 240, dtype=np.uint8)
    noisy = np.random.default_rng(0).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    reward = build_reward("jpeg_compressibility")
    flat_score, noisy_score = reward.score(flat, ["x", "x"]), reward.score(noisy, ["x", "x"])
    assert (flat_score > noisy_score).all() and (noisy_score < 0).all()


def test_brightness_conflicts_with_the_verifier():
    blank = np.full((1, 32, 32, 3), 240, dtype=np.uint8)
    assert build_reward("brightness").score(blank, ["a"])[0] == pytest.approx(240 / 255)
    three, one = render("three squares", 0)[None], render("one square", 0)[None]
    brightness = build_reward("brightness")
    assert brightness.score(three, ["a"])[0] < brightness.score(one, ["a"])[0] < brightness.score(blank, ["a"])[0]


class _WrongShape(Reward):
    name = "wrong_shape"

    def __call__(self, images, prompts, metadata):
        return np.zeros((len(images), 2))


class _IntScores(Reward):
    name = "int_scores"

    def __call__(self, images, prompts, metadata):
        return np.zeros(len(images), dtype=np.int64)


class _Raises(Reward):
    name = "raises"

    def __call__(self, images, prompts, metadata):
        raise KeyError("model weights")


@pytest.mark.parametrize(
    ("reward", "message"),
    [
        (_WrongShape(), r"reward 'wrong_shape' returned shape \(2, 2\), expected \(2,\)"),
        (_IntScores(), r"reward 'int_scores' returned dtype int64, expected a float dtype"),
        (_Raises(), r"reward 'raises' raised KeyError: 'model weights'"),
    ],
)
def test_bad_rewards_give_errors_naming_the_reward(reward, message):
    with pytest.raises(RewardError, match=message):
        reward.score(_images(), ["a red circle"] * 2)


def test_bad_inputs_are_rejected_with_the_reward_name():
    reward = build_reward("brightness")
    with pytest.raises(RewardError, match=r"reward 'brightness': images must be a uint8 array \[B, H, W, 3\], got float32"):
        reward.score(_images().astype(np.float32), ["a", "b"])
    with pytest.raises(RewardError, match="2 images but 1 prompts"):
        reward.score(_images(), ["a"])


def test_build_reward_from_dotted_path_entry_point_and_errors(tmp_path, monkeypatch):
    module = tmp_path / "my_rewards.py"
    module.write_text(
        textwrap.dedent("""
        import numpy as np
        from rewards import Reward

        class Constant(Reward):
            name = "constant"
            def __init__(self, value=0.5):
                self.value = value
            def __call__(self, images, prompts, metadata):
                return np.full(len(images), self.value)
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    reward = build_reward("my_rewards:Constant", value=0.25)
    assert reward.score(_images(), ["a", "b"]).tolist() == [0.25, 0.25]

    dist = tmp_path / "my_rewards_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-rewards-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[solray.rewards]\nconstant_plugin = my_rewards:Constant\n")
    assert build_reward("constant_plugin").score(_images(1), ["a"]).tolist() == [0.5]

    with pytest.raises(ValueError, match=r"unknown reward 'no_such_reward'; registered: .*tiny_verifier"):
        build_reward("no_such_reward")
    with pytest.raises(ValueError, match="cannot load reward 'my_rewards:Missing'"):
        build_reward("my_rewards:Missing")
    sys.modules.pop("my_rewards", None)


def test_register_reward_refuses_nameless_and_duplicate_names():
    with pytest.raises(ValueError, match="must set a non-empty `name`"):
        register_reward(type("Nameless", (Reward,), {}))
    with pytest.raises(ValueError, match="'brightness' is already registered"):
        register_reward(type("Other", (Reward,), {"name": "brightness"}))


PLUGIN_REWARDS = """
import numpy as np
from rewards import Reward

class Huge(Reward):
    name = "huge"
    def __call__(self, images, prompts, metadata):
        return np.array([1e308] + [0.5] * (len(images) - 1))

class Partial(Reward):
    name = "partial"
    def __call__(self, images, prompts, metadata):
        return np.array([0.2, np.nan, 0.6, 0.8])[: len(images)]

class Constant(Reward):
    name = "constant"
    def __call__(self, images, prompts, metadata):
        return np.full(len(images), 1.0)
"""


@pytest.fixture
def plugin_rewards(tmp_path, monkeypatch):
    (tmp_path / "score_range_plugins.py").write_text(PLUGIN_REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "score_range_plugins"
    sys.modules.pop("score_range_plugins", None)


def test_a_huge_score_is_refused_naming_the_reward_and_nan_stays_not_applicable(plugin_rewards):
    from actors.workers import RewardWorker
    from rl.config import Recipe

    huge, partial, constant = ({"name": f"{plugin_rewards}:{cls}"} for cls in ("Huge", "Partial", "Constant"))
    images, prompts = _images(4), ["a red circle"] * 4
    with pytest.raises(RewardError, match=r"reward 'huge' returned 1e\+308 at index 0: scores must lie within \+-1e\+09"):
        RewardWorker(recipe=Recipe(rewards={"models": [huge, partial], "retries": 1})).score(images, prompts)
    # NaN from one of two rewards is "not applicable", not an error.
    accepted = RewardWorker(recipe=Recipe(rewards={"models": [partial, constant]})).score(images, prompts)
    assert np.isnan(accepted[1, 0]) and accepted[[0, 2, 3], 0].tolist() == [0.2, 0.6, 0.8] and accepted[:, 1].tolist() == [1.0] * 4


def test_a_refused_huge_score_under_skip_leaves_finite_advantages(plugin_rewards):
    import torch

    from actors.workers import RewardWorker
    from rl.advantages import group_advantages, weighted_reward
    from rl.config import Recipe

    specs = [{"name": f"{plugin_rewards}:Huge"}, {"name": f"{plugin_rewards}:Partial"}]
    table = RewardWorker(recipe=Recipe(rewards={"models": specs, "retries": 1, "on_reward_error": "skip"})).score(
        _images(4), ["a red circle"] * 4
    )
    assert np.isnan(table[:, 0]).all()  # the failed call's column, as rewards.on_reward_error "skip" gives it
    # What the driver computes: float32 table, weighted sum (only "partial" applies: x sum w / w_partial = 2), group advantages.
    summed = weighted_reward(torch.tensor(table, dtype=torch.float32), torch.tensor([1.0, 1.0]))
    assert summed.numpy()[[0, 2, 3]].tolist() == pytest.approx([0.4, 1.2, 1.6]) and summed[1].isnan()
    advantages = group_advantages(summed, torch.tensor([0, 0, 1, 1])).numpy()
    std = np.std([0.4, 1.2, 1.6])  # the global std over the finite rewards
    # Group 0 holds one finite reward (zero variance: 0); group 1's mean is 1.4.
    assert advantages[[0, 2, 3]] == pytest.approx([0.0, -0.2 / (std + 1e-4), 0.2 / (std + 1e-4)], rel=1e-5)
    assert np.isnan(advantages[1])
