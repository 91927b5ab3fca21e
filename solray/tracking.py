"""Tracking: each step's metrics go to output_dir/metrics.jsonl, W&B and a progress bar; captioned image
grids every logging.grid_every steps; a PNG of the reward curves at the end.

Keys are namespaced by what they measure: reward/<name> (the training labels' means), explore/ (the
explore-precision pool and its ranking agreement with the regenerated rewards), loss/, train/,
balance/ (multi-reward weights), time/<phase> (seconds per phase of the step), driver/.
W&B (recipe logging.wandb) is "online", "offline" (synced later with `wandb sync`) or "disabled";
its files go to output_dir/wandb, and a resumed run continues the same W&B run.

metrics.jsonl and eval.jsonl are strict JSON, which has no NaN or Infinity: a non-finite value is
written as null (read_metrics reads it back as NaN) and each row's metrics/nonfinite counts them.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from rl.config import Recipe
from rollout.images import image_grid, save_png

METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.jsonl"
CURVES_FILE = "reward_curves.png"
GRIDS_DIR = "grids"
WANDB_ID_FILE = "wandb_id.txt"
NONFINITE_KEY = "metrics/nonfinite"  # per row: how many values were inf or NaN, written as null


def with_nonfinite_count(row: dict[str, Any]) -> dict[str, Any]:
    """The row with NONFINITE_KEY set to the number of its other values that are inf or NaN floats."""
    count = sum(isinstance(v, float) and not math.isfinite(v) for k, v in row.items() if k != NONFINITE_KEY)
    return row | {NONFINITE_KEY: count}


def encode_row(row: dict[str, Any]) -> str:
    """One line of strict JSON: inf and NaN floats become null."""
    return json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}, allow_nan=False)


def decode_row(line: str) -> dict[str, Any]:
    """Inverse of encode_row up to the sign of infinity: null reads back as NaN, so that rows hold numbers."""
    return {k: math.nan if v is None else v for k, v in json.loads(line).items()}


def read_metrics(path: str | Path, before_step: int | None = None) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl, only those with step < before_step when given."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = [decode_row(line) for line in path.read_text().splitlines() if line.strip()]
    return [row for row in rows if before_step is None or row["step"] < before_step]


PROBES = {"eval_train": "trained prompts", "eval": "held-out prompts"}


def evaluation_summary(evaluations: list[dict[str, Any]]) -> str:
    """The first and last evaluation side by side: per probe, every metric that has a standard error, as mean +- SE."""
    if len(evaluations) < 2:
        return ""
    first, last = evaluations[0], evaluations[-1]
    lines = [
        f"{'evaluation (' + str(last.get('adapter', 'current')) + ' adapter)':<36} {'before (step ' + str(first['step']) + ')':>18} {'after (step ' + str(last['step']) + ')':>18}"
    ]
    for prefix, title in PROBES.items():
        keys = [
            key.removesuffix("_se")
            for key in last
            if key.startswith(prefix + "/") and key.endswith("_se") and key.removesuffix("_se") in first
        ]
        if keys:
            lines.append(title)
            for key in sorted(keys, key=lambda k: (k != f"{prefix}/strict", k)):
                cells = [f"{row[key]:.3f} +- {row[key + '_se']:.3f}" for row in (first, last)]
                lines.append(f"  {key.removeprefix(prefix + '/'):<34} {cells[0]:>18} {cells[1]:>18}")
    return "\n".join(lines)


def captioned_grid(images: np.ndarray, prompts: list[str], rewards: np.ndarray, scale: int = 1) -> np.ndarray:
    """uint8 grid: one row per prompt (in order of first appearance), the prompt above, each image's reward under it."""
    if not len(images) == len(prompts) == len(rewards):
        raise ValueError(f"captioned_grid needs one prompt and reward per image, got {len(images)}, {len(prompts)}, {len(rewards)}")
    font = ImageFont.load_default()
    line = font.getbbox("Ag")[3] + 2
    rows = list(dict.fromkeys(prompts))
    columns = max(prompts.count(p) for p in rows)
    strips = []
    for prompt in rows:
        mine = [i for i, p in enumerate(prompts) if p == prompt]
        cells = image_grid(images[mine], columns, scale)
        strip = Image.new("RGB", (cells.shape[1], cells.shape[0] + 2 * line), "white")
        strip.paste(Image.fromarray(cells), (0, line))
        draw = ImageDraw.Draw(strip)
        draw.text((1, 1), prompt, fill="black", font=font)
        cell_width = images.shape[2] * scale + 1
        for column, i in enumerate(mine):
            draw.text((1 + column * cell_width, line + cells.shape[0]), f"{rewards[i]:.3f}", fill="black", font=font)
        strips.append(np.asarray(strip))
    return np.concatenate(strips)


def plot_reward_curves(history: list[dict[str, Any]], path: str | Path) -> Path:
    """One panel per reward/* key (and the explore pool's mean reward), against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for row in history for k in row if k.startswith("reward/")}) or ["reward/(none)"]
    figure, axes = plt.subplots(len(keys), 1, figsize=(6, 2.5 * len(keys)), sharex=True, squeeze=False)
    for axis, key in zip(axes[:, 0], keys):
        rows = [row for row in history if key in row]
        axis.plot([row["step"] for row in rows], [row[key] for row in rows], marker=".", label="training batch")
        explored = [row for row in rows if "explore/reward_mean" in row]
        if key == keys[0] and explored:
            axis.plot([row["step"] for row in explored], [row["explore/reward_mean"] for row in explored], "--", label="explore pool")
            axis.legend(fontsize=8)
        axis.set_ylabel(key.removeprefix("reward/"))
        axis.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


class Tracker:
    """Sinks of one run's metrics; a resumed run (start_step > 0) keeps the rows of the steps before it."""

    def __init__(self, recipe: Recipe, start_step: int = 0) -> None:
        self.recipe = recipe
        self.output_dir = Path(recipe.run.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.output_dir / METRICS_FILE
        # Rows a killed run wrote after its last checkpoint are recomputed, so they are dropped here.
        self.history = read_metrics(self.metrics_path, start_step)
        temp = self.metrics_path.with_suffix(".jsonl.tmp")
        temp.write_text("".join(encode_row(row) + "\n" for row in self.history))
        os.replace(temp, self.metrics_path)
        self.metrics_file = self.metrics_path.open("a")
        self.eval_path = self.output_dir / EVAL_FILE
        self.evaluations = read_metrics(self.eval_path, start_step + 1)
        self.eval_path.write_text("".join(encode_row(row) + "\n" for row in self.evaluations))
        self.reward_key = f"reward/{recipe.rewards.models[0].name}"
        self.wandb = self._start_wandb() if recipe.logging.wandb != "disabled" else None
        self.progress = tqdm(
            total=recipe.run.steps, initial=start_step, desc=recipe.run.name, unit="step", disable=not recipe.logging.progress
        )

    def _start_wandb(self) -> Any:
        import wandb

        id_path = self.output_dir / WANDB_ID_FILE
        if not id_path.is_file():
            id_path.write_text(secrets.token_hex(6) + "\n")
        return wandb.init(
            project=self.recipe.logging.project,
            name=self.recipe.run.name,
            id=id_path.read_text().strip(),
            resume="allow",
            mode=self.recipe.logging.wandb,
            dir=self.output_dir,
            config=self.recipe.public_dump(),
        )

    def log(self, metrics: dict[str, Any]) -> None:
        """One step's row (with its "step" and, added here, NONFINITE_KEY): metrics.jsonl, W&B, progress bar."""
        metrics = with_nonfinite_count(metrics)
        self.history.append(metrics)
        self.metrics_file.write(encode_row(metrics) + "\n")
        self.metrics_file.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in metrics.items() if k != "step"}, step=metrics["step"])
        postfix = {"reward": metrics.get(self.reward_key, math.nan)} | ({"loss": metrics["loss/nft"]} if "loss/nft" in metrics else {})
        self.progress.set_postfix({k: f"{v:.4f}" for k, v in postfix.items()}, refresh=False)
        self.progress.update(1)

    def log_eval(self, step: int, metrics: dict[str, float]) -> None:
        """An evaluation of the policy after `step` steps: a row of eval.jsonl (naming the adapter evaluated, eval.adapter), W&B, and one printed line."""
        adapter = self.recipe.eval.adapter
        row = with_nonfinite_count({"step": step, "adapter": adapter} | metrics)
        self.evaluations.append(row)
        with self.eval_path.open("a") as file:
            file.write(encode_row(row) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        self.progress.write(
            f"eval after {step} steps ({adapter} adapter): "
            + ", ".join(f"{k.removeprefix('eval/')} {v:.3f}" for k, v in metrics.items() if "/task/" not in k and not k.endswith("_se"))
        )

    def log_grid(self, step: int, images: np.ndarray, prompts: list[str], rewards: np.ndarray) -> Path:
        """A captioned grid of uint8 images [B, H, W, 3] with their prompts and rewards [B]: PNG and W&B."""
        stride = max(1, images.shape[2] // 256)  # large images are thinned to <= ~256 px for a preview
        grid = captioned_grid(images[:, ::stride, ::stride], prompts, rewards, scale=max(1, 128 // images.shape[2]))
        path = save_png(grid, self.output_dir / GRIDS_DIR / f"step_{step:06d}.png")
        if self.wandb is not None:
            import wandb

            self.wandb.log(
                {"samples/grid": wandb.Image(grid, caption=f"step {step}: rows are prompts, numbers are {self.reward_key}")}, step=step
            )
        return path

    def close(self) -> Path:
        """Write the reward-curve PNG and close every sink; returns the PNG's path."""
        self.progress.close()
        self.metrics_file.close()
        path = plot_reward_curves(self.history, self.output_dir / CURVES_FILE)
        if self.wandb is not None:
            import wandb

            self.wandb.log({"samples/reward_curves": wandb.Image(str(path))})
            self.wandb.finish()
        return path
