"""The testbed's subcommands, `solray eval` and `solray pretrain-tiny`, registered through the
`solray.commands` entry points like any plug-in's (solray.cli documents what a command provides)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from rollout.policy import Policy


class EvalCommand:
    help = "strict verifier accuracy on the tiny eval prompts, per task type"
    loads_policy = True  # solray.cli adds --model, --lora, --precision, --steps, --solver and loads the policy

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--seeds-per-prompt", type=parser.number(int, 1), default=8)
        parser.add_argument("--json", help="also write the result as JSON here (its directory must exist)")

    def run(self, args: argparse.Namespace, policy: Policy) -> None:
        from rollout.tiny.evaluate import accuracy_table, evaluate_policy

        if args.json and not Path(args.json).resolve().parent.is_dir():
            raise argparse.ArgumentTypeError(f"--json {args.json}: the directory {Path(args.json).resolve().parent} does not exist")

        result = evaluate_policy(policy, seeds_per_prompt=args.seeds_per_prompt, steps=args.steps, solver=args.solver, progress=True)
        print(accuracy_table(result))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


class PretrainTinyCommand:
    help = "pretrain the tiny testbed policy from scratch on the procedural world"
    loads_policy = False

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--out", required=True, help="output directory (diffusers layout)")
        parser.add_argument("--steps", type=parser.number(int, 1), default=4000)
        parser.add_argument("--batch-size", type=parser.number(int, 1), default=64)
        parser.add_argument("--lr", type=parser.number(float, 0, strict=True), default=1e-3)
        parser.add_argument("--seed", type=parser.number(int, 0), default=0)
        parser.add_argument(
            "--save-every", type=parser.number(int, 0), default=0, help="also save step-N snapshots every N steps (0 = none)"
        )
        parser.add_argument("--init", help="continue from a saved tiny policy instead of a random init")
        parser.add_argument(
            "--guidance",
            type=parser.number(float, 0, strict=True),
            default=1.0,
            help="bake classifier-free guidance of this scale into the model (1 = none)",
        )
        parser.add_argument(
            "--task-weight",
            type=_task_weight,
            action="append",
            default=[],
            help="draw a task this many times as often as the others (default 1 each): two_object=3; repeat",
        )

    def run(self, args: argparse.Namespace) -> None:
        from rollout.tiny.pretrain import pretrain_tiny

        task_weights: dict[str, int] = {}
        for task, weight in args.task_weight:
            if task in task_weights:
                raise argparse.ArgumentTypeError(f"--task-weight {task} given twice ({task_weights[task]!r} and {weight!r})")
            task_weights[task] = weight
        losses = pretrain_tiny(
            args.out,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            save_every=args.save_every,
            init=args.init,
            guidance=args.guidance,
            task_weights=task_weights,
        )
        print(f"saved to {args.out}; loss {np.mean(losses[:50]):.4f} (first 50 steps) -> {np.mean(losses[-50:]):.4f} (last 50)")


def _task_weight(text: str) -> tuple[str, int]:
    """'two_object=3' -> ('two_object', 3)."""
    task, sep, weight = text.partition("=")
    if not sep or not weight.isdigit():
        raise argparse.ArgumentTypeError(f"bad task weight {text!r}: use task=integer, e.g. two_object=3")
    return task, int(weight)


EVAL = EvalCommand()
PRETRAIN_TINY = PretrainTinyCommand()
