"""The `solray` command line."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np


def _seeds(text: str) -> list[int]:
    """'7' -> [7]; '0-3' -> [0, 1, 2, 3]; '1,5,9' -> [1, 5, 9]."""
    seeds: list[int] = []
    for part in text.split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part.strip())
        if not match:
            raise argparse.ArgumentTypeError(f"bad seed list {text!r}: use 7, 0-3 or 1,5,9")
        first, last = int(match[1]), int(match[2] or match[1])
        seeds += list(range(first, last + 1))
    return seeds


def _slug(prompt: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:60]


def cmd_sample(args: argparse.Namespace) -> None:
    from rewards import build_reward
    from rollout import load_policy
    from rollout.images import image_grid, save_png
    from rollout.samplers import sample
    from rollout.tiny import ALL_PROMPTS

    policy = load_policy(args.model, precision=args.precision)
    pairs = [(p, s) for p in args.prompt for s in args.seed]
    out = sample(policy, [p for p, _ in pairs], [s for _, s in pairs], args.steps, solver=args.solver, batch_size=96, progress=True)
    out_dir = Path(args.out)
    for i, (image, (prompt, seed)) in enumerate(zip(out.images, pairs)):
        save_png(image, out_dir / f"{i:03d}_{_slug(prompt)}_seed{seed}.png")
    grid = save_png(image_grid(out.images, columns=len(args.seed), scale=args.scale), out_dir / "grid.png")
    print(f"wrote {len(pairs)} images and {grid} (rows = prompts, columns = seeds)")
    if all(p in ALL_PROMPTS for p in args.prompt):
        scores = build_reward("tiny_verifier").score(out.images, [p for p, _ in pairs])
        for prompt in args.prompt:
            mine = np.array([score for score, (p, _) in zip(scores, pairs) if p == prompt])
            print(f"  {prompt!r}: verifier reward {mine.mean():.3f}, strict pass {int((mine == 1.0).sum())}/{len(mine)}")


def cmd_eval(args: argparse.Namespace) -> None:
    from rollout import load_policy
    from rollout.tiny.evaluate import accuracy_table, evaluate_policy

    policy = load_policy(args.model, precision=args.precision)
    result = evaluate_policy(policy, seeds_per_prompt=args.seeds_per_prompt, steps=args.steps, solver=args.solver, progress=True)
    print(accuracy_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


def cmd_pretrain_tiny(args: argparse.Namespace) -> None:
    from rollout.tiny.pretrain import pretrain_tiny

    losses = pretrain_tiny(args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, save_every=args.save_every)
    print(f"saved to {args.out}; loss {np.mean(losses[:50]):.4f} (first 50 steps) -> {np.mean(losses[-50:]):.4f} (last 50)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="solray", description="RL post-training of text-to-image flow models on Ray.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add_model_args(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--model", default="tiny", help='"tiny" (the shipped testbed model), a local path or a hub id')
        sub.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "nvfp4"])
        sub.add_argument("--steps", type=int, default=10, help="sampler steps")
        sub.add_argument("--solver", default="euler", choices=["euler", "dpm2", "sde"])

    sample = commands.add_parser("sample", help="write PNGs and one grid image for prompts x seeds")
    add_model_args(sample)
    sample.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for several")
    sample.add_argument("--seed", type=_seeds, default=[0], help="seeds: 7, 0-3 or 1,5,9 (default 0)")
    sample.add_argument("--out", required=True, help="output directory")
    sample.add_argument("--scale", type=int, default=4, help="grid upscaling factor")
    sample.set_defaults(run=cmd_sample)

    evaluate = commands.add_parser("eval", help="strict verifier accuracy on the tiny eval prompts, per task type")
    add_model_args(evaluate)
    evaluate.add_argument("--seeds-per-prompt", type=int, default=8)
    evaluate.add_argument("--json", help="also write the result as JSON here")
    evaluate.set_defaults(run=cmd_eval)

    pretrain = commands.add_parser("pretrain-tiny", help="pretrain the tiny testbed policy from scratch on the procedural world")
    pretrain.add_argument("--out", required=True, help="output directory (diffusers layout)")
    pretrain.add_argument("--steps", type=int, default=4000)
    pretrain.add_argument("--batch-size", type=int, default=64)
    pretrain.add_argument("--lr", type=float, default=1e-3)
    pretrain.add_argument("--seed", type=int, default=0)
    pretrain.add_argument("--save-every", type=int, default=0, help="also save step-N snapshots every N steps")
    pretrain.set_defaults(run=cmd_pretrain_tiny)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main(sys.argv[1:])
