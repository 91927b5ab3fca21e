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
