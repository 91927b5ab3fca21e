"""The `solray` command line: train, sample and reward-server, plus the commands plug-ins register.

A plug-in command is a `solray.commands` entry point naming an object with `help` (one line),
`loads_policy` (True: the command gets --model, --lora, --precision, --steps and --solver, and
`run(args, policy)` receives the loaded policy; False: `run(args)`), and
`add_arguments(parser)`; the parser offers `parser.number(kind, low, high=None, strict=False)`,
an argument type refusing numbers outside the bounds. A usage error inside `run` is an
argparse.ArgumentTypeError.

A user error (a bad argument, recipe, model path, LoRA directory or reward name) exits 2 with one
line naming the input; `--debug` shows its traceback too. A traceback without --debug is a solray bug.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np

COMMANDS_ENTRY_POINT_GROUP = "solray.commands"
MAX_SEEDS = 10_000  # images a seed list may ask for; 0-999999999 would fill memory before drawing one


def _seeds(text: str) -> list[int]:
    """'7' -> [7]; '0-3' -> [0, 1, 2, 3]; '1,5,9' -> [1, 5, 9]."""
    seeds: list[int] = []
    for part in text.split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part.strip())
        if not match:
            raise argparse.ArgumentTypeError(f"bad seed list {text!r}: use 7, 0-3 or 1,5,9")
        first, last = int(match[1]), int(match[2] or match[1])
        if last < first:
            raise argparse.ArgumentTypeError(f"bad seed list {text!r}: the range {part.strip()} runs backwards")
        if len(seeds) + last - first + 1 > MAX_SEEDS:
            raise argparse.ArgumentTypeError(f"bad seed list {text!r}: more than {MAX_SEEDS} seeds")
        seeds += list(range(first, last + 1))
    return seeds


def _slug(prompt: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:60]


def cmd_train(args: argparse.Namespace) -> None:
    from rl.config import RecipeError, load_recipe
    from rl.trainer import NonFiniteTrainingError
    from solray.driver import ActorLostError, RewardFailedError, train
    from solray.tracking import evaluation_summary

    try:
        recipe = load_recipe(args.recipe, args.overrides)
        result = train(recipe)
    except (RecipeError, FileExistsError) as error:  # a bad recipe, or run.resume=never on an earlier run's checkpoint
        if args.debug:
            raise
        print(f"solray train: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except (NonFiniteTrainingError, ActorLostError, RewardFailedError) as error:  # inf / NaN training, a learner died, a reward failed
        if args.debug:
            raise
        print(f"solray train: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    last = result.history[-1] if result.history else {}
    rewards = ", ".join(f"{k} {v:.4f}" for k, v in last.items() if k.startswith("reward/"))
    summary = evaluation_summary(result.evaluations)
    print((summary + "\n") if summary else "", end="")
    print(f"{len(result.history)} steps done ({rewards or 'no steps'}); metrics, grids and checkpoints in {result.output_dir}")


class UsageError(Exception):
    """A user's input that cannot be used; main() prints it and exits 2."""


class CommandParser(argparse.ArgumentParser):
    """argparse's parser with bounded number argument types (plug-in commands get one too)."""

    @staticmethod
    def number(kind: type, low: float, high: float | None = None, strict: bool = False):
        """An argument type: `kind` (int or float) >= low (> low when strict) and <= high."""

        def parse(text: str):
            bound = f"{'>' if strict else '>='} {low:g}" + (f" and <= {high:g}" if high is not None else "")
            try:
                value = kind(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'} {bound}") from None
            if not math.isfinite(value) or value < low or (strict and value == low) or (high is not None and value > high):
                raise argparse.ArgumentTypeError(f"{text!r} is not {bound}")
            return value

        return parse


def _load_policy(args: argparse.Namespace, precision: str):
    """--model in `precision`, with --lora (a training checkpoint) attached; nvfp4 and fp8 quantize the merged weights."""
    from quant import quantize_policy
    from rl.checkpoint import CheckpointError, attach_lora
    from rollout import load_policy
    from rollout.policy import QUANTIZED_PRECISIONS, TRAINABLE_ADAPTER, unquantized_precision

    try:
        policy = load_policy(args.model, precision=unquantized_precision(precision))
    except (ValueError, OSError) as error:
        raise UsageError(f"--model {args.model!r}: {error}") from error
    if args.lora:
        try:
            attach_lora(policy, args.lora)
        except (ValueError, OSError, KeyError, CheckpointError) as error:
            raise UsageError(f"--lora {args.lora!r}: {error}") from error
    if precision in QUANTIZED_PRECISIONS:
        return quantize_policy(policy, precision, adapter=TRAINABLE_ADAPTER)
    return policy


def cmd_sample(args: argparse.Namespace) -> None:
    from rewards import build_reward
    from rollout.images import image_grid, save_png
    from rollout.samplers import sample

    try:
        reward = build_reward(args.reward) if args.reward else None
    except (ValueError, TypeError) as error:
        raise UsageError(f"--reward {args.reward!r}: {error}") from error
    policy = _load_policy(args, args.precision)
    pairs = [(p, s) for p in args.prompt for s in args.seed]
    out = sample(policy, [p for p, _ in pairs], [s for _, s in pairs], args.steps, solver=args.solver, batch_size=96, progress=True)
    out_dir = Path(args.out)
    for i, (image, (prompt, seed)) in enumerate(zip(out.images, pairs)):
        save_png(image, out_dir / f"{i:03d}_{_slug(prompt)}_seed{seed}.png")
    grid = save_png(image_grid(out.images, columns=len(args.seed), scale=args.scale), out_dir / "grid.png")
    print(f"wrote {len(pairs)} images and {grid} (rows = prompts, columns = seeds)")
    scores = None if reward is None else reward.score(out.images, [p for p, _ in pairs])
    if scores is not None and np.isfinite(scores).any():  # NaN everywhere: the reward does not apply to these prompts
        for prompt in args.prompt:
            mine = np.array([score for score, (p, _) in zip(scores, pairs) if p == prompt])
            extra = reward.eval_metrics(mine, [prompt] * len(mine))
            print(
                f"  {prompt!r}: {reward.name} reward {mine.mean():.3f}"
                + "".join(f", {key} {value:.3f}" for key, value in extra.items() if not key.endswith("_se"))
            )
    if args.compare_precision:
        # The same prompts x seeds in a second precision; compare.png puts the two grids side by side.
        other_policy = _load_policy(args, args.compare_precision)
        other = sample(
            other_policy, [p for p, _ in pairs], [s for _, s in pairs], args.steps, solver=args.solver, batch_size=96, progress=True
        )
        grids = [image_grid(images, columns=len(args.seed), scale=args.scale) for images in (out.images, other.images)]
        gap = np.full((grids[0].shape[0], 4 * args.scale, 3), 255, dtype=np.uint8)
        compare = save_png(np.concatenate([grids[0], gap, grids[1]], axis=1), out_dir / "compare.png")
        difference = np.abs(out.images.astype(np.int16) - other.images).mean()
        print(
            f"wrote {compare}: left {args.precision}, right {args.compare_precision} (same seeds); mean |pixel difference| {difference:.2f}"
        )
        if scores is not None and np.isfinite(scores).any():
            other_scores = reward.score(other.images, [p for p, _ in pairs])
            print(
                f"  {reward.name} reward: {args.precision} {np.nanmean(scores):.3f}, {args.compare_precision} {np.nanmean(other_scores):.3f}"
            )


def _unique_keys(pairs: list[tuple[str, object]], flag: str) -> dict[str, object]:
    """Repeated key=value flags as a dict; a key given twice is an error rather than a silent overwrite."""
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise UsageError(f"{flag} {key} given twice ({result[key]!r} and {value!r})")
        result[key] = value
    return result


def _reward_kwarg(text: str) -> tuple[str, object]:
    """'model=/ckpt' -> ('model', '/ckpt'); values that parse as JSON (numbers, true, null, lists) are typed."""
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"bad reward argument {text!r}: use key=value, e.g. model=/path/to/checkpoint")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def cmd_reward_server(args: argparse.Namespace) -> None:
    import os

    from rewards.remote import TOKEN_ENV
    from rewards.server import ServerSettings
    from solray.reward_server import Replicas, reward_server

    kwargs = _unique_keys(args.arg, "--arg")
    try:
        settings = ServerSettings(
            host=args.host,
            port=args.port,
            max_batch=args.max_batch,
            batch_wait_s=args.batch_wait_ms / 1000,
            max_request_bytes=int(args.max_request_mb * 2**20),
            max_request_pixels=int(args.max_request_mpx * 2**20),
            max_inflight_bytes=int(args.max_inflight_mb * 2**20),
            max_connections=args.max_connections,
            request_timeout_s=args.request_timeout_s,
            token=args.token if args.token is not None else os.environ.get(TOKEN_ENV),
            insecure=args.insecure,
        ).check()
        replicas = Replicas(args.replicas, args.max_replicas, args.gpus).check()
    except ValueError as error:
        raise UsageError(f"reward-server: {error}") from error
    try:
        with reward_server(args.reward, kwargs, settings, replicas) as url:
            print(f"serving reward {args.reward!r} on {url} (POST /score, GET /health); Ctrl-C or SIGTERM stops it", flush=True)
            _wait_for_ctrl_c()
    except ValueError as error:  # the reward does not resolve, does not take --arg, or its replicas failed to start
        raise UsageError(str(error)) from error
    except (OSError, OverflowError) as error:  # a host that does not resolve, a port in use
        raise UsageError(f"cannot listen on {args.host}:{args.port}: {error}") from error


def _wait_for_ctrl_c() -> None:
    """Block until Ctrl-C or SIGTERM (the server runs on other threads); the caller then stops it and its replicas."""
    import signal
    import threading

    stop = threading.Event()
    for signal_number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signal_number, lambda *_: stop.set())
    while not stop.wait(1.0):  # a timed wait lets the signal handlers run
        pass


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="solray", description="RL post-training of text-to-image flow models on Ray.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of user errors too")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=CommandParser)
    number = CommandParser.number

    def add_model_args(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--model", default="tiny", help='"tiny" (the shipped testbed model), a local path or a hub id')
        sub.add_argument("--lora", help="a LoRA trained by `solray train`: output_dir/checkpoints/step_N (or its lora/ folder)")
        sub.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "nvfp4", "fp8"])
        sub.add_argument("--steps", type=number(int, 1), default=10, help="sampler steps")
        sub.add_argument("--solver", default="euler", choices=["euler", "dpm2", "sde", "cps"])

    train = commands.add_parser("train", help="run a recipe: RL post-training on Ray (local Ray when none is running)")
    train.add_argument("recipe", help="recipe YAML, e.g. recipes/tiny_solrl.yaml")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides with YAML values: run.steps=3 sol.pool_size=48")
    train.set_defaults(run=cmd_train)

    sample = commands.add_parser("sample", help="write PNGs and one grid image for prompts x seeds")
    add_model_args(sample)
    sample.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for several")
    sample.add_argument("--seed", type=_seeds, default=[0], help="seeds: 7, 0-3 or 1,5,9 (default 0)")
    sample.add_argument("--out", required=True, help="output directory")
    sample.add_argument("--scale", type=number(int, 1), default=4, help="grid upscaling factor")
    sample.add_argument(
        "--compare-precision",
        choices=["fp32", "bf16", "nvfp4", "fp8"],
        help="also sample in this precision and write compare.png (grids side by side)",
    )
    sample.add_argument(
        "--reward", default="tiny_verifier", help="score the images with this reward where it applies (default tiny_verifier; '' = none)"
    )
    sample.set_defaults(run=cmd_sample)

    reward_server = commands.add_parser("reward-server", help="serve a registered reward over HTTP for the `remote` reward")
    reward_server.add_argument("reward", help="registry name or dotted path 'pkg.module:Class' of the reward to serve")
    reward_server.add_argument(
        "--arg", type=_reward_kwarg, action="append", default=[], help="reward constructor argument key=value; repeat"
    )
    reward_server.add_argument(
        "--host", default="127.0.0.1", help="interface to listen on (0.0.0.0: every one; needs --token or --insecure)"
    )
    reward_server.add_argument("--port", type=number(int, 0, 65535), default=8000, help="port (0 picks a free one)")
    reward_server.add_argument("--max-batch", type=number(int, 1), default=64, help="most images scored in one reward call")
    reward_server.add_argument("--batch-wait-ms", type=number(float, 0), default=5.0, help="how long a batch waits for more requests")
    reward_server.add_argument("--max-request-mb", type=number(float, 0, strict=True), default=64.0, help="larger request bodies get 413")
    reward_server.add_argument(
        "--max-request-mpx",
        type=number(float, 0, strict=True),
        default=32.0,
        help="megapixels (2**20) all images of a request may hold; 413 beyond",
    )
    reward_server.add_argument(
        "--max-inflight-mb", type=number(float, 0, strict=True), default=2048.0, help="bodies and decoded images in flight; 503 beyond"
    )
    reward_server.add_argument("--max-connections", type=number(int, 1), default=256, help="concurrent requests; 503 beyond")
    reward_server.add_argument(
        "--request-timeout-s", type=number(float, 0, strict=True), default=300.0, help="most seconds to score a request"
    )
    reward_server.add_argument("--replicas", type=number(int, 1), default=1, help="Ray Serve replicas of the reward")
    reward_server.add_argument("--max-replicas", type=number(int, 1), help="autoscale up to this many replicas on load")
    reward_server.add_argument("--gpus", type=number(float, 0), help="GPUs per replica (default: what the reward class declares)")
    reward_server.add_argument(
        "--token", help="shared token every request must carry (Authorization: Bearer); prefer the SOLRAY_REWARD_TOKEN variable"
    )
    reward_server.add_argument("--insecure", action="store_true", help="serve beyond loopback without a token")
    reward_server.set_defaults(run=cmd_reward_server)

    for entry in entry_points(group=COMMANDS_ENTRY_POINT_GROUP):
        try:
            plugin = entry.load()
        except Exception as error:  # one broken plug-in must not take the other commands down
            print(f"solray: plug-in command {entry.name!r} ({entry.value}) not loaded: {type(error).__name__}: {error}", file=sys.stderr)
            continue
        sub = commands.add_parser(entry.name, help=plugin.help)
        if plugin.loads_policy:
            add_model_args(sub)
        plugin.add_arguments(sub)
        sub.set_defaults(run=_plugin_runner(plugin))
    return parser


def _plugin_runner(plugin):
    """argparse's `run` for a plug-in command: load the policy first where it asks for one; its usage errors exit 2."""

    def run(args: argparse.Namespace) -> None:
        try:
            plugin.run(args, _load_policy(args, args.precision)) if plugin.loads_policy else plugin.run(args)
        except argparse.ArgumentTypeError as error:
            raise UsageError(str(error)) from error

    return run


def main(argv: list[str] | None = None) -> None:
    from rl.config import RecipeError

    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (UsageError, RecipeError) as error:
        if args.debug:
            raise
        print(f"solray: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main(sys.argv[1:])
