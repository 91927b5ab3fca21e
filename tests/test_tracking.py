import json

import numpy as np
import pytest
from PIL import Image

from rl.config import Recipe
from solray.tracking import Tracker, captioned_grid, plot_reward_curves, read_metrics


def _images(count: int, size: int = 8) -> np.ndarray:
    """Image i is filled with the grey level 10 * (i + 1), so cells can be told apart."""
    return np.stack([np.full((size, size, 3), 10 * (i + 1), dtype=np.uint8) for i in range(count)])


def test_captioned_grid_puts_one_prompt_per_row_and_each_reward_under_its_image():
    prompts = ["a red circle", "a red circle", "two squares", "a red circle", "two squares"]
    grid = captioned_grid(_images(5), prompts, np.array([0.1, 0.2, 0.3, 0.4, 0.5]), scale=2)
    line = 14  # default font: 12 px glyph box + 2
    cells_height, width = 16 + 2, 3 * (16 + 1) + 1  # image_grid: 1 row of 3 columns at 2x, 1 px padding
    assert grid.shape == (2 * (cells_height + 2 * line), width, 3) and grid.dtype == np.uint8
    # Row 1 holds images 0, 1, 3 of "a red circle"; row 2 images 2, 4 and an empty cell.
    row_tops = [line + 1, cells_height + 2 * line + line + 1]
    for top, images in zip(row_tops, [[0, 1, 3], [2, 4]]):
        for column, i in enumerate(images):
            left = 1 + column * 17
            assert (grid[top : top + 16, left : left + 16] == 10 * (i + 1)).all()
    assert (grid[row_tops[1] : row_tops[1] + 16, 35:51] == 255).all()
    # The prompt is written above each row and the rewards below it (dark text pixels).
    assert grid[:line].min() < 128 and grid[line + cells_height : 2 * line + cells_height].min() < 128
    with pytest.raises(ValueError, match="one prompt and reward per image, got 5, 4, 5"):
        captioned_grid(_images(5), prompts[:4], np.zeros(5))


def test_reward_curves_have_one_panel_per_reward(tmp_path):
    history = [{"step": s, "reward/tiny_verifier": 0.1 * s, "reward/brightness": 0.9, "explore/reward_mean": 0.05 * s} for s in range(4)]
    path = plot_reward_curves(history, tmp_path / "curves.png")
    assert Image.open(path).size == (600, 500)  # 6 x 2.5 inches per panel at 100 dpi
    assert Image.open(plot_reward_curves([{"step": 0, "reward/x": 1.0}], tmp_path / "one.png")).size == (600, 250)


def _recipe(tmp_path, wandb: str = "offline") -> Recipe:
    return Recipe.model_validate(
        {"run": {"name": "track", "steps": 4, "output_dir": str(tmp_path / "run")}, "logging": {"wandb": wandb, "progress": False}}
    )


def test_tracker_writes_jsonl_grids_curves_and_an_offline_wandb_run_that_a_resume_continues(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    rows = [{"step": s, "reward/tiny_verifier": 0.25 * s, "loss/nft": 2.0 - s, "time/update": 0.5} for s in range(3)]
    tracker = Tracker(_recipe(tmp_path))
    for row in rows:
        tracker.log(row)
    grid = tracker.log_grid(2, _images(4), ["a", "a", "b", "b"], np.array([0.0, 1.0, 0.5, 0.25]))
    assert tracker.wandb.config["run"]["name"] == "track" and tracker.wandb.offline
    curves = tracker.close()

    run_dir = tmp_path / "run"
    counted = [row | {"metrics/nonfinite": 0} for row in rows]
    assert read_metrics(run_dir / "metrics.jsonl") == counted and tracker.history == counted
    assert grid == run_dir / "grids" / "step_000002.png" and Image.open(grid).size[0] == 2 * (128 + 1) + 1
    assert curves == run_dir / "reward_curves.png" and curves.is_file()
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    offline_runs = list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(offline_runs) == 1
    media = sorted(p.name.rsplit("_", 1)[0] for p in (offline_runs[0] / "files" / "media" / "images" / "samples").glob("*.png"))
    assert media == ["grid_2", "reward_curves_2"]  # key, then the step it was logged at

    # Resumed after a checkpoint at step 2: the killed run's row of step 2 is dropped, the W&B run continues.
    resumed = Tracker(_recipe(tmp_path), start_step=2)
    assert resumed.history == counted[:2] and read_metrics(run_dir / "metrics.jsonl") == counted[:2]
    resumed.log(rows[2] | {"loss/nft": 7.0})
    resumed.close()
    assert [row["loss/nft"] for row in read_metrics(run_dir / "metrics.jsonl")] == [2.0, 1.0, 7.0]
    assert len(list((run_dir / "wandb").glob(f"offline-run-*-{run_id}*"))) == 2
    assert json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0]) == counted[0]


def _strict_json(line: str) -> dict:
    """json.loads that refuses the NaN / Infinity / -Infinity tokens Python's json writes by default."""

    def refuse(token: str) -> None:
        raise ValueError(f"not strict JSON: {token}")

    return json.loads(line, parse_constant=refuse)


def test_nonfinite_values_are_written_as_null_and_counted_per_row(tmp_path):
    with pytest.raises(ValueError, match="not strict JSON: NaN"):
        _strict_json(json.dumps({"x": float("nan")}))  # the check catches what json.dumps writes by default
    tracker = Tracker(_recipe(tmp_path, wandb="disabled"))
    tracker.log({"step": 0, "reward/a": float("nan"), "loss/nft": float("inf"), "train/grad_norm": -np.inf, "time/update": 0.5})
    tracker.log({"step": 1, "reward/a": 0.25, "loss/nft": 1.5})
    tracker.log_eval(2, {"eval/a": 0.5, "eval/a_se": float("nan")})
    tracker.close()

    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert _strict_json(lines[0]) == {
        "step": 0, "reward/a": None, "loss/nft": None, "train/grad_norm": None, "time/update": 0.5, "metrics/nonfinite": 3,
    }  # fmt: skip
    assert _strict_json(lines[1]) == {"step": 1, "reward/a": 0.25, "loss/nft": 1.5, "metrics/nonfinite": 0}
    evaluation = _strict_json((tmp_path / "run" / "eval.jsonl").read_text().splitlines()[0])
    assert evaluation == {"step": 2, "adapter": "ema", "eval/a": 0.5, "eval/a_se": None, "metrics/nonfinite": 1}

    # A resume reads null back as NaN (rows hold numbers: means over them still work) and rewrites strict JSON.
    resumed = Tracker(_recipe(tmp_path, wandb="disabled"), start_step=2)
    first = resumed.history[0]
    assert np.isnan(first["reward/a"]) and np.isnan(first["loss/nft"]) and first["metrics/nonfinite"] == 3
    assert np.nanmean([row["reward/a"] for row in resumed.history]) == 0.25
    assert np.isnan(resumed.evaluations[0]["eval/a_se"])
    resumed.close()
    assert [_strict_json(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][0]["metrics/nonfinite"] == 3


def test_disabled_wandb_and_read_metrics_before_step(tmp_path):
    tracker = Tracker(_recipe(tmp_path, wandb="disabled"))
    for step in range(3):
        tracker.log({"step": step, "reward/tiny_verifier": float(step)})
    tracker.close()
    assert tracker.wandb is None and not (tmp_path / "run" / "wandb").exists()
    assert [row["step"] for row in read_metrics(tmp_path / "run" / "metrics.jsonl", before_step=2)] == [0, 1]
    assert read_metrics(tmp_path / "nothing.jsonl") == []


def test_evaluation_summary_puts_before_and_after_side_by_side():
    from solray.tracking import evaluation_summary

    rows = [
        {
            "step": 0,
            "adapter": "ema",
            "eval/strict": 0.25,
            "eval/strict_se": 0.03,
            "eval_train/strict": 0.28,
            "eval_train/strict_se": 0.02,
            "eval/task/colors": 0.5,
        },
        {
            "step": 40,
            "adapter": "ema",
            "eval/strict": 0.3,
            "eval/strict_se": 0.031,
            "eval_train/strict": 0.41,
            "eval_train/strict_se": 0.025,
            "eval/task/colors": 0.6,
        },
    ]
    lines = evaluation_summary(rows).splitlines()
    assert lines[0].split() == ["evaluation", "(ema", "adapter)", "before", "(step", "0)", "after", "(step", "40)"]
    assert lines[1:] == [
        "trained prompts",
        f"  {'strict':<34} {'0.280 +- 0.020':>18} {'0.410 +- 0.025':>18}",
        "held-out prompts",
        f"  {'strict':<34} {'0.250 +- 0.030':>18} {'0.300 +- 0.031':>18}",
    ]
    assert evaluation_summary(rows[:1]) == ""
