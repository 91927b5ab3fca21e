import numpy as np
import pytest

from rollout.tiny import ALL_PROMPTS, TASKS, detect_objects, parse_prompt, prompt_set, render, strict_pass, verify
from rollout.tiny.world import COLORS, MAX_SIZE, MIN_SIZE, SHAPES, _aligned_corners, _quadrant_corners, draw, shape_mask


def test_world_has_the_required_vocabulary():
    assert len(SHAPES) >= 3 and len(COLORS) >= 4
    counts = {spec.count for parsed in ALL_PROMPTS.values() for spec in parsed.objects}
    assert counts == {1, 2, 3}
    relations = {parsed.relation for parsed in ALL_PROMPTS.values() if parsed.relation}
    assert relations == {"left of", "right of", "above", "below"}
    assert {parsed.task for parsed in ALL_PROMPTS.values()} == set(TASKS)


def test_prompt_sets_are_disjoint_fixed_and_cover_every_task():
    train, eval_ = prompt_set("train"), prompt_set("eval")
    assert not set(train) & set(eval_)
    assert len(train) + len(eval_) == len(ALL_PROMPTS)
    assert eval_ == prompt_set("eval")
    assert eval_[:3] == ["a circle", "a red circle", "a red cross"]
    assert {parse_prompt(p).task for p in eval_} == set(TASKS)
    with pytest.raises(ValueError, match="'train', 'eval' or 'curriculum'"):
        prompt_set("test")
    curriculum = prompt_set("curriculum")
    assert len(curriculum) == 16 and set(curriculum) <= set(train)
    assert sorted(parse_prompt(p).task for p in curriculum) == sorted(["colors", "counting", "two_object", "position"] * 4)


def test_render_is_deterministic_and_seed_dependent():
    a, b, c = render("two circles", 3), render("two circles", 3), render("two circles", 4)
    assert a.dtype == np.uint8 and a.shape == (32, 32, 3)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_unknown_prompt_is_a_clear_error():
    with pytest.raises(ValueError, match="not a prompt of the tiny world"):
        render("a purple hexagon", 0)


def test_detection_on_a_hand_drawn_image():
    image = np.full((32, 32, 3), 240, dtype=np.uint8)
    image[2:12, 2:12] = COLORS["red"]
    image[4:13, 20:29][shape_mask("circle", 9, 9)] = COLORS["blue"]
    objects = sorted(detect_objects(image), key=lambda o: o.cx)
    assert [(o.shape, o.color) for o in objects] == [("square", "red"), ("circle", "blue")]
    assert objects[0].area == 100 and objects[0].cx == pytest.approx(6.5)
    assert verify(image, "a red square and a blue circle") == 1.0
    assert verify(image, "a square left of a circle") == 1.0
    # relation fails on the dominant axis: square (1), circle (1), relation (0); 2 of 2 objects
    assert verify(image, "a square above a circle") == pytest.approx(2 / 3)
    assert verify(image, "a circle left of a square") == pytest.approx(2 / 3)
    # present square (1), wrong colour (0), present circle (1), right colour (1)
    assert verify(image, "a green square and a blue circle") == pytest.approx(3 / 4)
    # counting: square present (1), one of three (1 - 2/3); clutter factor 2 found / 3 asked
    assert verify(image, "three squares") == pytest.approx((1 + 1 / 3) / 2 * 2 / 3)
    # one object asked, two found: the clutter factor halves the score
    assert verify(image, "a red square") == pytest.approx(1 / 2)


def test_ground_truth_passes_and_wrong_prompts_fail_on_every_eval_prompt():
    eval_prompts = prompt_set("eval")
    by_task = {task: [p for p in ALL_PROMPTS if parse_prompt(p).task == task] for task in TASKS}
    right, wrong = [], []
    for prompt in eval_prompts:
        same_task = by_task[parse_prompt(prompt).task]
        wrong_prompt = same_task[(same_task.index(prompt) + 1) % len(same_task)]
        for seed in range(8):
            image = render(prompt, seed)
            right.append(strict_pass(image, prompt))
            wrong.append(strict_pass(image, wrong_prompt))
    assert np.mean(right) >= 0.98
    assert np.mean(wrong) <= 0.2


def test_blank_and_noise_images_score_near_zero():
    blank = np.full((32, 32, 3), 240, dtype=np.uint8)
    assert all(verify(blank, p) == 0.0 for p in ALL_PROMPTS)
    noise = np.random.default_rng(0).integers(0, 256, size=(8, 32, 32, 3), dtype=np.uint8)
    scores = [verify(image, p) for image in noise for p in prompt_set("eval")]
    assert all(0.0 <= s < 1.0 for s in scores) and np.mean(scores) < 0.15  # measured 0.11


@pytest.mark.parametrize("relation", ["left of", "right of", "above", "below"])
def test_fallback_layouts_of_crowded_draws_hold_the_prompt(relation):
    """The layouts used when random placement gives up: the largest objects still satisfy the prompt."""
    rng = np.random.default_rng(0)
    for size_a, size_b in [(MAX_SIZE, MAX_SIZE), (MIN_SIZE, MAX_SIZE), (MAX_SIZE, MIN_SIZE)]:
        corners = _aligned_corners(rng, relation, size_a, size_b)
        assert all(1 <= v <= 32 - 1 - MAX_SIZE for corner in corners for v in corner), corners
        image = draw([("circle", "red", size_a), ("square", "blue", size_b)], corners)
        assert strict_pass(image, f"a circle {relation} a square"), (size_a, size_b, corners)
    image = draw([("triangle", color, MAX_SIZE) for color in ("red", "green", "blue")], _quadrant_corners(3))
    assert strict_pass(image, "three triangles")
