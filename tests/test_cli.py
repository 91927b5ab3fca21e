import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from rl.checkpoint import CHECKPOINTS, adapter_state_dict, lora_config, save_lora
from rollout import load_policy
from rollout.policy import TRAINABLE_ADAPTER
from solray.cli import build_parser, main


def test_help_lists_every_command_with_a_description():
    result = subprocess.run([sys.executable, "-m", "solray.cli", "--help"], capture_output=True, text=True, check=True)
    text = " ".join(result.stdout.split())
    for command, description in [
        ("train", "run a recipe"),
        ("sample", "write PNGs and one grid image"),
        ("eval", "strict verifier accuracy"),
        ("pretrain-tiny", "pretrain the tiny"),
    ]:
        assert f" {command} {description}" in text
    assert set(build_parser()._subparsers._group_actions[0].choices) == {"train", "sample", "eval", "pretrain-tiny", "reward-server"}


def test_sample_writes_pngs_grid_and_verifier_scores(tmp_path, capsys):
    main(
        [
            "sample",
            "--prompt",
            "a red circle",
            "--prompt",
            "two squares",
            "--seed",
            "0-2",
            "--steps",
            "3",
            "--out",
            str(tmp_path),
            "--scale",
            "2",
        ]
    )
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert len(pngs) == 7 and "grid.png" in pngs and "000_a-red-circle_seed0.png" in pngs
    image = np.asarray(Image.open(tmp_path / "005_two-squares_seed2.png"))
    assert image.shape == (32, 32, 3)
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape == (2 * (64 + 1) + 1, 3 * (64 + 1) + 1, 3)
    out = capsys.readouterr().out
    assert "wrote 6 images" in out and "'two squares': tiny_verifier reward" in out


def test_sample_with_a_trained_lora_changes_the_images_in_every_precision(tmp_path, capsys):
    policy = load_policy("tiny")
    policy.add_lora(4, 8.0, init_seed=0)
    with torch.no_grad():
        for param in policy.adapter_parameters(TRAINABLE_ADAPTER).values():
            param.add_(0.2 * torch.randn(param.shape, generator=torch.Generator().manual_seed(param.numel())))
    save_lora(adapter_state_dict(policy, TRAINABLE_ADAPTER), lora_config(policy, TRAINABLE_ADAPTER), tmp_path / "step_000001" / "lora")
    args = ["sample", "--prompt", "a red circle", "--seed", "0-1", "--steps", "3", "--compare-precision", "nvfp4"]
    main([*args, "--out", str(tmp_path / "base")])
    main([*args, "--out", str(tmp_path / "lora"), "--lora", str(tmp_path / "step_000001")])
    for name in ("grid.png", "compare.png"):
        base, lora = (np.asarray(Image.open(tmp_path / run / name)).astype(int) for run in ("base", "lora"))
        assert np.abs(base - lora).mean() > 1.0, name
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize(
    "seeds, message",
    [
        ("three", "use 7, 0-3 or 1,5,9"),
        ("5-2", "the range 5-2 runs backwards"),
        ("0-999999999", "more than 10000 seeds"),
        ("0-9999,10000", "more than 10000 seeds"),
    ],
)
def test_bad_seed_list_is_a_usage_error(tmp_path, capsys, seeds, message):
    with pytest.raises(SystemExit) as exit_:
        main(["sample", "--prompt", "a circle", "--seed", seeds, "--out", str(tmp_path / "x")])
    assert exit_.value.code == 2
    assert f"bad seed list '{seeds}': {message}" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        ("run:\n  stepz: 3\n", [], "recipe.yaml: run.stepz: Extra inputs are not permitted"),
        ("optim:\n  lr: fast\n", [], "recipe.yaml: optim.lr: Input should be a valid number"),
        ("", ["sol.pool_sise=8"], "recipe.yaml: sol.pool_sise: Extra inputs are not permitted"),
        ("", ["run.steps"], "override 'run.steps' must look like section.key=value"),
    ],
)
def test_train_with_a_bad_recipe_is_a_usage_error_naming_key_and_file(tmp_path, capsys, text, overrides, message):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    with pytest.raises(SystemExit) as exit_:
        main(["train", str(recipe), *overrides])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("solray train: ") and message in err


def test_train_refusing_an_earlier_runs_checkpoint_is_a_usage_error(tmp_path, capsys):
    (tmp_path / CHECKPOINTS / "step_000004").mkdir(parents=True)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"run:\n  output_dir: {tmp_path}\n  resume: never\n")
    with pytest.raises(SystemExit) as exit_:
        main(["train", str(recipe)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("solray train: ") and "holds a checkpoint of an earlier run (step_000004): set run.resume=auto" in err


@pytest.mark.parametrize(
    "sol, message, kept",
    [
        (
            "false",
            "optimizer step 2: the gradient is inf or NaN",
            "Training stopped in step 2; the newest checkpoint, {}, holds finite weights.",
        ),
        ("true", "calibration of the explore copy overflowed", "Training stopped in step 1; no checkpoint had been written."),
    ],
)
def test_train_into_nan_stops_with_the_step_and_the_checkpoint_it_keeps(tmp_path, capsys, sol, message, kept):
    # optim.lr 1e30 validates; step 1 moves the LoRA by about 1e30, so the NVFP4 copy's calibration (after step 1)
    # or, without Sol-RL, step 2's gradient overflows.
    small = [
        "run.steps=3",
        "algorithm.prompts_per_step=2",
        "algorithm.group_size=4",
        "sol.pool_size=8",
        "cluster.rollout_workers=0",
        "cluster.reward_workers=0",
        "cluster.remote_learners=false",
        "eval.enabled=false",
        "logging.grid_every=0",
        "logging.progress=false",
    ]
    with pytest.raises(SystemExit) as stopped:
        main(
            [
                "train",
                "recipes/tiny_solrl.yaml",
                *small,
                f"sol.enabled={sol}",
                "optim.lr=1e30",
                "checkpoint.every=1",
                f"run.output_dir={tmp_path}",
            ]
        )
    assert stopped.value.code == 1
    err = capsys.readouterr().err
    assert f"solray train: {message}" in err and "Traceback" not in err
    assert kept.format(tmp_path / CHECKPOINTS / "step_000001") in err
    written = sorted(p.name for p in (tmp_path / CHECKPOINTS).iterdir()) if (tmp_path / CHECKPOINTS).exists() else []
    assert written == (["step_000001"] if sol == "false" else [])


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["pretrain-tiny", "--out", "{out}", "--task-weight", "two_object=3", "--task-weight", "two_object=5"],
            "--task-weight two_object given twice (3 and 5)",
        ),
        (["reward-server", "brightness", "--arg", "scale=1", "--arg", "scale=2"], "--arg scale given twice (1 and 2)"),
    ],
)
def test_a_key_given_twice_is_refused_not_overwritten(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as refused:
        main([arg.format(out=tmp_path / "out") for arg in argv])
    assert refused.value.code == 2 and capsys.readouterr().err == f"solray: {message}\n"
    assert not (tmp_path / "out").exists()  # pretrain-tiny wrote nothing
